"""APDB: diapipe's ``ApdbSql`` against Rubin's ``lsst-dax-apdb`` on SQLite and PostgreSQL.

``python -m bench apdb [--json PATH] [--quick] [--backends sqlite,postgresql]``

Both databases get the same synthetic sky: N DiaObjects spread uniformly over a
3 x 3 patch of detector footprints (0.2 deg square each, centred at RA 45,
Dec -30), each with a history of 1 + Poisson(1) DiaSources and Poisson(2)
DiaForcedSources over the previous 300 days (SDM columns all filled). Then, per
"visit" of the central detector, each implementation runs the per-detector APDB
work of a DiaPipelineTask:

1. load objects: the latest DiaObjects in the detector polygon (~N/9 rows);
2. load sources: their DiaSources of the last 360 days;
3. load forced sources: their DiaForcedSources of the last 360 days;
4. store: S new DiaSources, S DiaObjects (S/2 new versions of loaded objects,
   S/2 new objects) and S DiaForcedSources, in one transaction.

Between filling the database and the first timed visit, :func:`settle` does what
autovacuum does to a database in service (``VACUUM (ANALYZE)`` on PostgreSQL,
``ANALYZE`` on SQLite), for both implementations alike.

Each step is timed (median of ``--repeat`` visits), and the client CPU time
of the three loads (``time.process_time``, best of the repeats; the database
server's CPU is not in it). dax_apdb runs with its
production layout (``dia_object_index="last_object_table"``, HTM level 20).
The speedup is dax_apdb time / diapipe time for the load+store total.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from apdb import sdm
from apdb.config import ApdbConfig
from apdb.region import Polygon
from apdb.sql import ApdbSql

RA0, DEC0 = 45.0, -30.0
DET_SIDE = 0.2  # deg
T0 = 61000.0  # MJD TAI of the first benchmark visit
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


# --------------------------------------------------------------------------- data


def _fill(table: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every SDM column of ``table`` filled with plausible random values."""
    out: dict[str, np.ndarray] = {}
    for col in sdm.columns(table):
        dt = col.dtype
        if dt in ("float64", "float32"):
            out[col.name] = rng.normal(100.0, 10.0, n).astype(dt)
        elif dt in ("bool", "boolean"):
            out[col.name] = np.zeros(n, dtype=bool)
        elif dt.lower() in ("int64", "int32", "int16", "int8"):
            out[col.name] = rng.integers(0, 100, n).astype(dt.lower())
        else:
            out[col.name] = np.full(n, "r", dtype=object)
    return out


def _positions(n: int, rng: np.random.Generator, half: float) -> tuple[np.ndarray, np.ndarray]:
    dec = DEC0 + rng.uniform(-half, half, n)
    ra = RA0 + rng.uniform(-half, half, n) / np.cos(np.radians(DEC0))
    return ra, dec


def detector_region() -> Polygon:
    """The central detector's footprint."""
    h = DET_SIDE / 2
    c = np.cos(np.radians(DEC0))
    return Polygon(
        [RA0 - h / c, RA0 + h / c, RA0 + h / c, RA0 - h / c],
        [DEC0 - h, DEC0 - h, DEC0 + h, DEC0 + h],
    )


def make_history(n_objects: int, seed: int = 1) -> list[dict]:
    """Batches of (visit, detector, time, objects, sources, forced) that build the sky.

    Batch (k, c) holds the k-th DiaSource and k-th DiaForcedSource of every object
    of chunk c (10,000 objects); the objects themselves come with k = 0.
    """
    rng = np.random.default_rng(seed)
    ra, dec = _positions(n_objects, rng, 1.5 * DET_SIDE)
    obj_ids = np.arange(1, n_objects + 1, dtype=np.int64)
    n_src = np.minimum(1 + rng.poisson(1.0, n_objects), 8)
    n_fsrc = np.minimum(rng.poisson(2.0, n_objects), 8)
    objects = pd.DataFrame(_fill("DiaObject", n_objects, rng))
    objects["diaObjectId"], objects["ra"], objects["dec"] = obj_ids, ra, dec
    objects["nDiaSources"] = n_src.astype(np.int32)
    batches = []
    chunk = 10_000
    next_src = 10 * n_objects
    for k in range(8):
        visit = 1000 + k
        t = T0 - 300.0 + 37.0 * k
        for c in range(0, n_objects, chunk):
            sel = slice(c, min(c + chunk, n_objects))
            det = c // chunk
            ids = obj_ids[sel]
            s_ids = ids[n_src[sel] > k]
            f_ids = ids[n_fsrc[sel] > k]
            src = pd.DataFrame(_fill("DiaSource", len(s_ids), rng))
            src["diaSourceId"] = np.arange(next_src, next_src + len(s_ids), dtype=np.int64)
            next_src += len(s_ids)
            src["diaObjectId"] = s_ids
            src["ra"], src["dec"] = ra[s_ids - 1], dec[s_ids - 1]
            src["visit"], src["detector"], src["midpointMjdTai"] = visit, det, t
            src["ssObjectId"] = pd.array([pd.NA] * len(s_ids), dtype="Int64")
            src["parentDiaSourceId"] = pd.array([pd.NA] * len(s_ids), dtype="Int64")
            fsrc = pd.DataFrame(_fill("DiaForcedSource", len(f_ids), rng))
            fsrc["diaForcedSourceId"] = np.arange(next_src, next_src + len(f_ids), dtype=np.int64)
            next_src += len(f_ids)
            fsrc["diaObjectId"] = f_ids
            fsrc["ra"], fsrc["dec"] = ra[f_ids - 1], dec[f_ids - 1]
            fsrc["visit"], fsrc["detector"], fsrc["midpointMjdTai"] = visit, det, t
            objs = objects.iloc[sel].reset_index(drop=True) if k == 0 else objects.iloc[0:0]
            batches.append(
                {
                    "visit": visit,
                    "detector": det,
                    "time": t,
                    "objects": objs,
                    "sources": src,
                    "forced": fsrc,
                }
            )
    return batches


