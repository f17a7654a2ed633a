"""APDB load per detector on the ``bench visit`` case: ``python -m bench apdb-load``.

``python -m bench apdb-load [--json PATH] [--apdb sqlite,postgresql] [--url URL]
[--repeat R] [--detectors N] [--cache-root DIR]``

The case is the one ``python -m bench visit`` runs (built or found by
:func:`bench.history.prepare`: 189 detectors, 12 months of history in the
APDB). For each detector, the load stage runs as the pipeline runs it
(:func:`flows.detector.load_detector`: the DiaObjects of the padded footprint,
cut to the detector, and their DiaSources and DiaForcedSources of the history
window before the visit); only the stage is timed, not the reading of the
detector's bundle (one untimed call first reads it, and warms the database
pages the detector touches). Then ``--repeat`` timed calls: this process's CPU
time (``time.process_time``; on PostgreSQL the server's work is not in it) and
the wall time, the median of the repeats per detector; the figures are the
medians and sums over the detectors.

By default each backend reads a fresh copy of the case's template APDB
(:func:`bench.history.fresh_apdb`); ``--url`` reads the given database instead
(one backend), e.g. a copy upgraded with ``python -m apdb migrate``. The
``digest`` is a hash of every frame loaded (sorted by ID), so two runs — two
layouts, or two versions of the code — can be checked to load the same rows.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import statistics
import time
from pathlib import Path

import pandas as pd

from bench.history import HistorySpec, drop_copy, fresh_apdb, prepare

__all__ = ["main", "measure"]

_ORDER = {"objects": "diaObjectId", "sources": "diaSourceId", "forced": "diaForcedSourceId"}


def _digest(loaded, h) -> None:
    for name, key in _ORDER.items():
        frame = getattr(loaded, name).sort_values(key, kind="stable").reset_index(drop=True)
        h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())


def measure(
    bundle_root: str,
    visit: int,
    url: str,
    repeat: int,
    detectors: int | None,
    apdb_settings: dict | None = None,
) -> dict:
    """Time ``load_detector`` on every detector of ``visit`` against the APDB at ``url``.

    ``apdb_settings``: further ``ApdbConfig`` fields (``sqlite_mmap_mb``).
    """
    from core.bundle import read_visit_info
    from flows import detector as D
    from flows.config import PipelineConfig

    config = PipelineConfig.model_validate(
        {
            "apdb": {"url": url, "auto_create": False, **(apdb_settings or {})},
            "orchestration": {"bundle_cache_mb": 64},
        }
    )
    info = read_visit_info(bundle_root, visit)
    dets = list(info.detectors)[:detectors] if detectors else list(info.detectors)
    gc.collect()
    gc.freeze()  # as a pipeline worker does after start-up (flows.visit)
    cpu: list[float] = []
    wall: list[float] = []
    rows = {"objects": 0, "sources": 0, "forced": 0}
    h = hashlib.blake2b(digest_size=8)
    for det in dets:
        loaded = D.load_detector(bundle_root, info, det, config)  # reads the bundle
        for name in rows:
            rows[name] += len(getattr(loaded, name))
        _digest(loaded, h)
        c_rep, w_rep = [], []
        for _ in range(repeat):
            c0, t0 = time.process_time(), time.perf_counter()
            D.load_detector(bundle_root, info, det, config)
            t1, c1 = time.perf_counter(), time.process_time()
            c_rep.append(c1 - c0)
            w_rep.append(t1 - t0)
        cpu.append(statistics.median(c_rep))
        wall.append(statistics.median(w_rep))
    D.get_apdb(config).close()
    gc.unfreeze()
    return {
        "detectors": len(dets),
        "repeat": repeat,
        "cpu_ms_median": 1000 * statistics.median(cpu),
        "wall_ms_median": 1000 * statistics.median(wall),
        "cpu_s_sum": sum(cpu),
        "wall_s_sum": sum(wall),
        "rows": rows,
        "digest": h.hexdigest(),
        "load_average": os.getloadavg()[0],
    }


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench apdb-load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--apdb", default="sqlite,postgresql", help="backends, comma-separated")
    parser.add_argument("--url", help="measure this APDB (one backend) instead of a fresh copy")
    parser.add_argument("--repeat", type=int, default=3, help="timed loads per detector")
    parser.add_argument("--detectors", type=int, help="only the first N detectors")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache-root", type=Path, default=Path(".bench-cache"))
    parser.add_argument(
        "--sqlite-mmap-mb", type=int, help="apdb.sqlite_mmap_mb (default: the config's)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    backends = [b for b in args.apdb.split(",") if b]
    unknown = sorted(set(backends) - {"sqlite", "postgresql"})
    if unknown:
        parser.error(f"--apdb: unknown backend(s) {unknown}; choose from sqlite, postgresql")
    if args.url and len(backends) != 1:
        parser.error("--url needs exactly one backend in --apdb")
    spec = HistorySpec(seed=args.seed)
    results = {}
    for backend in backends:
        prepared = prepare(spec, backend, cache_root=args.cache_root)
        url = args.url or fresh_apdb(prepared, backend, "load")
        try:
            settings = {}
            if args.sqlite_mmap_mb is not None:
                settings["sqlite_mmap_mb"] = args.sqlite_mmap_mb
            r = measure(
                prepared.bundle_root, prepared.visit, url, args.repeat, args.detectors, settings
            )
        finally:
            if not args.url:
                drop_copy(prepared, backend, "load")
        results[backend] = r
        print(
            f"{backend:10s} {r['detectors']} detectors: load per detector (median) "
            f"CPU {r['cpu_ms_median']:6.1f} ms  wall {r['wall_ms_median']:6.1f} ms;  "
            f"sum CPU {r['cpu_s_sum']:5.2f} s  wall {r['wall_s_sum']:5.2f} s;  rows "
            f"{r['rows']['objects']:,}/{r['rows']['sources']:,}/{r['rows']['forced']:,}  "
            f"digest {r['digest']}  load {r['load_average']:.1f}",
            flush=True,
        )
    headline = {}
    for backend, r in results.items():
        headline[f"load_cpu_ms_{backend}"] = r["cpu_ms_median"]
        headline[f"load_wall_ms_{backend}"] = r["wall_ms_median"]
    return {"headline": headline, "results": results}
