"""Result caching never serves a stale or failed answer; what it stores stays small."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from apdb import ApdbConfig, ApdbSql
from core.bundle import read_visit_info
from core.errors import InputError
from flows import detector as D
from flows import stages as S
from flows.visit import run_visit, run_visit_plain
from tests.conftest import V0, V1, V2, make_config

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def field_root(tmp_path_factory) -> str:
    """3 visits x 2 detectors of one field, 80 DiaSources per detector (seed 5)."""
    from sim.config import SurveyConfig
    from sim.survey import Survey

    root = tmp_path_factory.mktemp("field")
    survey = Survey(SurveyConfig(seed=5, n_detectors=2, n_visits=3, sources_per_detector=80))
    for visit in range(3):
        survey.write_visit(str(root), visit)
    assert [survey.config.visit_number(k) for k in range(3)] == [V0, V1, V2]
    return str(root)


def _fail_sources(db: Path, on: bool) -> None:
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        if on:
            conn.exec_driver_sql(
                'CREATE TRIGGER fail_sources BEFORE INSERT ON "DiaSource" '
                "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
            )
        else:
            conn.exec_driver_sql("DROP TRIGGER fail_sources")
    engine.dispose()


def _stored(db: Path) -> dict:
    with sqlite3.connect(db) as c:
        return {
            "sources": sorted(
                c.execute(
                    'SELECT "diaSourceId", "diaObjectId", visit, detector FROM "DiaSource"'
                ).fetchall()
            ),
            "objects": sorted(
                c.execute('SELECT "diaObjectId", "nDiaSources" FROM "DiaObjectLast"').fetchall()
            ),
            "inconsistent": c.execute(
                'SELECT count(*) FROM "DiaObjectLast" o WHERE o."nDiaSources" != '
                '(SELECT count(*) FROM "DiaSource" s WHERE s."diaObjectId" = o."diaObjectId")'
            ).fetchone()[0],
        }


def _operator_sequence(root: str, work: Path, *, later_visit: bool = True, **orchestration):
    """Visit 0; visit 1 with every DiaSource insert failing; visit 2; visit 1 again.

    With ``later_visit=False`` visit 2 is left out: visit 1 is re-run right after
    its failure.
    """
    work.mkdir(parents=True)
    config = make_config(work, **orchestration)
    db = work / "apdb.sqlite3"
    ApdbSql.create(ApdbConfig(url=str(db))).close()
    assert run_visit(root, V0, config)[0].name == "Completed"
    _fail_sources(db, True)
    state, result = run_visit(root, V1, config)
    assert state.name == "Partial" and len(result["failed"]) == 2, result["failed"]
    assert all("injected" in e for e in result["failed"].values()), result["failed"]
    _fail_sources(db, False)
    if later_visit:
        assert run_visit(root, V2, config)[0].name == "Completed"
    return run_visit(root, V1, config)


def test_rerun_after_a_later_visit_does_what_an_uncached_run_does(field_root, tmp_path):
    """The operator's sequence with visit 2 stored before visit 1's re-run.

    Visits of one sky area are processed in time order (an alert is a function of
    its visit alone), so the re-run of visit 1 after visit 2 is refused per
    detector, cached or not; the cache must neither store stale objects nor hide
    the refusal.
    """
    control_state, control = _operator_sequence(field_root, tmp_path / "nocache", cache=False)
    state, result = _operator_sequence(field_root, tmp_path / "default")
    assert state.name == control_state.name == "Partial"
    assert sorted(result["failed"]) == sorted(control["failed"]) == sorted(result["detectors"])
    assert all("OutOfOrderError" in e for e in result["failed"].values()), result["failed"]
    default, expected = (
        _stored(tmp_path / "default" / "apdb.sqlite3"),
        _stored(tmp_path / "nocache" / "apdb.sqlite3"),
    )
    assert default["inconsistent"] == 0, "nDiaSources agrees with the stored DiaSources"
    assert default == expected


def test_rerun_after_a_failed_store_stores_what_an_uncached_run_stores(field_root, tmp_path):
    control_state, control = _operator_sequence(
        field_root, tmp_path / "nocache", later_visit=False, cache=False
    )
    assert control_state.name == "Completed", control_state.message

    state, result = _operator_sequence(field_root, tmp_path / "default", later_visit=False)
    assert state.name == "Completed", state.message
    assert result["failed"] == {}
    default, expected = (
        _stored(tmp_path / "default" / "apdb.sqlite3"),
        _stored(tmp_path / "nocache" / "apdb.sqlite3"),
    )
    assert default["inconsistent"] == 0, "nDiaSources agrees with the stored DiaSources"
    assert len(default["objects"]) == len(expected["objects"]), "no duplicate DiaObject"
    assert default == expected
    # Visit 1's alerts are out after the first re-run, one per stored DiaSource.
    files = sorted(p.name for p in (tmp_path / "default" / "alerts").glob(f"{V1}_*.avro"))
    assert files == sorted(f"{V1}_{d}.avro" for d in result["detectors"])
    assert result["alerts"] == control["alerts"] > 0
    assert result["alerts"] == sum(1 for s in default["sources"] if s[2] == V1)
    assert sum(row.get("associate_matched", 0) for row in control["table"]) > 0, "a real re-run"


def test_a_failed_detector_is_not_served_from_the_cache(survey_root, tmp_path, monkeypatch):
    info = read_visit_info(survey_root, V0)
    bad = info.detectors[0]
    real = D.calibrate_detector

    def flaky(root, visit, det, config, t):
        if det == bad:
            raise ValueError("calibration tables not readable yet")
        return real(root, visit, det, config, t)

    config = make_config(tmp_path)
    monkeypatch.setattr(D, "calibrate_detector", flaky)
    state, result = run_visit(survey_root, V0, config)
    assert state.name == "Partial" and set(result["failed"]) == {bad}
    monkeypatch.setattr(D, "calibrate_detector", real)  # the cause is fixed
    state, result = run_visit(survey_root, V0, config)
    assert state.name == "Completed", state.message
    assert (tmp_path / "alerts" / f"{V0}_{bad}.avro").exists()


def test_a_config_change_between_runs_is_honoured(field_root, tmp_path):
    """Visit 1 fails to store; its re-run with a wider association radius uses that radius."""
    results = {}
    for name, radius in (("narrow", 0.05), ("wide", 3.0)):
        work = tmp_path / name
        work.mkdir()
        config = make_config(work)
        db = work / "apdb.sqlite3"
        ApdbSql.create(ApdbConfig(url=str(db))).close()
        run_visit(field_root, V0, config)
        _fail_sources(db, True)
        run_visit(field_root, V1, config)
        _fail_sources(db, False)
        changed = config.model_copy(
            update={
                "association": config.association.model_copy(update={"max_distance_arcsec": radius})
            }
        )
        state, result = run_visit(field_root, V1, changed)
        assert state.name == "Completed", state.message
        results[name] = sum(row.get("associate_matched", 0) for row in result["table"])
        # What an uncached run with that radius finds on the same APDB state.
        results[name + "_expected"] = _matched_uncached(
            field_root, tmp_path / f"{name}-ctl", radius
        )
    assert results["narrow"] == results["narrow_expected"]
    assert results["wide"] == results["wide_expected"]
    assert results["wide"] > results["narrow"]


def _matched_uncached(root: str, work: Path, radius: float) -> int:
    work.mkdir()
    config = make_config(work, cache=False)
    run_visit_plain(root, V0, config)
    changed = config.model_copy(
        update={
            "association": config.association.model_copy(update={"max_distance_arcsec": radius})
        }
    )
    result = run_visit_plain(root, V1, changed)
    return sum(row.get("associate_matched", 0) for row in result["table"])


def test_the_code_version_is_in_the_key(survey_root, tmp_path, monkeypatch):
    info = read_visit_info(survey_root, V0)
    config = make_config(tmp_path)
    ctx = S.StageContext(survey_root, info, config, 61000.0)
    calibrate = next(s for s in S.PIPELINE if s.name == "calibrate")
    dets = list(info.detectors[:2])
    first = S.run_group(calibrate, ctx, dets, {})
    again = S.run_group(calibrate, ctx, dets, {})
    assert first.cached == () and again.cached == tuple(dets)
    assert all(again.values[d].equals(first.values[d]) for d in dets)
    monkeypatch.setattr(S, "code_version", lambda: "0.0.0+other")
    assert S.run_group(calibrate, ctx, dets, {}).cached == ()


def test_result_storage_after_a_default_run_is_within_a_tenth_of_the_alerts(survey_root, tmp_path):
    config = make_config(tmp_path)
    state, result = run_visit(survey_root, V0, config)
    assert state.name == "Completed", state.message
    alert_bytes = sum(p.stat().st_size for p in (tmp_path / "alerts").glob(f"{V0}_*.avro"))
    stored = [p for p in (tmp_path / "results").rglob("*") if p.is_file()]
    assert stored, "the default run caches its calibrate results"
    assert sum(p.stat().st_size for p in stored) <= 0.10 * alert_bytes


def test_expired_cache_entries_are_deleted(survey_root, tmp_path):
    import os
    import time

    config = make_config(tmp_path, cache_expiration_hours=1.0)
    info = read_visit_info(survey_root, V0)
    calibrate = next(s for s in S.PIPELINE if s.name == "calibrate")
    S.run_group(
        calibrate, S.StageContext(survey_root, info, config, 61000.0), [info.detectors[0]], {}
    )
    entries = list((tmp_path / "results").rglob("*.pkl"))
    assert len(entries) == 1
    old = time.time() - 2 * 3600
    os.utime(entries[0], (old, old))
    assert S.prune_cache(config.orchestration) == 1
    assert not entries[0].exists()


def test_a_detector_listed_twice_is_refused(survey_root, tmp_path):
    det = read_visit_info(survey_root, V0).detectors[0]
    config = make_config(tmp_path, cache=False)
    state, result = run_visit(survey_root, V0, config, detectors=[det, det])
    assert isinstance(result, InputError), result
    assert f"detectors [{det}] are listed more than once" in str(result)
    assert not (tmp_path / "alerts").exists() or not list((tmp_path / "alerts").glob("*.avro"))
    with pytest.raises(InputError, match="listed more than once"):
        run_visit_plain(survey_root, V0, config, detectors=[det, det])
