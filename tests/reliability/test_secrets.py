"""Secrets set for the APDB, Kafka and S3 never reach a log, an artifact or an alert file."""

from __future__ import annotations

import logging
import uuid

import pytest

from apdb.config import ApdbConfig
from apdb.sql import ApdbSql
from flows.visit import run_visit
from tests.conftest import free_port, make_config

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.postgresql, pytest.mark.s3]

DB_PASSWORD = "db-Pw-7f3a9c1e"
KAFKA_PASSWORD = "kafka-Pw-52d8b0aa"
KAFKA_PARAM_PASSWORD = "kafka-param-Pw-91c4"
S3_SECRET = "s3-Secret-e0b7d2c6"
SECRETS = (DB_PASSWORD, KAFKA_PASSWORD, KAFKA_PARAM_PASSWORD, S3_SECRET)


@pytest.fixture
def s3_server(moto_s3_port, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    endpoint = f"http://127.0.0.1:{moto_s3_port}"
    bucket = f"alerts-{uuid.uuid4().hex[:10]}"  # moto keeps one in-memory S3 per process
    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(bucket)
    return endpoint, bucket


def test_no_secret_in_logs_artifacts_or_alerts(
    survey_root, tmp_path, pg_url, s3_server, monkeypatch, caplog, capfd
):
    import asyncio

    import s3fs
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    monkeypatch.setenv("DIAPIPE_APDB_PASSWORD", DB_PASSWORD)
    monkeypatch.setenv("DIAPIPE_KAFKA_USERNAME", "alerts-producer")
    monkeypatch.setenv("DIAPIPE_KAFKA_PASSWORD", KAFKA_PASSWORD)
    ApdbSql.create(ApdbConfig(url=pg_url), drop=True).close()
    base = make_config(tmp_path, cache=False)
    endpoint, bucket = s3_server
    storage = {"endpoint_url": endpoint}
    config = base.model_validate(
        {
            **base.model_dump(),
            "apdb": {"url": pg_url},
            "output": {
                "store": {"location": f"s3://{bucket}/lsst", "storage_options": storage},
                "dead_letter_location": str(tmp_path / "dead"),
                "do_produce_alerts": True,
            },
            "kafka": {
                "servers": f"127.0.0.1:{free_port()}",  # nothing listens: every alert fails
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "delivery_timeout_ms": 1500,
                "flush_timeout_s": 5,
            },
        }
    )
    caplog.set_level(logging.DEBUG)
    state, result = run_visit(survey_root, 0, config, detectors=None)
    assert state.name == "Completed", state.message
    assert result["alerts"] > 0

    # A password given as a parameter is masked in what Prefect stores.
    leaked_param = config.model_copy(
        update={"kafka": config.kafka.model_copy(update={"sasl_password": KAFKA_PARAM_PASSWORD})}
    )
    state2, _ = run_visit(survey_root, 0, leaked_param)

    async def stored():
        async with get_client() as client:
            texts = []
            for st in (state, state2):
                run = await client.read_flow_run(st.state_details.flow_run_id)
                texts.append(repr(run.parameters))
                arts = await client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=[st.state_details.flow_run_id])
                    )
                )
                texts += [repr(a.data) + repr(a.description) for a in arts]
            return texts

    api_texts = asyncio.run(stored())
    assert any("visit-0" in t or "Visit 0" in t for t in api_texts), "artifacts were read"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    alert_bytes = [fs.cat(p) for p in fs.find(f"{bucket}/lsst")]
    assert any(p.endswith(".avro") for p in fs.find(f"{bucket}/lsst")), "alerts went to S3"
    dead = [p.read_bytes() for p in (tmp_path / "dead").rglob("*") if p.is_file()]
    assert dead, "unacknowledged alerts are in the dead-letter store"
    out, err = capfd.readouterr()
    haystacks = {
        "log records": "\n".join(r.getMessage() + repr(r.args) for r in caplog.records),
        "stdout/stderr": out + err,
        "flow result": repr(result),
        "Prefect parameters and artifacts": "\n".join(api_texts),
    }
    for name, text in haystacks.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} found in {name}"
    for blob in alert_bytes + dead:
        for secret in SECRETS:
            assert secret.encode() not in blob, f"{secret!r} found in an alert or dead-letter file"
