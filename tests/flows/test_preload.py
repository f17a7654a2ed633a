"""Preload from the next-visit message: used when it fits, exact, refreshed, discarded otherwise."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time

import pandas as pd
import pytest

from alerts.store import read_alert_file
from core.bundle import read_visit_info
from core.nextvisit import NextVisit
from flows import detector as D
from flows import preload as P
from flows.visit import run_visit_plain
from tests.conftest import V0, V1, V2, make_config

pytestmark = pytest.mark.usefixtures("empty_process_caches")


def _dets(survey_root: str) -> list[int]:
    return sorted(read_visit_info(survey_root, V0).detectors)


def _message(visit: int, **kw) -> NextVisit:
    from sim.config import SurveyConfig
    from sim.nextvisit import next_visit_message
    from sim.survey import Survey

    survey = Survey(
        SurveyConfig(
            seed=7, n_detectors=4, n_visits=3, detector_size=(256, 256), sources_per_detector=25
        )
    )
    return next_visit_message(survey, visit, **kw)


def _sorted(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return df.sort_values(keys).reset_index(drop=True)


def _assert_same_load(a: D.Loaded, b: D.Loaded) -> None:
    pd.testing.assert_frame_equal(
        _sorted(a.objects, ["diaObjectId"]), _sorted(b.objects, ["diaObjectId"])
    )
    pd.testing.assert_frame_equal(
        _sorted(a.sources, ["diaSourceId"]), _sorted(b.sources, ["diaSourceId"])
    )
    keys = ["diaObjectId", "visit", "detector"]
    pd.testing.assert_frame_equal(_sorted(a.forced, keys), _sorted(b.forced, keys))
    assert (a.n_in_region, a.n_outside_bbox) == (b.n_in_region, b.n_outside_bbox)


def test_refresh_finds_rows_stored_after_the_preload_and_equals_the_normal_load(
    survey_root, tmp_path
):
    """Visit 1 (overlapping) is stored between visit 2's preload and its load."""
    config = make_config(tmp_path)
    assert run_visit_plain(survey_root, V0, config)["failed"] == {}
    summary = P.preload_message(_message(2), config)
    assert sorted(summary["preloaded"]) == _dets(survey_root) and summary["bytes"] > 0
    preloaded_ids = {
        det: set(P._cache[(V2, det)].objects["diaObjectId"]) for det in _dets(survey_root)
    }
    assert run_visit_plain(survey_root, V1, config)["failed"] == {}

    info = read_visit_info(survey_root, V2)
    refreshed = found_after = 0
    for det in _dets(survey_root):
        with_preload = D.load_detector(survey_root, info, det, config)
        outcome = P.pop_outcome(V2, det)
        assert outcome["preload_used"] == 1, outcome
        assert P.cached_preloads().count((V2, det)) == 0, "a preload is used once"
        normal = D.load_detector(survey_root, info, det, config)
        assert P.pop_outcome(V2, det) == {"preload_used": 0}
        _assert_same_load(with_preload, normal)
        assert with_preload.objects["diaObjectId"].is_unique
        refreshed += outcome["preload_refreshed"]
        found_after += len(set(with_preload.objects["diaObjectId"]) - preloaded_ids[det])
    # Visit 1 made new DiaObjects (not in the preload) and new versions of visit 0's.
    assert found_after > 0 and refreshed >= found_after


#: Each table's primary key; a DiaObject has one row per version (nDiaSources grows).
_KEYS = {
    "DiaObject": ["diaObjectId", "nDiaSources"],
    "DiaSource": ["diaSourceId"],
    "DiaForcedSource": ["diaObjectId", "visit", "detector"],
}


def _table(config, name: str, drop: tuple[str, ...]) -> pd.DataFrame:
    with sqlite3.connect(config.apdb.url.removeprefix("sqlite:///")) as db:
        df = pd.read_sql_query(f'SELECT * FROM "{name}"', db)
    return _sorted(df.drop(columns=[c for c in drop if c in df.columns]), _KEYS[name])


def test_preload_then_process_gives_the_same_apdb_and_alerts(survey_root, tmp_path):
    for sub in ("plain", "pre"):
        (tmp_path / sub).mkdir()
    plain = make_config(tmp_path / "plain")
    pre = make_config(tmp_path / "pre")
    for config in (plain, pre):
        assert run_visit_plain(survey_root, V0, config)["failed"] == {}
    assert P.preload_message(_message(1), pre)["preloaded"] == _dets(survey_root)
    r_pre = run_visit_plain(survey_root, V1, pre)
    r_plain = run_visit_plain(survey_root, V1, plain)
    assert r_pre["preload_used_fraction"] == 1.0 and r_plain["preload_used_fraction"] == 0.0
    assert all(row["load_preload_used"] == 1 for row in r_pre["table"])
    # Nothing was stored between the preload and the load: all history comes from the preload.
    assert sum(row["load_preload_refreshed"] for row in r_pre["table"]) == 0
    assert sum(row["load_preload_reused"] for row in r_pre["table"]) > 0
    assert r_pre["alerts"] == r_plain["alerts"] > 0
    # Times of processing differ between any two runs; the packed row (payload) holds them too.
    times = ("timeProcessedMjdTai", "validityStartMjdTai", "validityEndMjdTai", "payload")
    for name in ("DiaObject", "DiaSource", "DiaForcedSource"):
        a, b = _table(pre, name, times), _table(plain, name, times)
        assert len(a) == len(b) > 0, name
        pd.testing.assert_frame_equal(a, b, obj=name)
    assert _alerts(tmp_path / "pre" / "alerts") == _alerts(tmp_path / "plain" / "alerts")


