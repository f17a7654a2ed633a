"""The APDB contract: the same behaviour on SQLite and on PostgreSQL."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from apdb import Circle, Polygon, make_apdb, sdm
from apdb.config import ApdbConfig
from apdb.sql import ApdbSql
from core.errors import ApdbError, InputError, SchemaVersionError, TransientError
from tests.apdb.conftest import make_forced, make_objects, make_sources, store_detector


def _assert_sdm_frame(df: pd.DataFrame, table: str) -> None:
    expected = sdm.empty_frame(table)
    assert list(df.columns) == list(expected.columns)
    assert {c: str(t) for c, t in df.dtypes.items()} == {
        c: str(t) for c, t in expected.dtypes.items()
    }


# --------------------------------------------------------------------------- schema


def test_create_writes_versions_and_reopens(db, apdb_url):
    assert db.metadata["version:schema"] == sdm.schema_version()
    assert db.row_counts()["DiaObject"] == 0
    again = make_apdb(ApdbConfig(url=apdb_url, auto_create=False))
    try:
        assert again.metadata == db.metadata
    finally:
        again.close()


def test_incompatible_schema_version_is_refused(db, apdb_url):
    engine = sa.create_engine(ApdbConfig(url=apdb_url).sqlalchemy_url())
    with engine.begin() as conn:
        conn.exec_driver_sql(
            """UPDATE "metadata" SET "value" = '999.0.0' WHERE "name" = 'version:schema'"""
        )
    engine.dispose()
    with pytest.raises(SchemaVersionError, match=r"version:schema is '999\.0\.0'"):
        ApdbSql(ApdbConfig(url=apdb_url))


def test_missing_tables_without_auto_create(apdb_url):
    # Make sure the PostgreSQL database has no APDB left from an earlier test.
    ApdbSql.create(ApdbConfig(url=apdb_url), drop=True).close()
    engine = sa.create_engine(ApdbConfig(url=apdb_url).sqlalchemy_url())
    with engine.begin() as conn:
        conn.exec_driver_sql('DROP TABLE "metadata"')
    engine.dispose()
    with pytest.raises(ApdbError, match="python -m apdb create"):
        ApdbSql(ApdbConfig(url=apdb_url, auto_create=False))


# --------------------------------------------------------------------------- empty


def test_empty_database_gives_empty_frames_with_columns(db):
    _assert_sdm_frame(db.get_objects(Circle(10.0, 10.0, 1.0)), "DiaObject")
    _assert_sdm_frame(db.get_sources([1, 2, 3], 0.0), "DiaSource")
    _assert_sdm_frame(db.get_forced_sources(np.array([1], dtype=np.int64), None), "DiaForcedSource")


@pytest.mark.parametrize(
    "ids",
    [[], np.array([], dtype=np.int64), pd.Series([], dtype="Int64")],
    ids=["list", "numpy", "series"],
)
def test_no_ids_gives_empty_frames(db, ids):
    store_detector(db, 1, 1, [1], 10.0, 10.0, 60000.0)
    _assert_sdm_frame(db.get_sources(ids, None), "DiaSource")
    _assert_sdm_frame(db.get_forced_sources(ids, None), "DiaForcedSource")


def test_store_of_empty_catalogs_marks_detector_done(db):
    result = db.store(
        7,
        3,
        sdm.empty_frame("DiaObject"),
        sdm.empty_frame("DiaSource"),
        sdm.empty_frame("DiaForcedSource"),
        time_mjd=60000.0,
    )
    assert (result.already_stored, result.n_objects, result.n_sources) == (False, 0, 0)
    assert db.is_done(7, 3)
    assert not db.is_done(7, 4)
    assert db.done_detectors(7) == {3}
    assert db.row_counts()["DiaSource"] == 0


# --------------------------------------------------------------------------- round trip


def test_round_trip_keeps_values_and_dtypes(db):
    ra = np.array([10.123456789012345, 10.2, 10.3])
    dec = np.array([-5.000000000000001, -5.1, -5.2])
    objects = make_objects([11, 12, 13], ra, dec, seed=3)
    sources = make_sources(
        [101, 102, 103],
        [11, 12, 13],
        ra,
        dec,
        visit=5,
        detector=2,
        mjd=60100.5,
        ssObjectId=pd.array([None, 7, None], dtype="Int64"),
        isDipole=pd.array([True, None, False], dtype="boolean"),
        reliabilityVersion=np.array(["v1", None, "v\t2"], dtype=object),
    )
    forced = make_forced([201, 202, 203], [11, 12, 13], ra, dec, visit=5, detector=2, mjd=60100.5)
    db.store(5, 2, objects, sources, forced, time_mjd=60100.5)

    got = db.get_objects(Circle(10.2, -5.1, 0.5)).sort_values("diaObjectId", ignore_index=True)
    _assert_sdm_frame(got, "DiaObject")
    np.testing.assert_array_equal(got["ra"].to_numpy(), ra)
    np.testing.assert_array_equal(got["dec"].to_numpy(), dec)
    np.testing.assert_array_equal(got["raErr"].to_numpy(), objects["raErr"].to_numpy())
    np.testing.assert_array_equal(
        got["r_psfFluxMean"].to_numpy(), objects["r_psfFluxMean"].to_numpy()
    )
    assert got["validityStartMjdTai"].tolist() == [60100.5] * 3
    assert got["validityEndMjdTai"].isna().all()
    assert got["g_psfFluxMean"].isna().all()

    src = db.get_sources([11, 12, 13], 60000.0).sort_values("diaSourceId", ignore_index=True)
    _assert_sdm_frame(src, "DiaSource")
    assert src["diaSourceId"].tolist() == [101, 102, 103]
    assert src["ssObjectId"].tolist() == [pd.NA, 7, pd.NA]
    assert src["isDipole"].tolist() == [True, pd.NA, False]
    assert src["reliabilityVersion"].tolist() == ["v1", None, "v\t2"]
    assert src["band"].tolist() == ["r", "r", "r"]
    np.testing.assert_array_equal(src["psfFlux"].to_numpy(), sources["psfFlux"].to_numpy())

    fsrc = db.get_forced_sources([11, 12, 13], 60000.0).sort_values(
        "diaObjectId", ignore_index=True
    )
    _assert_sdm_frame(fsrc, "DiaForcedSource")
    assert fsrc["diaForcedSourceId"].tolist() == [201, 202, 203]
    assert fsrc["band"].tolist() == ["g"] * 3


# --------------------------------------------------------------------------- regions


def _sky_grid(ra0: float, dec0: float, half: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A regular grid of n x n positions, ``half`` deg either side, RA scaled by cos(dec)."""
    offsets = np.linspace(-half, half, n)
    dra, ddec = np.meshgrid(offsets, offsets)
    dec = np.clip(dec0 + ddec.ravel(), -90, 90)
    ra = (ra0 + dra.ravel() / max(np.cos(np.radians(dec0)), 1e-3)) % 360.0
    return ra, dec


