"""``python -m bench sim``: how fast the simulator makes visits.

Two paths are timed on the default survey (189 LSSTCam-like detectors of
512×512 px, ≈53 DiaSources per detector):

- ``write_visit``: render science/template/difference images, measure the
  DiaSources on the pixels, write the docs/design.md §2 bundle with truth (local disk).
- ``visit_catalog``: the catalog-only fast path used to fill months of APDB
  history (no images).

Wall time and process CPU time are both reported: the machine is shared, so
wall time depends on what else runs; CPU time does not.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from sim.config import SurveyConfig
from sim.survey import Survey


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench sim", description=__doc__.split("\n")[0])
    p.add_argument("--detectors", type=int, default=189)
    p.add_argument("--detector-size", type=int, default=512)
    p.add_argument("--sources-per-detector", type=float, default=53.0)
    p.add_argument("--visits", type=int, default=2, help="visits written with images")
    p.add_argument("--catalog-visits", type=int, default=10, help="visits via the fast path")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="where to write (default: a temp dir)")
    args = p.parse_args(argv)

    cfg = SurveyConfig(
        n_detectors=args.detectors,
        detector_size=args.detector_size,
        sources_per_detector=args.sources_per_detector,
        workers=args.workers,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    survey = Survey(cfg)
    init = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-sim-"))
    writes = []
    try:
        for visit in range(args.visits):
            t0, c0 = time.perf_counter(), time.process_time()
            paths = survey.write_visit(str(out), visit)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            number = cfg.visit_number(visit)  # the directory: day_obs·10⁵ + seq_num
            rows = sum(
                pq.read_metadata(f"{out}/{number}/{d}/diaSources.parquet").num_rows
                for d in survey.detectors
            )
            writes.append(
                {
                    "visit": visit,
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "files": len(paths),
                    "bytes": _du(out / str(number)),
                    "sources_per_detector": rows / len(survey.detectors),
                }
            )
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)

    fast = []
    for visit in range(args.visits, args.visits + args.catalog_visits):
        t0, c0 = time.perf_counter(), time.process_time()
        cat = survey.visit_catalog(visit)
        fast.append(
            {
                "visit": visit,
                "wall_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0,
                "sources_per_detector": len(cat) / len(survey.detectors),
            }
        )

    print(f"survey: {len(survey.sky)} true objects {survey.counts}; init {init['wall_s']:.2f} s")
    print(f"{'path':<14}{'visit':>6}{'wall s':>9}{'cpu s':>9}{'src/det':>9}{'MB':>9}")
    for w in writes:
        print(
            f"{'write_visit':<14}{w['visit']:>6}{w['wall_s']:>9.2f}{w['cpu_s']:>9.2f}"
            f"{w['sources_per_detector']:>9.1f}{w['bytes'] / 1e6:>9.0f}"
        )
    for f in fast:
        print(
            f"{'visit_catalog':<14}{f['visit']:>6}{f['wall_s']:>9.2f}{f['cpu_s']:>9.2f}"
            f"{f['sources_per_detector']:>9.1f}{'':>9}"
        )
    headline = {
        "detectors": len(survey.detectors),
        "write_visit_wall_s": statistics.median(w["wall_s"] for w in writes) if writes else None,
        "write_visit_cpu_s": statistics.median(w["cpu_s"] for w in writes) if writes else None,
        "visit_catalog_wall_s": statistics.median(f["wall_s"] for f in fast) if fast else None,
        "sources_per_detector": statistics.mean(
            [w["sources_per_detector"] for w in writes] + [f["sources_per_detector"] for f in fast]
        ),
    }
    return {
        "config": cfg.model_dump(mode="json"),
        "init": init,
        "write_visit": writes,
        "visit_catalog": fast,
        "headline": headline,
    }
