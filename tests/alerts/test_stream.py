"""The stream as brokers consume it: schema registry, Rubin's Kafka conventions, manifest, replay.

Kafka is the real tansu broker of test_kafka_broker.py; the consumer is stock
confluent-kafka (DeserializingConsumer + AvroDeserializer + SchemaRegistryClient)
pointed at ``registry serve``; ``registry sync`` is tested against a small
registry server in this file that records what it is sent.
"""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fastavro
import pytest
from confluent_kafka import OFFSET_BEGINNING, DeserializingConsumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer

from alerts import __main__ as cli
from alerts.cutouts import make_cutouts
from alerts.index import object_keys
from alerts.kafka import KafkaConfig, produce_alerts
from alerts.manifest import read_night, visit_entry, write_visit_manifest
from alerts.packet import load_schema, package_alerts
from alerts.registry import registered_schemas, serve_in_thread
from alerts.store import AlertStoreConfig, read_alert_batch, write_alerts
from core.errors import InputError

from .conftest import make_alert_inputs, make_visit
from .kafka_util import consume_all, source_id
from .test_kafka_broker import Broker, _free_port, _tansu_binary


@pytest.fixture
def registry():
    server, url = serve_in_thread()
    yield url
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def test_registry_answers_as_confluent_does(registry):
    latest = load_schema(None)
    ids = [s.schema_id for s in registered_schemas()]
    assert latest.schema_id in ids and 1100 in ids and ids == sorted(set(ids))
    status, body = _get(f"{registry}/schemas/ids/{latest.schema_id}")
    assert status == 200
    assert json.loads(body["schema"]) == json.loads(
        fastavro.schema.to_parsing_canonical_form(latest.definition)
    )
    subject = f"lsst-alerts-v{latest.version}-value"
    assert _get(f"{registry}/schemas/ids/{latest.schema_id}/versions") == (
        200,
        [
            {"subject": "alert-packet", "version": latest.schema_id},
            {"subject": subject, "version": 1},
        ],
    )
    status, subjects = _get(f"{registry}/subjects")
    assert "alert-packet" in subjects and subject in subjects
    assert _get(f"{registry}/subjects/alert-packet/versions") == (200, ids)
    status, body = _get(f"{registry}/subjects/alert-packet/versions/latest")
    assert (body["id"], body["version"], body["subject"]) == (ids[-1], ids[-1], "alert-packet")
    status, body = _get(f"{registry}/subjects/{subject}/versions/1")
    assert (status, body["id"]) == (200, latest.schema_id)
    # unknown id / subject / version: Confluent's 404s
    assert _get(f"{registry}/schemas/ids/42") == (
        404,
        {"error_code": 40403, "message": "Schema 42 not found"},
    )
    assert _get(f"{registry}/subjects/no-such/versions")[1]["error_code"] == 40401
    assert _get(f"{registry}/subjects/alert-packet/versions/7")[1]["error_code"] == 40402
    # read-only
    req = urllib.request.Request(f"{registry}/subjects/x/versions", data=b"{}", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 405
    err.value.close()

    client = SchemaRegistryClient({"url": registry})
    assert client.get_latest_version("alert-packet").schema_id == ids[-1]
    assert client.get_version(subject, 1).schema_id == latest.schema_id


class _FakeRegistry(BaseHTTPRequestHandler):
    """A Confluent-compatible registry that records requests; IMPORT mode needed to post ids."""

    requests: list
    modes: dict
    versions: dict
    refuse_mode: set

    def _send(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n)) if n else None

    def do_PUT(self):
        body = self._body()
        self.requests.append(("PUT", self.path, body))
        subject = self.path.split("?")[0].split("/")[2]
        if subject in self.refuse_mode:
            return self._send(422, {"error_code": 42205, "message": "not permitted"})
        self.modes[subject] = body["mode"]
        self._send(200, body)

    def do_POST(self):
        body = self._body()
        self.requests.append(("POST", self.path, body))
        subject = self.path.split("/")[2]
        if self.modes.get(subject) != "IMPORT":
            return self._send(422, {"error_code": 42205, "message": "not in IMPORT mode"})
        key = (subject, body["version"])
        if key in self.versions and self.versions[key] != (body["id"], body["schema"]):
            return self._send(409, {"error_code": 409, "message": "conflict"})
        self.versions[key] = (body["id"], body["schema"])
        self._send(200, {"id": body["id"]})

    def log_message(self, *args):
        pass