def _separation_deg(ra1, dec1, ra2, dec2):
    """Great-circle distance (Vincenty), independent of apdb.region."""
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    dra = r2 - r1
    num = np.hypot(
        np.cos(d2) * np.sin(dra), np.cos(d1) * np.sin(d2) - np.sin(d1) * np.cos(d2) * np.cos(dra)
    )
    den = np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(dra)
    return np.degrees(np.arctan2(num, den))


@pytest.mark.parametrize(
    ("ra0", "dec0"),
    [(0.0, 0.0), (359.95, 12.0), (0.02, -45.0), (180.0, 89.9), (300.0, -89.95)],
    ids=["ra0", "ra360", "ra0-south", "north-pole", "south-pole"],
)
def test_circle_query_returns_exactly_the_objects_inside(db, ra0, dec0):
    ra, dec = _sky_grid(ra0, dec0, 0.3, 31)
    ids = np.arange(1, len(ra) + 1)
    store_detector(db, 1, 0, ids, ra, dec, 60000.0)
    radius = 0.2
    got = db.get_objects(Circle(ra0, dec0, radius))
    sep = _separation_deg(ra0, dec0, ra, dec)
    # Exclude positions within 1e-9 deg of the edge from the comparison.
    edge = np.abs(sep - radius) < 1e-9
    expected = set(ids[(sep < radius) & ~edge].tolist())
    got_ids = set(got["diaObjectId"].tolist()) - set(ids[edge].tolist())
    assert len(expected) > 50
    assert got_ids == expected


