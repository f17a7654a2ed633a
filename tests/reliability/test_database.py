"""Database faults: a dropped connection or a failure inside the store transaction.

Faults are injected in the database itself (a trigger on DiaSource, written
after the marker and the DiaObjects), so the transaction has already written
part of the detector when it breaks.
"""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from apdb import make_apdb
from apdb.config import ApdbConfig
from apdb.sql import ApdbSql
from flows.visit import run_visit
from tests.conftest import V0, V1, make_config

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _config(tmp_path, url: str, **orch):
    c = make_config(tmp_path, cache=False, **orch)
    return c.model_copy(update={"apdb": ApdbConfig(url=url)})


def _alert_ids(folder) -> list[int]:
    from alerts.store import read_alert_batch

    return [
        int(i)
        for f in sorted(folder.glob("*.avro"))
        for i in read_alert_batch(str(f)).dia_source_ids
    ]


def _source_ids(url: str) -> list[int]:
    engine = sa.create_engine(url if "://" in url else f"sqlite:///{url}")
    with engine.connect() as conn:
        ids = [r[0] for r in conn.exec_driver_sql('SELECT "diaSourceId" FROM "DiaSource"')]
    engine.dispose()
    return ids


@pytest.mark.postgresql
def test_connection_killed_mid_store_is_retried_never_partial(survey_root, tmp_path, pg_url):
    """pg_terminate_backend from another connection while the store transaction runs."""
    ApdbSql.create(ApdbConfig(url=pg_url), drop=True).close()
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE fault_flag (armed int)")
        conn.exec_driver_sql("INSERT INTO fault_flag VALUES (1)")
        conn.exec_driver_sql(
            "CREATE FUNCTION slow_forced() RETURNS trigger AS $$ BEGIN "
            "IF EXISTS (SELECT 1 FROM fault_flag) THEN PERFORM pg_sleep(30); END IF; "
            "RETURN NULL; END $$ LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            'CREATE TRIGGER slow_forced BEFORE INSERT ON "DiaSource" '
            "FOR EACH STATEMENT EXECUTE FUNCTION slow_forced()"
        )
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        with admin.connect() as conn:
            while not stop.is_set() and not killed:
                pids = [
                    r[0]
                    for r in conn.exec_driver_sql(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
                        "AND datname = current_database()"
                    )
                ]
                for pid in pids:
                    conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
                    killed.append(pid)
                if killed:
                    conn.exec_driver_sql("DELETE FROM fault_flag")  # the retry goes through
                time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    config = _config(tmp_path, pg_url, detectors_per_task=1, max_workers=1, retry_backoff_s=0.2)
    try:
        state, result = run_visit(survey_root, V0, config)
    finally:
        stop.set()
        thread.join(timeout=5)
        admin.dispose()
    assert killed, "the fault was injected"
    assert state.name == "Completed", state.message
    ids = _source_ids(pg_url)
    assert len(ids) == len(set(ids)), "no DiaSource stored twice"
    assert sorted(ids) == sorted(_alert_ids(tmp_path / "alerts")), "stored == alerted"
    apdb = make_apdb(pg_url)
    summary = apdb.visit_summary(V0)
    assert int(summary["nDiaSources"].sum()) == len(ids), "markers agree with the rows"


def test_failure_inside_the_transaction_leaves_nothing(survey_root, tmp_path):
    """SQLite: the last insert of the store fails; marker, objects, sources roll back."""
    url = str(tmp_path / "apdb.sqlite3")
    ApdbSql.create(ApdbConfig(url=url)).close()
    engine = sa.create_engine(f"sqlite:///{url}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            'CREATE TRIGGER fail_sources BEFORE INSERT ON "DiaSource" '
            "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
        )
    config = _config(tmp_path, url)
    state, result = run_visit(survey_root, V1, config)
    failing = sorted(d for d, e in result["failed"].items() if "injected fault" in e)
    assert failing, result["failed"]
    assert state.name == "Partial"
    apdb = make_apdb(url)
    assert not (apdb.done_detectors(V1) & set(failing)), "no marker for a failed store"
    stored = _source_ids(url)
    assert len(stored) == sum(
        row.get("store_sources", 0) for row in result["table"] if row["detector"] not in failing
    ), "no row of a failed detector"
    for det in failing:
        assert not (tmp_path / "alerts" / f"{V1}_{det}.avro").exists(), "no alert for unstored data"

    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER fail_sources")
    engine.dispose()
    state2, result2 = run_visit(survey_root, V1, config)
    assert state2.name == "Completed", state2.message
    assert sorted(result2["skipped"]) == sorted(set(result["detectors"]) - set(failing))
    ids = _source_ids(url)
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(_alert_ids(tmp_path / "alerts"))


def test_database_down_at_start_fails_clearly_and_sends_nothing(survey_root, tmp_path):
    url = "postgresql://postgres@127.0.0.1:1/nowhere"
    config = _config(tmp_path, url).model_copy(
        update={"apdb": ApdbConfig(url=url, connect_timeout_s=2)}
    )
    state, result = run_visit(survey_root, V0, config)
    assert state.is_failed()
    assert "127.0.0.1:1" in str(result) and "nowhere" in str(result)
    assert not (tmp_path / "alerts").exists() or not list((tmp_path / "alerts").rglob("*.avro"))


def test_rerun_of_a_finished_visit_adds_nothing(survey_root, tmp_path):
    config = _config(tmp_path, str(tmp_path / "apdb.sqlite3"))
    state, first = run_visit(survey_root, V0, config)
    assert state.name == "Completed"
    counts = make_apdb(config.apdb).row_counts()
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "alerts").glob("*.avro")}
    state, again = run_visit(survey_root, V0, config)
    assert state.name == "Completed"
    assert again["alerts"] == 0 and sorted(again["skipped"]) == sorted(first["detectors"])
    assert make_apdb(config.apdb).row_counts() == counts, "0 new rows"
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "alerts").glob("*.avro")} == files
    ids = _alert_ids(tmp_path / "alerts")
    assert len(ids) == len(set(ids)), "0 duplicate alerts"
