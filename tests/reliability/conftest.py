"""The fault suite: every test here is marked ``reliability`` (run alone: ``-m reliability``)."""

from __future__ import annotations

import pytest

from tests.apdb.conftest import pg_url  # noqa: F401  (a fresh PostgreSQL database per session)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/reliability/" in str(item.fspath):
            item.add_marker(pytest.mark.reliability)
