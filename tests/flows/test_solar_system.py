"""The visit with known asteroids: SSO alerts, SSSource rows, filters counted, bad ephemerides.

A small simulated survey (2 detectors of 256 px, many moving objects, most
of them known) is run with the plain runner (the same stage table as the
Prefect flow, without its server); recovery is checked by rebuilding each
detector's alerts from the APDB and comparing bytes.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest
from lsst.alert.packet import Schema, get_schema_path

from alerts.packet import decode_alert
from alerts.store import qa_sources_url, read_alert_batch
from core.bundle import read_visit_info
from core.ids import IdPacker
from flows import detector as D
from flows.visit import run_visit_plain
from tests.conftest import V0, V1, make_config

N_DET = 2


@pytest.fixture(scope="module")
def sso_root(tmp_path_factory) -> str:
    from sim.config import SurveyConfig
    from sim.survey import Survey

    root = tmp_path_factory.mktemp("sso-bundles")
    survey = Survey(
        SurveyConfig(
            seed=11,
            n_detectors=N_DET,
            n_visits=2,
            detector_size=(256, 256),
            sources_per_detector=40,
            real_mix=(0.3, 0.2, 0.5),
        )
    )
    # the shared survey's visit numbers: the same start and cadence
    assert [survey.config.visit_number(k) for k in range(2)] == [V0, V1]
    for visit in range(2):
        survey.write_visit(str(root), visit)
    return str(root)


def _detectors(root: str, visit: int = V0) -> list[int]:
    return list(read_visit_info(root, visit).detectors)


def _truth(root: str, visit: int) -> pd.DataFrame:
    from sim.scoring import load_truth

    truth = load_truth(root, [visit], _detectors(root, visit), IdPacker())
    ss = pd.read_parquet(f"{root}/truth/solarsystem.parquet")
    ss = ss.astype({"ssObjectId": "Int64"})  # ids exceed 2**53: never as floats
    return truth.merge(ss[["truthId", "ssObjectId", "known"]], on="truthId", how="left")


def _alerts(location, visit: int, dets) -> tuple[dict[int, bytes], dict[int, dict]]:
    payloads, records = {}, {}
    for det in dets:
        url = f"{location}/{visit}_{det}.avro"
        batch = read_alert_batch(url)
        for sid, p in zip(batch.dia_source_ids.tolist(), batch.payloads, strict=True):
            payloads[sid] = p
            records[sid] = decode_alert(p, batch.schema)
    return payloads, records


def test_known_asteroids_give_sso_alerts_and_no_dia_objects(sso_root, tmp_path):
    config = make_config(tmp_path, cache=False)
    result = run_visit_plain(sso_root, V0, config)
    assert result["failed"] == {}
    payloads, recs = _alerts(tmp_path / "alerts", V0, result["detectors"])
    truth = _truth(sso_root, V0).set_index("diaSourceId")
    sso = {k: r for k, r in recs.items() if r["ssSource"] is not None}
    assert len(sso) >= 5, "the survey puts known asteroids on the detectors"

    # every alert validates against the official schema of its version
    major, minor = (
        int(x) for x in read_alert_batch(result["alert_files"][0]).schema.version.split(".")
    )
    official = Schema.from_file(f"{get_schema_path(major, minor)}/lsst.v{major}_{minor}.alert.avsc")
    assert all(official.validate(r) for r in recs.values())

    # SSO alerts: ssSource + mpc_orbits, no diaObject, no history, the right asteroid
    for sid, r in sso.items():
        assert r["diaSource"]["diaObjectId"] == 0
        assert r["diaSource"]["ssObjectId"] == r["ssSource"]["ssObjectId"]
        assert r["ssSource"]["ssObjectId"] == truth.loc[sid, "ssObjectId"]
        assert r["mpc_orbits"] is not None and r["mpc_orbits"]["designation"]
        assert r["diaObject"] is None
        assert r["prvDiaSources"] is None and r["prvDiaForcedSources"] is None
        assert r["ssSource"]["ephOffset"] < 1.0

    # the APDB: SSSource rows for exactly those sources, no DiaObject made from them
    with sqlite3.connect(tmp_path / "apdb.sqlite3") as db:
        ss_ids = {i for (i,) in db.execute('SELECT "diaSourceId" FROM "SSSource"')}
        obj_ids = {i for (i,) in db.execute('SELECT "diaObjectId" FROM "DiaObjectLast"')}
        zero = db.execute('SELECT count(*) FROM "DiaSource" WHERE "diaObjectId" = 0').fetchone()
    assert ss_ids == set(sso)
    assert zero[0] == len(sso)
    assert not (obj_ids & set(sso)), "no DiaObject is created by a solar-system source"

    # counts: per detector and for the visit
    rows = {r["detector"]: r for r in result["table"]}
    assert sum(r["ssoassociate_associated"] for r in rows.values()) == len(sso)
    assert sum(r["store_ss_sources"] for r in rows.values()) == len(sso)
    f = result["filters"]
    assert f["solar_system"] == len(sso)
    assert f["unreliable"] == sum(r["ssoassociate_unreliable"] for r in rows.values()) > 0
    assert set(f) == {"unreliable", "trailed", "solar_system", "marginal", "not_good_objects"}
    # the unreliable sources are gone: none of them is stored or alerted
    cal_rel = [r["diaSource"]["reliability"] for r in recs.values()]
    assert min(v for v in cal_rel if v is not None) >= config.source_filters.min_reliability

    # QA tables beside the alerts, one row per marginal / trailed source counted
    for det, row in rows.items():
        for kind, col in (("marginal", "associate_rejected"), ("trailed", "ssoassociate_trailed")):
            qa = pd.read_parquet(qa_sources_url(str(tmp_path / "alerts"), V0, det, kind))
            assert len(qa) == row[col]
            assert "diaSourceId" in qa.columns


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_recovered_sso_alerts_are_byte_identical(sso_root, tmp_path, backend):
    if backend == "postgresql":
        from tests.apdb.conftest import fresh_pg_database

        with fresh_pg_database("diapipe_sso") as url:
            _check_recovery(sso_root, tmp_path, url)
    else:
        _check_recovery(sso_root, tmp_path, None)


def _check_recovery(sso_root, tmp_path, url) -> None:
    config = make_config(tmp_path, cache=False)
    if url is not None:
        config = config.model_validate(
            {**config.model_dump(), "apdb": {**config.apdb.model_dump(), "url": url}}
        )
    for v in (V0, V1):
        assert run_visit_plain(sso_root, v, config)["failed"] == {}
    dets = _detectors(sso_root)
    first, recs = _alerts(tmp_path / "alerts", V0, dets)
    n_sso = sum(r["ssSource"] is not None for r in recs.values())
    assert n_sso > 0
    info = read_visit_info(sso_root, V0)
    rebuilt = {}
    for det in dets:
        batch = D.recover_detector(sso_root, info, det, config)
        rebuilt.update(zip(batch.dia_source_ids.tolist(), batch.payloads, strict=True))
    assert sorted(rebuilt) == sorted(first)
    differ = [k for k in first if first[k] != rebuilt[k]]
    assert differ == [], f"{len(differ)} of {len(first)} recovered alerts differ ({n_sso} SSO)"
    assert (tmp_path / "apdb.sqlite3").exists() == (url is None), "the backend under test"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda e: e.drop(columns="ephDec"), "missing required column(s) ephDec"),
        (
            lambda e: e.assign(ephRa=np.where(np.arange(len(e)) == 0, np.nan, e["ephRa"])),
            "ephRa is not finite",
        ),
        (lambda e: pd.concat([e, e.iloc[:1]], ignore_index=True), "duplicate ssObjectId"),
    ],
)
def test_malformed_ephemerides_fail_only_that_detector(sso_root, tmp_path, change, problem):
    import shutil

    root = tmp_path / "bundles"
    shutil.copytree(sso_root, root)
    eph = pd.read_parquet(root / str(V0) / "ephemerides.parquet")
    good, bad_det = _detectors(sso_root)
    bad = root / str(V0) / str(bad_det) / "ephemerides.parquet"
    change(eph).to_parquet(bad)
    config = make_config(tmp_path, cache=False)
    result = run_visit_plain(str(root), V0, config)
    assert sorted(result["failed"]) == [bad_det]
    err = result["failed"][bad_det]
    assert "InputError" in err and str(bad) in err and problem in err, err
    assert result["succeeded"] == [good]
    # nothing of the failed detector was written: no marker, no rows, no alerts, no QA tables
    with sqlite3.connect(tmp_path / "apdb.sqlite3") as db:
        marked = {d for (d,) in db.execute('SELECT "detector" FROM "ApdbVisitDetector"')}
        n_bad = db.execute(
            'SELECT count(*) FROM "DiaSource" WHERE "detector" = ?', [bad_det]
        ).fetchone()[0]
    assert marked == {good} and n_bad == 0
    alerts = tmp_path / "alerts"
    assert not (alerts / f"{V0}_{bad_det}.avro").exists()
    assert not list(alerts.glob(f"{V0}_{bad_det}.*.parquet"))
    assert (alerts / f"{V0}_{good}.avro").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_prefect_flow_recovers_sso_alerts_with_the_same_bytes(sso_root, tmp_path):
    """Through the Prefect flow: SSO alerts out, lost after the commit, rebuilt by RECOVERY."""
    from flows.visit import run_visit

    config = make_config(tmp_path, cache=False)
    state, result = run_visit(sso_root, V0, config)
    assert state.name == "Completed", state.message
    assert result["filters"]["solar_system"] > 0
    dets = result["detectors"]
    first, recs = _alerts(tmp_path / "alerts", V0, dets)
    assert (
        sum(r["ssSource"] is not None for r in recs.values()) == result["filters"]["solar_system"]
    )
    for f in (tmp_path / "alerts").glob(f"{V0}_*.avro"):
        f.unlink()
    for f in (tmp_path / "alerts" / "receipts").glob(f"{V0}_*.json"):
        f.unlink()
    state, again = run_visit(sso_root, V0, config)
    assert state.name == "Completed", state.message
    assert sorted(again["recovered"]) == sorted(dets)
    rebuilt, _ = _alerts(tmp_path / "alerts", V0, dets)
    assert rebuilt == first
