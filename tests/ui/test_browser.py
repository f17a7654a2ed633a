"""Browser check: the Prefect UI runs a served diapipe deployment from its run form.

The test starts a real Prefect server (fresh ``PREFECT_HOME``, SQLite) and
serves the ``process-visit`` deployment in a subprocess whose default
``bundle_root`` points nowhere. Headless Chromium (Debian ``chromium`` +
``chromium-driver``, driven by selenium) opens the deployment page, clicks
"Run" → "Custom run", types the simulated visit's bundle root and a run name
into the form and submits it. The test then polls the API until the flow run
is final, checks that the run got exactly what was typed and wrote alerts,
opens the flow run page and saves a screenshot under ``tests/ui/artifacts/``
(path printed; CI keeps it as an artifact of the test run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import V0, make_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).parent / "artifacts"
REPO = Path(__file__).resolve().parents[2]
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
]
DEPLOYMENT = "browser-check"
RUN_NAME = "browser-check-visit-0"

SERVE = textwrap.dedent(
    """
    import json, sys
    from flows.visit import process_visit
    process_visit.serve(name=sys.argv[1], parameters=json.loads(sys.argv[2]))
    """
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver); .ci/run installs them",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def _wait(what: str, check, timeout: float, procs=()):
    deadline = time.monotonic() + timeout
    while True:
        for p, log in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: process exited ({p.returncode}); see {log}")
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _simulate(root: Path) -> None:
    from sim.config import SurveyConfig
    from sim.survey import Survey

    survey = Survey(
        SurveyConfig(
            seed=11, n_detectors=2, n_visits=1, detector_size=(256, 256), sources_per_detector=25
        )
    )
    survey.write_visit(str(root), 0)


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_run_form_submits_a_visit_that_completes(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.monotonic()
    marks = {}
    bundles = tmp_path / "bundles"
    (tmp_path / "work").mkdir()
    port = _free_port()
    ui = f"http://127.0.0.1:{port}"
    api = f"{ui}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_LOGGING_TO_API_ENABLED": "true",
        "SE_OFFLINE": "true",  # selenium: never try to download a driver
    }
    server_log = tmp_path / "server.log"
    serve_log = tmp_path / "serve.log"
    prefect = str(Path(sys.executable).parent / "prefect")
    procs = []
    driver = None
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "prefect-ui-flow-run.png"
    try:
        with open(server_log, "wb") as log:
            server = subprocess.Popen(
                [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
                + ["--no-scheduler", "--no-late-runs"],  # nothing here is scheduled
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        procs.append((server, server_log))
        _simulate(bundles)  # while the server starts
        driver = _browser(tmp_path / "chromium-profile")
        _wait("server health", lambda: _api(api, "/health"), 240, procs)
        marks["server up"] = time.monotonic() - t0

        # the deployment's default bundle_root points nowhere: only the form can make it work
        defaults = {
            "bundle_root": str(tmp_path / "not-here"),
            "visit": V0,
            "config": make_config(tmp_path / "work", cache=False).model_dump(mode="json"),
        }
        with open(serve_log, "wb") as log:
            serve = subprocess.Popen(
                [sys.executable, "-c", SERVE, DEPLOYMENT, json.dumps(defaults)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        procs.append((serve, serve_log))
        deployment = _wait(
            "deployment registered",
            lambda: _api(
                api, "/deployments/filter", {"deployments": {"name": {"any_": [DEPLOYMENT]}}}
            ),
            120,
            procs,
        )[0]

        marks["deployment served"] = time.monotonic() - t0
        wait = WebDriverWait(driver, 60)
        driver.get(f"{ui}/deployments/deployment/{deployment['id']}")
        wait.until(
            ec.element_to_be_clickable((By.XPATH, "//button[normalize-space(.)='Run']"))
        ).click()
        wait.until(
            ec.element_to_be_clickable((By.XPATH, "//button[normalize-space(.)='Custom run']"))
        ).click()

        # the run form: run name, then bundle_root (a textarea pre-filled with the default)
        placeholder = defaults["bundle_root"]
        root_box = wait.until(
            lambda d: next(
                (
                    t
                    for t in d.find_elements(By.TAG_NAME, "textarea")
                    if t.get_attribute("value") == placeholder
                ),
                False,
            )
        )
        name_box = driver.find_element(By.XPATH, "//input[@type='text']")
        for box, text in ((name_box, RUN_NAME), (root_box, str(bundles))):
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(text)
        assert root_box.get_attribute("value") == str(bundles)
        submit = driver.find_element(By.XPATH, "//button[normalize-space(.)='Submit']")
        driver.execute_script("arguments[0].scrollIntoView();", submit)
        submit.click()

        def runs_of_deployment():
            return _api(
                api,
                "/flow_runs/filter",
                {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}},
            )

        # On a loaded machine the form's script may not take the first click: the UI then
        # stays on the form and no flow run exists. Click again only in that case.
        def wait_for_a_run(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while not runs_of_deployment() and time.monotonic() < deadline:
                time.sleep(1.0)

        wait_for_a_run(30)
        buttons = driver.find_elements(By.XPATH, "//button[normalize-space(.)='Submit']")
        if buttons and not runs_of_deployment():
            driver.execute_script("arguments[0].click();", buttons[0])
        marks["run submitted"] = time.monotonic() - t0

        def final_run():
            runs = runs_of_deployment()
            return runs[0] if runs and runs[0]["state"]["type"] in _FINAL else None

        run = _wait("flow run final", final_run, 180, procs)
        marks["run final"] = time.monotonic() - t0
        assert run["name"] == RUN_NAME
        assert run["parameters"]["bundle_root"] == str(bundles)
        assert run["state"]["type"] == "COMPLETED", (run["state"], serve_log.read_text()[-3000:])
        assert run["state"]["name"] == "Completed"  # not "Partial": both detectors succeeded
        alerts = sorted(p.name for p in (tmp_path / "work" / "alerts").glob("*.avro"))
        assert len(alerts) == 2 and all(a.startswith(f"{V0}_") for a in alerts), alerts

        driver.get(f"{ui}/runs/flow-run/{run['id']}")
        wait.until(ec.presence_of_element_located((By.XPATH, f"//*[contains(., '{RUN_NAME}')]")))
        wait.until(
            ec.presence_of_element_located(
                (By.XPATH, "//*[not(*) and normalize-space(.)='Completed']")
            )
        )
        time.sleep(1)  # let the run graph finish drawing
        driver.save_screenshot(str(shot))
        marks["screenshot"] = time.monotonic() - t0
        print(f"\nscreenshot of the completed flow run: {shot}")
        print("elapsed (s): " + ", ".join(f"{k} {v:.1f}" for k, v in marks.items()))
        assert shot.stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        for proc, _ in reversed(procs):
            _stop(proc)


_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
