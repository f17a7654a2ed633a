"""Alert files and dead letters: readable by any Avro reader, atomic, local and S3."""

from __future__ import annotations

import io
import os

import fastavro
import numpy as np
import pytest

from alerts.packet import AlertBatch, package_alerts
from alerts.store import (
    AlertStoreConfig,
    DeadLetterStore,
    iter_container_payloads,
    read_alert_batch,
    read_alert_file,
    write_alerts,
)
from core.errors import AlertError, InputError
from tests.data import RUBIN_ALERTS

from .conftest import make_alert_inputs


@pytest.fixture(scope="module")
def batch() -> AlertBatch:
    bundle, new, objects, hist, forced = make_alert_inputs(seed=11, n_alerts=12, depth=4, forced=3)
    return package_alerts(new, objects, hist, forced, {}, bundle.visit)


@pytest.mark.parametrize("codec", ["null", "deflate"])
def test_local_file_readable_by_fastavro_and_back(tmp_path, batch, codec):
    url = write_alerts(batch, AlertStoreConfig(location=str(tmp_path / "out"), codec=codec))
    assert url == f"{tmp_path}/out/7001_3.avro"
    assert os.listdir(tmp_path / "out") == ["7001_3.avro"]  # no temporary left behind
    assert read_alert_file(url) == batch.records()
    with open(url, "rb") as f:
        reader = fastavro.reader(f)
        assert reader.metadata["avro.codec"] == codec
        assert reader.metadata["diapipe.schema_id"] == "1101"
    back = read_alert_batch(url)
    assert back.payloads == batch.payloads
    assert back.dia_source_ids.tolist() == batch.dia_source_ids.tolist()
    assert (back.visit, back.detector, back.schema.version) == (7001, 3, "11.1")


def test_empty_batch_writes_nothing(tmp_path, batch):
    assert (
        write_alerts(
            batch.subset(np.zeros(len(batch), bool)), AlertStoreConfig(location=str(tmp_path))
        )
        is None
    )
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_previous_file_intact(tmp_path, batch, monkeypatch):
    config = AlertStoreConfig(location=str(tmp_path))
    url = write_alerts(batch.subset(np.arange(len(batch)) < 3), config)
    before = open(url, "rb").read()

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(AlertError, match=r"7001_3\.avro: cannot write: disk full"):
        write_alerts(batch, config)
    assert open(url, "rb").read() == before
    assert os.listdir(tmp_path) == ["7001_3.avro"]


def test_multi_record_blocks_are_split_into_original_payloads(batch):
    buf = io.BytesIO()
    fastavro.writer(buf, batch.schema.parsed, batch.records(), codec="deflate")
    _, payloads = iter_container_payloads(buf.getvalue())
    assert list(payloads) == batch.payloads
    with pytest.raises(InputError, match="not an Avro container"):
        iter_container_payloads(b"PAR1....", "x.parquet")


def test_dead_letter_store_put_list_replace_remove(tmp_path, batch):
    store = DeadLetterStore(str(tmp_path / "dlq"))
    assert store.list() == []
    a = store.put(batch.subset(np.arange(len(batch)) < 5))
    b = store.put(batch.subset(np.arange(len(batch)) >= 5))
    assert a != b and store.list() == sorted([a, b])
    assert store.count() == len(batch)
    back = store.read(a)
    assert back.payloads == batch.payloads[:5]
    store.replace(a, back.subset(np.arange(5) == 2))
    assert store.read(a).dia_source_ids.tolist() == [batch.dia_source_ids[2]]
    store.remove(a)
    store.replace(b, back.subset(np.zeros(5, bool)))  # empty → removed
    assert store.list() == []


@pytest.fixture(scope="module")
def s3(moto_s3_port):
    """The session's moto S3 server, the fsspec options to reach it, bucket ``alerts-bucket``."""
    import s3fs

    opts = {
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{moto_s3_port}"},
        "skip_instance_cache": True,
    }
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir("alerts-bucket")
    return opts, fs


@pytest.mark.s3
@pytest.mark.slow  # moto imports its S3 backend on the first request (~5 s)
def test_s3_alert_file_and_dead_letters(s3, batch):
    opts, fs = s3
    config = AlertStoreConfig(location="s3://alerts-bucket/run1", storage_options=opts)
    url = write_alerts(batch, config)
    assert url == "s3://alerts-bucket/run1/7001_3.avro"
    assert fs.ls("alerts-bucket/run1") == [
        "alerts-bucket/run1/7001_3.avro"
    ]  # one object, final name
    assert read_alert_file(url, opts) == batch.records()
    assert read_alert_batch(url, opts).payloads == batch.payloads

    store = DeadLetterStore("s3://alerts-bucket/dead", opts)
    d = store.put(batch)
    assert store.list() == [d]
    assert store.read(d).payloads == batch.payloads
    store.remove(d)
    assert store.list() == []


def test_cli_lists_dead_letters_with_counts(tmp_path, batch, capsys):
    from alerts import __main__ as cli

    store = DeadLetterStore(str(tmp_path))
    url = store.put(batch)
    assert cli.main(["list", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(len(batch)), url]


def test_real_rubin_packets_round_trip_through_an_alert_file(tmp_path):
    from alerts.packet import clean_alert_record, encode_alert_records, load_schema
    from alerts.store import write_alert_file

    schema = load_schema("11.1")
    with open(RUBIN_ALERTS, "rb") as f:
        real = [clean_alert_record(r, schema) for r in fastavro.reader(f)]
    payloads = encode_alert_records(real, schema)
    ids = np.array([r["diaSourceId"] for r in real], dtype=np.int64)
    url = write_alert_file(
        str(tmp_path / "918301_0.avro"), AlertBatch(payloads, ids, schema, 918301, 0)
    )
    assert read_alert_file(url) == real
    back = read_alert_batch(url)
    assert back.payloads == payloads and back.dia_source_ids.tolist() == ids.tolist()
