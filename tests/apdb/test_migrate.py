"""``python -m apdb migrate``: databases of the earlier layouts are upgraded.

The fixtures ``data/layout-<version>.sqlite3`` were made and filled by
``apdb/sql.py`` of the commit that wrote that layout, with :func:`store_fixture`:
1.0.0 by main at 1bd0c70 (``data/make_layout_1_0_0.py``), 2.0.0 (before the
covering indexes) by 91f7b4d (``data/make_layout_2_0_0.py``);
``data/layout-<version>-postgresql.sql`` is that code's PostgreSQL DDL, filled
in the test with the same rows copied from the SQLite file.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from apdb import Circle, Polygon
from apdb.__main__ import main as cli
from apdb.config import ApdbConfig
from apdb.migrate import migrate, plan
from apdb.sql import (
    COVERING_INDEXES,
    IMPLEMENTATION_VERSION,
    SQLITE_FORCED_KEY,
    SQLITE_FORCED_SDM_KEY,
    TABLES,
    ApdbSql,
    read_index,
)
from core.errors import ApdbError, SchemaVersionError
from tests.apdb.conftest import store_detector

DATA = Path(__file__).parent / "data"
OLD = "1.0.0"
#: Every earlier layout with a fixture; each migrates to the current one.
LAYOUTS = ("1.0.0", "2.0.0")

#: (visit, detector, object IDs, ra, dec, mjd) stored into the fixture, in order.
FIXTURE = (
    (1, 3, [11, 12, 13], [10.0, 10.01, 10.02], [20.0, 20.0, 20.01], 60000.0),
    (2, 3, [11, 12, 14], [10.0, 10.01, 10.03], [20.0, 20.0, 20.02], 60003.0),
    (3, 4, [21, 22], [359.99, 0.01], [-5.0, -5.0], 60006.0),
)


def store_fixture(db) -> None:
    """What the fixture holds (run by make_layout_1_0_0.py with the 1bd0c70 code)."""
    for visit, detector, ids, ra, dec, mjd in FIXTURE:
        store_detector(db, visit, detector, ids, ra, dec, mjd)


def _old_sqlite(tmp_path, version: str = OLD) -> str:
    path = tmp_path / "old.sqlite3"
    shutil.copyfile(DATA / f"layout-{version}.sqlite3", path)
    return str(path)


def _old_postgresql(pg_url, version: str = OLD) -> str:
    """The PostgreSQL DDL of ``version``, filled row by row from its SQLite fixture."""
    url = sa.make_url(pg_url).set(drivername="postgresql")
    src = sqlite3.connect(DATA / f"layout-{version}.sqlite3")
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        for name in TABLES:
            conn.execute(f'DROP TABLE IF EXISTS "{name}"')
        for stmt in (DATA / f"layout-{version}-postgresql.sql").read_text().splitlines():
            if stmt.strip():
                conn.execute(stmt)
        old_tables = {
            r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        for name in TABLES:
            if name == "metadata" or name not in old_tables:
                continue
            cur = src.execute(f'SELECT * FROM "{name}"')
            cols = [d[0] for d in cur.description]
            rows = cur.fetchall()
            types = dict(
                conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_name = %s",
                    [name],
                ).fetchall()
            )
            rows = [
                tuple(
                    bool(v) if v is not None and types[c] == "boolean" else v
                    for c, v in zip(cols, row, strict=True)
                )
                for row in rows
            ]
            names = ", ".join(f'"{c}"' for c in cols)
            marks = ", ".join(["%s"] * len(cols))
            conn.cursor().executemany(f'INSERT INTO "{name}" ({names}) VALUES ({marks})', rows)
    src.close()
    return pg_url


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


@pytest.fixture(params=BACKENDS)
def old_url(request, tmp_path):
    """A database of layout 1.0.0 (the oldest) on each backend."""
    if request.param == "sqlite":
        return _old_sqlite(tmp_path)
    return _old_postgresql(request.getfixturevalue("pg_url"))


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


@pytest.fixture(params=BACKENDS)
def layout_url(request, tmp_path, layout):
    """A database of each earlier layout on each backend."""
    if request.param == "sqlite":
        return _old_sqlite(tmp_path, layout)
    return _old_postgresql(request.getfixturevalue("pg_url"), layout)


def _version(url: str) -> str:
    engine = sa.create_engine(ApdbConfig(url=url).sqlalchemy_url())
    with engine.connect() as conn:
        got = conn.exec_driver_sql(
            """SELECT "value" FROM "metadata" WHERE "name" = 'version:ApdbSql'"""
        ).scalar()
    engine.dispose()
    return got


def test_old_layout_migrates_then_reads_back_intact(layout_url, layout, capsys):
    old_url = layout_url
    if layout.split(".")[0] != IMPLEMENTATION_VERSION.split(".")[0]:
        with pytest.raises(SchemaVersionError, match="python -m apdb migrate URL"):
            ApdbSql(ApdbConfig(url=old_url, auto_create=False))
    assert cli(["migrate", old_url, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"layout {layout} -> {IMPLEMENTATION_VERSION}" in out and "nothing changed" in out
    assert _version(old_url) == layout
    assert cli(["migrate", old_url]) == 0
    assert f"migrated to layout {IMPLEMENTATION_VERSION}" in capsys.readouterr().out
    sqlite = ApdbConfig(url=old_url).sqlalchemy_url().get_backend_name() == "sqlite"
    dialect = "sqlite" if sqlite else "postgresql"
    want = {read_index(t, dialect) for t in COVERING_INDEXES} - {None}
    assert _indexes(old_url) >= want | ({SQLITE_FORCED_SDM_KEY} if sqlite else set())
    if sqlite:  # DiaForcedSource rebuilt keyed for its read, its covering index gone
        assert COVERING_INDEXES["DiaForcedSource"][0] not in _indexes(old_url)
        assert _sqlite_primary_key(old_url, "DiaForcedSource") == list(SQLITE_FORCED_KEY)
    assert not _indexes(old_url) & {
        "IDX_DiaObjectLast_pixelId",
        "IDX_DiaSource_diaObjectId",
        "IDX_DiaForcedSource_diaObjectId",
    }, "the plain indexes the covering ones replace are dropped"
    with ApdbSql(ApdbConfig(url=old_url, auto_create=False)) as db:
        assert db.metadata["version:ApdbSql"] == IMPLEMENTATION_VERSION
        objects = db.get_objects(Circle(10.01, 20.01, 0.1)).sort_values("diaObjectId")
        assert objects["diaObjectId"].tolist() == [11, 12, 13, 14]
        assert objects.set_index("diaObjectId").loc[11, "validityStartMjdTai"] == 60003.0
        assert db.get_object_history([11])["validityEndMjdTai"].isna().sum() == 1
        wrap = db.get_objects(Polygon([359.9, 0.1, 0.1, 359.9], [-5.1, -5.1, -4.9, -4.9]))
        assert sorted(wrap["diaObjectId"]) == [21, 22]
        src = db.get_sources([11, 12], 60001.0)
        assert sorted(src["visit"]) == [2, 2]
        assert len(db.get_sources([11, 12, 13, 14], None)) == 6
        forced = db.get_forced_sources([11], None).sort_values("visit")
        assert forced["visit"].tolist() == [1, 2]
        np.testing.assert_allclose(forced["midpointMjdTai"], [60000.0, 60003.0])
        assert db.done_detectors(2) == {3}
        assert db.row_counts()["DiaSource"] == 8
        # the migrated database takes new visits, and a re-store still writes nothing
        assert store_detector(db, 2, 3, [11], 10.0, 20.0, 60003.0).already_stored
        assert store_detector(db, 5, 3, [11], 10.0, 20.0, 60009.0).n_objects_updated == 1
    assert cli(["migrate", old_url]) == 0
    assert "nothing to do" in capsys.readouterr().out


def _sqlite_primary_key(url: str, table: str) -> list[str]:
    engine = sa.create_engine(ApdbConfig(url=url).sqlalchemy_url())
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f'PRAGMA table_info("{table}")').fetchall()
    engine.dispose()
    return [r[1] for r in sorted((r for r in rows if r[5]), key=lambda r: r[5])]


def _indexes(url: str) -> set[str]:
    engine = sa.create_engine(ApdbConfig(url=url).sqlalchemy_url())
    inspector = sa.inspect(engine)
    names = {ix["name"] for table in COVERING_INDEXES for ix in inspector.get_indexes(table)}
    engine.dispose()
    return names


def test_layout_2_0_0_opens_with_a_warning_before_it_is_migrated(tmp_path, caplog):
    """Same major version: readable as it is (without its covering indexes), with a hint."""
    import logging

    url = _old_sqlite(tmp_path, "2.0.0")
    with caplog.at_level(logging.WARNING, logger="apdb.sql"):
        with ApdbSql(ApdbConfig(url=url, auto_create=False)) as db:
            assert len(db.get_sources([11, 12, 13, 14], None)) == 6
    assert "layout 2.0.0 is older" in caplog.text and "python -m apdb migrate URL" in caplog.text
    assert _version(url) == "2.0.0"


def test_half_migrated_2_0_0_is_refused(tmp_path):
    url = _old_sqlite(tmp_path, "2.0.0")
    with sqlite3.connect(url) as conn:
        conn.execute(
            'CREATE INDEX "IDX_DiaSource_diaObjectId_payload" ON "DiaSource" ("diaObjectId")'
        )
    with pytest.raises(ApdbError, match="half-migrated.*IDX_DiaSource_diaObjectId_payload"):
        migrate(url)
    assert _version(url) == "2.0.0"


def test_newer_layout_is_refused(old_url):
    engine = sa.create_engine(ApdbConfig(url=old_url).sqlalchemy_url())
    with engine.begin() as conn:
        conn.exec_driver_sql(
            """UPDATE "metadata" SET "value" = '99.0.0' WHERE "name" = 'version:ApdbSql'"""
        )
    engine.dispose()
    with pytest.raises(SchemaVersionError, match=r"'99\.0\.0' is newer than this code knows"):
        migrate(old_url)
    assert cli(["migrate", old_url]) == 1
    assert _version(old_url) == "99.0.0"


def test_half_migrated_database_is_refused(old_url):
    engine = sa.create_engine(ApdbConfig(url=old_url).sqlalchemy_url())
    with engine.begin() as conn:
        conn.exec_driver_sql(
            'CREATE INDEX "IDX_DiaForcedSource_diaObjectId" ON "DiaForcedSource" ("diaObjectId")'
        )
    engine.dispose()
    with pytest.raises(ApdbError, match="half-migrated.*IDX_DiaForcedSource_diaObjectId"):
        plan(old_url)
    with pytest.raises(ApdbError, match="half-migrated"):
        migrate(old_url)
    assert _version(old_url) == OLD


def test_not_an_apdb_is_refused(tmp_path):
    path = tmp_path / "other.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(ApdbError, match="not an APDB"):
        migrate(str(path))
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
    with pytest.raises(ApdbError, match="no version:ApdbSql"):
        migrate(str(path))
    with sqlite3.connect(path) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["t", "metadata"]
    with pytest.raises(ApdbError, match="no such SQLite file"):
        migrate(str(tmp_path / "missing.sqlite3"))


def test_locked_database_is_refused_and_unchanged(old_url):
    engine = sa.create_engine(ApdbConfig(url=old_url).sqlalchemy_url())
    holder = engine.connect()
    if engine.dialect.name == "sqlite":
        holder.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        holder.exec_driver_sql('LOCK TABLE "DiaForcedSource" IN ACCESS EXCLUSIVE MODE')
    try:
        with pytest.raises(ApdbError, match="locked by another connection"):
            migrate(old_url, lock_timeout_s=0.2)
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()
    assert _version(old_url) == OLD