def _alerts(folder) -> dict:
    """diaSourceId → its DiaObject and the IDs of its history in the alert files under ``folder``."""
    out = {}
    for f in sorted(folder.glob(f"{V1}_*.avro")):
        for a in read_alert_file(str(f)):
            out[a["diaSourceId"]] = (
                a["diaSource"]["diaObjectId"],
                sorted(p["diaSourceId"] for p in a["prvDiaSources"] or []),
                sorted((p["diaObjectId"], p["visit"]) for p in a["prvDiaForcedSources"] or []),
            )
    assert out
    return out


def test_stale_and_misplaced_preloads_are_discarded(survey_root, tmp_path, caplog):
    """The first detector's preload is too old, the second's 0.5 deg off; the others are used."""
    config = make_config(tmp_path)
    assert run_visit_plain(survey_root, V0, config)["failed"] == {}
    info = read_visit_info(survey_root, V1)
    good = _message(1)
    moved = {d: tuple((ra + 0.5, dec) for ra, dec in c) for d, c in good.detector_corners.items()}
    far = dataclasses.replace(good, detector_corners=moved)
    d0, d1, d2, d3 = _dets(survey_root)
    P.preload_message(good, config)
    age = config.orchestration.preload_max_age_s + 1.0
    P._cache[(V1, d0)] = dataclasses.replace(P._cache[(V1, d0)], loaded_at=time.time() - age)
    P._keep(P.preload_detector(far, d1, config), 2**30)

    used = {}
    with caplog.at_level(logging.INFO, logger="flows.preload"):
        for det in _dets(survey_root):
            loaded = D.load_detector(survey_root, info, det, config)
            used[det] = P.pop_outcome(V1, det)["preload_used"]
            _assert_same_load(loaded, D.load_detector(survey_root, info, det, config))
    assert used == {d0: 0, d1: 0, d2: 1, d3: 1}, used
    assert f"detector {d0}: preload discarded, stale: loaded 30" in caplog.text
    assert f"detector {d1}: preload discarded, the real footprint is not inside" in caplog.text


def test_cache_is_bounded_by_bytes_and_drops_the_oldest(survey_root, tmp_path):
    config = make_config(tmp_path)
    assert run_visit_plain(survey_root, V0, config)["failed"] == {}
    message = _message(1)
    dets = _dets(survey_root)
    entries = [P.preload_detector(message, d, config) for d in dets]
    assert all(e.nbytes > 0 for e in entries)
    budget = entries[2].nbytes + entries[3].nbytes
    evicted = sum(P._keep(e, budget) for e in entries)
    assert P.cached_preloads() == [(V1, dets[2]), (V1, dets[3])] and evicted == 2
    # A preload larger than the whole budget is not kept and evicts nothing.
    assert P._keep(entries[0], entries[0].nbytes - 1) == 0
    assert (V1, dets[0]) not in P.cached_preloads()
    P.forget_preloads()
    off = config.model_copy(
        update={"orchestration": config.orchestration.model_copy(update={"preload_cache_mb": 0})}
    )
    summary = P.preload_message(message, off)
    assert summary["preloaded"] == [] and summary["skipped"] == dets
    assert P.cached_preloads() == []


def test_preload_on_next_trigger_renders_the_payload_as_the_message(survey_root):
    """The prefect.yaml trigger, rendered as Prefect's server renders it, gives the message."""
    from pathlib import Path

    import yaml
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.events.schemas.events import Event
    from prefect.server.events.actions import RunDeployment
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    from core.nextvisit import parse_next_visit
    from flows.watch import NEXT_EVENT

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    (dep,) = [d for d in doc["deployments"] if d["name"] == "preload-on-next"]
    assert dep["entrypoint"] == "flows/preload.py:preload_visit"
    (trigger,) = [DeploymentEventTrigger(**raw) for raw in dep["triggers"]]
    assert trigger.expect == {NEXT_EVENT}
    message = _message(1).to_json_dict()
    event = Event(
        event=NEXT_EVENT, resource={"prefect.resource.id": "diapipe.visit.1"}, payload=message
    )
    params = dict(trigger.parameters)
    RunDeployment._upgrade_v1_templates(params)
    rendered = hydrate(
        params,
        HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": event}),
    )
    assert rendered == {"message": message}
    assert parse_next_visit(rendered["message"]) == _message(1)
    assert set(rendered) <= set(P.preload_visit.parameters.properties)