def test_polygon_across_ra_zero(db):
    ra = np.array([359.95, 359.99, 0.01, 0.05, 359.85, 0.15, 0.0])
    dec = np.array([0.0, 0.05, -0.05, 0.09, 0.0, 0.0, 0.2])
    store_detector(db, 1, 0, np.arange(1, 8), ra, dec, 60000.0)
    square = Polygon([359.9, 0.1, 0.1, 359.9], [-0.1, -0.1, 0.1, 0.1])
    assert sorted(db.get_objects(square)["diaObjectId"].tolist()) == [1, 2, 3, 4]


def test_polygon_around_the_north_pole(db):
    # Edges between vertices at dec 89.5, 90 deg of RA apart, dip no lower than
    # atan(tan(89.5 deg) / cos(45 deg)) = 89.646 deg: points above are inside.
    ra = np.arange(0.0, 360.0, 15.0)
    inner = np.full(ra.size, 89.7)
    outer = np.full(ra.size, 89.45)
    ids = np.arange(1, 2 * ra.size + 1)
    store_detector(db, 1, 0, ids, np.r_[ra, ra], np.r_[inner, outer], 60000.0)
    cap = Polygon([0.0, 90.0, 180.0, 270.0], [89.5] * 4)
    assert sorted(db.get_objects(cap)["diaObjectId"].tolist()) == ids[: ra.size].tolist()


# --------------------------------------------------------------------------- history


def test_time_window_boundary_is_inclusive(db):
    since = 60000.0
    times = [since - 1e-6, since, since + 1e-6]
    for visit, mjd in enumerate(times, start=1):
        store_detector(db, visit, 0, [42], 10.0, 10.0, mjd, source_base=visit * 10)
    src = db.get_sources([42], since)
    assert sorted(src["midpointMjdTai"].tolist()) == times[1:]
    fsrc = db.get_forced_sources([42], since)
    assert sorted(fsrc["midpointMjdTai"].tolist()) == times[1:]
    assert len(db.get_sources([42], None)) == 3
    # The default window: history_start is visit time minus 360 days.
    assert db.history_start(60360.0) == since


def test_long_id_lists(db):
    n = 5000
    ids = np.arange(1, n + 1, dtype=np.int64) * 7
    ra, dec = _sky_grid(20.0, 20.0, 0.5, 71)
    store_detector(db, 1, 0, ids, ra[:n], dec[:n], 60000.0)
    wanted = np.r_[ids[::2], ids[::2], [10**15]]  # duplicates and an unknown id
    src = db.get_sources(wanted, 59000.0)
    assert sorted(src["diaObjectId"].tolist()) == sorted(ids[::2].tolist())
    fsrc = db.get_forced_sources(pd.Series(wanted), 59000.0)
    assert len(fsrc) == len(ids[::2])


def test_new_object_version_replaces_the_latest(db):
    store_detector(db, 1, 0, [5, 6], [30.0, 30.001], [0.0, 0.0], 60000.0)
    moved = make_objects([5], 30.0005, 0.0005, nDiaSources=np.array([2], dtype=np.int32))
    result = db.store(
        2,
        0,
        moved,
        make_sources([900], [5], 30.0005, 0.0005, visit=2, detector=0, mjd=60010.0),
        None,
        time_mjd=60010.0,
    )
    assert (result.n_objects, result.n_objects_updated) == (1, 1)
    latest = db.get_objects(Circle(30.0, 0.0, 0.1)).set_index("diaObjectId")
    assert sorted(latest.index) == [5, 6]
    assert latest.loc[5, "nDiaSources"] == 2
    assert latest.loc[5, "ra"] == 30.0005
    assert latest.loc[5, "validityStartMjdTai"] == 60010.0
    history = db.get_object_history([5]).sort_values("validityStartMjdTai")
    assert history["validityStartMjdTai"].tolist() == [60000.0, 60010.0]
    assert history["validityEndMjdTai"].iloc[0] == 60010.0
    assert pd.isna(history["validityEndMjdTai"].iloc[1])
    assert db.visit_summary(2)["nDiaObjectsUpdated"].tolist() == [1]