def make_visit(
    rep: int, n_sources: int, loaded_ids: np.ndarray, sky: pd.DataFrame, seed: int
) -> dict:
    """One detector's new catalogs: S sources, S objects (half updated), S forced sources.

    The updated objects are full rows of ``sky`` (the generated objects) whose
    IDs were among the loaded ones: dax_apdb's load returns only a column subset.
    """
    rng = np.random.default_rng(seed + rep)
    visit, det, t = 5000 + rep, 0, T0 + rep * 1e-5
    known = loaded_ids[loaded_ids <= len(sky)]
    n_upd = min(n_sources // 2, len(known))
    n_new = n_sources - n_upd
    upd = sky.iloc[rng.choice(known, n_upd, replace=False) - 1]
    new = pd.DataFrame(_fill("DiaObject", n_new, rng))
    new["diaObjectId"] = 10**9 * (rep + 1) + np.arange(n_new, dtype=np.int64)
    new["ra"], new["dec"] = _positions(n_new, rng, 0.45 * DET_SIDE)
    objs = pd.concat(
        [sdm.conform(upd, "DiaObject"), sdm.conform(new, "DiaObject")], ignore_index=True
    )
    objs["nDiaSources"] = objs["nDiaSources"] + 1
    src = pd.DataFrame(_fill("DiaSource", len(objs), rng))
    src["diaSourceId"] = 10**12 * (rep + 1) + np.arange(len(objs), dtype=np.int64)
    src["diaObjectId"] = objs["diaObjectId"].to_numpy()
    src["ra"], src["dec"] = objs["ra"].to_numpy(), objs["dec"].to_numpy()
    src["visit"], src["detector"], src["midpointMjdTai"] = visit, det, t
    src["ssObjectId"] = pd.array([pd.NA] * len(objs), dtype="Int64")
    src["parentDiaSourceId"] = pd.array([pd.NA] * len(objs), dtype="Int64")
    fsrc = pd.DataFrame(_fill("DiaForcedSource", len(objs), rng))
    fsrc["diaForcedSourceId"] = 10**13 * (rep + 1) + np.arange(len(objs), dtype=np.int64)
    fsrc["diaObjectId"] = objs["diaObjectId"].to_numpy()
    fsrc["ra"], fsrc["dec"] = objs["ra"].to_numpy(), objs["dec"].to_numpy()
    fsrc["visit"], fsrc["detector"], fsrc["midpointMjdTai"] = visit, det, t
    return {
        "visit": visit,
        "detector": det,
        "time": t,
        "objects": objs,
        "sources": src,
        "forced": fsrc,
    }


# --------------------------------------------------------------------------- adapters


class Diapipe:
    """diapipe's ApdbSql."""

    name = "diapipe"

    def __init__(self, url: str):
        self.db = ApdbSql.create(ApdbConfig(url=url), drop=True)

    def store(self, b: dict) -> None:
        self.db.store(
            b["visit"], b["detector"], b["objects"], b["sources"], b["forced"], time_mjd=b["time"]
        )

    def load_objects(self, region: Polygon) -> pd.DataFrame:
        return self.db.get_objects(region)

    def load_sources(self, ids: np.ndarray, t: float) -> pd.DataFrame:
        return self.db.get_sources(ids, self.db.history_start(t))

    def load_forced(self, ids: np.ndarray, t: float) -> pd.DataFrame:
        return self.db.get_forced_sources(ids, self.db.history_start(t))

    def close(self) -> None:
        self.db.close()


class DaxApdb:
    """lsst-dax-apdb's ApdbSql with its production layout."""

    name = "dax_apdb"

    def __init__(self, url: str):
        from lsst.dax.apdb import Apdb
        from lsst.dax.apdb.sql import ApdbSql as DaxApdbSql

        # dax_apdb's PostgreSQL path is written for psycopg2 (SQLAlchemy's default
        # postgresql driver): with psycopg 3 its all-None validityEnd column is bound
        # as VARCHAR and the insert fails.
        url = url.replace("postgresql+psycopg://", "postgresql+psycopg2://")
        config = DaxApdbSql.init_database(
            db_url=url, dia_object_index="last_object_table", drop=True
        )
        self.db = Apdb.from_config(config)

    @staticmethod
    def _time(t: float):
        import astropy.time

        return astropy.time.Time(t, format="mjd", scale="tai")

    def store(self, b: dict) -> None:
        self.db.store(self._time(b["time"]), b["objects"], b["sources"], b["forced"])

    def region(self, region: Polygon):
        from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

        return ConvexPolygon(
            [
                UnitVector3d(LonLat.fromDegrees(r, d))
                for r, d in zip(region.ra, region.dec, strict=True)
            ]
        )

    def load_objects(self, region) -> pd.DataFrame:
        return self.db.getDiaObjects(region)

    def load_sources(self, ids: np.ndarray, t: float) -> pd.DataFrame:
        return self.db.getDiaSources(None, ids.tolist(), self._time(t))

    def load_forced(self, ids: np.ndarray, t: float) -> pd.DataFrame:
        return self.db.getDiaForcedSources(None, ids.tolist(), self._time(t))

    def close(self) -> None:
        self.db._engine.dispose()


# --------------------------------------------------------------------------- databases


@contextlib.contextmanager
def database(backend: str, tmp: Path) -> Iterator[str]:
    """A fresh empty database URL, removed afterwards."""
    if backend == "sqlite":
        path = tmp / f"apdb-{uuid.uuid4().hex[:8]}.sqlite3"
        try:
            yield f"sqlite:///{path}"
        finally:
            for p in tmp.glob(path.name + "*"):
                p.unlink()
        return
    import sqlalchemy as sa

    name = f"bench_apdb_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def settle(url: str) -> None:
    """What autovacuum does to a database in service, before the timed visits.

    ``VACUUM (ANALYZE)`` on PostgreSQL (planner statistics, and the visibility map
    that lets an index-only scan skip the table), ``ANALYZE`` on SQLite; the same
    for both implementations.
    """
    import sqlalchemy as sa

    engine = sa.create_engine(
        url if "://" in url else f"sqlite:///{url}", isolation_level="AUTOCOMMIT"
    )
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE)" if "postgresql" in url else "ANALYZE")
    finally:
        engine.dispose()