def _fake_registry(refuse_mode=()):
    handler = type(
        "Fake",
        (_FakeRegistry,),
        {"requests": [], "modes": {}, "versions": {}, "refuse_mode": set(refuse_mode)},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler, f"http://127.0.0.1:{server.server_address[1]}"


def test_sync_registers_rubin_ids_and_subjects_in_import_mode(capsys):
    server, fake, url = _fake_registry()
    try:
        assert cli.main(["registry", "sync", url]) == 0
        schemas = registered_schemas()
        expected = {("alert-packet", s.schema_id): (s.schema_id, s.schema) for s in schemas}
        expected |= {(s.topic_subject, 1): (s.schema_id, s.schema) for s in schemas}
        assert fake.versions == expected
        # each subject: IMPORT before its schemas, READWRITE after
        by_subject: dict[str, list] = {}
        for method, path, body in fake.requests:
            by_subject.setdefault(path.split("?")[0].split("/")[2], []).append((method, body))
        for subject, calls in by_subject.items():
            assert calls[0] == ("PUT", {"mode": "IMPORT"}), subject
            assert calls[-1] == ("PUT", {"mode": "READWRITE"}), subject
            assert all(m == "POST" for m, _ in calls[1:-1])
        out = capsys.readouterr().out
        assert f"{2 * len(schemas)} schema version(s) registered" in out
        # a second sync registers the same again and is accepted
        assert cli.main(["registry", "sync", url]) == 0
    finally:
        server.shutdown()
        server.server_close()

    server, fake, url = _fake_registry(refuse_mode={"alert-packet"})
    try:
        assert cli.main(["registry", "sync", url]) == 1
        assert "alert-packet: IMPORT mode refused: HTTP 422" in capsys.readouterr().err
        assert not any(k[0] == "alert-packet" for k in fake.versions)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def broker(tmp_path):
    b = Broker(_tansu_binary(), _free_port(), tmp_path / "tansu.log")
    b.start()
    yield b
    b.stop()


def _stock_consume(servers: str, topic: str, registry: str, expected: int, timeout=30.0) -> list:
    """What a broker runs: DeserializingConsumer + AvroDeserializer + SchemaRegistryClient."""
    client = SchemaRegistryClient({"url": registry})
    consumer = DeserializingConsumer(
        {
            "bootstrap.servers": servers,
            "group.id": "stock-broker",
            "enable.auto.commit": False,
            "value.deserializer": AvroDeserializer(client),
        }
    )
    try:
        parts = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append(msg)
        return out
    finally:
        consumer.close()


def _encode(record: dict, schema) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema.parsed, record)
    return buf.getvalue()


@pytest.mark.kafka
@pytest.mark.slow
def test_stock_consumer_decodes_every_alert_with_rubin_conventions(broker, registry, tmp_path):
    bundle, new, objects, hist, forced = make_alert_inputs(seed=5, n_alerts=24, depth=6, forced=4)
    batch = package_alerts(new, objects, hist, forced, make_cutouts(new, bundle), bundle.visit)
    store = AlertStoreConfig(location=str(tmp_path / "alerts"))
    url = write_alerts(batch, store)
    major = batch.schema.version.split(".")[0]
    topic = f"lsst-alerts-v{major}"
    broker.create_topic(topic, partitions=3)
    config = KafkaConfig(servers=broker.servers)  # Rubin's defaults
    assert (config.compression, config.key) == ("snappy", "object")
    t0 = time.time_ns() // 1_000_000
    result = produce_alerts(batch, config)
    t1 = time.time_ns() // 1_000_000
    assert (result.n_delivered, result.n_failed) == (len(batch), 0)

    messages = _stock_consume(broker.servers, topic, registry, len(batch))
    assert len(messages) == len(batch)
    stored = {
        b: p
        for b, p in zip(batch.dia_source_ids.tolist(), read_alert_batch(url).payloads, strict=True)
    }
    obj, _ = object_keys(batch.payloads, batch.schema)
    key_of = {
        s: str(o if o >= 0 else s).encode()
        for s, o in zip(batch.dia_source_ids.tolist(), obj, strict=True)
    }
    partitions: dict[bytes, set[int]] = {}
    for m in messages:
        alert = m.value()  # decoded by the stock deserializer, schema from the registry
        sid = alert["diaSourceId"]
        assert _encode(alert, batch.schema) == stored[sid], "same alert as the file store's"
        assert m.key() == key_of[sid]
        headers = dict(m.headers())
        stamp = int(headers["producer_timestamp"])
        assert t0 <= stamp <= t1
        assert m.timestamp()[1] == stamp
        partitions.setdefault(m.key(), set()).add(m.partition())
    assert all(len(p) == 1 for p in partitions.values()), "one object, one partition"
    assert any(o < 0 for o in obj), "alerts without a DiaObject are keyed by diaSourceId"


