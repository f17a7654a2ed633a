"""Two overlapping visits processed at the same time: no DiaObject twice, no source lost.

Visit V1 loads and associates before the overlapping visit V0 has stored
(both visits' threads wait at the store stage until both have loaded), then V0
stores, then V1. V1's guarded store finds V0's DiaObjects in its footprint and
re-associates (:func:`flows.detector.store_guarded`); the APDB and the alerts
must equal those of processing V0 then V1 one after the other. Run on SQLite
and on the real PostgreSQL server.
"""

from __future__ import annotations

import threading

import pandas as pd
import pytest
import sqlalchemy as sa

from alerts.store import read_alert_file
from core.bundle import read_visit_info
from flows.stages import PIPELINE, GroupResult, StageContext, run_group, run_table
from flows.visit import _now_mjd_tai, run_visit_plain
from tests.apdb.conftest import fresh_pg_database
from tests.conftest import V0, V1, make_config

pytestmark = pytest.mark.usefixtures("empty_process_caches")


@pytest.fixture(params=["sqlite", "postgresql"])
def apdb_urls(request, tmp_path):
    """APDB URLs of the serial control and of the concurrent run, on one backend."""
    if request.param == "sqlite":
        yield str(tmp_path / "serial.sqlite3"), str(tmp_path / "concurrent.sqlite3")
        return
    with fresh_pg_database("diapipe_overlap") as a, fresh_pg_database("diapipe_overlap") as b:
        yield a, b


def _config(tmp_path, name: str, url: str):
    config = make_config(tmp_path / name)
    return config.model_copy(update={"apdb": config.apdb.model_copy(update={"url": url})})


def _run_overlapping(root: str, config) -> dict[int, dict]:
    """V0 and V1 at once: both load before either stores, then V0 stores, then V1."""
    both_loaded = threading.Barrier(2, timeout=120)
    v0_stored = threading.Event()
    out: dict[int, dict] = {}
    failures: list[BaseException] = []

    def call(stage, ctx, detectors, inputs) -> GroupResult:
        if stage.name == "store":
            both_loaded.wait()
            if ctx.visit.visit == V1 and not v0_stored.wait(120):
                raise TimeoutError("visit V0 never stored")
        result = run_group(stage, ctx, detectors, inputs)
        if stage.name == "store" and ctx.visit.visit == V0:
            v0_stored.set()
        return result

    def one(visit: int) -> None:
        try:
            info = read_visit_info(root, visit)
            ctx = StageContext(root, info, config, _now_mjd_tai())
            out[visit] = run_table(PIPELINE, ctx, sorted(info.detectors), call)
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)
            both_loaded.abort()
            v0_stored.set()

    threads = [threading.Thread(target=one, args=(v,)) for v in (V0, V1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures
    return out


#: Each table's key; a DiaObject has one row per version (nDiaSources grows).
_KEYS = {
    "DiaObject": ["diaObjectId", "nDiaSources"],
    "DiaObjectLast": ["diaObjectId"],
    "DiaSource": ["diaSourceId"],
    "DiaForcedSource": ["diaObjectId", "visit", "detector"],
}
#: Times of processing differ between two runs; the packed row (payload) holds them too.
_TIMES = ("timeProcessedMjdTai", "validityStartMjdTai", "validityEndMjdTai", "payload")


def _table(url: str, name: str) -> pd.DataFrame:
    engine = sa.create_engine(url if "://" in url else f"sqlite:///{url}")
    try:
        with engine.connect() as conn:
            df = pd.read_sql_query(sa.text(f'SELECT * FROM "{name}"'), conn)
    finally:
        engine.dispose()
    df = df.drop(columns=[c for c in _TIMES if c in df.columns])
    return df.sort_values(_KEYS[name]).reset_index(drop=True)


def _alerts(folder) -> tuple[dict, int]:
    """diaSourceId → (DiaObject, history IDs) of every alert file, and the number of alerts."""
    out, n = {}, 0
    for f in sorted(folder.glob("*.avro")):
        for a in read_alert_file(str(f)):
            n += 1
            out[a["diaSourceId"]] = (
                a["diaSource"]["visit"],
                a["diaSource"]["diaObjectId"],
                (a["diaObject"] or {}).get("nDiaSources"),
                sorted(p["diaSourceId"] for p in a["prvDiaSources"] or []),
                sorted((p["diaObjectId"], p["visit"]) for p in a["prvDiaForcedSources"] or []),
            )
    return out, n


def test_overlapping_visits_at_once_store_each_source_once_and_alert_it_once(
    survey_root, tmp_path, apdb_urls
):
    serial_url, concurrent_url = apdb_urls
    serial = _config(tmp_path, "serial", serial_url)
    concurrent = _config(tmp_path, "concurrent", concurrent_url)
    for visit in (V0, V1):
        assert run_visit_plain(survey_root, visit, serial)["failed"] == {}

    outcome = _run_overlapping(survey_root, concurrent)

    for visit in (V0, V1):
        produce = outcome[visit]["produce"]
        assert isinstance(produce, GroupResult), produce
        assert produce.errors == {}, produce.errors
    n_objects = len(_table(concurrent_url, "DiaObjectLast"))
    n_serial = len(_table(serial_url, "DiaObjectLast"))
    assert n_objects == n_serial, f"{n_objects - n_serial} duplicate DiaObjects"
    for name in _KEYS:
        a, b = _table(concurrent_url, name), _table(serial_url, name)
        assert len(a) == len(b) > 0, name
        pd.testing.assert_frame_equal(a, b, obj=name)
    assert _table(concurrent_url, "DiaObjectLast")["diaObjectId"].is_unique

    alerts, n_alerts = _alerts(tmp_path / "concurrent" / "alerts")
    serial_alerts, _ = _alerts(tmp_path / "serial" / "alerts")
    sources = _table(concurrent_url, "DiaSource")
    assert n_alerts == len(alerts) == len(sources), "every stored DiaSource alerted exactly once"
    assert set(alerts) == set(sources["diaSourceId"])
    # V1's alerts carry V0 in their history, as in serial processing.
    assert alerts == serial_alerts
    assert any(v == V1 and hist for v, _, _, hist, _ in alerts.values())
    # V1 associated against an APDB without V0, so its stores found V0 there and re-associated.
    store = outcome[V1]["store"]
    assert isinstance(store, GroupResult)
    assert sum(c["reassociated"] for c in store.counts.values()) > 0, store.counts
    assert all(c["reassociated"] == 0 for c in outcome[V0]["store"].counts.values())
