"""Sending alerts to Kafka, with dead letters for anything not acknowledged (docs/design.md §4.9b).

Each message is an alert in the Confluent wire format: byte ``0``, the schema
id ``major * 100 + minor`` as 4 big-endian bytes (1101 for schema 11.1, as in
Rubin's alert stream), then the schemaless Avro payload. Rubin's conventions
are the defaults (docs/alert-stream.md says where each comes from):

* topic: one per schema major version, ``lsst-alerts-v{major}`` (``topic`` is
  a template: ``{major}``, ``{minor}`` and ``{version}`` are filled from the
  batch's schema; a name without them is used as it is);
* compression: snappy;
* headers: ``producer_timestamp``, the time the alert was handed to the
  producer in milliseconds since the Unix epoch (decimal ASCII); the
  message's own Kafka timestamp is the same, so consumers can seek by time;
* key: the decimal ``diaObjectId`` (``ssObjectId`` when set, for alerts of
  solar-system objects; ``diaSourceId`` for an alert without either; 0 counts
  as not set, as Rubin writes it), so
  that every alert of one object goes to one partition, in order.

Messages are handed to a ``confluent_kafka.Producer`` in a loop that never
flushes per message: librdkafka batches them (``linger.ms``,
``batch.size``/``batch.num.messages``, compression), the loop polls for
delivery reports as it goes (and waits on a poll when the local queue is
full), and one ``flush`` with a timeout ends the batch. Messages still queued
after the timeout are purged, so they cannot be delivered later behind our
back. Every alert whose delivery report is not a success goes to the
dead-letter store; ``python -m alerts replay SRC`` re-sends them and removes
only those the broker acknowledged. Delivery is therefore at-least-once: an
alert purged while in flight may have reached the broker and be sent again by
a replay; consumers can de-duplicate on ``diaSourceId`` (the alert's first
field).

The producer lives as long as its process: one per producer configuration
and process, made by the first batch and reused by every later one (a
detector's batch, a replayed file), so a Dask worker or a flow process
serving a night connects, fetches metadata and (idempotence) obtains its
producer id once, not once per detector. Starting a producer costs ~0.6 s of
waiting per batch against a local broker, ~0.06 s for a reused one
(bench/RESULTS.md, "night"). A producer that saw any failure — an error
delivery report, a purge after the flush timeout — is dropped after its
batch, so the next batch starts from a fresh connection and producer id;
one idle for :data:`PRODUCER_IDLE_S` is closed. Concurrent batches
(the thread runner) share the producer: each one's ``flush`` also waits for
the others' messages, and a purge fails the others' undelivered messages too,
which then go to their own dead letters like any failure.

Credentials: SASL username and password are ``SecretStr`` fields, filled from
the environment variables named in the config (``DIAPIPE_KAFKA_USERNAME`` /
``DIAPIPE_KAFKA_PASSWORD`` by default) when not given; they are passed to
librdkafka only and never appear in logs, reprs or serialised configs.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from alerts.index import object_key
from alerts.packet import AlertBatch, AlertSchema, wire_header
from alerts.store import DeadLetterStore, mask_field, refuse_secrets
from core.errors import ConfigError, InputError
from core.extras import import_extra

__all__ = [
    "KafkaConfig",
    "ProduceResult",
    "ReplayResult",
    "produce_alerts",
    "message_key",
    "producer_config",
    "replay_dead_letters",
    "topic_for",
]

log = logging.getLogger(__name__)


class KafkaConfig(BaseModel, frozen=True, extra="forbid"):
    """Where and how alerts are produced (Rubin: doProduceAlerts and its server/topic)."""

    servers: str = Field(
        "localhost:9092",
        description="Kafka bootstrap servers, comma separated (bootstrap.servers).",
    )
    topic: str = Field(
        "lsst-alerts-v{major}",
        description="Topic the alerts are produced to; {major}, {minor} and {version} are "
        "replaced by the alert schema's (Rubin: lsst-alerts-v11 for schema 11.x).",
    )
    key: Literal["object", "diaSourceId", "none"] = Field(
        "object",
        description="Message key: 'object' = diaObjectId (ssObjectId when set), giving "
        "per-object order within a partition; 'diaSourceId'; or no key.",
    )
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "snappy", description="Producer compression codec (compression.type)."
    )
    linger_ms: float = Field(
        20.0, ge=0, description="How long librdkafka waits to fill a batch (linger.ms)."
    )
    batch_size: int = Field(
        4_000_000, gt=0, description="Largest message batch in bytes (batch.size)."
    )
    batch_num_messages: int = Field(
        10_000, gt=0, description="Largest batch in messages (batch.num.messages)."
    )
    queue_max_kbytes: int = Field(
        1_048_576,
        gt=0,
        description="Local producer queue limit in KiB (queue.buffering.max.kbytes).",
    )
    message_max_bytes: int = Field(
        8_000_000,
        gt=0,
        description="Largest message the producer accepts (message.max.bytes); the topic's "
        "max.message.bytes must allow alerts with long histories (~0.3-1 MB).",
    )
    delivery_timeout_ms: int = Field(
        120_000,
        gt=0,
        description="Time librdkafka keeps retrying one message before reporting failure "
        "(delivery.timeout.ms).",
    )
    flush_timeout_s: float = Field(
        180.0, gt=0, description="Seconds the final flush waits for outstanding deliveries."
    )
    acks: Literal["all", "1", "0"] = Field(
        "all", description="Broker acknowledgements required (acks)."
    )
    idempotence: bool = Field(
        True,
        description="Idempotent producer (enable.idempotence; only with acks=all): librdkafka's "
        "retries then never duplicate or reorder alerts.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="security.protocol."
    )
    sasl_mechanism: str = Field("SCRAM-SHA-512", description="sasl.mechanism for SASL protocols.")
    sasl_username: SecretStr | None = Field(
        None, description="SASL username; default: from the environment variable username_env."
    )
    sasl_password: SecretStr | None = Field(
        None, description="SASL password; default: from the environment variable password_env."
    )
    username_env: str = Field(
        "DIAPIPE_KAFKA_USERNAME", description="Environment variable holding the SASL username."
    )
    password_env: str = Field(
        "DIAPIPE_KAFKA_PASSWORD", description="Environment variable holding the SASL password."
    )
    ssl_ca_location: str | None = Field(None, description="CA bundle path (ssl.ca.location).")
    extra: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description=(
            "Further librdkafka producer options, passed as they are. Credentials "
            "(sasl.password, ssl.key.password, ...) are refused here: the options are "
            "stored in clear with the flow's parameters; use sasl_username/sasl_password "
            "or the environment."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _mask_credentials(cls, data):
        return mask_field(data, "extra", _is_kafka_secret)

    @field_validator("extra")
    @classmethod
    def _refuse_credentials(cls, extra: dict) -> dict:
        return refuse_secrets(
            extra,
            _is_kafka_secret,
            "KafkaConfig.extra",
            "set sasl_username/sasl_password (kept secret) or the environment variables "
            "DIAPIPE_KAFKA_USERNAME/DIAPIPE_KAFKA_PASSWORD",
        )

    @field_validator("topic")
    @classmethod
    def _topic_template(cls, v: str) -> str:
        try:
            v.format(major=11, minor=1, version="11.1")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"topic {v!r}: only {{major}}, {{minor}} and {{version}} may be filled in ({exc})"
            ) from None
        return v


def _is_kafka_secret(key: str) -> bool:
    """Whether ``key`` is a librdkafka property holding credentials (password, key, token, JAAS)."""
    k = key.lower()
    return (
        any(w in k for w in ("password", "secret", "token", "credential"))
        or k in ("sasl.username", "ssl.key.pem", "ssl_key", "sasl.oauthbearer.config")
        or k.endswith(".jaas.config")
    )


def topic_for(config: KafkaConfig, schema: AlertSchema) -> str:
    """The topic of alerts written with ``schema``: ``config.topic`` filled in."""
    major, minor = schema.version.split(".")
    return config.topic.format(major=major, minor=minor, version=schema.version)


def message_key(payload: bytes, dia_source_id: int, schema: AlertSchema, how: str) -> bytes | None:
    """The message key of one alert (see :class:`KafkaConfig` ``key``)."""
    if how == "none":
        return None
    if how == "object":
        obj, ss = object_key(payload, schema)
        # Rubin writes 0 for "none" as well as null (real LSSTCam alerts, schema 10).
        key = ss if ss else obj if obj else dia_source_id
        return str(key).encode()
    return str(dia_source_id).encode()


def producer_config(config: KafkaConfig) -> dict:
    """The librdkafka configuration dict for ``config`` (contains secrets: never log it)."""
    conf: dict[str, object] = {
        "bootstrap.servers": config.servers,
        "compression.type": config.compression,
        "linger.ms": config.linger_ms,
        "batch.size": config.batch_size,
        "batch.num.messages": config.batch_num_messages,
        "queue.buffering.max.kbytes": config.queue_max_kbytes,
        "message.max.bytes": config.message_max_bytes,
        "delivery.timeout.ms": config.delivery_timeout_ms,
        "acks": config.acks,
        "enable.idempotence": config.idempotence and config.acks == "all",
        "security.protocol": config.security_protocol,
    }
    if config.security_protocol.startswith("SASL"):
        user = config.sasl_username or _env_secret(config.username_env)
        password = config.sasl_password or _env_secret(config.password_env)
        if user is None or password is None:
            raise ConfigError(
                f"Kafka {config.security_protocol} needs a SASL username and password: set "
                f"{config.username_env} and {config.password_env}"
            )
        conf["sasl.mechanism"] = config.sasl_mechanism
        conf["sasl.username"] = user.get_secret_value()
        conf["sasl.password"] = password.get_secret_value()
    if config.ssl_ca_location:
        conf["ssl.ca.location"] = config.ssl_ca_location
    conf.update(config.extra)
    return conf


def _env_secret(name: str) -> SecretStr | None:
    value = os.environ.get(name)
    return SecretStr(value) if value else None


@dataclass(frozen=True)
class ProduceResult:
    """Counts of one produce call.

    ``n_sent`` messages were handed to the producer, ``n_delivered`` were
    acknowledged by the broker, ``n_failed`` were not (they are in the
    dead-letter file ``dead_letter_url`` when a store was given).
    ``errors`` counts failures by Kafka error name.
    """

    n_sent: int
    n_delivered: int
    n_failed: int
    dead_letter_url: str | None = None
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


#: Seconds a cached producer may stay unused before the next batch closes it.
PRODUCER_IDLE_S = 600.0

# (pid, digest of the librdkafka configuration) → [producer, last use (monotonic)]
_producers: dict[tuple[int, str], list] = {}
_producers_lock = threading.Lock()


def _producer(config: KafkaConfig):
    """The producer for ``config`` in this process: the cached one, or a new one.

    Returns ``(key, producer)``; :func:`_drop_producer` with the key retires it.
    """
    conf = producer_config(config)
    # the digest keeps credentials out of the key; the pid keeps a forked child
    # from using its parent's librdkafka threads, which it does not have
    digest = hashlib.blake2b(repr(sorted(conf.items())).encode(), digest_size=16).hexdigest()
    key = (os.getpid(), digest)
    now = time.monotonic()
    idle = []
    with _producers_lock:
        for k in list(_producers):
            if k[0] != key[0]:  # a parent's, inherited by fork: its threads are not here
                del _producers[k]
            elif now - _producers[k][1] > PRODUCER_IDLE_S:
                idle.append(_producers.pop(k)[0])
        entry = _producers.get(key)
        if entry is None:
            Producer = import_extra("confluent_kafka", "kafka", "Kafka output").Producer
            try:
                entry = [Producer(conf), now]
            except Exception as exc:  # KafkaException for bad options
                raise ConfigError(f"Kafka producer for {config.servers}: {exc}") from exc
            _producers[key] = entry
        entry[1] = now
    for p in idle:
        p.close()
    return key, entry[0]


def _drop_producer(key: tuple[int, str], producer) -> None:
    """Retire ``producer`` (cached under ``key``): the next batch makes a new one."""
    with _producers_lock:
        entry = _producers.get(key)
        if entry is not None and entry[0] is producer:
            del _producers[key]


def close_producers() -> None:
    """Close this process's cached producers (each has flushed its batches already)."""
    with _producers_lock:
        mine = [k for k in _producers if k[0] == os.getpid()]
        entries = [_producers.pop(k) for k in mine]
    for p, _ in entries:
        p.close()


