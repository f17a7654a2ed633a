"""Overlapping visits of one night, processed at once, store in the order they were taken."""

from __future__ import annotations

import threading
import time

import pytest

from core.completion import mark_complete
from flows.detector import get_apdb
from flows.order import unstored_earlier_visits
from flows.visit import run_visit_plain
from tests.conftest import make_config


@pytest.fixture(scope="module")
def night_root(tmp_path_factory) -> tuple[str, list[int]]:
    """Two visits of one field 40 s apart, 2 detectors each, delivered with their markers."""
    from sim.config import SurveyConfig
    from sim.survey import Survey

    survey = Survey(
        SurveyConfig(
            seed=11,
            n_detectors=2,
            n_visits=2,
            cadence_days=40.0 / 86400.0,
            detector_size=(256, 256),
            sources_per_detector=25,
        )
    )
    root = tmp_path_factory.mktemp("night")
    numbers = [survey.config.visit_number(k) for k in range(2)]
    for k in range(2):
        survey.write_visit(str(root), k)
        mark_complete(str(root), numbers[k])
    assert numbers[1] == numbers[0] + 1, "one night, consecutive seq_num"
    return str(root), numbers


def test_later_visit_waits_for_the_earlier_one_to_be_stored(night_root, tmp_path):
    root, (first, second) = night_root
    config = make_config(tmp_path, cache=False)
    later: dict = {}
    worker = threading.Thread(
        target=lambda: later.update(run_visit_plain(root, second, config)), daemon=True
    )
    worker.start()
    time.sleep(3.0)
    assert get_apdb(config).done_detectors(second) == set(), "the later visit waits"
    earlier = run_visit_plain(root, first, config)
    worker.join(timeout=120)
    assert earlier["failed"] == {}, earlier["failed"]
    assert later["failed"] == {}, later["failed"]
    assert later["waited_for_earlier"]["waited_for"] == [first]
    assert not later["waited_for_earlier"]["timed_out"]
    assert earlier["waited_for_earlier"]["waited_for"] == []
    assert unstored_earlier_visits(root, _info(root, second), config) == []


def test_the_wait_ends_and_the_later_visit_goes_on(night_root, tmp_path):
    root, (first, second) = night_root
    base = make_config(tmp_path, cache=False)
    orch = base.orchestration.model_copy(update={"wait_for_earlier_s": 1.0})
    config = base.model_copy(update={"orchestration": orch})
    # the earlier one arrived just before the later one: within the 1 s looked back
    mark_complete(root, first)
    mark_complete(root, second)
    result = run_visit_plain(root, second, config)
    assert result["failed"] == {}
    assert result["waited_for_earlier"]["timed_out"] is True
    assert result["waited_for_earlier"]["waited_for"] == [first]
    assert result["waited_for_earlier"]["waited_s"] >= 1.0
    # Arrived longer than the wait before the later one: failed or abandoned, not waited for.
    time.sleep(1.1)
    mark_complete(root, second)
    assert unstored_earlier_visits(root, _info(root, second), config) == []


def _info(root: str, visit: int):
    from core.bundle import read_visit_info

    return read_visit_info(root, visit)