# --------------------------------------------------------------------------- store


def test_restore_of_same_visit_detector_adds_nothing(db):
    first = store_detector(db, 3, 9, [1, 2, 3], 50.0, 50.0, 60000.0)
    counts = db.row_counts()
    second = store_detector(db, 3, 9, [1, 2, 3], 50.0, 50.0, 60000.0)
    assert not first.already_stored and first.n_sources == 3
    assert second.already_stored and second.n_sources == 0
    assert db.row_counts() == counts


@pytest.mark.parametrize("optimized", [False, True], ids=["fresh", "after-optimize"])
def test_failure_inside_the_transaction_rolls_everything_back(db, optimized):
    """Also after optimize() (a VACUUM outside any transaction on PostgreSQL), which
    must leave the pooled connections transactional."""
    store_detector(db, 1, 0, [1], 60.0, 0.0, 60000.0, source_base=500)
    if optimized:
        db.optimize()
    counts = db.row_counts()
    # diaSourceId 500 exists: the DiaSource insert fails after the marker and the
    # objects were written in the same transaction; the error names the collision.
    with pytest.raises(InputError, match=r"store\(2, 0\): diaSourceId values collide"):
        db.store(
            2,
            0,
            make_objects([2, 3], 60.0, 0.0),
            make_sources([500, 501], [2, 3], 60.0, 0.0, visit=2, detector=0, mjd=60010.0),
            make_forced([1, 2], [2, 3], 60.0, 0.0, visit=2, detector=0, mjd=60010.0),
            time_mjd=60010.0,
        )
    assert db.row_counts() == counts
    assert not db.is_done(2, 0)
    assert db.get_objects(Circle(60.0, 0.0, 0.1))["diaObjectId"].tolist() == [1]


@pytest.mark.parametrize(
    ("table", "change", "match"),
    [
        (
            "objects",
            lambda df: df.drop(columns="nDiaSources"),
            "DiaObject: required column 'nDiaSources'",
        ),
        ("objects", lambda df: df.assign(ra=np.nan), "ra/dec must be finite"),
        ("objects", lambda df: pd.concat([df, df]), "DiaObject.diaObjectId: duplicate value 1"),
        ("sources", lambda df: df.assign(visit=99), r"DiaSource.visit: store\(4, 1\) got 2 row"),
        (
            "sources",
            lambda df: df.assign(psfNdata=np.nan),
            "DiaSource.psfNdata: column is not nullable",
        ),
        (
            "sources",
            lambda df: df.assign(detector=70000),
            "DiaSource.detector: value 70000 overflows",
        ),
        (
            "sources",
            lambda df: df.assign(psfNdata=1.5),
            "DiaSource.psfNdata: non-integer value 1.5",
        ),
        ("forced", lambda df: df.assign(detector=2), "DiaForcedSource.detector"),
        (
            "forced",
            lambda df: df.assign(psfFlux="bright"),
            "DiaForcedSource.psfFlux: cannot convert",
        ),
    ],
    ids=[
        "missing-column",
        "nan-position",
        "duplicate-id",
        "wrong-visit",
        "null-required",
        "overflow",
        "non-integer",
        "wrong-detector",
        "not-a-number",
    ],
)
def test_bad_input_is_refused_before_any_write(db, table, change, match):
    frames = {
        "objects": make_objects([1, 2], 70.0, 0.0),
        "sources": make_sources([10, 11], [1, 2], 70.0, 0.0, visit=4, detector=1, mjd=60000.0),
        "forced": make_forced([20, 21], [1, 2], 70.0, 0.0, visit=4, detector=1, mjd=60000.0),
    }
    frames[table] = change(frames[table])
    with pytest.raises(InputError, match=match):
        db.store(4, 1, frames["objects"], frames["sources"], frames["forced"], time_mjd=60000.0)
    assert not db.is_done(4, 1)
    assert db.row_counts()["DiaObject"] == 0