atexit.register(close_producers)


def _send(batch: AlertBatch, config: KafkaConfig) -> tuple[np.ndarray, dict[str, int], int]:
    """Produce every alert of ``batch``; returns (delivered mask, error counts, sent)."""
    n = len(batch)
    delivered = np.zeros(n, dtype=bool)
    errors: dict[str, int] = {}
    if n == 0:
        return delivered, errors, 0
    key, producer = _producer(config)
    try:
        sent = _send_with(producer, batch, config, delivered, errors)
    except BaseException:
        _drop_producer(key, producer)
        raise
    if errors or not delivered.all():
        _drop_producer(key, producer)  # a failure may leave it fenced or broken
    return delivered, errors, sent


def _send_with(
    producer, batch: AlertBatch, config: KafkaConfig, delivered: np.ndarray, errors: dict
) -> int:
    header = wire_header(batch.schema.schema_id)
    topic = topic_for(config, batch.schema)

    def report(index: int):
        def on_delivery(err, _msg):
            if err is None:
                delivered[index] = True
            else:
                errors[err.name()] = errors.get(err.name(), 0) + 1

        return on_delivery

    sent = 0
    for i, (sid, payload) in enumerate(
        zip(batch.dia_source_ids.tolist(), batch.payloads, strict=True)
    ):
        key = message_key(payload, sid, batch.schema, config.key)
        now_ms = time.time_ns() // 1_000_000
        while True:
            try:
                producer.produce(
                    topic,
                    value=header + payload,
                    key=key,
                    timestamp=now_ms,
                    headers=[("producer_timestamp", str(now_ms).encode())],
                    on_delivery=report(i),
                )
                sent += 1
                break
            except BufferError:
                producer.poll(0.05)  # local queue full: serve delivery reports, then retry
            except Exception as exc:  # KafkaException: message too large, unknown topic, ...
                name = (
                    exc.args[0].name()
                    if exc.args and hasattr(exc.args[0], "name")
                    else str(type(exc).__name__)
                )
                errors[name] = errors.get(name, 0) + 1
                break
        if i % 256 == 255:
            producer.poll(0)
    remaining = producer.flush(config.flush_timeout_s)
    if remaining:
        log.warning(
            "kafka: %d alert(s) not delivered within %.0f s; purging them",
            remaining,
            config.flush_timeout_s,
        )
        producer.purge(in_queue=True, in_flight=True)
        producer.flush(5.0)  # serves the purge delivery reports (_PURGE_QUEUE / _PURGE_INFLIGHT)
    return sent


