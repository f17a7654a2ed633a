"""``python -m bench visit``: one full LSST visit — ~10,000 alerts — end to end, timed.

The case (built once and cached under ``.bench-cache/``, see
:mod:`bench.history`): a field covered by 189 detectors (512×512 px), 120
prior visits (12 months at a 3-day cadence) stored in the APDB, and the
rendered bundle of the next visit, ~53 DiaSources per detector.

Timed, from the bundle on disk to the alerts on disk and the APDB committed:

1. the Prefect flow (:func:`flows.visit.run_visit`, task runner from
   ``--runner``), after a warm-up flow so that the ephemeral API server's
   start-up is not counted;
2. the same stages without Prefect (:func:`flows.visit.run_visit_plain`);
3. with ``--dask-plain`` (and ``--runner dask``), the plain runner's groups on a
   standing Dask cluster: Dask without Prefect, to tell the two apart.

Each run starts from its own copy of the built APDB (SQLite file copy,
PostgreSQL ``CREATE DATABASE ... TEMPLATE``), so both see the same state.
An untimed plain run comes first; then ``--rounds`` rounds of both modes,
in alternating order, and each mode's figures are those of its median run:
``overhead_fraction = (prefect − plain) / prefect`` of the two medians. Peak
memory is the largest sum over this process and its children, sampled every
0.25 s: of resident set sizes, of proportional set sizes (every 2 s) and of
resident sets without file-backed pages.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from pathlib import Path

# Before anything imports Prefect: no analytics (no internet here), no log shipping
# to the API (it competes with the task runs for the server), a generous server
# start-up timeout on a busy machine, and a Prefect home of its own (made by
# :func:`run_case`: Prefect creates only its last level, and its ephemeral server cannot
# start without its database's folder, whatever --cache-root says).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_HOME", str(Path(".bench-cache/prefect-home").resolve()))

import numpy as np

from bench.history import (
    HistorySpec,
    Prepared,
    adopt,
    alert_depths,
    drop_copy,
    fresh_apdb,
    prepare,
)

__all__ = ["main", "parser", "run_case", "timed_run"]

STAGE_ORDER = (
    "load",
    "calibrate",
    "ssoassociate",
    "associate",
    "forced",
    "store",
    "cutout",
    "package",
    "produce",
)


def _proc_kib(pid: int, name: str, field: str) -> int:
    """Bytes of the ``field:`` line (in kB) of ``/proc/<pid>/<name>``; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _file_backed_rss(proc) -> int:
    """Bytes of ``proc``'s RSS that map files (``RssFile``: code, memory-mapped databases)."""
    return _proc_kib(proc.pid, "status", "RssFile")


def _pss(proc) -> int:
    """``proc``'s proportional set size (bytes): each shared page divided among its sharers."""
    return _proc_kib(proc.pid, "smaps_rollup", "Pss")


