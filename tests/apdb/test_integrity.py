"""The APDB is checked table by table when opened; damaged or foreign databases are refused.

Also: how driver errors map to diapipe errors for a read-only SQLite APDB, and
PostgreSQL lock and statement timeouts on the real server (these tests fail,
not skip, when the server at 127.0.0.1:5432 cannot be reached).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import numpy as np
import pytest
import sqlalchemy as sa

from apdb.__main__ import main as apdb_main
from apdb.config import ApdbConfig
from apdb.sql import ApdbSql, _translate
from core.errors import ApdbError, TransientError
from tests.apdb.conftest import fresh_pg_database, store_detector


def _apdb_file(tmp_path) -> str:
    path = tmp_path / "apdb.sqlite3"
    ApdbSql.create(ApdbConfig(url=str(path))).close()
    return str(path)


def _tables(path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_a_missing_table_is_refused_at_open_and_repaired_by_create(tmp_path, capsys):
    path = _apdb_file(tmp_path)
    with ApdbSql(ApdbConfig(url=path)) as db:
        store_detector(db, 1, 2, [11, 12], [10.0, 10.001], [0.0, 0.0], 61000.0)
    with sqlite3.connect(path) as conn:
        conn.execute('DROP TABLE "DiaForcedSource"')
    for auto_create in (True, False):
        with pytest.raises(ApdbError, match=r"damaged: table\(s\) \['DiaForcedSource'\] missing"):
            ApdbSql(ApdbConfig(url=path, auto_create=auto_create))
    assert apdb_main(["info", path]) == 1
    assert "DiaForcedSource" in capsys.readouterr().err

    assert apdb_main(["create", path]) == 0
    assert "DiaForcedSource" in _tables(path)
    with ApdbSql(ApdbConfig(url=path, auto_create=False)) as db:
        counts = db.row_counts()
    assert counts["DiaSource"] == 2 and counts["DiaForcedSource"] == 0, "data kept, table back"


def test_a_table_lacking_columns_is_refused_even_by_create(tmp_path):
    path = _apdb_file(tmp_path)
    with sqlite3.connect(path) as conn:
        conn.execute('ALTER TABLE "DiaSource" DROP COLUMN "snr"')
    with pytest.raises(ApdbError, match=r"table DiaSource lacks column\(s\) \['snr'\]"):
        ApdbSql(ApdbConfig(url=path))
    with pytest.raises(ApdbError, match="cannot fill in columns"):
        ApdbSql.create(ApdbConfig(url=path))


def test_auto_create_never_writes_into_a_foreign_database(tmp_path):
    path = tmp_path / "other.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE foo (x INTEGER)")
        conn.execute("INSERT INTO foo VALUES (1)")
    with pytest.raises(ApdbError, match=r"holds other tables \(foo\) and no APDB"):
        ApdbSql(ApdbConfig(url=str(path)))
    assert _tables(path) == {"foo"}, "nothing was added to the foreign file"
    # An explicit create is the operator's decision.
    ApdbSql.create(ApdbConfig(url=str(path))).close()
    assert {"foo", "DiaObject", "metadata"} <= _tables(path)


def test_an_empty_file_is_still_auto_created(tmp_path):
    path = tmp_path / "empty.sqlite3"
    path.touch()
    ApdbSql(ApdbConfig(url=str(path))).close()
    assert "DiaSource" in _tables(path)


@pytest.mark.parametrize(
    ("message", "expect"),
    [
        ("attempt to write a readonly database", "read-only"),
        ("unable to open database file", "directory is missing or read-only"),
    ],
)
def test_read_only_sqlite_is_a_clear_apdb_error_not_a_retry(message, expect):
    err = _translate(sqlite3.OperationalError(message), "store visit 1 detector 2", "/x/a.db")
    assert isinstance(err, ApdbError) and not isinstance(err, TransientError)
    assert expect in str(err) and "/x/a.db" in str(err) and "store visit 1 detector 2" in str(err)
    wrapped = sa.exc.OperationalError("INSERT", {}, sqlite3.OperationalError(message))
    assert isinstance(_translate(wrapped, "store", "/x/a.db"), ApdbError)


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_db():
    """A fresh PostgreSQL database; the test fails (never skips) without the server."""
    with fresh_pg_database("diapipe_lock", required=True) as url:
        yield url


@pytest.mark.postgresql
def test_postgresql_store_behind_a_table_lock_times_out_as_transient(pg_db, caplog):
    db = ApdbSql.create(ApdbConfig(url=pg_db, lock_timeout_ms=300))
    holder = sa.create_engine(pg_db)
    locked, release = threading.Event(), threading.Event()

    def hold_lock():  # what a CREATE INDEX or an idle transaction does to the store
        with holder.connect() as conn:
            conn.exec_driver_sql('LOCK TABLE "ApdbVisitDetector" IN SHARE MODE')
            locked.set()
            release.wait(60)
            conn.rollback()

    t = threading.Thread(target=hold_lock)
    t.start()
    try:
        assert locked.wait(30)
        caplog.set_level(logging.WARNING, logger="apdb.sql")
        t0 = time.monotonic()
        with pytest.raises(TransientError, match=r"store visit 1 detector 2: gave up waiting"):
            store_detector(db, 1, 2, [11], [10.0], [0.0], 61000.0)
        assert time.monotonic() - t0 < 30, "the store did not wait for ever"
        logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("store visit 1 detector 2" in m and "lock_timeout" in m for m in logged)
        assert db.row_counts()["ApdbVisitDetector"] == 0, "nothing half-written"
    finally:
        release.set()
        t.join()
        holder.dispose()
    result = store_detector(db, 1, 2, [11], [10.0], [0.0], 61000.0)  # the retry succeeds
    assert not result.already_stored and result.n_sources == 1
    db.close()


@pytest.mark.postgresql
def test_postgresql_statement_timeout_is_transient(pg_db):
    db = ApdbSql.create(ApdbConfig(url=pg_db, statement_timeout_ms=200))
    try:
        with pytest.raises(TransientError, match=r"slow query: gave up waiting.*statement_timeout"):
            with db._connection("slow query") as conn:
                conn.execute("SELECT pg_sleep(5)")
        assert np.isfinite(db.size_bytes()), "the pool's connections still work"
    finally:
        db.close()
