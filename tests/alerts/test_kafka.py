"""Kafka production against librdkafka's built-in mock cluster (a real protocol peer)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from confluent_kafka import Producer
from pydantic import SecretStr

from alerts import __main__ as cli
from alerts.cutouts import make_cutouts
from alerts.kafka import KafkaConfig, produce_alerts, producer_config
from alerts.packet import decode_alert, package_alerts
from alerts.store import DeadLetterStore
from core.errors import ConfigError

from .conftest import make_alert_inputs
from .kafka_util import consume_all, source_id


@pytest.fixture(scope="module")
def batch():
    bundle, new, objects, hist, forced = make_alert_inputs(seed=21, n_alerts=25, depth=6, forced=4)
    return package_alerts(new, objects, hist, forced, {}, bundle.visit)


@pytest.fixture
def mock_cluster():
    """librdkafka's mock cluster (3 brokers); yields its bootstrap servers."""
    holder = Producer(
        {"test.mock.num.brokers": 3, "bootstrap.servers": "unused:9092", "log_level": 0}
    )
    md = holder.list_topics(timeout=10)
    yield ",".join(f"{b.host}:{b.port}" for b in md.brokers.values())
    holder.flush(1)


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_alerts_arrive_in_confluent_wire_format(mock_cluster, batch):
    config = KafkaConfig(servers=mock_cluster, topic="alerts-wire", linger_ms=5)
    result = produce_alerts(batch, config)
    assert (result.n_sent, result.n_delivered, result.n_failed) == (len(batch), len(batch), 0)
    msgs = consume_all(mock_cluster, "alerts-wire", len(batch))
    assert len(msgs) == len(batch)
    by_key = {source_id(m): m.value() for m in msgs}
    assert sorted(by_key) == sorted(batch.dia_source_ids.tolist())
    for sid, payload in zip(batch.dia_source_ids.tolist(), batch.payloads, strict=True):
        value = by_key[sid]
        assert value[0] == 0
        assert int.from_bytes(value[1:5], "big") == 1101
        assert value[5:] == payload
        assert decode_alert(value, batch.schema)["diaSourceId"] == sid


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_compression_codecs(mock_cluster, batch, compression):
    config = KafkaConfig(
        servers=mock_cluster, topic=f"alerts-{compression}", compression=compression
    )
    assert produce_alerts(batch, config).n_delivered == len(batch)
    assert len(consume_all(mock_cluster, f"alerts-{compression}", len(batch))) == len(batch)


def test_unreachable_broker_sends_everything_to_dead_letters_then_replay(
    tmp_path, mock_cluster, batch
):
    dead = DeadLetterStore(str(tmp_path / "dead"))
    down = KafkaConfig(servers=_closed_port(), topic="alerts-replay", delivery_timeout_ms=1500)
    result = produce_alerts(batch, down, dead)
    assert (result.n_delivered, result.n_failed) == (0, len(batch))
    assert result.dead_letter_url in dead.list()
    assert dead.count() == len(batch)
    assert dead.read(result.dead_letter_url).payloads == batch.payloads

    # replay against a broker that is up: all acknowledged, dead letters removed
    code = cli.main(
        ["replay", str(tmp_path / "dead"), "--servers", mock_cluster, "--topic", "alerts-replay"]
    )
    assert code == 0
    assert dead.list() == []
    msgs = consume_all(mock_cluster, "alerts-replay", len(batch))
    assert sorted(source_id(m) for m in msgs) == sorted(batch.dia_source_ids.tolist())


def test_replay_keeps_what_is_still_not_acknowledged(tmp_path, batch):
    dead = DeadLetterStore(str(tmp_path / "dead"))
    url = dead.put(batch)
    code = cli.main(
        ["replay", str(tmp_path / "dead"), "--servers", _closed_port(), "--timeout", "1.5"]
    )
    assert code == 1
    assert dead.list() == [url]
    assert dead.read(url).payloads == batch.payloads


def test_message_too_large_is_a_dead_letter_not_a_loss(tmp_path, mock_cluster):
    bundle, new, objects, hist, forced = make_alert_inputs(seed=22, n_alerts=10, depth=3, forced=2)
    cutouts = make_cutouts(new, bundle)
    batch = package_alerts(new, objects, hist, forced, cutouts, bundle.visit)
    sizes = np.array([len(p) + 5 for p in batch.payloads])
    limit = int(np.median(sizes))
    dead = DeadLetterStore(str(tmp_path / "dead"))
    config = KafkaConfig(
        servers=mock_cluster, topic="alerts-big", message_max_bytes=limit, batch_size=limit
    )
    result = produce_alerts(batch, config, dead)
    too_big = sizes > limit - 100  # librdkafka counts some protocol overhead
    assert result.n_delivered + result.n_failed == len(batch)
    assert result.n_failed >= int((sizes > limit).sum()) > 0
    failed = set(dead.read(result.dead_letter_url).dia_source_ids.tolist())
    assert set(batch.dia_source_ids[sizes > limit].tolist()) <= failed
    assert failed <= set(batch.dia_source_ids[too_big].tolist())


def test_empty_batch_sends_nothing(batch):
    empty = batch.subset(np.zeros(len(batch), bool))
    result = produce_alerts(empty, KafkaConfig(servers=_closed_port()))
    assert (result.n_sent, result.n_delivered, result.n_failed) == (0, 0, 0)


def test_credentials_from_environment_never_shown(monkeypatch):
    monkeypatch.setenv("DIAPIPE_KAFKA_USERNAME", "alice")
    monkeypatch.setenv("DIAPIPE_KAFKA_PASSWORD", "hunter2-secret")
    config = KafkaConfig(security_protocol="SASL_SSL")
    conf = producer_config(config)
    assert (conf["sasl.username"], conf["sasl.password"]) == ("alice", "hunter2-secret")
    explicit = KafkaConfig(security_protocol="SASL_SSL", sasl_password=SecretStr("pw-in-config"))
    for shown in (repr(explicit), str(explicit), explicit.model_dump_json()):
        assert "pw-in-config" not in shown
    assert producer_config(explicit)["sasl.password"] == "pw-in-config"
    monkeypatch.delenv("DIAPIPE_KAFKA_PASSWORD")
    with pytest.raises(ConfigError, match="DIAPIPE_KAFKA_PASSWORD"):
        producer_config(config)
    assert "sasl.username" not in producer_config(KafkaConfig())


def test_acks_one_turns_idempotence_off_and_still_delivers(mock_cluster, batch):
    config = KafkaConfig(servers=mock_cluster, topic="alerts-acks1", acks="1")
    assert producer_config(config)["enable.idempotence"] is False
    assert produce_alerts(batch, config).n_delivered == len(batch)