class PeakRss:
    """Largest memory of this process plus its children while active.

    ``peak`` sums every process's RSS, so a page mapped by several processes
    (shared libraries: ~0.1 GiB per Python process here; a memory-mapped file)
    counts once per process; ``peak_pss`` sums proportional set sizes, which
    count such a page once in all (the memory the processes hold together);
    ``peak_anon`` leaves file-backed pages out. PSS is read every
    ``pss_every``-th sample only: the kernel walks a process's page tables for
    it (~2 ms per GiB).
    """

    def __init__(self, interval: float = 0.25, pss_every: int = 8):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.pss_every = pss_every
        self.peak = 0
        self.peak_anon = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._children: list = []
        self._n = 0

    def _sample(self) -> int:
        total = files = pss = 0
        with_pss = self._n % self.pss_every == 0
        with contextlib.suppress(Exception):
            # listing children scans /proc: refresh the list every 8 samples only
            if self._n % 8 == 0:
                self._children = self._proc.children(recursive=True)
            self._n += 1
            for p in [self._proc, *self._children]:
                with contextlib.suppress(Exception):
                    total += p.memory_info().rss
                    files += _file_backed_rss(p)
                    if with_pss:
                        pss += _pss(p)
        self.peak_anon = max(self.peak_anon, total - files)
        self.peak_pss = max(self.peak_pss, pss)
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of this process and its (live and reaped) children."""
        total = 0.0
        with contextlib.suppress(Exception):
            t = self._proc.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in self._proc.children(recursive=True):
                with contextlib.suppress(Exception):
                    c = child.cpu_times()
                    # with what it reaped: a serve process's finished flow-run subprocesses
                    total += c.user + c.system + c.children_user + c.children_system
        return total

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds by kind of process: this one, the Prefect API server, workers, ...

        A process's reaped children count with it (a ``serve`` process's finished
        flow-run subprocesses), so the kinds add up to :meth:`cpu_seconds`.
        """
        out: dict[str, float] = {}
        procs = [self._proc]
        with contextlib.suppress(Exception):
            procs += self._proc.children(recursive=True)
        for p in procs:
            with contextlib.suppress(Exception):
                cmd = " ".join(p.cmdline())
                t = p.cpu_times()
                kind = (
                    "this process (flow, Dask scheduler)"
                    if p.pid == self._proc.pid
                    else "Prefect API server"
                    if "uvicorn" in cmd or "prefect.server" in cmd
                    else "workers"
                    if "spawn_main" in cmd or "multiprocessing" in cmd
                    else "serve and its flow-run subprocesses"
                    if "serve(" in cmd
                    else "other"
                )
                own = t.user + t.system + t.children_user + t.children_system
                out[kind] = out.get(kind, 0.0) + own
        return out

    def __enter__(self):
        self.cpu0 = self.cpu_seconds()
        self.by0 = self.cpu_by_process()
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())
        self.cpu = self.cpu_seconds() - self.cpu0
        by1 = self.cpu_by_process()
        self.cpu_by = {k: v - self.by0.get(k, 0.0) for k, v in by1.items()}


def parser(prog: str = "python -m bench visit") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--apdb", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--runner", default="thread", help="thread | dask | dask=tcp://host:port")
    p.add_argument(
        "--cold-cluster",
        action="store_true",
        help="with --runner dask: let the flow start its local cluster inside the timed run "
        "(default: a standing cluster, started and warmed before timing)",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached case")
    p.add_argument(
        "--prior-visits", type=int, default=120, help="visits of history (3-day cadence)"
    )
    p.add_argument("--detectors", type=int, default=189, help="detectors per visit")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--detectors-per-task", type=int, default=None)
    p.add_argument("--max-workers", type=int, default=None)
    p.add_argument(
        "--sqlite-mmap-mb",
        type=int,
        default=None,
        help="apdb.sqlite_mmap_mb (default: the config's)",
    )
    p.add_argument("--cache", action="store_true", help="Prefect result caching on (default off)")
    p.add_argument("--no-plain", action="store_true", help="skip the run without Prefect")
    p.add_argument("--no-prefect", action="store_true", help="skip the Prefect run")
    p.add_argument(
        "--dask-plain",
        action="store_true",
        help="with --runner dask: also time the plain runner's groups on a standing Dask "
        "cluster (mode 'dask-plain': Dask without Prefect)",
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="timed runs of each mode, orders alternating"
    )
    p.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="skip the untimed first run"
    )
    p.add_argument("--cache-root", type=Path, default=Path(".bench-cache"))
    p.add_argument(
        "--case-dir",
        type=Path,
        help="time the case built in this directory as it is (bench.history.adopt; SQLite)",
    )
    p.add_argument("--profile", type=Path, help="write a pyinstrument HTML profile of plain run")
    return p


def default_group_size() -> int:
    """The configured default of ``orchestration.detectors_per_task``."""
    from flows.config import OrchestrationConfig

    return OrchestrationConfig().detectors_per_task


