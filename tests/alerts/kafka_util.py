"""Helpers for the Kafka tests: consume a topic back from offset 0."""

from __future__ import annotations

import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition


def consume_all(servers: str, topic: str, expected: int, timeout: float = 30.0) -> list:
    """Messages of every partition of ``topic`` from the start, until ``expected`` or timeout."""
    consumer = Consumer(
        {
            "bootstrap.servers": servers,
            "group.id": "diapipe-tests",
            "enable.auto.commit": False,
            "fetch.max.bytes": 52_428_800,
            "max.partition.fetch.bytes": 52_428_800,
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append(msg)
        # a little longer, to catch duplicates
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            msg = consumer.poll(0.1)
            if msg is not None and msg.error() is None:
                out.append(msg)
        return out
    finally:
        consumer.close()


def source_id(msg) -> int:
    """The ``diaSourceId`` of an alert message: the first field of its Avro payload."""
    from alerts.store import _read_long

    return _read_long(msg.value(), 5)[0]
