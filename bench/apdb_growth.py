"""APDB growth: per-detector load and store time as the database grows in time and in sky.

``python -m bench apdb-growth [--json PATH] [--backends sqlite,postgresql]
[--objects-per-detector N] [--passes P]``

Three databases are built with :meth:`Apdb.bulk_load`, in time order (one bulk
load per 30 visits, rows of a visit together), as the nightly stores would have
written them, so that one object's DiaSources are scattered through the tables:

- ``1x``: a field of 3 x 3 detector footprints (0.2 deg square), N objects per
  footprint, 120 visits at a 3-day cadence (the 360-day history window); each
  object is detected with probability 0.05 and force-measured with probability
  0.075 per visit (means 6 and 9 in the window, close to the ~14,000 history
  rows per detector of the ``bench visit`` case at N = 1,000).
- ``4x-time``: the same field with three more years of visits before the
  window: 4x the DiaSource and DiaForcedSource rows.
- ``16x-sky``: the same density and history over a 12 x 12 field (16x the
  area), which contains the 3 x 3 field.

The 9 core footprints hold the same objects and, inside the window, the same
detections in all three databases (which objects a visit detects comes from a
random stream seeded by the footprint's grid position and the visit), so a
load returns the same number of rows of the same objects everywhere and any difference in time is the cost of the table's size. What
this does not cover is the growth of ``DiaObjectLast`` itself over the years
(objects made by one-off detections stay in the table and in every later load
of their footprint): that grows the *result*, not the table, and is a matter
for de-duplication and object retirement.

For each of the 9 core footprints the benchmark times what a detector does:
load its DiaObjects (``get_objects`` on the footprint), their DiaSources and
DiaForcedSources since ``history_start`` (the pipeline's three loads), then a
store of 50 new DiaSources (half on loaded objects), their DiaObjects and 50
forced sources as a new (visit, detector).
After the build, :meth:`ApdbSql.optimize` settles the database as a database in
service is (planner statistics; on SQLite the build's write-ahead log folded in
and truncated, on PostgreSQL ``VACUUM (ANALYZE)``). Each case is built and
measured in a process of its own, so that one case's build (its heap, its
connections) cannot slow the next case's reads. ``--passes`` passes go over the
9 footprints; the first warms the caches and is not counted; the figure is the
median over the remaining passes and footprints.

Headline per backend: ``growth_time_4x`` and ``growth_sky_16x`` = median
(load + store) wall time at 4x-time / 16x-sky over the time at 1x; the
``cpu_growth_*`` figures are the same ratios of this process's CPU time, which a
busy machine disturbs less (on PostgreSQL they leave out the server's work).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from apdb import sdm
from apdb.config import ApdbConfig
from apdb.region import Polygon
from apdb.sql import ApdbSql
from bench.apdb import _fill, _pg_reachable, database

RA0, DEC0 = 45.0, -30.0
DET_SIDE = 0.2  # deg
GRID = 12  # cells per side of the 16x sky field
CORE = (4, 5, 6)  # grid indices of the 3 x 3 field
CADENCE = 3.0  # days between visits
WINDOW_VISITS = 120  # visits inside the 360-day window
T_NOW = 61000.0  # MJD TAI of the measured visits
P_DETECT, P_FORCED = 0.05, 0.075
CHUNK_VISITS = 30
N_NEW = 50  # sources stored per measured detector

CASES = {
    "1x": {"cells": [(i, j) for i in CORE for j in CORE], "visits": WINDOW_VISITS},
    "4x-time": {"cells": [(i, j) for i in CORE for j in CORE], "visits": 4 * WINDOW_VISITS},
    "16x-sky": {
        "cells": [(i, j) for i in range(GRID) for j in range(GRID)],
        "visits": WINDOW_VISITS,
    },
}


def cell_polygon(i: int, j: int) -> Polygon:
    """The footprint of grid cell (i, j): 0.2 deg square on a constant-RA-width grid."""
    c = np.cos(np.radians(DEC0))
    ra_lo = RA0 + (i - GRID / 2) * DET_SIDE / c
    dec_lo = DEC0 + (j - GRID / 2) * DET_SIDE
    ra_hi, dec_hi = ra_lo + DET_SIDE / c, dec_lo + DET_SIDE
    return Polygon([ra_lo, ra_hi, ra_hi, ra_lo], [dec_lo, dec_lo, dec_hi, dec_hi])


def _cell_index(i: int, j: int) -> int:
    return i * GRID + j


def cell_objects(i: int, j: int, n: int, seed: int) -> pd.DataFrame:
    """The DiaObjects of cell (i, j): the same in every case."""
    rng = np.random.default_rng([seed, i, j, 0])
    poly = cell_polygon(i, j)
    objects = pd.DataFrame(_fill("DiaObject", n, rng))
    # strictly inside the cell, so a footprint's load never sees a neighbour's objects
    eps = 1e-6
    objects["ra"] = rng.uniform(min(poly.ra) + eps, max(poly.ra) - eps, n)
    objects["dec"] = rng.uniform(min(poly.dec) + eps, max(poly.dec) - eps, n)
    objects["diaObjectId"] = 1 + _cell_index(i, j) * 10**6 + np.arange(n, dtype=np.int64)
    objects["validityStartMjdTai"] = T_NOW - 4 * WINDOW_VISITS * CADENCE - 1.0
    return objects


def _visit_time(k: int) -> float:
    """MJD of visit k; k = 0 is the last visit before the measured one, counting back."""
    return T_NOW - CADENCE * (k + 1)


def cell_masks(i: int, j: int, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of cell (i, j)'s objects are detected / force-measured in visit k (back from now)."""
    rng = np.random.default_rng([seed, i, j, 1, k])
    return rng.random(n) < P_DETECT, rng.random(n) < P_FORCED


