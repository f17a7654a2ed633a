"""A worker killed with SIGKILL in the middle of a visit, then the visit run again.

Each DiaSource must end up stored once, each alert present once in the file
store, and every alert delivered to Kafka at least once with the same bytes
(consumers dedupe on diaSourceId, the message key).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from alerts.store import _read_long, read_alert_batch
from tests.alerts.kafka_util import consume_all
from tests.alerts.test_kafka_broker import Broker, _free_port, _tansu_binary
from tests.conftest import V0

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.kafka]


def _markers(db) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute('SELECT count(*) FROM "ApdbVisitDetector"').fetchone()[0]
    except sqlite3.Error:
        return 0


def test_sigkill_mid_visit_then_rerun(survey_root, tmp_path):
    from prefect.settings import PREFECT_API_URL

    broker = Broker(_tansu_binary(), _free_port(), tmp_path / "tansu.log")
    broker.start()
    try:
        broker.create_topic("alerts", partitions=1)
        work = tmp_path / "work"
        cmd = [
            sys.executable,
            "-m",
            "flows.visit",
            "--root",
            survey_root,
            "--visit",
            str(V0),
            "--workdir",
            str(work),
            "--kafka",
            broker.servers,
            "--topic",
            "alerts",
            "--detectors-per-task",
            "1",
            "--max-workers",
            "1",
            "--no-cache",
        ]
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        db = work / "apdb.sqlite3"
        log = (tmp_path / "run1.log").open("wb")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 240
        while _markers(db) < 1 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
        stored_at_kill = _markers(db)
        assert 1 <= stored_at_kill < 4, f"killed mid-visit ({stored_at_kill} of 4 stored)"

        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]

        with sqlite3.connect(db) as conn:
            ids = [r[0] for r in conn.execute('SELECT "diaSourceId" FROM "DiaSource"')]
            markers = conn.execute('SELECT count(*) FROM "ApdbVisitDetector"').fetchone()[0]
        assert markers == 4
        assert len(ids) == len(set(ids)), "each DiaSource stored once"

        files = sorted((work / "alerts").glob(f"{V0}_*.avro"))
        payloads = {}
        for f in files:
            batch = read_alert_batch(str(f))
            for sid, p in zip(batch.dia_source_ids.tolist(), batch.payloads, strict=True):
                assert sid not in payloads, f"alert {sid} twice in the file store"
                payloads[sid] = p
        assert sorted(payloads) == sorted(ids), (
            "each stored DiaSource has exactly one alert file entry"
        )

        messages = consume_all(broker.servers, "alerts", expected=len(ids), timeout=60)
        seen = defaultdict(set)
        for m in messages:
            body = m.value()
            assert body[0] == 0, "Confluent wire format"
            sid = _read_long(body[5:], 0)[0]
            seen[sid].add(body[5:])
        assert set(seen) == set(ids), "every alert delivered at least once"
        for sid, bodies in seen.items():
            assert bodies == {payloads[sid]}, f"alert {sid}: every delivery has the same bytes"
    finally:
        broker.stop()
