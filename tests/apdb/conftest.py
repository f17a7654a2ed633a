"""Fixtures of the APDB contract suite: every test runs on SQLite and on PostgreSQL.

SQLite runs twice: on a freshly created database and on the layout-1.0.0
fixture (written by the code of 1bd0c70, tests/apdb/data) after
``apdb.migrate.migrate`` and with its rows deleted, so the whole contract holds
on a migrated layout too.

PostgreSQL: one fresh database ``diapipe_test_<random>`` per test session on
the server at 127.0.0.1:5432, dropped at the end; each test recreates the APDB
tables in it. When the server cannot be reached the PostgreSQL cases are
skipped with the reason printed, except under CI (the ``CI`` environment
variable set, as ``.ci/run`` and hosted CI services do), where a missing server
is an error: CI must never pass with the production backend untested.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from apdb import sdm
from apdb.config import ApdbConfig
from apdb.sql import TABLES, ApdbSql

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def fresh_pg_database(prefix: str, *, required: bool = False):
    """A new PostgreSQL database ``{prefix}_<random>`` on the test server, dropped afterwards.

    Without the server the caller's test fails when ``required`` or under CI (the
    ``CI`` variable set), and is skipped with the reason printed otherwise.
    """
    engine = sa.create_engine(
        PG_ADMIN, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.OperationalError as exc:
        engine.dispose()
        reason = f"PostgreSQL at 127.0.0.1:5432 cannot be reached: {str(exc.orig).strip()}"
        if required or os.environ.get("CI"):
            pytest.fail(f"{reason} (the PostgreSQL tests must run)", pytrace=False)
        print(f"\nSKIPPING PostgreSQL APDB tests: {reason}")
        pytest.skip(reason)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        engine.dispose()


@pytest.fixture(scope="session")
def pg_url():
    """URL of a fresh PostgreSQL database for this session (dropped afterwards)."""
    with fresh_pg_database("diapipe_test") as url:
        yield url


def migrated_sqlite(path) -> str:
    """The layout-1.0.0 fixture (tests/apdb/data) migrated to the current layout, emptied."""
    from apdb.migrate import migrate

    shutil.copyfile(Path(__file__).parent / "data" / "layout-1.0.0.sqlite3", path)
    migrate(str(path))
    with sqlite3.connect(path) as conn:
        for table in TABLES:
            if table != "metadata":
                conn.execute(f'DELETE FROM "{table}"')
    return f"sqlite:///{path}"


@pytest.fixture(
    params=[
        "sqlite",
        "sqlite-migrated",
        pytest.param("postgresql", marks=pytest.mark.postgresql),
    ]
)
def apdb_url(request, tmp_path):
    """An empty database URL: a new SQLite file, the 1.0.0 fixture migrated and emptied,
    or the session's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'apdb.sqlite3'}"
    if request.param == "sqlite-migrated":
        return migrated_sqlite(tmp_path / "migrated.sqlite3")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def db(request, apdb_url):
    """An empty APDB on each backend: freshly created, or migrated from layout 1.0.0."""
    migrated = "migrated" in request.node.callspec.params.get("apdb_url", "")
    apdb = ApdbSql.create(ApdbConfig(url=apdb_url), drop=not migrated)
    yield apdb
    apdb.close()


# --------------------------------------------------------------------------- factories


def make_objects(ids, ra, dec, *, seed: int = 0, **columns) -> pd.DataFrame:
    """DiaObjects with every required SDM column (and a few optional ones) filled."""
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    data = {
        "diaObjectId": ids,
        "ra": np.asarray(ra, dtype=np.float64) * np.ones(n),
        "dec": np.asarray(dec, dtype=np.float64) * np.ones(n),
        "raErr": rng.uniform(1e-5, 1e-4, n).astype(np.float32),
        "decErr": rng.uniform(1e-5, 1e-4, n).astype(np.float32),
        "nDiaSources": np.ones(n, dtype=np.int32),
        "r_psfFluxMean": rng.normal(1000.0, 50.0, n).astype(np.float32),
        "lastDiaSourceMjdTai": np.full(n, 60000.0),
    }
    for band in sdm_bands():
        data[f"{band}_psfFluxNdata"] = np.zeros(n, dtype=np.int32)
    data.update(columns)
    return pd.DataFrame(data)


def sdm_bands() -> list[str]:
    return [
        c.name.split("_")[0] for c in sdm.columns("DiaObject") if c.name.endswith("_psfFluxNdata")
    ]


def make_sources(ids, object_ids, ra, dec, *, visit, detector, mjd, seed: int = 0, **columns):
    """DiaSources of one (visit, detector) with every required SDM column filled."""
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    data = {
        "diaSourceId": ids,
        "visit": np.full(n, visit, dtype=np.int64),
        "detector": np.full(n, detector, dtype=np.int16),
        "diaObjectId": pd.array(np.asarray(object_ids, dtype=np.int64), dtype="Int64"),
        "midpointMjdTai": np.asarray(mjd, dtype=np.float64) * np.ones(n),
        "ra": np.asarray(ra, dtype=np.float64) * np.ones(n),
        "dec": np.asarray(dec, dtype=np.float64) * np.ones(n),
        "x": rng.uniform(0, 4000, n).astype(np.float32),
        "y": rng.uniform(0, 4000, n).astype(np.float32),
        "psfFlux": rng.normal(500.0, 30.0, n).astype(np.float32),
        "psfNdata": np.full(n, 10, dtype=np.int32),
        "trailNdata": np.zeros(n, dtype=np.int32),
        "dipoleNdata": np.zeros(n, dtype=np.int32),
        "timeProcessedMjdTai": np.full(n, 60500.0),
        "bboxSize": np.full(n, 30, dtype=np.int32),
        "band": np.full(n, "r", dtype=object),
    }
    data.update(columns)
    return pd.DataFrame(data)


def make_forced(ids, object_ids, ra, dec, *, visit, detector, mjd, seed: int = 0, **columns):
    """DiaForcedSources of one (visit, detector) with every required SDM column filled."""
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    data = {
        "diaForcedSourceId": ids,
        "diaObjectId": np.asarray(object_ids, dtype=np.int64),
        "ra": np.asarray(ra, dtype=np.float64) * np.ones(n),
        "dec": np.asarray(dec, dtype=np.float64) * np.ones(n),
        "visit": np.full(n, visit, dtype=np.int64),
        "detector": np.full(n, detector, dtype=np.int16),
        "psfFlux": rng.normal(100.0, 10.0, n).astype(np.float32),
        "midpointMjdTai": np.asarray(mjd, dtype=np.float64) * np.ones(n),
        "timeProcessedMjdTai": np.full(n, 60500.0),
        "band": np.full(n, "g", dtype=object),
    }
    data.update(columns)
    return pd.DataFrame(data)


def store_detector(db, visit, detector, object_ids, ra, dec, mjd, *, source_base=None):
    """Store objects with one source and one forced source each for (visit, detector)."""
    object_ids = np.asarray(object_ids, dtype=np.int64)
    base = (visit * 1000 + detector) * 100_000 if source_base is None else source_base
    src_ids = base + np.arange(len(object_ids))
    return db.store(
        visit,
        detector,
        make_objects(object_ids, ra, dec),
        make_sources(src_ids, object_ids, ra, dec, visit=visit, detector=detector, mjd=mjd),
        make_forced(src_ids, object_ids, ra, dec, visit=visit, detector=detector, mjd=mjd),
        time_mjd=mjd,
    )