@pytest.mark.usefixtures("prefect_harness")
def test_preload_flow_from_the_file_then_process_visit_in_the_same_process(survey_root, tmp_path):
    """Both Prefect flows in one process: the visit's result reports every detector preloaded."""
    import shutil

    from flows.visit import run_visit
    from sim.nextvisit import write_next_visit

    config = make_config(tmp_path)
    assert run_visit_plain(survey_root, V0, config)["failed"] == {}
    root = tmp_path / "bundles"
    shutil.copytree(f"{survey_root}/{V1}", root / str(V1))
    write_next_visit(str(root), _message(1))
    summary = P.preload_visit(str(root), visit=V1, config=config)
    assert summary["preloaded"] == _dets(survey_root) and summary["skipped"] == []
    state, result = run_visit(str(root), V1, config)
    assert state.is_completed(), state.message
    assert result["preload_used_fraction"] == 1.0
    assert [row["load_preload_used"] for row in result["table"]] == [1] * len(result["table"])
    assert P.cached_preloads() == []


def _with_dir(config, where) -> object:
    orch = config.orchestration.model_copy(update={"preload_dir": str(where)})
    return config.model_copy(update={"orchestration": orch})


PRELOAD_ELSEWHERE = """
import json, sys
from core.nextvisit import parse_next_visit
from flows.config import PipelineConfig
from flows.preload import preload_message
config = PipelineConfig.model_validate(json.loads(sys.argv[1]))
print(json.dumps(preload_message(parse_next_visit(json.loads(sys.argv[2])), config)))
"""


def test_preload_written_by_another_process_is_found_in_the_directory(survey_root, tmp_path):
    """A deployment run preloads in its own process: the visit's load finds the files."""
    import json
    import subprocess
    import sys

    config = _with_dir(make_config(tmp_path), tmp_path / "preload")
    assert run_visit_plain(survey_root, V0, config)["failed"] == {}
    args = [json.dumps(config.model_dump(mode="json")), json.dumps(_message(1).to_json_dict())]
    run = subprocess.run(
        [sys.executable, "-c", PRELOAD_ELSEWHERE, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["preloaded"] == _dets(survey_root)
    assert P.cached_preloads() == [], "nothing in this process's memory"
    spool = P.PreloadDir(tmp_path / "preload")
    assert sorted(spool.keys()) == [(V1, d) for d in _dets(survey_root)]

    info = read_visit_info(survey_root, V1)
    for det in _dets(survey_root):
        with_preload = D.load_detector(survey_root, info, det, config)
        assert P.pop_outcome(V1, det)["preload_used"] == 1
        assert (V1, det) not in spool.keys(), "a preload is used once"
        _assert_same_load(with_preload, D.load_detector(survey_root, info, det, config))
        assert P.pop_outcome(V1, det) == {"preload_used": 0}
    assert list((tmp_path / "preload").iterdir()) == [], "used preloads leave no file"


def test_preload_directory_is_bounded_taken_once_and_skips_incomplete_entries(
    survey_root, tmp_path
):
    config = make_config(tmp_path)
    assert run_visit_plain(survey_root, V0, config)["failed"] == {}
    message = _message(1)
    d0, d1, d2, d3 = _dets(survey_root)
    entries = {d: P.preload_detector(message, d, config) for d in (d0, d1, d2, d3)}
    scratch = P.PreloadDir(tmp_path / "scratch")
    for e in entries.values():
        scratch.keep(e, 2**30, 300.0)
    size = {int(stem.name.split("_")[1]): n for _, stem, n in scratch._entries()}
    spool = P.PreloadDir(tmp_path / "preload")
    for d in (d0, d1):
        assert spool.keep(entries[d], 2**30, 300.0) == (True, 0)
    # Room for two entries: writing a third drops the oldest.
    budget = size[d1] + size[d2]
    assert spool.keep(entries[d2], budget, 300.0) == (True, 1)
    assert spool.keys() == [(V1, d1), (V1, d2)]
    # An entry past the age limit is dropped whenever another is written.
    old = dataclasses.replace(entries[d3], loaded_at=time.time() - 1000.0)
    spool.keep(old, 2**30, 300.0)
    assert spool.keep(entries[d0], 2**30, 300.0) == (True, 1)
    assert (V1, d3) not in spool.keys()
    # Larger than the whole budget: not kept, nothing else dropped.
    assert spool.keep(entries[d3], 10, 300.0) == (False, 0)
    assert sorted(spool.keys()) == [(V1, d0), (V1, d1), (V1, d2)]

    # Taken once, equal to what was written.
    got = spool.take(V1, d1)
    pd.testing.assert_frame_equal(got.objects, entries[d1].objects)
    pd.testing.assert_frame_equal(got.sources, entries[d1].sources)
    assert list(got.polygon.ra) == list(entries[d1].polygon.ra)
    assert spool.take(V1, d1) is None
    # An entry whose JSON is not there (still being written) is not read.
    (tmp_path / "preload" / f"{V1}_{d2}.json").unlink()
    assert spool.take(V1, d2) is None and (V1, d2) not in spool.keys()