def test_inputs_are_not_modified(db):
    objects = make_objects([1, 2], 80.0, 1.0)
    sources = make_sources([3, 4], [1, 2], 80.0, 1.0, visit=1, detector=1, mjd=60000.0)
    before = (objects.copy(), sources.copy())
    db.store(1, 1, objects, sources, None, time_mjd=60000.0)
    pd.testing.assert_frame_equal(objects, before[0])
    pd.testing.assert_frame_equal(sources, before[1])


def test_visit_summary_and_visits(db):
    store_detector(db, 10, 1, [1, 2], 90.0, 0.0, 60000.0)
    store_detector(db, 10, 4, [3], 90.0, 0.0, 60000.0)
    store_detector(db, 11, 1, [4], 90.0, 0.0, 60001.0)
    summary = db.visit_summary(10)
    assert summary["detector"].tolist() == [1, 4]
    assert summary["nDiaSources"].tolist() == [2, 1]
    assert db.done_detectors(10) == {1, 4}
    visits = db.visits()
    assert visits["visit"].tolist() == [10, 11]
    assert visits["nDetectors"].tolist() == [2, 1]
    assert db.visit_summary(12).empty


# --------------------------------------------------------------------------- errors


def test_unreachable_postgresql_is_transient():
    config = ApdbConfig(url="postgresql://postgres@127.0.0.1:1/nothing", connect_timeout_s=1)
    with pytest.raises(TransientError, match="127.0.0.1:1"):
        ApdbSql(config)


def test_sqlite_lock_held_too_long_is_transient(tmp_path):
    url = f"sqlite:///{tmp_path / 'locked.sqlite3'}"
    db = ApdbSql.create(ApdbConfig(url=url, sqlite_busy_timeout_ms=100))
    import sqlite3

    holder = sqlite3.connect(tmp_path / "locked.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(TransientError, match="locked"):
            store_detector(db, 1, 1, [1], 0.0, 0.0, 60000.0)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store_detector(db, 1, 1, [1], 0.0, 0.0, 60000.0).n_objects == 1
    db.close()


def test_sdm_columns_hold_the_same_values_as_the_reads(db, apdb_url):
    """SQL users see the SDM columns; they must agree with what the API returns."""
    ra = np.array([120.0, 120.01])
    sources = make_sources(
        [1, 2],
        [10, 20],
        ra,
        5.0,
        visit=3,
        detector=1,
        mjd=60000.25,
        ssObjectId=pd.array([None, 9], dtype="Int64"),
    )
    db.store(3, 1, make_objects([10, 20], ra, 5.0), sources, None, time_mjd=60000.25)
    engine = sa.create_engine(ApdbConfig(url=apdb_url).sqlalchemy_url())
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            'SELECT "diaSourceId", "psfFlux", "ssObjectId", "band", "midpointMjdTai" '
            'FROM "DiaSource" ORDER BY "diaSourceId"'
        ).fetchall()
        last = conn.exec_driver_sql(
            'SELECT "diaObjectId", "ra", "nDiaSources" FROM "DiaObjectLast" ORDER BY 1'
        ).fetchall()
    engine.dispose()
    api = db.get_sources([10, 20], None).sort_values("diaSourceId")
    assert [r[0] for r in rows] == api["diaSourceId"].tolist()
    assert np.array_equal(
        np.array([r[1] for r in rows], dtype=np.float32), api["psfFlux"].to_numpy()
    )
    assert [r[2] for r in rows] == [None, 9]
    assert [r[3] for r in rows] == ["r", "r"]
    assert [r[4] for r in rows] == [60000.25, 60000.25]
    assert [(r[0], r[1], r[2]) for r in last] == [(10, 120.0, 1), (20, 120.01, 1)]


def test_empty_store_needs_no_time(db):
    result = db.store(9, 9, None, None, None)
    assert not result.already_stored
    assert db.is_done(9, 9)