def make_config(prepared: Prepared, url: str, run: str, args):
    from flows.config import PipelineConfig

    orch = {"task_runner": args.runner, "cache": bool(args.cache)}
    if args.detectors_per_task:
        orch["detectors_per_task"] = args.detectors_per_task
    if args.max_workers:
        orch["max_workers"] = args.max_workers
    if args.cache:
        orch["result_storage"] = str(prepared.directory / f"results-{run}")
    apdb = {"url": url, "auto_create": False}
    if args.sqlite_mmap_mb is not None:
        apdb["sqlite_mmap_mb"] = args.sqlite_mmap_mb
    return PipelineConfig.model_validate(
        {
            "apdb": apdb,
            "output": {
                "store": {"location": str(prepared.directory / f"alerts-{run}")},
                "dead_letter_location": str(prepared.directory / f"dead-{run}"),
            },
            "orchestration": orch,
        }
    )


def warm_prefect() -> float:
    """Start Prefect's ephemeral API server with a trivial flow; return its seconds."""
    from prefect import flow, task

    @task
    def _one() -> int:
        return 1

    @flow(name="bench-warmup")
    def _warm() -> int:
        return _one.submit().result()

    t0 = time.perf_counter()
    _warm()
    return time.perf_counter() - t0


def _import_pipeline() -> None:
    import flows.visit  # noqa: F401 - imports every stage module (numpy, pandas, astropy, ...)


def start_cluster():
    """A standing local Dask cluster as the flow would start it, warmed.

    Production runs visit after visit on workers that are already up; starting
    the cluster and importing the pipeline in its workers is therefore done here,
    outside the timed run (``--cold-cluster`` times a cluster started by the flow).
    The workers use this process's Prefect API server.
    """
    from distributed import Client, LocalCluster

    from flows.visit import local_cluster_kwargs

    t0 = time.perf_counter()
    cluster = LocalCluster(**local_cluster_kwargs())
    with Client(cluster) as client:
        client.run(_import_pipeline)
        n_workers = len(client.scheduler_info()["workers"])
    warm_cluster_task_runs(cluster.scheduler_address, n_workers)
    return cluster, time.perf_counter() - t0


def warm_cluster_task_runs(address: str, n_workers: int) -> None:
    """A Prefect flow on the cluster whose task runs (each with a nested one) reach every worker.

    A worker's first Prefect task run imports the task engine's modules, makes its
    API client and starts its event and log threads; a cluster that has served
    one visit has done all that, so the timed visit should not pay it.
    """
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    @task
    def _inner() -> int:
        return os.getpid()

    @task
    def _outer(seconds: float) -> int:
        time.sleep(seconds)  # long enough that the scheduler hands the next one elsewhere
        return _inner()

    @flow(name="bench-warm-cluster", task_runner=DaskTaskRunner(address=address))
    def _warm() -> set[int]:
        return {f.result() for f in [_outer.submit(0.5) for _ in range(2 * n_workers)]}

    pids = _warm()
    if len(pids) < n_workers:
        print(f"warning: the warm-up reached {len(pids)} of {n_workers} Dask workers")


