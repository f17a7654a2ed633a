"""Optional backends are imported only by the runs that use them.

The default run (SQLite APDB, alert files on a local disk, threads) must not
load the PostgreSQL driver, S3, Kafka, Dask or matplotlib: each costs start-up
time and memory in every worker, and a broken install of one of them must not
break a run that does not use it. Each check runs in a fresh interpreter, so
what the test process itself has imported does not count.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from apdb.sql import _translate, psycopg_errors
from core.errors import ApdbError, TransientError

REPO = Path(__file__).resolve().parents[1]

#: modules only an optional backend needs
BACKENDS = (
    "psycopg",
    "s3fs",
    "aiobotocore",
    "confluent_kafka",
    "dask",
    "distributed",
    "prefect_dask",
    "matplotlib",
)


def loaded_after(code: str) -> list[str]:
    """The modules of :data:`BACKENDS` loaded after running ``code`` in a new interpreter."""
    script = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        print(json.dumps([m for m in {BACKENDS!r} if sys.modules.get(m) is not None]))
        """
    )
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_product_loads_no_backend():
    code = """
        import flows.visit, flows.detector, flows.stages
        import apdb, apdb.sql, apdb.migrate, apdb.__main__
        import alerts.store, alerts.packet, alerts.cutouts, alerts.__main__
    """
    assert loaded_after(code) == []


def test_a_sqlite_apdb_loads_no_backend(tmp_path):
    db = tmp_path / "apdb.db"
    code = f"""
        import flows.visit
        from apdb import make_apdb
        from apdb.__main__ import main

        with make_apdb({str(db)!r}) as db:
            db.row_counts()
            db.visits()
        for argv in (["info"], ["visits"], ["visit", "1"], ["cone", "10", "10", "1"]):
            assert main([argv[0], {str(db)!r}, *argv[1:]]) == 0
    """
    assert loaded_after(code) == []


def test_error_mapping_without_the_postgresql_driver():
    code = """
        import sqlite3
        from apdb.sql import _translate, psycopg_errors
        from core.errors import TransientError

        assert psycopg_errors("OperationalError", "LockNotAvailable") == ()
        mapped = _translate(sqlite3.OperationalError("database is locked"), "store", "a.db")
        assert isinstance(mapped, TransientError), mapped
    """
    assert loaded_after(code) == []


def test_error_mapping_recognises_psycopg_errors_once_loaded():
    import psycopg

    assert psycopg_errors("LockNotAvailable") == (psycopg.errors.LockNotAvailable,)
    mapped = _translate(psycopg.errors.LockNotAvailable("lock timeout"), "store", "pg")
    assert isinstance(mapped, TransientError) and "lock_timeout_ms" in str(mapped)
    mapped = _translate(psycopg.errors.SerializationFailure("conflict"), "store", "pg")
    assert isinstance(mapped, TransientError)
    mapped = _translate(psycopg.errors.UndefinedTable("no table"), "read", "pg")
    assert isinstance(mapped, ApdbError) and not isinstance(mapped, TransientError)
    assert isinstance(_translate(sqlite3.DatabaseError("malformed"), "read", "a.db"), ApdbError)


#: run first: the optional backends as if not installed (a default install); a
#: ``None`` in ``sys.modules`` makes their import fail and ``find_spec`` say absent
BLOCK_BACKENDS = f"""
import sys
for _name in {BACKENDS!r}:
    sys.modules[_name] = None
"""


def test_the_default_run_needs_no_optional_backend(tmp_path):
    """``python -m flows.visit`` (SQLite, local files, threads) with no extra installed."""
    code = BLOCK_BACKENDS + textwrap.dedent(
        f"""
        from flows.visit import main
        rc = main(["--workdir", {str(tmp_path)!r}, "--sim-visits", "1",
                   "--sim-detectors", "2", "--sim-sources", "15"])
        assert rc == 0, rc
        """
    )
    assert loaded_after(code) == []
    assert list((tmp_path / "alerts").glob("*.avro")), "the default run wrote no alerts"


def test_kafka_output_without_its_package_names_the_extra():
    code = BLOCK_BACKENDS + textwrap.dedent(
        """
        import numpy as np
        from alerts.kafka import KafkaConfig, _send
        from core.errors import ConfigError

        class Batch:
            def __len__(self):
                return 1

        try:
            _send(Batch(), KafkaConfig(servers="127.0.0.1:1", topic="t"))
        except ConfigError as exc:
            assert "pip install 'diapipe[kafka]'" in str(exc), exc
            assert "Kafka output" in str(exc), exc
        else:
            raise AssertionError("no ConfigError")
        """
    )
    assert loaded_after(code) == []


def test_a_visit_asking_for_kafka_without_its_package_fails_before_any_work(tmp_path):
    """The flow stops at its start with the extra named; no detector is loaded or stored."""
    code = BLOCK_BACKENDS + textwrap.dedent(
        f"""
        import contextlib, io, sys
        from flows.visit import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["--workdir", {str(tmp_path)!r}, "--sim-visits", "1",
                       "--sim-detectors", "2", "--sim-sources", "15",
                       "--kafka", "127.0.0.1:1", "--topic", "t"])
        sys.stdout.write(err.getvalue())
        assert rc != 0, rc
        """
    )
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Kafka output needs the 'kafka' extra" in out.stdout, out.stdout + out.stderr[-2000:]
    assert not list((tmp_path / "alerts").glob("*.avro")), "alerts written before the check"


def test_forced_photometry_runs_without_numba():
    """numba is an extra: without it the pixel sums are the numpy gather, with the same fluxes."""
    code = """
        import sys
        sys.modules["numba"] = None  # an install without the 'numba' extra
        import numpy as np
        import tasks.forced as forced
        from tests.tasks.factories import make_exposure, render

        assert forced._psf_sums is forced._psf_sums_numpy
        x, y = np.array([20.3, 41.8, 0.4]), np.array([25.1, 30.6, 12.0])
        exp = make_exposure((60, 70), image=render((60, 70), x, y, np.full(3, 500.0)))
        flux, err, edge = forced.measure_psf_flux(exp, x, y)
        assert np.allclose(flux[:2] / exp.photo_calib, 500.0, rtol=1e-3), flux
        assert np.isfinite(err).all() and edge.tolist() == [False, False, True]
    """
    assert loaded_after(code) == []