def test_objects_without_a_time_are_refused(db):
    with pytest.raises(InputError, match="time_mjd is needed"):
        db.store(9, 9, make_objects([1], 0.0, 0.0), None, None)


# --------------------------------------------------------------------------- bulk reads


def _store_strings_case(db) -> np.ndarray:
    """Two detectors of 30 objects whose sources carry awkward strings; returns the IDs."""
    rng = np.random.default_rng(11)
    ids = np.arange(1, 61, dtype=np.int64)
    ra, dec = 40.0 + rng.uniform(0, 0.05, 60), -20.0 + rng.uniform(0, 0.05, 60)
    texts = np.array(['v"1', "v\\2", "ü\tß", None, "", "r"] * 10, dtype=object)
    for det, sel in ((1, slice(0, 30)), (2, slice(30, 60))):
        o = ids[sel]
        common = dict(visit=3, detector=det, mjd=60200.0 + det, seed=det)
        db.store(
            3,
            det,
            make_objects(o, ra[sel], dec[sel], seed=det),
            make_sources(
                o + 1000,
                o,
                ra[sel],
                dec[sel],
                reliabilityVersion=texts[sel],
                band=np.array(list("ugrizy" * 5), dtype=object),
                **common,
            ),
            make_forced(o + 5000, o, ra[sel], dec[sel], **common),
            time_mjd=60200.0 + det,
        )
    return ids


def test_aggregated_reads_equal_row_by_row_reads(db):
    """Bulk reads come back concatenated by the server; row by row gives the same frames."""
    ids = _store_strings_case(db)
    region = Circle(40.025, -19.975, 0.2)
    got = [db.get_objects(region), db.get_sources(ids, None), db.get_forced_sources(ids, 0.0)]
    db._aggregate_reads = False
    want = [db.get_objects(region), db.get_sources(ids, None), db.get_forced_sources(ids, 0.0)]
    assert [len(g) for g in got] == [60, 60, 60]
    for g, w in zip(got, want, strict=True):
        pd.testing.assert_frame_equal(g, w)
    assert sorted(got[1]["reliabilityVersion"].tolist(), key=str) == sorted(
        ['v"1', "v\\2", "ü\tß", None, "", "r"] * 10, key=str
    )


def test_aggregate_too_large_for_sqlite_is_read_row_by_row(tmp_path, caplog):
    """A result over SQLite's value size limit (SQLITE_TOOBIG) falls back to a row fetch."""
    import logging
    import sqlite3

    db = ApdbSql.create(ApdbConfig(url=f"sqlite:///{tmp_path / 'small.sqlite3'}"))
    try:
        ids = _store_strings_case(db)
        want = db.get_sources(ids, None)
        db._engine.dispose()

        @sa.event.listens_for(db._engine, "connect")
        def _small_values(dbapi_conn, _record):
            dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 4096)  # one detector: ~11 kB

        with caplog.at_level(logging.INFO, logger="apdb.sql"):
            got = db.get_sources(ids, None)
        assert "reading the rows one by one" in caplog.text
        pd.testing.assert_frame_equal(got, want)
        assert db.get_objects(Circle(40.025, -19.975, 0.2))["diaObjectId"].nunique() == 60
    finally:
        db.close()


def _plan_text(db, sql: str, params: list) -> str:
    """The query plan of ``sql``; on PostgreSQL with sequential and bitmap scans off, so
    that a tiny table is read the way a large one is (through an index if any fits)."""
    with db._connection("explain") as conn:
        cur = conn.cursor()
        if db.dialect == "sqlite":
            cur.execute("EXPLAIN QUERY PLAN " + sql, params)
            return "\n".join(str(r[-1]) for r in cur.fetchall())
        cur.execute("SET enable_seqscan = off")
        cur.execute("SET enable_bitmapscan = off")
        try:
            cur.execute("EXPLAIN " + sql, params)
            return "\n".join(r[0] for r in cur.fetchall())
        finally:
            cur.execute("RESET enable_seqscan")
            cur.execute("RESET enable_bitmapscan")


