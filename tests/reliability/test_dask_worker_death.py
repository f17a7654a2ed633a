"""A Dask worker killed (SIGKILL) in the middle of a visit: its groups move on.

Each group's stages are pinned to one worker (flows.visit._placement) with
``allow_other_workers``: when that worker dies, Dask recomputes the lost
results on a live (or restarted) worker. The visit must still end with every
detector stored once and every alert written once.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import psutil
import pytest

from alerts.store import read_alert_batch
from flows.visit import run_visit
from tests.conftest import make_config

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _markers(db) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute('SELECT count(*) FROM "ApdbVisitDetector"').fetchone()[0]
    except sqlite3.Error:
        return 0


def _worker_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_a_killed_dask_worker_loses_and_duplicates_nothing(survey_root, tmp_path):
    config = make_config(tmp_path, task_runner="dask", cache=False, detectors_per_task=1)
    db = tmp_path / "apdb.sqlite3"
    outcome: dict = {}

    def visit():
        outcome["state"], outcome["result"] = run_visit(survey_root, 1, config)

    runner = threading.Thread(target=visit)
    runner.start()
    killed_at = None
    deadline = time.monotonic() + 240
    while runner.is_alive() and time.monotonic() < deadline:
        if db.exists() and _markers(db) >= 1 and len(_worker_processes()) >= 1:
            killed_at = _markers(db)
            os.kill(_worker_processes()[0].pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    runner.join(timeout=300)
    assert not runner.is_alive(), "the visit did not finish"
    assert killed_at is not None and killed_at < 4, f"the kill came after the visit ({killed_at})"

    state, result = outcome["state"], outcome["result"]
    assert state.name == "Completed", state.message
    assert len(result["succeeded"]) == 4 and not result["failed"]
    assert _markers(db) == 4
    with sqlite3.connect(db) as conn:
        stored = [r[0] for r in conn.execute('SELECT "diaSourceId" FROM "DiaSource" WHERE visit=1')]
    alerted = [
        a["diaSourceId"]
        for f in sorted((tmp_path / "alerts").glob("1_*.avro"))
        for a in read_alert_batch(str(f)).records()
    ]
    assert len(stored) == len(set(stored)) > 0, "each DiaSource stored once"
    assert sorted(alerted) == sorted(stored), "each stored DiaSource alerted once"