def run_case(impl_cls, url: str, history: list[dict], sizes, repeat: int, seed: int):
    """Populate, then time the per-detector steps for each S; returns rows of figures."""
    impl = impl_cls(url)
    try:
        t = time.perf_counter()
        for b in history:
            impl.store(b)
        populate_s = time.perf_counter() - t
        settle(url)
        region = detector_region()
        sky = pd.concat([b["objects"] for b in history], ignore_index=True)
        reg = impl.region(region) if hasattr(impl, "region") else region
        rows = []
        for s in sizes:
            times: dict[str, list[float]] = {
                k: [] for k in ("objects", "sources", "forced", "store", "load_cpu")
            }
            counts = {}
            for rep in range(repeat):
                rep_id = s * 100 + rep
                visit_t = T0 + rep_id * 1e-5
                c0, t0 = time.process_time(), time.perf_counter()
                objs = impl.load_objects(reg)
                t1 = time.perf_counter()
                inside = objs.loc[region.contains(objs["ra"].to_numpy(), objs["dec"].to_numpy())]
                t1 = time.perf_counter()
                ids = inside["diaObjectId"].to_numpy()
                srcs = impl.load_sources(ids, visit_t)
                t2 = time.perf_counter()
                fsrcs = impl.load_forced(ids, visit_t)
                t3, c3 = time.perf_counter(), time.process_time()
                batch = make_visit(rep_id, s, inside["diaObjectId"].to_numpy(), sky, seed)
                t4 = time.perf_counter()
                impl.store(batch)
                t5 = time.perf_counter()
                times["objects"].append(t1 - t0)
                times["sources"].append(t2 - t1)
                times["forced"].append(t3 - t2)
                times["store"].append(t5 - t4)
                times["load_cpu"].append(c3 - c0)
                counts = {"n_objects": len(inside), "n_sources": len(srcs), "n_forced": len(fsrcs)}
            load_cpu = times.pop("load_cpu")
            med = {k: 1000 * statistics.median(v) for k, v in times.items()}
            med["total"] = sum(med.values())
            # this process's CPU for the three loads (the database server's is not in it)
            med["load_cpu"] = 1000 * min(load_cpu)
            rows.append(
                {
                    "S": s,
                    "populate_s": populate_s,
                    **counts,
                    **{f"{k}_ms": v for k, v in med.items()},
                }
            )
        return rows
    finally:
        impl.close()