def produce_alerts(
    batch: AlertBatch, config: KafkaConfig, dead_letters: DeadLetterStore | None = None
) -> ProduceResult:
    """Produce ``batch`` to Kafka; alerts not acknowledged go to ``dead_letters``.

    Parameters
    ----------
    batch : AlertBatch
        Encoded alerts (from :func:`alerts.packet.package_alerts`).
    config : KafkaConfig
    dead_letters : DeadLetterStore, optional
        Where unacknowledged alerts are written (Rubin: doWriteFailedAlerts).
        Without one, failures are only counted and logged.

    Returns
    -------
    ProduceResult
        ``n_delivered + n_failed == len(batch)`` always.
    """
    t0 = time.perf_counter()
    delivered, errors, sent = _send(batch, config)
    failed = ~delivered
    url = None
    if failed.any():
        if dead_letters is not None:
            url = dead_letters.put(batch.subset(failed))
            log.error(
                "kafka %s/%s: %d of %d alerts not acknowledged (%s); written to %s",
                config.servers,
                topic_for(config, batch.schema),
                int(failed.sum()),
                len(batch),
                errors,
                url,
            )
        else:
            log.error(
                "kafka %s/%s: %d of %d alerts not acknowledged (%s); no dead-letter store",
                config.servers,
                topic_for(config, batch.schema),
                int(failed.sum()),
                len(batch),
                errors,
            )
    return ProduceResult(
        n_sent=sent,
        n_delivered=int(delivered.sum()),
        n_failed=int(failed.sum()),
        dead_letter_url=url,
        errors={k: v for k, v in errors.items() if v},
        seconds=time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class ReplayResult:
    """Outcome of a replay: files seen/emptied, alerts re-sent/delivered/still failing."""

    n_files: int
    n_files_removed: int
    n_sent: int
    n_delivered: int
    n_failed: int
    corrupt: dict[str, str] = field(default_factory=dict)  # file URL → why it was skipped


def replay_dead_letters(store: DeadLetterStore, config: KafkaConfig) -> ReplayResult:
    """Re-send every dead letter; remove those acknowledged, keep the others.

    Each file is re-sent as a whole; when all its alerts are acknowledged the
    file is removed, otherwise it is rewritten (atomically) with only the
    alerts still not acknowledged. A file that cannot be read is kept, logged
    and listed in ``corrupt``; the other files are replayed.
    """
    files = store.list()
    removed = sent = ok = bad = 0
    corrupt: dict[str, str] = {}
    for url in files:
        try:
            batch = store.read(url)
        except InputError as exc:  # a damaged file is kept and reported; the others go on
            corrupt[url] = str(exc)
            log.error("replay %s: skipped, not readable: %s", url, exc)
            continue
        delivered, errors, n_sent = _send(batch, config)
        sent += n_sent
        ok += int(delivered.sum())
        bad += int((~delivered).sum())
        if delivered.all():
            store.remove(url)
            removed += 1
        else:
            store.replace(url, batch.subset(~delivered))
            log.error(
                "replay %s: %d alert(s) still not acknowledged (%s)",
                url,
                int((~delivered).sum()),
                errors,
            )
    return ReplayResult(len(files), removed, sent, ok, bad, corrupt)