def test_bulk_reads_never_visit_the_table_rows(db):
    """The three bulk reads are answered from their covering index alone.

    SQLite's DiaForcedSource is itself keyed for its read (WITHOUT ROWID,
    ``SQLITE_FORCED_KEY``): the read is a search of the table's primary key.
    """
    from apdb.sql import LAST_TABLE, read_index

    ids = _store_strings_case(db)
    db.optimize()  # PostgreSQL: VACUUM sets the visibility map index-only scans need
    ranges = Circle(40.025, -19.975, 0.2).pixel_ranges(db.order, db.config.max_pixel_ranges)
    reads = {
        LAST_TABLE: (db._objects_read(ranges), "DiaObject"),
        "DiaSource": (db._history_read("DiaSource", ids, 60000.0), "DiaSource"),
        "DiaForcedSource": (db._history_read("DiaForcedSource", ids, None), "DiaForcedSource"),
    }
    for table, ((source, where, params), sdm_table) in reads.items():
        sql = db._aggregated_sql(source, where, db._packing[sdm_table])
        plan = _plan_text(db, sql, params)
        index = read_index(table, db.dialect)
        if db.dialect == "sqlite":
            reads = [line for line in plan.splitlines() if f" {table} " in f" {line} "]
            how = "USING PRIMARY KEY" if index is None else f"USING COVERING INDEX {index}"
            assert reads and all(how in r for r in reads), plan
        else:
            assert f'Index Only Scan using "{index}"' in plan, plan
            assert "Seq Scan" not in plan and "Index Scan" not in plan, plan


# --------------------------------------------------------------------------- de-duplication


def test_object_pixels_are_those_of_the_current_objects(db):
    import hpgeom

    assert db.object_pixels(5).size == 0
    ra, dec = np.array([10.0, 10.0001, 200.0]), np.array([0.0, 0.0, -30.0])
    store_detector(db, 1, 1, [1, 2, 3], ra, dec, 60000.0)
    want = np.unique(hpgeom.angle_to_pixel(hpgeom.order_to_nside(5), ra, dec))
    np.testing.assert_array_equal(db.object_pixels(5), want)
    assert db.object_pixels(0).tolist() == sorted(set(hpgeom.angle_to_pixel(1, ra, dec).tolist()))
    with pytest.raises(InputError, match="order must be within"):
        db.object_pixels(db.order + 1)


def _split_object(db):
    """Object 1 seen in visit 1, object 2 (a split of it) in visits 2 and 3, object 9 apart.

    Forced photometry: object 1 in visits 1 and 2, object 2 in visits 2 and 3.
    """
    ra, dec = 30.0, -5.0
    for visit, oid, forced_ids in ((1, 1, [1]), (2, 2, [1, 2]), (3, 2, [2])):
        mjd = 60000.0 + visit
        db.store(
            visit,
            0,
            make_objects([oid], ra, dec),
            make_sources([visit * 100], [oid], ra, dec, visit=visit, detector=0, mjd=mjd),
            make_forced(
                [visit * 10 + f for f in forced_ids],
                forced_ids,
                ra,
                dec,
                visit=visit,
                detector=0,
                mjd=mjd,
            ),
            time_mjd=mjd,
        )
    store_detector(db, 4, 0, [9], 31.0, -5.0, 60004.0)


def _expected(db, ids):
    objects = db.get_objects(Circle(30.0, -5.0, 2.0))
    return objects[objects["diaObjectId"].isin(ids)][["diaObjectId", "validityStartMjdTai"]]


