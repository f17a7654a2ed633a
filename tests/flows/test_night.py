"""A small night through the real event path: watcher, server triggers, served deployments.

The harness is the one of ``python -m bench night`` (:class:`bench.night.Night`):
the watcher polls the bundle root, the session's Prefect server runs the
``preload-on-next`` and ``visit-on-ready`` triggers of prefect.yaml, and a
``serve`` process runs each flow in its own subprocess, so the preload reaches
the visit only through ``orchestration.preload_dir``. (The half-written bundle
and the watcher on ``s3://`` are in tests/flows/test_watch.py.)
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from bench.night import Night, verify_visit
from flows.visit import run_visit_plain
from tests.conftest import V0, V1, V2, make_config

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def _survey():
    from sim.config import SurveyConfig
    from sim.survey import Survey

    return Survey(
        SurveyConfig(
            seed=7, n_detectors=4, n_visits=3, detector_size=(256, 256), sources_per_detector=25
        )
    )


def test_small_night_preloads_refreshes_discards_and_alerts_every_source_once(
    survey_root, tmp_path
):
    from sim.nextvisit import next_visit_message

    survey = _survey()
    messages = [next_visit_message(survey, k) for k in range(3)]
    # Visit 2 is announced 0.5 deg away from where it is taken: a wrong prediction.
    moved = {
        d: tuple((ra + 0.5, dec) for ra, dec in c) for d, c in messages[2].detector_corners.items()
    }
    messages[2] = dataclasses.replace(messages[2], detector_corners=moved)
    for sub in ("night", "reference"):
        (tmp_path / sub).mkdir()
    config = make_config(tmp_path / "night", cache=False, preload_dir=str(tmp_path / "preload"))

    with Night(tmp_path / "night", config, limit=2) as night:
        night.announce(messages[0])
        preloads = [night.wait("preload", V0)]
        # Visit 1 is preloaded before visit 0 (which overlaps it) is stored.
        night.announce(messages[1])
        preloads.append(night.wait("preload", V1))
        night.release(survey_root, V0)
        runs = [night.wait("visit", V0)]
        night.announce(messages[2])
        preloads.append(night.wait("preload", V2))
        night.release(survey_root, V1)
        runs.append(night.wait("visit", V1))
        night.release(survey_root, V2)
        runs.append(night.wait("visit", V2))
        tables = {r.visit: night.detector_table(r) for r in runs}
        assert len(night.runs("visit")) == 3, "one visit run per ready bundle"
        assert night.watch_errors == []

    assert [r.state for r in preloads + runs] == ["Completed"] * 6, night.serve_log()
    used = {v: [row["load_preload_used"] for row in t] for v, t in tables.items()}
    assert used == {V0: [1] * 4, V1: [1] * 4, V2: [0] * 4}, used
    # Visit 0's objects, stored after visit 1's preload, were read by visit 1's refresh.
    assert sum(int(row["load_preload_refreshed"]) for row in tables[V1]) > 0
    for visit, table in tables.items():
        latency = [float(row["alert_timing_since_shutter_close_s"]) for row in table]
        assert all(0.0 < s < 300.0 for s in latency), (visit, latency)

    # The same three visits processed one after the other without preload: same APDB rows
    # (a duplicated DiaObject would add DiaObject and forced-source rows), same alerts.
    reference = make_config(tmp_path / "reference", cache=False)
    for visit in (V0, V1, V2):
        assert run_visit_plain(survey_root, visit, reference)["failed"] == {}
    from flows.detector import get_apdb

    assert get_apdb(config).row_counts() == get_apdb(reference).row_counts()
    for visit in (V0, V1, V2):
        night_check = verify_visit(config, visit)
        ref_check = verify_visit(reference, visit)
        assert night_check["stored"] == ref_check["stored"] > 0
        assert (night_check["lost"], night_check["duplicated"]) == (0, 0), night_check


def test_verify_visit_counts_lost_and_duplicated_alerts(survey_root, tmp_path):
    """The night's check is a real check: a missing and a repeated alert are counted."""
    from alerts.store import alert_file_url, iter_container_payloads, record_dia_source_id

    config = make_config(tmp_path, cache=False)
    assert run_visit_plain(survey_root, V0, config)["failed"] == {}
    check = verify_visit(config, V0)
    assert check["lost"] == check["duplicated"] == 0 and check["stored"] == check["alerted"] > 0
    det = min(get_stored_detectors(config, V0))
    url = alert_file_url(config.output.store.location, V0, det)
    with open(url, "rb") as f:
        _, records = iter_container_payloads(f.read(), url)
    ids = [record_dia_source_id(r) for r in records]
    kafka = Counter(ids[1:])  # the first one lost
    kafka[ids[1]] += 1  # the second one twice
    got = verify_visit(config, V0, kafka)
    others = check["stored"] - len(ids)
    assert got["kafka_lost"] == 1 + others and got["kafka_duplicated"] == 1


def get_stored_detectors(config, visit: int) -> set[int]:
    from flows.detector import get_apdb

    return get_apdb(config).done_detectors(visit)
