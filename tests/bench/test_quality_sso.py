"""``bench quality`` on a small survey: the solar-system figures of its headline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.quality import run, score_solar_system


@pytest.fixture(scope="module")
def small_run():
    """3 visits x 2 detectors of 512 px, half of the real sources moving."""
    return run(visits=3, detectors=2, detector_size=512, sources_per_detector=60, seed=3)


def test_headline_has_the_solar_system_figures_on_target(small_run):
    h = small_run["headline"]
    s = small_run["solar_system"]
    assert s["n_known_entered"] > 10, "the survey puts known asteroids on the detectors"
    assert h["sso_matched_fraction"] == s["matched_fraction"] >= 0.995
    assert h["sso_dia_objects"] == s["n_dia_objects"] == 0
    assert h["sso_false_matches"] == s["false_match_fraction"] <= 0.001
    assert small_run["counts"]["n_sso_associated"] == s["n_matched_right"] + s["n_wrong_object"] + (
        s["n_unknown_matched"] + s["n_false_matches"]
    )
    # the DIA figures are still there, on the DIA-associated sources
    assert h["purity"] > 0.9 and h["completeness"] > 0.9


def test_score_solar_system_counts_wrong_and_false_matches():
    big = 21163624394469969  # > 2**53: a float comparison would confuse neighbours
    truth = pd.DataFrame(
        {
            "diaSourceId": [1, 2, 3, 4, 5, 6],
            "truthId": [10, 10, 11, 12, 20, -1],
            "kind": ["moving", "moving", "moving", "moving", "static", "bogus_noise"],
        }
    )
    bodies = pd.DataFrame(
        {
            "truthId": [10, 11, 12],
            "ssObjectId": [big, big + 1, big + 2],
            "known": [True, True, False],
        }
    )
    matches = pd.DataFrame({"diaSourceId": [1, 3, 5], "ssObjectId": [big, big + 2, big + 1]})
    objects = pd.DataFrame({"diaObjectId": np.array([2, 6], dtype=np.int64)})
    s = score_solar_system(truth, bodies, np.array([1, 2, 3, 4, 5, 6]), matches, objects)
    # known detections 1, 2, 3: 1 right, 3 matched to another body, 2 unmatched
    assert s["n_known_entered"] == 3 and s["n_matched_right"] == 1 and s["n_wrong_object"] == 1
    assert s["matched_fraction"] == pytest.approx(1 / 3)
    assert s["n_dia_objects"] == 1  # DiaObject 2, made by a known asteroid's detection
    assert s["n_false_matches"] == 1 and s["false_match_fraction"] == pytest.approx(1 / 2)
    assert s["n_unknown_matched"] == 0
