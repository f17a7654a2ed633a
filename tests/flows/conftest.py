"""Flow tests use the shared fixtures of tests/conftest.py (survey_root, prefect_harness)."""

from __future__ import annotations

import pytest

from flows import detector as D
from flows import preload as P


@pytest.fixture
def empty_process_caches():
    """No preload and no bundle cached in this process before or after the test."""
    P.forget_preloads()
    D.forget_bundles()
    yield
    P.forget_preloads()
    D.forget_bundles()
