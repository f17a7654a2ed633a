"""Secrets set for the APDB, Kafka and S3 never reach a log, an artifact or an alert file."""

from __future__ import annotations

import logging
import uuid

import pytest

from apdb.config import ApdbConfig
from apdb.sql import ApdbSql
from flows.visit import run_visit
from tests.conftest import V0, free_port, make_config

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
    state, result = run_visit(survey_root, V0, config, detectors=None)
    assert state.name == "Completed", state.message
    assert result["alerts"] > 0

    # A password given as a parameter is masked in what Prefect stores.
    leaked_param = config.model_copy(
        update={"kafka": config.kafka.model_copy(update={"sasl_password": KAFKA_PARAM_PASSWORD})}
    )
    state2, _ = run_visit(survey_root, V0, leaked_param)

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
    assert any(f"visit-{V0}" in t or f"Visit {V0}" in t for t in api_texts), "artifacts were read"
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


def _everything_prefect_stored() -> dict[str, list[str]]:
    """Every flow run, task run, log and artifact on the Prefect server, as JSON text."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        out: dict[str, list[str]] = {}
        async with get_client() as client:
            for name, call in (
                ("flow runs", client.read_flow_runs),
                ("task runs", client.read_task_runs),
                ("logs", client.read_logs),
                ("artifacts", client.read_artifacts),
            ):
                texts, offset = [], 0
                while True:
                    page = await call(limit=200, offset=offset)
                    if not page:
                        break
                    texts += [x.model_dump_json() for x in page]
                    offset += len(page)
                out[name] = texts
        return out

    return asyncio.run(read())


#: (name, URL with the secret, the secret) — every shape a password takes in an APDB URL.
def _url_shapes(port: int) -> list[tuple[str, str, str]]:
    return [
        ("user:password@", f"postgresql://postgres:Pw-plain-1a@127.0.0.1:{port}/x", "Pw-plain-1a"),
        (
            "?password=",
            f"postgresql://postgres@127.0.0.1:{port}/x?password=Pw-query-2b",
            "Pw-query-2b",
        ),
        ("unencoded @", f"postgresql://postgres:p@Pw-at-3c@127.0.0.1:{port}/x", "Pw-at-3c"),
        ("port typo", "postgresql://postgres:Pw-port-4d@127.0.0.1:x/x", "Pw-port-4d"),
        ("broken scheme", "postgresql:/postgres:Pw-scheme-5e@127.0.0.1/x", "Pw-scheme-5e"),
        ("percent-encoded", f"postgresql://postgres:Pw%40enc-6f@127.0.0.1:{port}/x", "Pw@enc-6f"),
    ]


def test_no_url_shape_shows_the_password_anywhere(survey_root, tmp_path, caplog, capfd):
    """The command line run with each URL shape: nothing stored by Prefect shows the password."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from flows.visit import main

    shapes = _url_shapes(free_port())  # nothing listens: the run fails at its first APDB call
    caplog.set_level(logging.DEBUG)
    codes = {}
    with temporary_settings({PREFECT_LOGGING_TO_API_ENABLED: True}):
        for name, url, _ in shapes:
            argv = ["--root", survey_root, "--visit", str(V0), "--apdb", url]
            codes[name] = main([*argv, "--workdir", str(tmp_path / name.replace(" ", "_"))])
        APILogHandler().flush()
    out, err = capfd.readouterr()
    assert codes == {
        "user:password@": 1,
        "?password=": 1,
        "unencoded @": 1,
        "port typo": 2,
        "broken scheme": 2,
        "percent-encoded": 1,
    }, out[-2000:] + err[-2000:]
    assert "not a valid database URL" in err and "cannot be parsed" in err
    stored = _everything_prefect_stored()
    assert stored["flow runs"] and stored["task runs"] is not None
    assert any("127.0.0.1" in t for t in stored["logs"]), "the runs' logs reached the server"
    haystacks = {
        "log records": "\n".join(r.getMessage() + repr(r.args) for r in caplog.records),
        "stdout/stderr": out + err,
        **{f"Prefect {k}": "\n".join(v) for k, v in stored.items()},
    }
    for name, _, secret in shapes:
        for where, text in haystacks.items():
            assert secret not in text, f"{name}: the password is in the {where}"
            assert secret.replace("@", "%40") not in text, f"{name}: the password is in the {where}"


@pytest.mark.parametrize(
    ("section", "options", "secret"),
    [
        ("kafka", {"extra": {"sasl.password": "Kx-extra-7a"}}, "Kx-extra-7a"),
        ("kafka", {"extra": {"ssl.key.password": "Kx-key-8b"}}, "Kx-key-8b"),
        ("output", {"store": {"storage_options": {"secret": "S3x-9c"}}}, "S3x-9c"),
        (
            "output",
            {"store": {"storage_options": {"client_kwargs": {"aws_secret_access_key": "S3x-0d"}}}},
            "S3x-0d",
        ),
        ("output", {"store": {"storage_options": {"key": "AKIAx-1e"}}}, "AKIAx-1e"),
        ("output", {"store": {"storage_options": {"token": "Tok-2f"}}}, "Tok-2f"),
    ],
    ids=["sasl.password", "ssl.key.password", "s3 secret", "nested aws secret", "s3 key", "token"],
)
def test_credentials_in_pass_through_options_are_refused_unseen(section, options, secret):
    """Options stored in clear as flow parameters refuse credentials, without showing them."""
    from pydantic import ValidationError

    from flows.config import PipelineConfig

    with pytest.raises(ValidationError, match="would be stored in clear") as info:
        PipelineConfig.model_validate({section: options})
    assert secret not in str(info.value)
    assert secret not in repr(info.value.errors())
