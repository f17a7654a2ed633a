"""Kafka faults: the broker down for a whole visit, the broker paused mid-batch.

Nothing may be lost: every alert the broker did not acknowledge is in the
dead-letter store, and a replay once the broker is back delivers every one of
them (same bytes) and empties the store. The broker is a real Kafka-protocol
peer (tansu) on 127.0.0.1; "down" is a closed port, "slow" is the broker
process stopped with SIGSTOP and resumed with SIGCONT.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from alerts import __main__ as cli
from alerts.cutouts import make_cutouts
from alerts.kafka import KafkaConfig, produce_alerts, replay_dead_letters
from alerts.packet import AlertBatch, package_alerts
from alerts.store import DeadLetterStore, read_alert_batch
from flows.visit import run_visit
from tests.alerts.conftest import make_alert_inputs
from tests.alerts.kafka_util import consume_all, source_id
from tests.alerts.test_kafka_broker import Broker, _free_port, _tansu_binary
from tests.conftest import V0, make_config

pytestmark = pytest.mark.kafka


def _by_key(messages) -> dict[int, set[bytes]]:
    """diaSourceId (first field of the payload) → the set of distinct Avro payloads received for it."""
    seen: dict[int, set[bytes]] = {}
    for m in messages:
        body = m.value()
        assert body[0] == 0, "Confluent wire format"
        seen.setdefault(source_id(m), set()).add(body[5:])
    return seen


def _alert_files(folder: Path) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for f in sorted(folder.glob("*.avro")):
        batch = read_alert_batch(str(f))
        for sid, p in zip(batch.dia_source_ids.tolist(), batch.payloads, strict=True):
            out[sid] = p
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_broker_down_for_the_whole_visit_then_replay(survey_root, tmp_path, capsys):
    """The flow with Kafka unreachable: every alert dead-lettered; replay delivers all."""
    port = _free_port()  # nothing listens here until the broker "returns"
    config = make_config(tmp_path, cache=False, detectors_per_task=2, max_workers=2)
    config = config.model_copy(
        update={
            "output": config.output.model_copy(update={"do_produce_alerts": True}),
            "kafka": KafkaConfig(
                servers=f"127.0.0.1:{port}",
                topic="alerts",
                delivery_timeout_ms=1500,
                flush_timeout_s=10.0,
            ),
        }
    )
    state, result = run_visit(survey_root, V0, config)
    assert state.name == "Completed", getattr(state, "message", state)
    assert not result["failed"]
    files = _alert_files(tmp_path / "alerts")
    assert files and result["alerts"] == len(files)

    dead = DeadLetterStore(str(tmp_path / "dead"))
    letters = {}
    for url in dead.list():
        batch = dead.read(url)
        for sid, p in zip(batch.dia_source_ids.tolist(), batch.payloads, strict=True):
            assert sid not in letters, f"alert {sid} dead-lettered twice"
            letters[sid] = p
    assert dead.count() == len(files), "every alert of the visit is a dead letter"
    assert letters == files, "dead letters hold the same bytes as the alert files"
    receipts = sorted((tmp_path / "alerts" / "receipts").glob(f"{V0}_*.json"))
    assert len(receipts) == len(result["detectors"]), "each detector finished (nothing pending)"

    broker = Broker(_tansu_binary(), port, tmp_path / "tansu.log")
    broker.start()
    try:
        broker.create_topic("alerts", partitions=2)
        # the replay command, in-process (its subprocess form is in tests/alerts)
        status = cli.main(
            [
                "replay",
                str(tmp_path / "dead"),
                "--servers",
                broker.servers,
                "--topic",
                "alerts",
                "--timeout",
                "30",
            ]
        )
        assert status == 0
        assert f"{len(files)} of {len(files)} alert(s) delivered" in capsys.readouterr().out
        assert dead.list() == [], "dead letters emptied"
        seen = _by_key(consume_all(broker.servers, "alerts", expected=len(files)))
    finally:
        broker.stop()
    assert set(seen) == set(files), "every alert delivered"
    for sid, bodies in seen.items():
        assert bodies == {files[sid]}, f"alert {sid}: delivered with the alert file's bytes"


def _wait_for_messages(servers: str, topic: str, at_least: int, timeout: float) -> int:
    """Poll the partitions' high watermarks until they hold ``at_least`` messages."""
    consumer = Consumer({"bootstrap.servers": servers, "group.id": "diapipe-watch"})
    try:
        parts = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        deadline = time.monotonic() + timeout
        while True:
            n = sum(
                consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                for p in parts
            )
            if n >= at_least or time.monotonic() > deadline:
                return n
            time.sleep(0.02)
    finally:
        consumer.close()


