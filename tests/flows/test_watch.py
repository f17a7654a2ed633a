"""The watcher against the session's real Prefect server: events sent, once, and what they trigger."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from core.completion import COMPLETE_FILE, mark_complete
from core.nextvisit import NEXT_VISIT_FILE, parse_next_visit
from flows.watch import NEXT_EVENT, READY_EVENT, Watcher, main
from tests.conftest import V0, V1, V2, make_config

pytestmark = pytest.mark.usefixtures("prefect_harness")

REPO = Path(__file__).resolve().parents[2]


def _events(root: str, name: str, want: int, wait_s: float = 30.0) -> list:
    """The server's events ``name`` about bundles under ``root`` (once ``want`` are stored).

    The server stores events in batches a few seconds after they arrive, so this
    asks again until ``want`` are there or ``wait_s`` has passed, then waits a
    little more for any extra (a duplicate must show up to be caught).
    """
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.schemas.events import ResourceSpecification

    flt = EventFilter(
        event=EventNameFilter(name=[name]),
        resource=EventResourceFilter(labels=ResourceSpecification({"diapipe.bundle-root": root})),
    )
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            found = client.read_events(filter=flt, limit=50).events
            if len(found) >= want or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if want:
            time.sleep(3.0)
            found = client.read_events(filter=flt, limit=50).events
    return found


def _copy_visit(survey_root: str, root: Path, visit: int, files=None) -> Path:
    """Visit ``visit`` of the session survey under ``root``: all files, or those ``files`` says."""
    src = Path(survey_root) / str(visit)
    dst = root / str(visit)
    for p in sorted(q for q in src.rglob("*") if q.is_file()):
        rel = p.relative_to(src)
        if files is None or files(str(rel)):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst / rel)
    return dst


def _announce(survey_root: str, root: Path, visit: int, **kw) -> dict:
    from sim.config import SurveyConfig
    from sim.nextvisit import next_visit_message, write_next_visit
    from sim.survey import Survey

    survey = Survey(
        SurveyConfig(
            seed=7, n_detectors=4, n_visits=3, detector_size=(256, 256), sources_per_detector=25
        )
    )
    message = next_visit_message(survey, survey.config.visit_index(visit), **kw)
    write_next_visit(str(root), message)
    return message.to_json_dict()


def test_half_written_bundle_is_not_ready_then_reported_once(survey_root, tmp_path):
    root = tmp_path / "bundles"
    # the complete source, with its marker, to copy from in pieces
    full = tmp_path / "full"
    _copy_visit(survey_root, full, V1)
    mark_complete(str(full), V1)
    sizes = json.loads((full / str(V1) / COMPLETE_FILE).read_text())["files"]
    # marker first, then everything but the last detector's template, which is half there
    held = sorted(k for k in sizes if k.endswith("template.fits"))[-1]
    _copy_visit(str(full), root, V1, files=lambda rel: rel != held)
    data = (full / str(V1) / held).read_bytes()
    (root / str(V1) / held).write_bytes(data[: len(data) // 2])

    watcher = Watcher(str(root))
    assert watcher.poll() == [], "half a file: not ready"
    assert _events(watcher.root, READY_EVENT, want=0, wait_s=0) == []

    (root / str(V1) / held).write_bytes(data)
    sent = watcher.poll()
    assert [(e.event, e.visit) for e in sent] == [(READY_EVENT, V1)]
    assert watcher.poll() == [], "reported once"
    events = _events(watcher.root, READY_EVENT, want=1)
    assert len(events) == 1
    ev = events[0]
    assert ev.resource.id == f"diapipe.visit.{V1}"
    assert ev.payload["bundle_root"] == str(root) and ev.payload["visit"] == V1


def test_next_visit_file_gives_one_event_and_a_restart_sends_nothing_again(survey_root, tmp_path):
    root = tmp_path / "bundles"
    message = _announce(survey_root, root, V2)
    state = tmp_path / "watch-state.json"
    assert main([str(root), "--once", "--state", str(state)]) == 0
    assert main([str(root), "--once", "--state", str(state)]) == 0, "a restart with the state"
    events = _events(str(root), NEXT_EVENT, want=1)
    assert len(events) == 1
    assert events[0].resource.id == f"diapipe.visit.{V2}"
    assert events[0].payload == message
    assert parse_next_visit(events[0].payload).detector_corners, "the footprint travels along"

    # a new prediction for the same visit is a new message
    os.utime(root / str(V2) / NEXT_VISIT_FILE, (2_000_000_000, 2_000_000_000))
    _announce(survey_root, root, V2, pointing_error_arcsec=5.0)
    sent = Watcher(str(root), state).poll()
    assert [e.event for e in sent] == [NEXT_EVENT]
    assert len(_events(str(root), NEXT_EVENT, want=2)) == 2


def test_invalid_next_visit_file_is_not_sent(tmp_path, caplog):
    root = tmp_path / "bundles"
    (root / "3").mkdir(parents=True)
    (root / "3" / NEXT_VISIT_FILE).write_text(json.dumps({"visit": 3, "band": "q"}))
    watcher = Watcher(str(root))
    assert watcher.poll() == [] and watcher.poll() == []
    warned = [r for r in caplog.records if "missing field(s)" in r.getMessage()]
    assert len(warned) == 1, "logged once, not at every poll"


@pytest.mark.s3
def test_watcher_command_on_s3(survey_root, tmp_path, moto_s3_port):
    import s3fs
    from prefect.settings import PREFECT_API_URL

    endpoint = f"http://127.0.0.1:{moto_s3_port}"
    bucket = f"bundles-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir(bucket)
    local = tmp_path / "local"
    _copy_visit(survey_root, local, V1)
    _announce(survey_root, local, V1)
    mark_complete(str(local), V1)
    for p in sorted(q for q in (local / str(V1)).rglob("*") if q.is_file()):
        fs.put_file(str(p), f"{bucket}/night/{p.relative_to(local)}")
    root = f"s3://{bucket}/night"
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    cmd = [sys.executable, "-m", "flows.watch", root, "--once"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(_events(root, NEXT_EVENT, want=1)) == 1
    ready = _events(root, READY_EVENT, want=1)
    assert len(ready) == 1 and ready[0].payload["bundle_root"] == root


SERVE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import yaml
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.visit import process_visit

    root, config = sys.argv[1], json.loads(sys.argv[2])
    doc = yaml.safe_load((Path(sys.argv[3]) / "prefect.yaml").read_text())
    dep = next(d for d in doc["deployments"] if d["name"] == "visit-on-ready")
    (trigger,) = dep["triggers"]
    # the session's server sees other tests' events too: only this test's bundle root
    trigger["match"] = {**trigger["match"], "diapipe.bundle-root": root}
    process_visit.serve(
        name="on-ready-test",
        triggers=[DeploymentEventTrigger(**trigger)],
        parameters={"config": config},
        limit=1,
    )
    """
)


