"""Any selection of the suite runs clean: one file, without xdist, exits 0.

Hypothesis' pytest plugin imports hypothesis in pytest's terminal summary;
that import runs trio's hypothesis entry point, whose ``register_random``
warns (an error under ``filterwarnings = error``) when trio's PRNG sits in
the permanent generation that :func:`flows.stages` puts the start-up heap in
with ``gc.freeze()``. A file that imports no hypothesis during collection but
runs a flow (tests/reliability/test_secrets.py) then passes its tests and
exits 1. tests/conftest.py imports hypothesis first; this test runs such a
file in a fresh pytest, without xdist, with the suite's conftest and settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FILE = textwrap.dedent(
    """
    import gc

    def test_runs_with_a_frozen_heap():
        import trio  # noqa: F401  (imported by the flow's dependencies)

        gc.freeze()  # as flows.stages does in every worker
        assert gc.get_freeze_count() > 0
    """
)


def test_one_file_without_xdist_exits_zero(tmp_path):
    test_file = tmp_path / "test_one.py"
    test_file.write_text(FILE)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "-c",
            str(REPO / "pyproject.toml"),
            "--rootdir",
            str(REPO),
            "-p",
            "tests.conftest",
            str(test_file),
        ],
        cwd=REPO,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "1 passed" in proc.stdout and "Traceback" not in out, out[-3000:]