def test_merge_objects_reassigns_sources_and_closes_versions(db, apdb_url):
    _split_object(db)
    merges = pd.DataFrame({"diaObjectId": [2], "survivorId": [1]})
    survivor = make_objects([1], 30.0, -5.0, nDiaSources=np.array([3], dtype=np.int32))
    result = db.merge_objects(merges, survivor, time_mjd=60010.0, expected=_expected(db, [1, 2]))
    assert (result.n_survivors, result.n_merged, result.n_sources) == (1, 1, 2)
    assert (result.n_forced_sources, result.n_forced_dropped) == (1, 1)

    src = db.get_sources([1], None).sort_values("diaSourceId")
    assert src["diaSourceId"].tolist() == [100, 200, 300]
    assert src["diaObjectId"].tolist() == [1, 1, 1]
    assert len(db.get_sources([2], None)) == 0
    fs = db.get_forced_sources([1, 2], None).sort_values("visit")
    # visit 2: the survivor's own row stays, object 2's is dropped; visit 3 moved over
    assert fs["diaForcedSourceId"].tolist() == [11, 21, 32]
    assert fs["diaObjectId"].tolist() == [1, 1, 1]
    # the SDM columns agree with the packed payloads the reads decode
    engine = sa.create_engine(ApdbConfig(url=apdb_url).sqlalchemy_url())
    with engine.connect() as conn:
        col = conn.exec_driver_sql(
            'SELECT "diaSourceId", "diaObjectId" FROM "DiaSource" ORDER BY "diaSourceId"'
        ).fetchall()
        fcol = conn.exec_driver_sql(
            'SELECT "diaForcedSourceId", "diaObjectId" FROM "DiaForcedSource" '
            'ORDER BY "diaForcedSourceId"'
        ).fetchall()
    engine.dispose()
    assert [tuple(r) for r in col] == [(100, 1), (200, 1), (300, 1), (400_000_000, 9)]
    assert [tuple(r) for r in fcol] == [(11, 1), (21, 1), (32, 1), (400_000_000, 9)]

    current = db.get_objects(Circle(30.0, -5.0, 2.0)).set_index("diaObjectId")
    assert sorted(current.index) == [1, 9]
    assert current.loc[1, "validityStartMjdTai"] == 60010.0
    assert current.loc[1, "nDiaSources"] == 3
    hist = db.get_object_history([1, 2]).sort_values(["diaObjectId", "validityStartMjdTai"])
    assert hist["diaObjectId"].tolist() == [1, 1, 2, 2]
    assert hist["validityStartMjdTai"].tolist() == [60001.0, 60010.0, 60002.0, 60003.0]
    end = hist["validityEndMjdTai"].tolist()
    assert end[0] == 60010.0 and np.isnan(end[1]) and end[2] == 60003.0 and end[3] == 60010.0


def test_merge_objects_refuses_a_changed_version_and_writes_nothing(db):
    _split_object(db)
    before = db.row_counts()
    stale = _expected(db, [1, 2]).assign(validityStartMjdTai=[60001.0, 60002.0])
    with pytest.raises(ApdbError, match="DiaObject 2 is at version 60003.0.*nothing was merged"):
        db.merge_objects(
            pd.DataFrame({"diaObjectId": [2], "survivorId": [1]}),
            make_objects([1], 30.0, -5.0),
            time_mjd=60010.0,
            expected=stale,
        )
    assert db.row_counts() == before
    assert db.get_sources([2], None)["diaSourceId"].tolist() == [200, 300]


@pytest.mark.parametrize(
    ("merges", "survivors", "time_mjd", "match"),
    [
        ({"diaObjectId": [2], "survivorId": [2]}, [2], 60010.0, "both a survivor and merged"),
        ({"diaObjectId": [2, 2], "survivorId": [1, 1]}, [1], 60010.0, "more than once"),
        ({"diaObjectId": [2], "survivorId": [1]}, [9], 60010.0, "one row per survivorId"),
        ({"diaObjectId": [2], "survivorId": [1]}, [1], 60003.0, "must be later than"),
        ({"diaObjectId": [2]}, [1], 60010.0, "lacks column 'survivorId'"),
    ],
)
def test_merge_objects_bad_input_writes_nothing(db, merges, survivors, time_mjd, match):
    _split_object(db)
    before = db.row_counts()
    with pytest.raises(InputError, match=match):
        db.merge_objects(
            pd.DataFrame(merges),
            make_objects(survivors, 30.0, -5.0),
            time_mjd=time_mjd,
            expected=_expected(db, [1, 2, 9]),
        )
    assert db.row_counts() == before
