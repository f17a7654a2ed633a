"""Dask workers killed (SIGKILL) in the middle of a visit: their groups are recomputed.

Each group's stages are pinned to one worker (flows.visit._placement) with
``allow_other_workers``: when that worker dies, Dask recomputes the lost
results on a live (or restarted) worker. The kill comes when a detector is
committed to the APDB but its alerts are not out, so the recomputed load sees
this visit already stored. The visit must still end with every detector stored
once and every alert written once, carrying what was committed.
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
from tests.conftest import V1, make_config

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


def test_killed_dask_workers_lose_and_duplicate_nothing(survey_root, tmp_path):
    config = make_config(tmp_path, task_runner="dask", cache=False, detectors_per_task=1)
    db = tmp_path / "apdb.sqlite3"
    outcome: dict = {}

    def visit():
        outcome["state"], outcome["result"] = run_visit(survey_root, V1, config)

    receipts = tmp_path / "alerts" / "receipts"
    runner = threading.Thread(target=visit)
    runner.start()
    killed_at = None
    deadline = time.monotonic() + 240
    while runner.is_alive() and time.monotonic() < deadline:
        # The worst moment: a detector committed to the APDB, its alerts not yet out.
        n_stored = _markers(db) if db.exists() else 0
        n_produced = len(list(receipts.glob(f"{V1}_*.json"))) if receipts.exists() else 0
        workers = _worker_processes()
        if n_stored > n_produced and workers:
            killed_at = (n_stored, n_produced)
            for w in workers:  # every worker: the stored group's results are lost
                os.kill(w.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    runner.join(timeout=300)
    assert not runner.is_alive(), "the visit did not finish"
    assert killed_at is not None, "the kill never found a stored, unproduced detector"

    state, result = outcome["state"], outcome["result"]
    assert state.name == "Completed", state.message
    assert len(result["succeeded"]) == 4 and not result["failed"]
    assert _markers(db) == 4
    with sqlite3.connect(db) as conn:
        stored = [
            r[0] for r in conn.execute(f'SELECT "diaSourceId" FROM "DiaSource" WHERE visit={V1}')
        ]
        n_sources = dict(conn.execute('SELECT "diaObjectId", "nDiaSources" FROM "DiaObjectLast"'))
    alerts = [
        a
        for f in sorted((tmp_path / "alerts").glob(f"{V1}_*.avro"))
        for a in read_alert_batch(str(f)).records()
    ]
    alerted = [a["diaSourceId"] for a in alerts]
    assert len(stored) == len(set(stored)) > 0, "each DiaSource stored once"
    assert sorted(alerted) == sorted(stored), "each stored DiaSource alerted once"
    # Alerts carry what was committed, even for a group recomputed after the kill.
    for a in alerts:
        obj = a["diaObject"]
        if obj is None:  # a known asteroid: its solar-system object, no DiaObject
            assert a["ssSource"] is not None and a["diaSource"]["diaObjectId"] == 0
            continue
        assert obj["nDiaSources"] == n_sources[obj["diaObjectId"]], a["diaSourceId"]
        assert a["diaSourceId"] not in {s["diaSourceId"] for s in a["prvDiaSources"] or []}