def _rows(table: str, parts: list[tuple], rng: np.random.Generator, id_base: int) -> pd.DataFrame:
    """One frame of ``table`` rows from ((ids, ra, dec), mask, visit, detector, time) parts.

    The identity columns (IDs, position, visit, detector, time) come from the
    parts; every other SDM column is filled at random.
    """
    ids, ra, dec, visit, det, t = [], [], [], [], [], []
    for (o_ids, o_ra, o_dec), mask, v, d, tt in parts:
        ids.append(o_ids[mask])
        ra.append(o_ra[mask])
        dec.append(o_dec[mask])
        m = int(mask.sum())
        visit.append(np.full(m, v, dtype=np.int64))
        det.append(np.full(m, d, dtype=np.int64))
        t.append(np.full(m, tt))
    n = sum(len(x) for x in ids)
    df = pd.DataFrame(_fill(table, n, rng))
    key = "diaSourceId" if table == "DiaSource" else "diaForcedSourceId"
    df[key] = id_base + np.arange(n, dtype=np.int64)
    df["diaObjectId"] = np.concatenate(ids)
    df["ra"], df["dec"] = np.concatenate(ra), np.concatenate(dec)
    df["visit"], df["detector"] = np.concatenate(visit), np.concatenate(det)
    df["midpointMjdTai"] = np.concatenate(t)
    if table == "DiaSource":
        df["ssObjectId"] = pd.array([pd.NA] * n, dtype="Int64")
        df["parentDiaSourceId"] = pd.array([pd.NA] * n, dtype="Int64")
    return df


def build(db: ApdbSql, case: str, n_per_cell: int, seed: int) -> dict:
    """Fill ``db`` with ``case``, oldest visits first; returns row counts and build time."""
    spec = CASES[case]
    t0 = time.perf_counter()
    cells = spec["cells"]
    objects = {c: cell_objects(*c, n_per_cell, seed) for c in cells}
    columns = {
        c: tuple(o[k].to_numpy() for k in ("diaObjectId", "ra", "dec")) for c, o in objects.items()
    }
    rng = np.random.default_rng([seed, 3])
    first = True
    n_src = n_fsrc = 0
    next_id = 1
    for start in range(spec["visits"] - 1, -1, -CHUNK_VISITS):
        src_parts, frc_parts = [], []
        for k in range(start, max(start - CHUNK_VISITS, -1), -1):
            visit, t = 10_000 + (10**5 - k), _visit_time(k)
            for c in cells:
                det, frc = cell_masks(*c, n_per_cell, k, seed)
                src_parts.append((columns[c], det, visit, _cell_index(*c), t))
                frc_parts.append((columns[c], frc, visit, _cell_index(*c), t))
        srcs = _rows("DiaSource", src_parts, rng, next_id)
        next_id += len(srcs)
        fsrcs = _rows("DiaForcedSource", frc_parts, rng, next_id)
        next_id += len(fsrcs)
        objs = (
            pd.concat(list(objects.values()), ignore_index=True)
            if first
            else sdm.empty_frame("DiaObject")
        )
        db.bulk_load(objs, srcs, fsrcs)
        first = False
        n_src += len(srcs)
        n_fsrc += len(fsrcs)
    build_s = time.perf_counter() - t0
    return {
        "objects": n_per_cell * len(cells),
        "sources": n_src,
        "forced": n_fsrc,
        "build_s": build_s,
    }