def _pg_reachable() -> str | None:
    import sqlalchemy as sa

    try:
        eng = sa.create_engine(PG_ADMIN, connect_args={"connect_timeout": 3})
        with eng.connect():
            pass
        eng.dispose()
        return None
    except Exception as exc:  # any failure means "skip PostgreSQL"
        return str(exc).splitlines()[0]


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench apdb", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="N=1e4 only, S=100 and 500, 2 repeats")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--impls", default="diapipe,dax_apdb")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--sizes", help="N:S[,S...];N:S... e.g. 100000:500 (default: 1e4 and 1e5 x 100,500,2000)"
    )
    args = parser.parse_args(argv)

    sizes = {10_000: [100, 500, 2000], 100_000: [100, 500, 2000]}
    repeat = args.repeat
    if args.quick:
        sizes, repeat = {10_000: [100, 500]}, 2
    if args.sizes:
        sizes = {
            int(n): [int(x) for x in ss.split(",")]
            for n, ss in (part.split(":") for part in args.sizes.split(";"))
        }
    backends = [b for b in args.backends.split(",") if b]
    skipped = {}
    if "postgresql" in backends:
        why = _pg_reachable()
        if why:
            skipped["postgresql"] = why
            backends.remove("postgresql")
            print(f"PostgreSQL skipped: {why}")
    impls = [c for c in (Diapipe, DaxApdb) if c.name in args.impls.split(",")]

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-apdb-") as tmpdir:
        for n_objects, s_list in sizes.items():
            history = make_history(n_objects, args.seed)
            for backend in backends:
                for impl in impls:
                    with database(backend, Path(tmpdir)) as url:
                        for row in run_case(impl, url, history, s_list, repeat, args.seed):
                            results.append(
                                {"backend": backend, "impl": impl.name, "N": n_objects, **row}
                            )
                            r = results[-1]
                            print(
                                f"  {backend:10s} {impl.name:8s} N={n_objects:>6d} S={r['S']:>4d} "
                                f"total {r['total_ms']:8.1f} ms",
                                flush=True,
                            )

    print()
    header = (
        f"{'backend':10s} {'impl':8s} {'N':>6s} {'S':>5s} {'objs':>6s} {'srcs':>6s} {'fsrcs':>6s} "
        f"{'objects':>8s} {'sources':>8s} {'forced':>8s} {'store':>8s} {'total':>8s} {'speedup':>8s}"
        f" {'load cpu':>8s}"
    )
    print(header + "\n" + "-" * len(header))
    speedups: dict[str, float] = {}
    for r in results:
        speed = ""
        if r["impl"] == "diapipe":
            dax = [
                x
                for x in results
                if x["impl"] == "dax_apdb"
                and (x["backend"], x["N"], x["S"]) == (r["backend"], r["N"], r["S"])
            ]
            if dax:
                ratio = dax[0]["total_ms"] / r["total_ms"]
                r["speedup"] = ratio
                speed = f"{ratio:7.1f}x"
                if (r["N"], r["S"]) == (100_000, 500):
                    speedups[r["backend"]] = ratio
        print(
            f"{r['backend']:10s} {r['impl']:8s} {r['N']:>6d} {r['S']:>5d} {r['n_objects']:>6d} "
            f"{r['n_sources']:>6d} {r['n_forced']:>6d} {r['objects_ms']:8.1f} {r['sources_ms']:8.1f} "
            f"{r['forced_ms']:8.1f} {r['store_ms']:8.1f} {r['total_ms']:8.1f} {speed:>8s}"
            f" {r['load_cpu_ms']:8.1f}"
        )
    print(
        "(times in ms, median per detector; speedup = dax_apdb total / diapipe total; "
        "load cpu = this process's CPU for the three loads, best of the repeats)"
    )
    headline = {
        "speedup_sqlite": speedups.get("sqlite", float("nan")),
        "speedup_postgresql": speedups.get("postgresql", float("nan")),
    }
    return {"headline": headline, "results": results, "skipped": skipped}