def _consume_keys(servers: str, topic: str, keys: set[int], timeout: float = 30.0) -> list:
    """Messages of ``topic`` from the start until every key in ``keys`` was seen (or timeout)."""
    consumer = Consumer(
        {"bootstrap.servers": servers, "group.id": "diapipe-keys", "enable.auto.commit": False}
    )
    try:
        parts = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out, missing = [], set(keys)
        deadline = time.monotonic() + timeout
        while missing and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append(msg)
                missing.discard(source_id(msg))
        end = time.monotonic() + 0.5  # a little longer, to catch duplicates
        while time.monotonic() < end:
            msg = consumer.poll(0.1)
            if msg is not None and msg.error() is None:
                out.append(msg)
        return out
    finally:
        consumer.close()


class _PausingPayloads(list):
    """Payloads whose iteration calls ``at_index(k)`` just before item ``k`` is handed out.

    :func:`alerts.kafka.produce_alerts` iterates the payloads once while it
    produces, so this pauses the broker exactly in the middle of the batch.
    """

    def __init__(self, payloads, k, action):
        super().__init__(payloads)
        self.k, self.action = k, action

    def __iter__(self):
        for i, p in enumerate(list.__iter__(self)):
            if i == self.k:
                self.action()
            yield p


@pytest.fixture(scope="module")
def batch() -> AlertBatch:
    bundle, new, objects, hist, forced = make_alert_inputs(seed=41, n_alerts=40, depth=6)
    return package_alerts(new, objects, hist, forced, make_cutouts(new, bundle), bundle.visit)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pause_s", "all_acknowledged"),
    [(0.3, True), (None, False)],
    ids=["pause-shorter-than-timeout", "paused-past-timeout"],
)
def test_broker_paused_mid_batch_loses_nothing(batch, tmp_path, pause_s, all_acknowledged):
    """SIGSTOP the broker after half the batch was handed to the producer.

    ``message.timeout.ms`` (``delivery_timeout_ms``) is 3 s. A pause shorter than
    that only delays delivery; a pause past it makes librdkafka give up on the
    rest. Either way delivered + dead-lettered == every alert, and after the
    broker resumes a replay delivers every dead letter.
    """
    broker = Broker(_tansu_binary(), _free_port(), tmp_path / "tansu.log")
    broker.start()
    resumed = False
    try:
        broker.create_topic("alerts", partitions=2)
        config = KafkaConfig(
            servers=broker.servers,
            topic="alerts",
            linger_ms=0,
            batch_num_messages=4,
            delivery_timeout_ms=3000,
            flush_timeout_s=15.0,
        )
        half = len(batch) // 2
        pid = broker.proc.pid

        def pause():
            # wait until the broker holds some of the first half, then stop it
            _wait_for_messages(broker.servers, "alerts", at_least=1, timeout=20)
            time.sleep(0.2)  # let their acknowledgements reach the producer
            os.kill(pid, signal.SIGSTOP)
            if pause_s is not None:
                threading.Timer(pause_s, os.kill, (pid, signal.SIGCONT)).start()

        paused = AlertBatch(
            _PausingPayloads(batch.payloads, half, pause),
            batch.dia_source_ids,
            batch.schema,
            batch.visit,
            batch.detector,
        )
        dead = DeadLetterStore(str(tmp_path / "dead"))
        result = produce_alerts(paused, config, dead)
        if pause_s is None:
            time.sleep(0.2)
        os.kill(pid, signal.SIGCONT)
        resumed = True

        assert result.n_sent == len(batch)
        assert result.n_delivered + result.n_failed == len(batch), "every alert accounted for"
        assert dead.count() == result.n_failed, "every unacknowledged alert is a dead letter"
        if all_acknowledged:
            assert (result.n_delivered, result.n_failed) == (len(batch), 0)
        else:
            assert result.n_delivered >= 1, "the first half went out before the pause"
            assert result.n_failed >= 1, "the pause outlasted the timeout for some alerts"
        letters = {sid for url in dead.list() for sid in dead.read(url).dia_source_ids.tolist()}

        replay = replay_dead_letters(dead, config.model_copy(update={"delivery_timeout_ms": 20000}))
        assert (replay.n_delivered, replay.n_failed) == (len(letters), 0)
        assert dead.list() == [], "dead letters emptied"
        # timed-out requests may still have been written once the broker resumed:
        # read until every key is seen (at least once; duplicates allowed)
        seen = _by_key(_consume_keys(broker.servers, "alerts", set(batch.dia_source_ids.tolist())))
    finally:
        if not resumed and broker.proc is not None:
            os.kill(broker.proc.pid, signal.SIGCONT)
        broker.stop()
    payloads = dict(zip(batch.dia_source_ids.tolist(), batch.payloads, strict=True))
    assert set(seen) == set(payloads), "every alert delivered at least once"
    for sid, bodies in seen.items():
        assert bodies == {payloads[sid]}, f"alert {sid}: every delivery has the same bytes"