def test_topic_template_and_bad_template():
    schema = load_schema(None)
    major, minor = schema.version.split(".")
    from alerts.kafka import topic_for

    assert topic_for(KafkaConfig(), schema) == f"lsst-alerts-v{major}"
    assert topic_for(KafkaConfig(topic="alerts-v{major}_{minor}"), schema) == (
        f"alerts-v{major}_{minor}"
    )
    assert topic_for(KafkaConfig(topic="alerts-simulated"), schema) == "alerts-simulated"
    with pytest.raises(ValueError, match="only {major}, {minor} and {version}"):
        KafkaConfig(topic="alerts-{night}")


def test_manifest_two_visits_finishing_at_once(tmp_path):
    location = str(tmp_path / "alerts")
    entries = []
    for k in range(2):
        visit = make_visit(visit=100 + k, mjd=61000.3 + k * 0.0005)
        receipts = [
            {
                "detector": d,
                "alerts": 3 + d,
                "delivered": 3 + d - k,
                "failed": k,
                "file": f"{100 + k}_{d}.avro",
                "ss_alerts": d % 2,
                "produced_at": None,
            }
            for d in range(4)
        ]
        entries.append(visit_entry(visit, receipts, {7: "load: InputError: bad"}, {0: 1, 1: 2}))
    barrier = threading.Barrier(2)

    def write(e):
        barrier.wait()
        write_visit_manifest(location, e)

    threads = [threading.Thread(target=write, args=(e,)) for e in entries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    night = entries[0]["night"]
    summary = read_night(location, night)
    assert [v["visit"] for v in summary["visits"]] == [100, 101]
    assert summary["alerts"] == 2 * (3 + 4 + 5 + 6) == summary["alerts_by_band"]["r"]
    assert summary["delivered"] == 18 + 14 and summary["dead_lettered"] == 4
    assert summary["ss_alerts"] == 4 and summary["new_objects"] == 6
    assert summary["new_objects_complete"] is False  # detectors 2, 3 have no count
    assert summary["failed_detectors"] == [
        {"visit": 100, "detector": 7, "reason": "load: InputError: bad"},
        {"visit": 101, "detector": 7, "reason": "load: InputError: bad"},
    ]
    assert read_night(location, "2001-01-01")["visits"] == []
    with pytest.raises(InputError, match="YYYY-MM-DD"):
        read_night(location, "tonight")


def _files(folder: Path) -> dict[int, tuple[bytes, str]]:
    """diaSourceId → (payload, file name) of every alert file."""
    out = {}
    for f in sorted(folder.glob("*.avro")):
        batch = read_alert_batch(str(f))
        for sid, p in zip(batch.dia_source_ids.tolist(), batch.payloads, strict=True):
            out[sid] = (p, f.name)
    return out


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_night_manifest_reconciles_and_replays(survey_root, broker, tmp_path, capsys):
    from flows.visit import run_visit
    from tests.conftest import V0, V1, make_config

    config = make_config(tmp_path, cache=False)
    config = config.model_copy(
        update={
            "output": config.output.model_copy(update={"do_produce_alerts": True}),
            "kafka": KafkaConfig(servers=broker.servers, topic="alerts-night"),
        }
    )
    broker.create_topic("alerts-night", partitions=2)
    for visit in (V0, V1):
        state, result = run_visit(survey_root, visit, config)
        assert state.name == "Completed", getattr(state, "message", state)
        assert result["manifest"]
    store = tmp_path / "alerts"
    files = _files(store)
    # the simulated survey's visits 0 and 1 are three nights apart
    nights = sorted(p.name for p in (store / "manifests").iterdir())
    summaries = [read_night(str(store), n) for n in nights]
    assert [s["n_visits"] for s in summaries] == [1, 1]

    # counts reconcile with the alert files ...
    schema = load_schema(None)
    got = consume_all(broker.servers, "alerts-night", len(files))
    for summary in summaries:
        (visit,) = summary["visits"]
        mine = {s: p for s, (p, n) in files.items() if n.startswith(f"{visit['visit']}_")}
        records = [
            fastavro.schemaless_reader(io.BytesIO(p), schema.parsed, None) for p in mine.values()
        ]
        assert summary["alerts"] == len(mine) > 0
        bands: dict[str, int] = {}
        for r in records:
            bands[r["diaSource"]["band"]] = bands.get(r["diaSource"]["band"], 0) + 1
        assert summary["alerts_by_band"] == bands
        assert summary["ss_alerts"] == sum(bool(r["diaSource"]["ssObjectId"]) for r in records)
        assert summary["new_objects_complete"]
        assert summary["new_objects"] == sum(
            1 for r in records if r["diaObject"] and r["diaObject"]["nDiaSources"] == 1
        )
        assert sorted(visit["files"]) == sorted({n for s, (_, n) in files.items() if s in mine})
        # ... and with what Kafka acknowledged
        acknowledged = [m for m in got if source_id(m) in mine]
        assert summary["delivered"] == len(acknowledged) == len(mine)
        assert summary["dead_lettered"] == 0 and summary["failed_detectors"] == []
        assert summary["latency_s"] is not None
    assert len(got) == len(files) == sum(s["alerts"] for s in summaries)
    night = nights[0]
    assert cli.main(["night", night, "--store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)["alerts"] == summaries[0]["alerts"]

    # get: through the index; an unreadable other file is never opened
    sid, (payload, name) = next(iter(files.items()))
    other = next(f for f in store.glob("*.avro") if f.name != name)
    kept = other.read_bytes()
    other.write_bytes(b"not avro")
    out = tmp_path / "one.avro"
    assert cli.main(["get", str(sid), "--store", str(store), "--out", str(out)]) == 0
    assert read_alert_batch(str(out)).payloads == [payload]
    assert cli.main(["get", str(sid), "--store", str(store)]) == 0
    assert f"alert {sid} in" in capsys.readouterr().out
    assert cli.main(["get", "12345", "--store", str(store)]) == 1
    assert "no alert with diaSourceId 12345" in capsys.readouterr().err
    other.write_bytes(kept)
    first = set(summaries[0]["visits"][0]["files"])
    expected = {s for s, (_, n) in files.items() if n in first}
    assert expected

    # a night without alerts
    assert (
        cli.main(
            [
                "replay-night",
                "2001-01-01",
                "--to",
                broker.servers,
                "--topic",
                "x",
                "--store",
                str(store),
            ]
        )
        == 1
    )
    assert "night 2001-01-01: no alerts" in capsys.readouterr().err

    # replay with Kafka down: everything dead-lettered, nothing lost
    port = _free_port()
    replay = [
        "replay-night",
        night,
        "--topic",
        "replayed",
        "--store",
        str(store),
        "--cadence",
        "0.05",
        "--timeout",
        "2",
    ]
    assert cli.main([*replay, "--to", f"127.0.0.1:{port}"]) == 1
    assert f"{len(expected)} dead-lettered" in capsys.readouterr().out
    # Kafka back: the dead letters go out, acknowledged files are not sent again
    later = Broker(_tansu_binary(), port, tmp_path / "tansu2.log")
    later.start()
    try:
        later.create_topic("replayed", partitions=2)
        assert cli.main([*replay, "--to", later.servers]) == 0
        out = capsys.readouterr().out
        assert (
            f"{len(expected)} earlier dead letter(s) delivered" in out and "0 alert(s) sent" in out
        )
        assert cli.main([*replay, "--to", later.servers]) == 0  # a third run sends nothing
        assert "0 alert(s) sent" in capsys.readouterr().out
        got = consume_all(later.servers, "replayed", len(expected))
    finally:
        later.stop()
    assert sorted(source_id(m) for m in got) == sorted(expected), "each alert exactly once"
    assert {source_id(m): m.value()[5:] for m in got} == {s: files[s][0] for s in expected}


def test_keys_of_real_rubin_alerts_object_or_solar_system_object():
    """Rubin writes 0 for "no DiaObject" / "no SSObject"; the key is the object that is set."""
    import numpy as np

    from alerts.kafka import message_key
    from alerts.packet import clean_alert_record, encode_alert_records
    from tests.data import RUBIN_ALERTS

    schema = load_schema("10.0")
    with open(RUBIN_ALERTS, "rb") as f:
        records = [clean_alert_record(r, schema) for r in fastavro.reader(f)]
    payloads = encode_alert_records(records, schema)
    keys = [
        message_key(p, r["diaSourceId"], schema, "object")
        for p, r in zip(payloads, records, strict=True)
    ]
    expected = [
        str(r["diaSource"]["ssObjectId"] or r["diaSource"]["diaObjectId"]).encode() for r in records
    ]
    assert keys == expected
    ss = sum(bool(r["diaSource"]["ssObjectId"]) for r in records)
    assert ss == 2 and int((object_keys(payloads, schema)[1] >= 0).sum()) == ss
    assert message_key(payloads[0], 7, schema, "diaSourceId") == b"7"
    assert message_key(payloads[0], 7, schema, "none") is None
    assert np.all(
        object_keys(payloads, schema)[0][[bool(r["diaSource"]["ssObjectId"]) for r in records]]
        == -1
    )


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_replay_night_keeps_the_survey_cadence_or_the_given_one(
    broker, tmp_path, monkeypatch, capsys
):
    """Visits go out as far apart as the survey took them (or ``--cadence``), over ``--speed``."""
    from alerts import stream
    from core.bundle import read_visit_info
    from flows.visit import run_visit
    from sim.config import SurveyConfig
    from sim.survey import Survey
    from tests.conftest import make_config

    survey = Survey(
        SurveyConfig(
            seed=5,
            n_detectors=2,
            n_visits=3,
            start_mjd=61000.3,  # mid-day UTC: the three visits share one date
            cadence_days=0.01,  # 864 s apart
            detector_size=(128, 128),
            sources_per_detector=8,
        )
    )
    root = tmp_path / "bundles"
    visits = [survey.config.visit_number(k) for k in range(3)]
    for k in range(3):
        survey.write_visit(str(root), k)
    config = make_config(tmp_path, cache=False)
    for v in visits:
        state, _ = run_visit(str(root), v, config)
        assert state.name == "Completed", getattr(state, "message", state)
    mjds = [read_visit_info(str(root), v).midpointMjdTai for v in visits]
    store = tmp_path / "alerts"
    (night,) = sorted(p.name for p in (store / "manifests").iterdir())

    pauses: list[float] = []
    monkeypatch.setattr(stream.time, "sleep", pauses.append)

    topics: set[str] = set()

    def replay(topic: str, *extra: str) -> int:
        if topic not in topics:
            broker.create_topic(topic, partitions=1)
            topics.add(topic)
        args = ["replay-night", night, "--to", broker.servers, "--topic", topic]
        return cli.main([*args, "--store", str(store), "--timeout", "10", *extra])

    # the survey's own gaps, 100x faster: 8.64 s between visits
    assert replay("survey-cadence", "--speed", "100") == 0
    expected = [(b - a) * 86400 / 100 for a, b in zip(mjds, mjds[1:], strict=False)]
    assert pauses == pytest.approx(expected, rel=1e-6)
    assert pauses == pytest.approx([8.64, 8.64], rel=1e-3)
    # a given cadence over the speed
    pauses.clear()
    assert replay("given-cadence", "--cadence", "2", "--speed", "4") == 0
    assert pauses == pytest.approx([0.5, 0.5])
    # a resumed replay waits only between visits it still sends: none here
    pauses.clear()
    assert replay("given-cadence", "--cadence", "2", "--speed", "4") == 0
    assert pauses == []
    n = sum(len(read_alert_batch(str(f))) for f in store.glob("*.avro"))
    got = consume_all(broker.servers, "given-cadence", n + 1, timeout=10)
    assert len(got) == n > 0, "every alert once: the resumed replay sent nothing again"
    capsys.readouterr()
