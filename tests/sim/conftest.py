"""Shared fixtures: small simulated surveys written once per test session."""

from __future__ import annotations

import pytest

from sim.config import SurveyConfig
from sim.survey import Survey

#: A small default-density survey: 4 central detectors of 512×512 pixels.
SMALL = SurveyConfig(seed=11, n_detectors=4, n_visits=40)
#: The LSSTCam visit numbers (day_obs·10⁵ + seq_num) of its visits 0 and 1: their directories.
V0, V1 = SMALL.visit_number(0), SMALL.visit_number(1)


@pytest.fixture(scope="session")
def small_survey() -> Survey:
    return Survey(SMALL)


@pytest.fixture(scope="session")
def small_root(tmp_path_factory, small_survey) -> str:
    """Visits 0 and 1 of :data:`SMALL` (``{root}/{V0}``, ``{root}/{V1}``), by the public API."""
    root = tmp_path_factory.mktemp("sim") / "survey"
    for visit in (0, 1):
        small_survey.write_visit(str(root), visit)
    small_survey.write_truth(str(root))
    return str(root)
