"""Association on real LSSTCam histories: the 1,739 DiaSources of the 5 real
DiaObjects in ``tests/data/rubin-lsstcam-alerts`` replayed visit by visit
through associate + summarise from an empty APDB."""

from __future__ import annotations

import pytest

from bench.quality import read_alert_histories, replay_histories
from tests.data import RUBIN_ALERTS


@pytest.fixture(scope="module")
def histories():
    return read_alert_histories(RUBIN_ALERTS)


def test_the_file_holds_five_objects_and_1739_sources(histories):
    assert len(histories) == 1739
    assert histories["truthId"].nunique() == 5
    assert histories["visit"].nunique() == 867


@pytest.mark.slow
def test_replay_keeps_each_real_object_whole(histories):
    """At most 7 DiaObjects (Rubin's own rule gives 7: two splits are in the
    data), none mixing two real objects, each real object's main DiaObject
    holding ≥ 95 % of its sources."""
    r = replay_histories(histories)
    assert r["n_stored"] == 1739
    assert r["n_impure"] == 0
    assert r["n_dia_objects"] <= 7, r["n_pieces"]
    assert min(r["main_share"].values()) >= 0.95, r["main_share"]