def _new_rows(loaded: pd.DataFrame, cell: tuple[int, int], rep: int, seed: int) -> dict:
    """One detector's store: N_NEW sources, half on loaded objects, their objects and forced."""
    rng = np.random.default_rng([seed, *cell, 2, rep])
    n_upd = min(N_NEW // 2, len(loaded))
    upd = sdm.conform(loaded.iloc[rng.choice(len(loaded), n_upd, replace=False)], "DiaObject")
    new = pd.DataFrame(_fill("DiaObject", N_NEW - n_upd, rng))
    poly = cell_polygon(*cell)
    new["ra"] = rng.uniform(min(poly.ra), max(poly.ra), len(new))
    new["dec"] = rng.uniform(min(poly.dec), max(poly.dec), len(new))
    new["diaObjectId"] = 9 * 10**15 + rep * 10**6 + _cell_index(*cell) * 1000 + np.arange(len(new))
    objs = pd.concat([upd, sdm.conform(new, "DiaObject")], ignore_index=True)
    visit, detector, t = 10**6 + rep, _cell_index(*cell), T_NOW + rep * 1e-4
    src = pd.DataFrame(_fill("DiaSource", len(objs), rng))
    src["diaSourceId"] = 8 * 10**15 + rep * 10**6 + _cell_index(*cell) * 1000 + np.arange(len(objs))
    src["diaObjectId"] = objs["diaObjectId"].to_numpy()
    src["ra"], src["dec"] = objs["ra"].to_numpy(), objs["dec"].to_numpy()
    src["visit"], src["detector"], src["midpointMjdTai"] = visit, detector, t
    src["ssObjectId"] = pd.array([pd.NA] * len(src), dtype="Int64")
    src["parentDiaSourceId"] = pd.array([pd.NA] * len(src), dtype="Int64")
    fsrc = pd.DataFrame(_fill("DiaForcedSource", len(objs), rng))
    fsrc["diaForcedSourceId"] = src["diaSourceId"].to_numpy() + 10**14
    fsrc["diaObjectId"] = objs["diaObjectId"].to_numpy()
    fsrc["ra"], fsrc["dec"] = objs["ra"].to_numpy(), objs["dec"].to_numpy()
    fsrc["visit"], fsrc["detector"], fsrc["midpointMjdTai"] = visit, detector, t
    return {"visit": visit, "detector": detector, "time": t, "objs": objs, "src": src, "fsrc": fsrc}


def measure(db: ApdbSql, passes: int, seed: int) -> dict:
    """Time the three loads and the store of each core footprint, ``passes`` times."""
    loads: list[float] = []
    stores: list[float] = []
    load_cpu: list[float] = []
    store_cpu: list[float] = []
    counts: dict[str, list[int]] = {"objects": [], "sources": [], "forced": []}
    cells = CASES["1x"]["cells"]
    for p in range(passes):
        for n, cell in enumerate(cells):
            rep = p * len(cells) + n
            c0, t0 = time.process_time(), time.perf_counter()
            objs = db.get_objects(cell_polygon(*cell))
            ids = objs["diaObjectId"].to_numpy()
            since = db.history_start(T_NOW)
            srcs = db.get_sources(ids, since)
            fsrcs = db.get_forced_sources(ids, since)
            t1, c1 = time.perf_counter(), time.process_time()
            b = _new_rows(objs, cell, rep, seed)
            t2, c2 = time.perf_counter(), time.process_time()
            db.store(b["visit"], b["detector"], b["objs"], b["src"], b["fsrc"], time_mjd=b["time"])
            t3, c3 = time.perf_counter(), time.process_time()
            if p == 0:
                counts["objects"].append(len(objs))
                counts["sources"].append(len(srcs))
                counts["forced"].append(len(fsrcs))
                continue
            loads.append(t1 - t0)
            load_cpu.append(c1 - c0)
            stores.append(t3 - t2)
            store_cpu.append(c3 - c2)
    total = [a + b for a, b in zip(loads, stores, strict=True)]
    total_cpu = [a + b for a, b in zip(load_cpu, store_cpu, strict=True)]
    return {
        "load_ms": 1000 * statistics.median(loads),
        "load_cpu_ms": 1000 * statistics.median(load_cpu),
        "store_ms": 1000 * statistics.median(stores),
        "store_cpu_ms": 1000 * statistics.median(store_cpu),
        "total_ms": 1000 * statistics.median(total),
        "total_cpu_ms": 1000 * statistics.median(total_cpu),
        "loaded_objects": int(statistics.median(counts["objects"])),
        "loaded_sources": int(statistics.median(counts["sources"])),
        "loaded_forced": int(statistics.median(counts["forced"])),
        "samples": len(total),
    }


def run(backend: str, case: str, tmp: Path, n_per_cell: int, passes: int, seed: int) -> dict:
    """Build ``case`` in a fresh database of ``backend`` and measure it."""
    with database(backend, tmp) as url:
        db = ApdbSql.create(ApdbConfig(url=url), drop=True)
        try:
            built = build(db, case, n_per_cell, seed)
            db.optimize()
            figures = measure(db, passes, seed)
        finally:
            db.close()
    return {"backend": backend, "case": case, **built, **figures}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench apdb-growth", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--objects-per-detector", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=4, help="passes over the 9 footprints")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.passes < 2:
        parser.error("--passes must be at least 2 (the first pass only warms the caches)")
    backends = [b for b in args.backends.split(",") if b]
    skipped = {}
    if "postgresql" in backends:
        why = _pg_reachable()
        if why:
            skipped["postgresql"] = why
            backends.remove("postgresql")
            print(f"PostgreSQL skipped: {why}")

    results = []
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-growth-") as tmpdir:
        for backend in backends:
            for case in CASES:
                with ProcessPoolExecutor(1, mp_context=spawn) as one:
                    r = one.submit(
                        run,
                        backend,
                        case,
                        Path(tmpdir),
                        args.objects_per_detector,
                        args.passes,
                        args.seed,
                    ).result()
                results.append(r)
                print(
                    f"  {backend:10s} {case:8s} rows {r['sources']:>9,d} src {r['forced']:>9,d} frc  "
                    f"build {r['build_s']:6.1f} s  load {r['load_ms']:7.1f} ms  "
                    f"store {r['store_ms']:7.1f} ms",
                    flush=True,
                )

    headline: dict[str, float] = {}
    print()
    header = (
        f"{'backend':10s} {'case':8s} {'objects':>8s} {'sources':>10s} {'forced':>10s} "
        f"{'loaded o/s/f':>18s} {'load ms':>8s} {'store ms':>8s} {'total':>8s} {'ratio':>6s} "
        f"{'cpu ms':>7s} {'cpu ratio':>9s}"
    )
    print(header + "\n" + "-" * len(header))
    for backend in backends:
        rows = {r["case"]: r for r in results if r["backend"] == backend}
        base, base_cpu = rows["1x"]["total_ms"], rows["1x"]["total_cpu_ms"]
        for case, r in rows.items():
            ratio = r["total_ms"] / base
            r["ratio"] = ratio
            r["cpu_ratio"] = r["total_cpu_ms"] / base_cpu
            loaded = f"{r['loaded_objects']}/{r['loaded_sources']}/{r['loaded_forced']}"
            print(
                f"{backend:10s} {case:8s} {r['objects']:>8,d} {r['sources']:>10,d} "
                f"{r['forced']:>10,d} {loaded:>18s} {r['load_ms']:8.1f} {r['store_ms']:8.1f} "
                f"{r['total_ms']:8.1f} {ratio:6.2f} {r['total_cpu_ms']:7.1f} {r['cpu_ratio']:9.2f}"
            )
        headline[f"growth_time_4x_{backend}"] = rows["4x-time"]["ratio"]
        headline[f"growth_sky_16x_{backend}"] = rows["16x-sky"]["ratio"]
        headline[f"cpu_growth_time_4x_{backend}"] = rows["4x-time"]["cpu_ratio"]
        headline[f"cpu_growth_sky_16x_{backend}"] = rows["16x-sky"]["cpu_ratio"]
    print(
        "(median per detector over the passes after the first; ratio = total / total at 1x; "
        "cpu = this process's CPU for load + store, the database server's not included)"
    )
    return {"headline": headline, "results": results, "skipped": skipped}
