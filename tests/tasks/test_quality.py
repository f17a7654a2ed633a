"""Scoring against truth (sim/scoring.py) and a small simulated survey through the stages."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sim.scoring import pull_statistics, score_association, score_forced


def _truth():
    # diaSourceId: truth identity
    rows = [
        (1, 10, "variable"),
        (2, 10, "variable"),
        (3, 10, "variable"),  # A: 3 detections
        (4, 20, "transient"),
        (5, 20, "transient"),  # B: 2 detections
        (6, 30, "moving"),
        (7, 30, "moving"),  # C: moving, never expected to associate
        (8, -1, "bogus_cr"),
        (9, -1, "bogus_noise"),
        (10, 40, "transient"),
        (11, 40, "transient"),  # D: second detection rejected
    ]
    return pd.DataFrame(rows, columns=["diaSourceId", "truthId", "kind"])


def _stored():
    # diaSourceId, diaObjectId, time: a new object has diaObjectId == diaSourceId
    rows = [
        (1, 1, 1.0),
        (2, 1, 2.0),
        (3, 1, 3.0),
        (8, 1, 4.0),  # A plus a cosmic ray: impure
        (4, 4, 1.0),
        (5, 5, 2.0),  # B split: one false new object
        (6, 6, 1.0),
        (7, 7, 2.0),  # C: two new objects, moving
        (9, 9, 3.0),  # bogus noise made its own object
        (10, 10, 1.0),  # D: detection 11 was rejected by the quality cut
    ]
    return pd.DataFrame(rows, columns=["diaSourceId", "diaObjectId", "midpointMjdTai"])


def test_score_association_closed_form():
    s = score_association(_stored(), _truth())
    # objects: 1 (impure), 4, 5, 6, 7, 9, 10 -> 6 of 7 pure
    assert s["n_dia_objects"] == 7 and s["n_impure"] == 1
    assert s["purity"] == pytest.approx(6 / 7)
    # eligible (non-moving, >= 2 detections): A, B, D. A complete; B split; D not all stored
    assert s["n_true_objects_2plus"] == 3
    assert s["completeness"] == pytest.approx(2 / 3)  # D's stored part is one object
    assert s["completeness_all_detections"] == pytest.approx(1 / 3)
    assert s["n_incomplete"] == 1 and s["n_not_all_stored"] == 1
    # new objects: 4, 5, 6, 7, 9, 10 (1 is new too) -> 7; false new: B's second
    assert s["n_new"] == 7 and s["n_false_new"] == 1
    assert s["false_new_fraction"] == pytest.approx(1 / 7)
    assert s["n_bogus_new"] == 1 and s["n_moving_new"] == 2


def test_completeness_of_the_passed_detections_is_scored_apart_from_all_injected():
    """D's second detection (11) was dropped by the reliability filter; E's third (14)
    passed it but association left it out (e.g. a non-finite position)."""
    from bench.quality import score_association_both

    truth = pd.concat(
        [
            _truth(),
            pd.DataFrame(
                {"diaSourceId": [12, 13, 14], "truthId": 50, "kind": "variable"},
            ),
        ],
        ignore_index=True,
    )
    stored = pd.concat(
        [
            _stored(),
            pd.DataFrame(
                {"diaSourceId": [12, 13], "diaObjectId": [12, 12], "midpointMjdTai": [1.0, 2.0]}
            ),
        ],
        ignore_index=True,
    )
    passed = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14])
    every, kept = score_association_both(stored, truth, passed)
    # all injected: A, B, D, E eligible; A complete; B split; D and E lost a detection
    assert every["n_true_objects_2plus"] == 4
    assert every["completeness"] == pytest.approx(3 / 4)
    assert every["completeness_all_detections"] == pytest.approx(1 / 4)
    # passed the filters: D has one passed detection left and is not eligible
    assert kept["n_true_objects_2plus"] == 3
    assert kept["completeness"] == pytest.approx(2 / 3)  # A, E in one DiaObject; B split
    assert kept["completeness_all_detections"] == pytest.approx(1 / 3)  # E lost 14
    assert kept["purity"] == every["purity"] and kept["n_new"] == every["n_new"]
    with pytest.raises(ValueError, match="1 stored DiaSource.*did not pass"):
        score_association_both(stored, truth, passed[passed != 13])


def test_score_association_rejects_foreign_ids():
    stored = pd.concat(
        [
            _stored(),
            pd.DataFrame({"diaSourceId": [99], "diaObjectId": [99], "midpointMjdTai": [1.0]}),
        ]
    )
    with pytest.raises(ValueError, match="1 stored DiaSource"):
        score_association(stored, _truth())


def test_pull_statistics_and_forced_scoring():
    stats = pull_statistics(np.array([-1.0, 0.0, 1.0, np.nan]))
    assert stats["n"] == 3 and stats["mean"] == 0.0 and stats["std"] == pytest.approx(1.0)
    truth_objects = pd.DataFrame(
        {
            "visit": [1, 1],
            "detector": [0, 0],
            "truthId": [5, 6],
            "kind": ["static", "variable"],
            "diffFlux": [0.0, 100.0],
            "scienceFlux": [50.0, 300.0],
        }
    )
    forced = pd.DataFrame(
        {
            "visit": [1, 1, 1],
            "detector": [0, 0, 0],
            "diaObjectId": [50, 60, 70],
            "psfFlux": [2.0, 90.0, 1.0],
            "psfFluxErr": [1.0, 5.0, 1.0],
            "scienceFlux": [40.0, 330.0, 1.0],
            "scienceFluxErr": [5.0, 10.0, 1.0],
        }
    )
    out = score_forced(forced, truth_objects, pd.Series({50: 5, 60: 6}))
    assert out["n_unmatched"] == 1
    assert out["static"]["diff"]["mean"] == 2.0 and out["static"]["science"]["mean"] == -2.0
    assert out["variable"]["diff"]["mean"] == -2.0 and out["variable"]["science"]["mean"] == 3.0


@pytest.mark.slow
def test_small_simulated_survey_meets_quality_targets(tmp_path):
    """6 visits × 2 detectors at 20 sources per 512² detector, seeded: a small bench quality.

    The full 20-visit survey's figures are in bench/RESULTS.md; the bounds here
    are for ~100 DiaObjects, where one miss moves a fraction by ~1 %.
    """
    from bench.quality import run

    out = run(
        visits=6,
        detectors=2,
        seed=3,
        detector_size=512,
        sources_per_detector=20.0,
        root=str(tmp_path),
    )
    h = out["headline"]
    a = out["association"]
    kept = out["association_passed_cuts"]
    assert a["n_dia_objects"] > 80 and a["n_true_objects_2plus"] > 20
    assert h["purity"] >= 0.98
    assert h["completeness"] == kept["completeness"] >= 0.95
    assert h["completeness_kept_detections"] == kept["completeness_all_detections"]
    assert h["completeness_all_detections"] == a["completeness_all_detections"]
    assert set(out["definitions"]) == set(h)
    assert h["false_new_fraction"] <= 0.02
    assert out["static_forced_pulls"]["diff"]["n"] > 300
    assert abs(h["pull_mean"]) < 0.1
    assert 0.9 < h["pull_std"] < 1.1
