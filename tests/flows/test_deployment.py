"""A deployment served in a subprocess and triggered through the Prefect API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import V0, make_config

pytestmark = pytest.mark.usefixtures("prefect_harness")

SERVE = textwrap.dedent(
    """
    from flows.visit import process_visit
    process_visit.serve(name="test-visit", limit=1)
    """
)


def test_served_deployment_runs_through_the_api(survey_root, tmp_path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", SERVE], env=env, stdout=log, stderr=log)
    try:
        config = make_config(tmp_path, cache=False)
        flow_run = None
        deadline = time.monotonic() + 90
        while flow_run is None:
            try:
                flow_run = run_deployment(
                    "process-visit/test-visit",
                    parameters={
                        "bundle_root": survey_root,
                        "visit": V0,
                        "detectors": None,
                        "config": config.model_dump(mode="json"),
                    },
                    timeout=180,
                )
            except Exception:  # the deployment is not registered yet
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1)
        assert flow_run.state.is_completed(), flow_run.state
        assert flow_run.state.name == "Completed"
        assert list((tmp_path / "alerts").glob(f"{V0}_*.avro")), "the served run wrote alerts"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("path", ["prefect.yaml", "deployments/production.yaml"])
def test_deployment_files_name_real_flows_and_valid_configs(path):
    """Every deployment's entrypoint exists and its config parameters validate."""
    import importlib
    from pathlib import Path

    import yaml

    from flows.config import PipelineConfig

    root = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / path).read_text())
    assert doc["deployments"], path
    for dep in doc["deployments"]:
        file, func = dep["entrypoint"].split(":")
        module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert hasattr(flow, "serve"), f"{dep['name']}: {func} is not a Prefect flow"
        params = dep.get("parameters", {})
        unknown = set(params) - set(flow.parameters.properties)
        assert not unknown, f"{dep['name']}: unknown parameters {unknown}"
        if "config" in params:
            PipelineConfig.model_validate(params["config"])
