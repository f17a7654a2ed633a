"""Shared test settings: no network, no analytics, one Prefect harness per session."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")

# Imported here, before any test can gc.freeze() the heap (flows.stages does): importing
# hypothesis runs trio's entry point, whose register_random warns when trio's PRNG is in
# the frozen generation, and filterwarnings=error would turn that into a crash at the
# terminal summary of a run that had not imported hypothesis yet (tests/test_selection.py).
import hypothesis  # noqa: F401
import pytest

from flows.config import PipelineConfig

N_DETECTORS = 4
#: The LSSTCam visit numbers (day_obs·10⁵ + seq_num) of a default-cadence simulated survey's
#: first three visits (MJD 61000.0 + 3 k): the visit directories of :func:`survey_root`.
V0, V1, V2 = 2025112000001, 2025112300001, 2025112600001


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for every flow test of the session.

    It takes 12-17 s to start here, so tests share it.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _no_lingering_kafka_producer():
    """A test's cached Kafka producers end with it (its broker is gone; they would reconnect)."""
    yield
    kafka = sys.modules.get("alerts.kafka")
    if kafka is not None:
        kafka.close_producers()


@pytest.fixture(scope="session")
def survey_root(tmp_path_factory) -> str:
    """Three simulated visits (V0, V1, V2) of 4 small detectors (256 px), written once."""
    from sim.config import SurveyConfig
    from sim.survey import Survey

    root = tmp_path_factory.mktemp("bundles")
    survey = Survey(
        SurveyConfig(
            seed=7,
            n_detectors=N_DETECTORS,
            n_visits=3,
            detector_size=(256, 256),
            sources_per_detector=25,
        )
    )
    for visit in range(3):
        survey.write_visit(str(root), visit)
    assert [survey.config.visit_number(k) for k in range(3)] == [V0, V1, V2]
    return str(root)


def make_config(tmp_path, **orchestration) -> PipelineConfig:
    """Everything under ``tmp_path``: SQLite APDB, alert files, results cache."""
    return PipelineConfig.model_validate(
        {
            "apdb": {"url": str(tmp_path / "apdb.sqlite3")},
            "output": {
                "store": {"location": str(tmp_path / "alerts")},
                "dead_letter_location": str(tmp_path / "dead"),
            },
            "orchestration": {
                "result_storage": str(tmp_path / "results"),
                "detectors_per_task": 2,
                **orchestration,
            },
        }
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_s3_port():
    """One local S3 server (moto) on 127.0.0.1 for the session; yields its port.

    moto keeps one in-memory S3 per process, so tests use their own bucket names.
    Test credentials are put in the environment for the session.
    """
    from moto.server import ThreadedMotoServer

    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield port
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
