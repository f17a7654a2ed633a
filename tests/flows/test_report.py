"""The visit picture's import runs beside the detectors, not after them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("matplotlib")


def test_picture_modules_import_in_the_background_of_a_fresh_process():
    code = textwrap.dedent(
        """
        import sys
        import flows.visit  # what a deployment run has loaded when its flow starts
        assert "matplotlib" not in sys.modules, "flows.visit imports matplotlib itself"
        from flows.report import import_picture_modules
        thread = import_picture_modules()
        assert thread is not None and thread.daemon
        thread.join(60)
        missing = [m for m in ("matplotlib.figure", "matplotlib.backends.backend_agg")
                   if m not in sys.modules]
        assert not missing, missing
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