def start_process_pool():
    """One process per core, the pipeline imported in each (outside the timed run)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    n = max(1, os.cpu_count() or 1)
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
    for f in [pool.submit(_import_pipeline) for _ in range(n)]:
        f.result()
    return pool, time.perf_counter() - t0


def warm_files(root: str) -> float:
    """Read every bundle file once (the page cache then holds them, as after upstream wrote them)."""
    t0 = time.perf_counter()
    for path in Path(root).rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                while fh.read(1 << 22):
                    pass
    return time.perf_counter() - t0


def timed_run(prepared: Prepared, backend: str, args, mode: str, executor=None) -> dict:
    """One timed run (``mode`` 'prefect' or 'plain') on a fresh APDB copy.

    ``executor``: where the plain run's groups go (default: threads).
    """
    import shutil

    from apdb import make_apdb
    from apdb.config import ApdbConfig
    from flows.detector import close_apdbs
    from flows.visit import run_visit, run_visit_plain

    close_apdbs()  # this process's client of the previous run's copy, now replaced
    url = fresh_apdb(prepared, backend, mode)
    config = make_config(prepared, url, mode, args)
    out_dir = Path(config.output.store.location)
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        with PeakRss() as mem:
            t0 = time.perf_counter()
            if mode == "prefect":
                state, result = run_visit(prepared.bundle_root, prepared.visit, config)
                state_name = state.name
            else:
                result = run_visit_plain(
                    prepared.bundle_root, prepared.visit, config, executor=executor
                )
                state_name = "plain"
            wall = time.perf_counter() - t0
            load = os.getloadavg()[0]
        if isinstance(result, BaseException):
            raise result
        apdb = make_apdb(ApdbConfig(url=url, auto_create=False))
        try:
            summary = apdb.visit_summary(prepared.visit)
            new_ids = _alerting_objects(apdb, prepared.visit)
        finally:
            apdb.close()
        files = sorted(out_dir.glob("*.avro"))
        row = {
            "mode": mode,
            "state": state_name,
            "wall_s": wall,
            "flow_wall_s": float(result["wall_s"]),
            "alerts": int(result["alerts"]),
            "alert_files": len(files),
            "alert_bytes": int(sum(f.stat().st_size for f in files)),
            "detectors_ok": len(result["succeeded"]),
            "detectors_failed": len(result["failed"]),
            "failures": dict(list(result["failed"].items())[:5]),
            "apdb_detectors_committed": len(summary),
            "apdb_sources_committed": int(summary["nDiaSources"].sum()) if len(summary) else 0,
            "apdb_forced_committed": int(summary["nDiaForcedSources"].sum()) if len(summary) else 0,
            "stage_seconds": dict(result["stage_seconds"]),
            "peak_rss_gib": mem.peak / 2**30,
            "peak_rss_anon_gib": mem.peak_anon / 2**30,
            "peak_pss_gib": mem.peak_pss / 2**30,
            "cpu_s": mem.cpu,
            "cpu_s_by_process": {k: round(v, 2) for k, v in mem.cpu_by.items()},
            "load_avg_1min": load,
            "alerts_per_s": int(result["alerts"]) / wall if wall > 0 else float("nan"),
            "_alerting_objects": new_ids,
            "_table": result["table"],
        }
        return row
    finally:
        drop_copy(prepared, backend, mode)


def _alerting_objects(apdb, visit: int) -> np.ndarray:
    """DiaObject IDs of the DiaSources stored for ``visit`` (one alert each)."""
    with apdb._connection("alerting objects") as conn:
        cur = conn.cursor()
        cur.execute(f'SELECT "diaObjectId" FROM "DiaSource" WHERE "visit" = {apdb._ph}', [visit])
        return np.array([r[0] for r in cur.fetchall()], dtype=np.int64)


def _return_build_memory() -> None:
    """Give back the heap a case build in this process freed (glibc ``malloc_trim``).

    This process counts in every run's peak memory: in an invocation that built
    the PostgreSQL template, the plain runs peaked at 6.3 GiB, against 3.95 GiB
    in one that found the case built.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _one_run(prepared: Prepared, args, mode: str, runner: str, log) -> dict:
    """One timed run of ``mode``, with its executor started before and closed after the clock.

    The Dask runner's Prefect run gets a standing cluster (unless ``--cold-cluster``);
    its plain baseline a two-process pool. Neither exists during the other mode's
    run, so each run's memory and CPU are its own.
    """
    if mode == "dask-plain":
        from distributed import Client

        cluster, _ = start_cluster()
        try:
            with Client(cluster) as client:
                row = timed_run(prepared, args.apdb, args, "plain", executor=client.get_executor())
        finally:
            cluster.close()
            _reap_workers()
        row["mode"] = mode
        return row
    if mode == "prefect":
        cluster = None
        run_args = args
        if runner == "dask" and not args.cold_cluster:
            cluster, started = start_cluster()
            run_args = argparse.Namespace(
                **{**vars(args), "runner": f"dask={cluster.scheduler_address}"}
            )
            log(f"standing Dask cluster ready in {started:.1f} s")
        try:
            return timed_run(prepared, args.apdb, run_args, "prefect")
        finally:
            if cluster is not None:
                cluster.close()
                _reap_workers()
    pool = None
    if runner.startswith("dask"):
        # The Dask runner's baseline: the same processes, without Prefect or Dask.
        pool, _ = start_process_pool()
    try:
        return timed_run(prepared, args.apdb, args, "plain", executor=pool)
    finally:
        if pool is not None:
            pool.shutdown()
            _reap_workers()


