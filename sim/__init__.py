"""The synthetic survey: a seeded sky, an LSSTCam-like camera, visit bundles with truth.

``Survey(SurveyConfig(...)).write_visit(root, visit)`` writes the docs/design.md §2
bundle of one visit; ``python -m sim`` does the same from the command line.
"""

from sim.config import SurveyConfig
from sim.survey import Survey

__all__ = ["Survey", "SurveyConfig"]