def _wait_for_trigger(client, name: str, wait_s: float = 120.0):
    """The served deployment, once its automation exists."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            dep = client.read_deployment_by_name(name)
            names = {a.name for a in client.read_automations()}
            if f"{dep.name}__automation_1" in names:
                time.sleep(2.0)  # the server's trigger service picks up new automations
                return dep
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"deployment {name} or its trigger never appeared")
        time.sleep(1.0)


@pytest.mark.slow
def test_ready_event_runs_the_visit_through_the_prefect_yaml_trigger(survey_root, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL

    root = tmp_path / "bundles"
    config = make_config(tmp_path, cache=False)
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    log = open(tmp_path / "serve.log", "wb")
    args = [str(root), json.dumps(config.model_dump(mode="json")), str(REPO)]
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, *args], env=env, stdout=log, stderr=log, cwd=REPO
    )
    try:
        with get_client(sync_client=True) as client:
            dep = _wait_for_trigger(client, "process-visit/on-ready-test")
            _copy_visit(survey_root, root, V0)
            mark_complete(str(root), V0)
            assert [e.event for e in Watcher(str(root)).poll()] == [READY_EVENT]
            flt = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
            deadline = time.monotonic() + 240
            while True:
                runs = client.read_flow_runs(deployment_filter=flt)
                if runs and runs[0].state is not None and runs[0].state.is_final():
                    break
                assert time.monotonic() < deadline, "the triggered run never finished"
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1.0)
        assert len(runs) == 1
        run = runs[0]
        assert run.state.is_completed(), run.state
        assert run.parameters["visit"] == V0 and type(run.parameters["visit"]) is int
        assert run.parameters["bundle_root"] == str(root)
        assert sorted(p.name for p in (tmp_path / "alerts").glob(f"{V0}_*.avro")), "alerts out"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("path", ["prefect.yaml", "deployments/production.yaml"])
def test_deployment_triggers_parse_and_fill_real_parameters(path):
    """Every trigger is a valid Prefect deployment trigger on an event the watcher sends."""
    import importlib

    import yaml
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    doc = yaml.safe_load((REPO / path).read_text())
    triggered = [d for d in doc["deployments"] if d.get("triggers")]
    assert triggered, f"{path}: no event-driven deployment"
    for dep in triggered:
        file, func = dep["entrypoint"].split(":")
        flow = getattr(importlib.import_module(file.removesuffix(".py").replace("/", ".")), func)
        for raw in dep["triggers"]:
            trigger = DeploymentEventTrigger(**raw)
            assert trigger.expect in ({READY_EVENT}, {NEXT_EVENT})
            assert set(trigger.parameters) <= set(flow.parameters.properties)
            if trigger.expect == {READY_EVENT}:
                assert trigger.parameters["visit"] == "{{ event.payload.visit }}"
                assert trigger.parameters["bundle_root"] == "{{ event.payload.bundle_root }}"
            else:  # the next-visit payload is the whole message (flows/preload.py)
                assert trigger.parameters == {"message": "{{ event.payload }}"}


def test_watcher_command_needs_a_server_address(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile that sets it
    cmd = [sys.executable, "-m", "flows.watch", str(tmp_path), "--once"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 2
    assert "error: PREFECT_API_URL is not set" in run.stderr