def _reap_workers(timeout: float = 30.0) -> None:
    """Wait until the closed executor's worker processes have exited and been reaped.

    A child's CPU time joins this process's ``children_*`` times when it is
    reaped; reaped during the next run, it would be counted there.
    """
    import multiprocessing

    import psutil

    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        multiprocessing.active_children()  # joins (reaps) the finished ones
        left = []
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "spawn_main" in " ".join(child.cmdline()):
                    left.append(child)
        if not left:
            return
        time.sleep(0.1)


def _median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]


def run_case(args, *, log=print) -> dict:
    """Prepare the case, run the requested modes, return every figure.

    With both modes, rounds alternate their order (Prefect first, then plain
    first, ...), so a drift of the machine over the runs does not fall on one
    mode; ``overhead_fraction`` compares the median runs. An untimed plain run
    comes first (``--no-warmup`` skips it): the first visits after the case is
    ready ran 15–25 % slower in either mode, whichever came first.
    """
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    spec = HistorySpec(seed=args.seed, prior_visits=args.prior_visits, n_detectors=args.detectors)
    t0 = time.perf_counter()
    if args.case_dir is not None:
        prepared = adopt(args.case_dir, args.apdb, log=log)
    else:
        prepared = prepare(
            spec, args.apdb, cache_root=args.cache_root, rebuild=args.rebuild, log=log
        )
    log(f"case ready in {time.perf_counter() - t0:.1f} s: {prepared.directory}")
    _return_build_memory()
    warm_files(prepared.bundle_root)
    out: dict = {
        "spec": spec.__dict__,
        "apdb": args.apdb,
        "runner": args.runner,
        "build": prepared.stats,
    }
    modes = [m for m, skip in (("prefect", args.no_prefect), ("plain", args.no_plain)) if not skip]
    runner = "dask" if args.runner == "dask" else args.runner
    if args.dask_plain:
        if runner != "dask":
            raise SystemExit("--dask-plain needs --runner dask")
        modes.append("dask-plain")
    if "prefect" in modes:
        out["prefect_warmup_s"] = warm_prefect()
    if args.warmup and modes:
        t1 = time.perf_counter()
        _one_run(prepared, args, "plain", runner, log)
        out["warmup_run_s"] = time.perf_counter() - t1
        log(f"untimed warm-up run: {out['warmup_run_s']:.1f} s")
    all_runs: dict[str, list[dict]] = {m: [] for m in modes}
    for k in range(max(1, args.rounds)):
        for mode in modes if k % 2 == 0 else modes[::-1]:
            if args.profile and mode == "plain" and not all_runs["plain"]:
                from pyinstrument import Profiler

                prof = Profiler(interval=0.005)
                prof.start()
                all_runs[mode].append(_one_run(prepared, args, mode, runner, log))
                prof.stop()
                args.profile.write_text(prof.output_html())
                print(prof.output_text(unicode=False, color=False, show_all=False)[:20000])
            else:
                all_runs[mode].append(_one_run(prepared, args, mode, runner, log))
            log(f"round {k + 1} {mode}: {all_runs[mode][-1]['wall_s']:.2f} s")
    runs = {m: _median_run(rs) for m, rs in all_runs.items()}
    first = next(iter(runs.values()))
    from flows.config import OrchestrationConfig

    o = OrchestrationConfig()
    out["orchestration"] = {
        "detectors_per_task": args.detectors_per_task or o.detectors_per_task,
        "max_workers": args.max_workers or o.max_workers,
        "cache": bool(args.cache),
    }
    out["alert_history"] = alert_depths(
        prepared, first.pop("_alerting_objects"), _visit_mjd(prepared)
    )
    for rs in all_runs.values():
        for r in rs:
            r.pop("_alerting_objects", None)
    out["rounds"] = {
        m: [{k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_gib", "peak_pss_gib")} for r in rs]
        for m, rs in all_runs.items()
    }
    for r in runs.values():
        r["per_detector"] = r.pop("_table")
    out["runs"] = runs
    if "prefect" in runs and "plain" in runs:
        p, q = runs["prefect"]["wall_s"], runs["plain"]["wall_s"]
        out["overhead_fraction"] = (p - q) / p
    return out


def _visit_mjd(prepared: Prepared) -> float:
    from core.bundle import read_visit_info

    return float(read_visit_info(prepared.bundle_root, prepared.visit).midpointMjdTai)


def print_report(out: dict) -> None:
    runs = out["runs"]
    print()
    print(f"APDB {out['apdb']}, runner {out['runner']}, {out['orchestration']}")
    print(
        f"history: {out['build']['rows']['DiaObject']:,} DiaObjects, "
        f"{out['build']['rows']['DiaSource']:,} DiaSources, "
        f"{out['build']['rows']['DiaForcedSource']:,} DiaForcedSources"
    )
    h = out["alert_history"]
    for name in ("prv_sources", "prv_forced"):
        d = h[name]
        print(
            f"  {name} per alert: mean {d['mean']:.1f} (objects with history: "
            f"{d['mean_with_history']:.1f}), median {d['median']:.0f}, p90 {d['p90']:.0f}, "
            f"none {100 * d['zero_fraction']:.0f}%"
        )
    print()
    print(
        f"{'mode':10} {'wall s':>8} {'alerts':>7} {'alerts/s':>9} {'peak GiB':>9} "
        f"{'APDB dets':>9} {'failed':>6} {'CPU s':>7} {'load':>5}"
    )
    for mode, r in runs.items():
        print(
            f"{mode:10} {r['wall_s']:8.2f} {r['alerts']:7d} {r['alerts_per_s']:9.0f} "
            f"{r['peak_rss_gib']:9.2f} {r['apdb_detectors_committed']:9d} {r['detectors_failed']:6d} "
            f"{r['cpu_s']:7.1f} {r['load_avg_1min']:5.1f}"
        )
    for mode, r in runs.items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_s_by_process"].items())
        print(f"  CPU s of {mode}: {parts}")
        print(
            f"  peak memory of {mode}: RSS {r['peak_rss_gib']:.2f} GiB, PSS "
            f"{r['peak_pss_gib']:.2f} GiB, RSS without file-backed pages "
            f"{r['peak_rss_anon_gib']:.2f} GiB"
        )
    if "overhead_fraction" in out:
        print(f"Prefect overhead fraction: {100 * out['overhead_fraction']:.1f} %")
    print()
    ref = runs.get("plain") or runs.get("prefect")
    total = sum(ref["stage_seconds"].values()) or 1.0
    print(
        "stage share of summed detector-stage time ("
        + ("plain" if "plain" in runs else "prefect")
        + ")"
    )
    for stage in STAGE_ORDER:
        s = ref["stage_seconds"].get(stage, 0.0)
        print(f"  {stage:10} {s:8.2f} s  {100 * s / total:5.1f} %")


def main(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    out = run_case(args)
    print_report(out)
    runs = out["runs"]
    main_run = runs.get("prefect") or runs["plain"]
    out["headline"] = {
        "wall_s": round(main_run["wall_s"], 2),
        "alerts": main_run["alerts"],
        "overhead_fraction": round(out["overhead_fraction"], 4)
        if "overhead_fraction" in out
        else None,
        "alerts_per_s": round(main_run["alerts_per_s"], 1),
        "peak_rss_gib": round(main_run["peak_rss_gib"], 2),
        "peak_rss_anon_gib": round(main_run["peak_rss_anon_gib"], 2),
        "peak_pss_gib": round(main_run["peak_pss_gib"], 2),
        "apdb": out["apdb"],
    }
    return out
