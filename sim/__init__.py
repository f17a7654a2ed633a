"""The synthetic survey: a seeded sky, an LSSTCam-like camera, visit bundles with truth.

``Survey(SurveyConfig(...)).write_visit(root, k)`` writes the docs/design.md §2
bundle of the survey's ``k``-th visit under its LSSTCam visit number
(``{root}/{day_obs·10⁵ + seq_num}/``, :meth:`SurveyConfig.visit_number`);
``python -m sim`` does the same from the command line.
"""

from sim.config import SurveyConfig
from sim.survey import Survey

__all__ = ["Survey", "SurveyConfig"]
