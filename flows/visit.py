"""The per-visit flow: fan out over detector groups, run the stage table, collect results.

``process_visit`` is the Prefect flow; ``python -m flows.visit`` simulates a
small visit and runs it on the embedded defaults (SQLite, local files). No
science here: the stages are declared once, with their inputs, in
:data:`flows.stages.PIPELINE`; the per-detector glue is :mod:`flows.detector`.

Each group of ``orchestration.detectors_per_task`` detectors is one task run
(``group-{visit}-d{first}``) whose stages are nested task runs
(``load-{visit}-d{first}``, ...), each retried on a TransientError. The group
task is the unit the task runner places: on Dask, one worker runs all of a
group's stages, so its values stay in that process and only a light summary
comes back. ``run_visit_plain`` walks the same table with plain calls.
"""

import argparse
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

from astropy.time import Time
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.states import Completed

from core.bundle import VisitInfo, read_visit_info
from core.errors import InputError
from core.extras import import_extra
from flows import detector as D
from flows.config import OrchestrationConfig, PipelineConfig
from flows.order import wait_for_earlier_visits
from flows.produce import finished_detectors, record_visit
from flows.report import (
    FILTER_COUNTS,
    filter_totals,
    import_picture_modules,
    png_data_uri,
    visit_figure_png,
)
from flows.stages import (
    STAGES,
    TABLES,
    GroupResult,
    Stage,
    StageContext,
    prune_cache,
    retry_on_transient,
    run_group,
    run_table,
)
from flows.timing import METRIC, add_latency, shutter_close

__all__ = ["VisitResult", "main", "process_visit", "run_visit", "run_visit_plain"]


class VisitResult(dict):
    """The flow's return value: a plain dict (JSON-friendly) with these keys.

    ``visit``, ``detectors`` (asked for), ``succeeded`` (list, including
    ``skipped``), ``failed`` (detector → error), ``skipped`` (finished by an
    earlier run: stored and produced), ``recovered`` (stored by an earlier run
    whose alerts never went out: rebuilt from the APDB and produced now),
    ``alerts`` (produced by this run), ``alert_files``, ``stage_seconds`` (stage →
    total seconds), ``filters`` (the visit's source-filter counts,
    :func:`flows.report.filter_totals`), ``table`` (per detector and stage
    rows), ``wall_s``, ``manifest`` (URL of the visit's record in the night
    manifest, or None), ``alert_timing_since_shutter_close`` (``visit_s``:
    shutter close to the last alert out, ``detectors_s``: per detector,
    ``shutter_close_utc``, ``source``; :mod:`flows.timing`),
    ``preload_used_fraction`` (of the detectors loaded by this run, the
    fraction whose load used a preload, :mod:`flows.preload`; 0.0 when none
    was loaded), ``waited_for_earlier`` (``waited_s``, ``waited_for``,
    ``timed_out``: the wait for earlier overlapping visits to be stored,
    :mod:`flows.order`; absent when nothing was left to load).
    """


def _now_mjd_tai() -> float:
    return float(Time.now().tai.mjd)


def _chunks(items: list[int], n: int) -> list[list[int]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def select_detectors(bundle_root: str, info: VisitInfo, detectors) -> list[int]:
    """The detectors to process: all of the visit's, or ``detectors``, each once and known."""
    if not detectors:
        return list(info.detectors)
    dets = [int(d) for d in detectors]
    dups = sorted({d for d in dets if dets.count(d) > 1})
    if dups:
        raise InputError(f"detectors {dups} are listed more than once for visit {info.visit}")
    unknown = sorted(set(dets) - set(info.detectors))
    if unknown:
        raise InputError(
            f"{bundle_root}/{info.visit}/visit.json: detectors {unknown} are not in the visit"
        )
    return dets


def _stage_body(
    stage: Stage,
    visit: int,
    detectors: list[int],
    ctx: StageContext,
    inputs: dict[str, GroupResult],
) -> GroupResult:
    return run_group(stage, ctx, detectors, inputs)


@functools.lru_cache(maxsize=64)
def _stage_task(name: str, o: OrchestrationConfig):
    """The Prefect task of one stage, with the run's retry settings (built once per process)."""
    return task(
        _stage_body,
        name=name,
        task_run_name=f"{name}-{{visit}}-d{{detectors[0]}}",
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=o.retries,
        retry_delay_seconds=[o.retry_backoff_s * 2**i for i in range(max(o.retries, 1))],
        retry_jitter_factor=o.retry_jitter_factor,
        retry_condition_fn=retry_on_transient,
    )


def _call_stage(stage: Stage, ctx: StageContext, detectors, inputs) -> GroupResult:
    t = _stage_task(stage.name, ctx.config.orchestration)
    return t(stage, ctx.visit.visit, list(detectors), ctx, inputs)


@task(
    name="group",
    task_run_name="{table}-{visit}-d{detectors[0]}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
def group_task(
    table: str, visit: int, detectors: list[int], ctx: StageContext
) -> dict[str, GroupResult | str]:
    """Every stage of ``TABLES[table]`` for one group of detectors, as nested task runs."""
    return run_table(TABLES[table], ctx, detectors, _call_stage)


@flow(name="process-visit", log_prints=False, validate_parameters=True)
def process_visit(
    bundle_root: str,
    visit: int,
    detectors: list[int] | None = None,
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - frozen pydantic model
    show_progress: bool = False,
    shutter_close_utc: str | None = None,
):
    """Process one visit: every stage for every detector, alerts out.

    Parameters
    ----------
    bundle_root : str
        Root of the visit bundles (local path or ``s3://bucket/prefix``).
    visit : int
        Visit number; ``{bundle_root}/{visit}/visit.json`` must exist.
    detectors : list of int, optional
        Subset of the visit's detectors (default: all of them), each once.
    config : PipelineConfig
        All settings; validated by Prefect and shown as a form in the UI.
    show_progress : bool
        Print a progress bar on stderr (the command line sets it).
    shutter_close_utc : str, optional
        When the visit's shutter closed (ISO-8601 with offset), the start of
        ``alert_timing_since_shutter_close``; by default it is taken from the
        visit's next-visit message, its completion marker or ``visit.json``
        (:mod:`flows.timing`).

    Returns
    -------
    VisitResult
        A dict; the flow run ends ``Completed`` when every detector succeeded
        and ``Completed`` named ``Partial`` (with the failures in its message)
        otherwise.
    """
    logger = get_run_logger()
    runner_spec = config.orchestration.task_runner
    if _is_dask(_current_runner()) != runner_spec.startswith("dask"):
        # A deployment run starts the flow on its default (thread) runner; the
        # config asks for another, so the visit runs as a subflow on that one.
        logger.info("visit %s: running as a subflow on task runner %r", visit, runner_spec)
        # The subflow is this module's flow under its package name: a deployment run loads
        # this file as a module of another name, and every task run sent to Dask carries
        # its flow, which a scheduler or worker started elsewhere could not unpickle.
        from flows.visit import process_visit as canonical

        sub = canonical.with_options(
            task_runner=_task_runner(runner_spec, config.orchestration.max_workers)
        )
        inner = sub(
            bundle_root,
            visit,
            detectors,
            config,
            show_progress,
            shutter_close_utc,
            return_state=True,
        )
        data = inner.result()  # raises if the subflow failed
        if inner.name == "Partial":
            return Completed(name="Partial", message=inner.message, data=data)
        return data
    t_start = time.perf_counter()
    info: VisitInfo = read_visit_info(bundle_root, visit)
    dets = select_detectors(bundle_root, info, detectors)
    close = shutter_close(bundle_root, info, shutter_close_utc)
    # Fail fast, before any work, when the APDB cannot be reached or the Kafka client the
    # output needs is not installed (else every detector would fail on it, one by one).
    if config.output.do_produce_alerts:
        import_extra("confluent_kafka", "kafka", "Kafka output")
    stored = D.get_apdb(config).done_detectors(info.visit) & set(dets)
    produced = finished_detectors(config, info.visit) & set(dets)
    skipped = sorted(stored & produced)  # finished before: nothing to do
    recover = sorted(stored - produced)  # stored, alerts never went out: rebuild from the APDB
    todo = [d for d in dets if d not in stored]
    logger.info(
        "visit %s: %d detectors (%d finished before, %d stored without alerts), band %s, APDB %s",
        info.visit,
        len(dets),
        len(skipped),
        len(recover),
        info.band,
        config.apdb.safe_url(),
    )
    prune_cache(config.orchestration)
    order = wait_for_earlier_visits(bundle_root, info, config, logger) if todo else None
    ctx = StageContext(bundle_root, info, config, _now_mjd_tai())
    size = config.orchestration.detectors_per_task
    groups = [("visit", g) for g in _chunks(todo, size)]
    groups += [("recover", g) for g in _chunks(recover, size)]
    place = _placement(len(groups))
    futures = []
    for i, (table, g) in enumerate(groups):
        with place(i):
            futures.append(group_task.submit(table, info.visit, g, ctx))
    if futures:
        import_picture_modules()  # for the picture drawn after the groups
    if show_progress and futures:
        _progress(futures, len(todo) + len(recover), [g for _, g in groups])
    wait(futures)
    outcomes = [_outcome(f, table) for f, (table, _) in zip(futures, groups, strict=True)]
    result = _collect(info, [g for _, g in groups], outcomes, time.perf_counter() - t_start)
    result["skipped"] = skipped
    result["recovered"] = recover
    if order is not None:
        result["waited_for_earlier"] = order
    result["succeeded"] = sorted(set(result["succeeded"]) | set(skipped))
    result["detectors"] = dets
    add_latency(result, close)
    _log_latency(logger, info.visit, result[METRIC])
    D.forget_bundles()
    _artifacts(result, config.output.store if config.output.do_write_alerts else None)
    result["manifest"] = record_visit(config, info, result)
    n_failed = len(result["failed"])
    if n_failed:
        msg = f"partial: {n_failed} of {len(dets)} detectors failed: " + "; ".join(
            f"{d}: {e}" for d, e in sorted(result["failed"].items())[:5]
        )
        logger.warning(msg)
        return Completed(name="Partial", message=msg[:2000], data=result)
    logger.info("visit %s: %d alerts from %d detectors", info.visit, result["alerts"], len(dets))
    return result


def _current_runner():
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return getattr(ctx, "task_runner", None) if ctx else None


def _is_dask(runner) -> bool:
    return type(runner).__module__.startswith("prefect_dask")


def _placement(n_groups: int):
    """Per group index, a context for submitting the group's task run.

    On a Dask cluster a group is one task, so every stage of the group runs in
    the same worker process: the stage values (loaded history, stamps, alert
    bytes: hundreds of MB a group) stay in that worker's memory, and its bundle
    cache serves every stage. No worker is named: a group pinned to a worker
    address would wait forever for a worker that died (the restarted one has a
    new address); unpinned, Dask recomputes it elsewhere. Earlier groups get a
    higher priority, so a worker finishes one group before it starts the next
    and holds one group's bundles at a time. With the thread runner this is a
    no-op.
    """
    import contextlib

    if not _is_dask(_current_runner()) or n_groups < 2:
        return lambda i: contextlib.nullcontext()
    import dask

    return lambda i: dask.annotate(priority=n_groups - i)


def _outcome(future, table: str) -> dict[str, GroupResult | str]:
    """A group's per-stage outcome: light GroupResults, or failure messages.

    The group task catches every stage's failure, so it fails only when its
    process did (e.g. a Dask worker lost for good); then each of its stages
    gets that message.
    """
    if future.state.is_completed():
        return future.result()
    try:
        exc = future.state.result(raise_on_failure=False)
    except Exception as e:
        exc = e
    msg = f"group failed: {type(exc).__name__}: {exc}"
    return {s.name: f"{s.name}: {msg}" for s in TABLES[table]}


def _progress(futures, n_dets: int, groups) -> None:
    from prefect.futures import as_completed

    done = 0
    by_future = {id(f): len(g) for f, g in zip(futures, groups, strict=True)}
    for fut in as_completed(futures):
        done += by_future[id(fut)]
        width = 30
        filled = int(width * done / n_dets)
        print(
            f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{n_dets} detectors",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)


def _collect(info: VisitInfo, groups, outcomes, wall_s: float) -> VisitResult:
    """Merge per-group stage outcomes (GroupResult, or a failure message) into a VisitResult."""
    failed: dict[int, str] = {}
    rows: list[dict[str, Any]] = []
    stage_seconds = dict.fromkeys(STAGES, 0.0)
    alerts = 0
    files: list[str] = []
    for g, outcome in zip(groups, outcomes, strict=True):
        results: dict[str, GroupResult | None] = {}
        for stage in outcome:
            r = outcome[stage]
            if isinstance(r, GroupResult):
                results[stage] = r
            else:
                results[stage] = None
                for det in g:
                    failed.setdefault(det, r)
        for det in g:
            row: dict[str, Any] = {"detector": det}
            # Which process(es) ran this detector's stages: one, when a group stays together.
            ran = sorted({r.worker for r in results.values() if r is not None and r.worker})
            if ran:
                row["worker"] = ",".join(ran)
            for stage in results:
                r = results[stage]
                if r is None:
                    continue
                if det in r.errors:
                    failed.setdefault(det, r.errors[det])
                sec = r.seconds.get(det)
                if sec is not None:
                    row[f"{stage}_ms"] = round(sec * 1000, 1)
                    stage_seconds[stage] = stage_seconds.get(stage, 0.0) + sec
                for k, v in r.counts.get(det, {}).items():
                    row[f"{stage}_{k}"] = v
            prod = results.get("produce")
            if prod is not None and det in prod.values:
                p = prod.values[det]
                if p.get("produced_at") is not None:
                    row["produced_at"] = p["produced_at"]
                alerts += p.get("alerts", 0)
                if p.get("file"):
                    files.append(p["file"])
            row["status"] = "failed" if det in failed else "ok"
            if det in failed:
                row["error"] = failed[det]
            rows.append(row)
    dets = [d for g in groups for d in g]
    loads = [r["load_preload_used"] for r in rows if "load_preload_used" in r]
    return VisitResult(
        preload_used_fraction=round(sum(loads) / len(loads), 4) if loads else 0.0,
        visit=info.visit,
        detectors=dets,
        succeeded=[d for d in dets if d not in failed],
        failed=failed,
        alerts=alerts,
        alert_files=sorted(files),
        stage_seconds={k: round(v, 3) for k, v in stage_seconds.items()},
        filters=filter_totals(rows),
        table=rows,
        wall_s=round(wall_s, 3),
    )


def _artifacts(result: VisitResult, report_store=None) -> None:
    """Table and markdown artifacts; the picture also goes beside the alerts (``report_store``)."""
    visit = result["visit"]
    columns = (
        ["detector", "status", "worker"]
        + [f"{s}_ms" for s in STAGES]
        + [
            "load_preload_used",
            "load_preload_refreshed",
            "calibrate_sources",
            *FILTER_COUNTS,
            "associate_matched",
            "associate_new",
            "forced_forced",
            "store_sources",
            "package_alerts",
            f"{METRIC}_s",
            "error",
        ]
    )
    table = [{c: row.get(c, "") for c in columns} for row in result["table"]]
    create_table_artifact(
        key=f"visit-{visit}-detectors",
        table=table,
        description=f"Visit {visit}: per detector and stage, time (ms) and rows.",
    )
    failed = result["failed"]
    lines = [
        f"# Visit {visit}",
        "",
        f"- detectors: {len(result['detectors'])}, succeeded {len(result['succeeded'])}, "
        f"failed {len(failed)}",
        f"- alerts: {result['alerts']} in {len(result['alert_files'])} files",
        "- filters: " + ", ".join(f"{k} {v}" for k, v in result["filters"].items()),
        f"- wall time: {result['wall_s']:.2f} s",
        f"- preload used by {result.get('preload_used_fraction', 0.0):.0%} of the detectors loaded",
        *_latency_lines(result.get(METRIC)),
        "",
        "| stage | total s |",
        "|---|---|",
        *(f"| {s} | {v:.3f} |" for s, v in result["stage_seconds"].items()),
    ]
    if failed:
        lines += ["", "## Failures", "", "| detector | error |", "|---|---|"]
        lines += [f"| {d} | {e.replace('|', '/')} |" for d, e in sorted(failed.items())]
    if result["alert_files"]:
        lines += ["", "## Alert files", ""] + [f"- `{p}`" for p in result["alert_files"][:50]]
    try:  # matplotlib comes with the [viewer] extra; without it the summary has no picture
        import matplotlib  # noqa: F401
    except ImportError:
        have_matplotlib = False
    else:
        have_matplotlib = True
    if result["table"] and have_matplotlib:
        png = visit_figure_png(result)
        lines += [
            "",
            "## Stage time and alerts per detector",
            "",
            f"![visit {visit}]({png_data_uri(png)})",
        ]
        if report_store is not None:
            url = _write_report(report_store, visit, png)
            lines += ["", f"Picture file: `{url}`"]
            result["report_png"] = url
    create_markdown_artifact(key=f"visit-{visit}-summary", markdown="\n".join(lines))


def _log_latency(logger, visit: int, timing: dict) -> None:
    if timing["visit_s"] is None:
        logger.info("visit %s: %s: no detector produced by this run", visit, METRIC)
        return
    per = sorted(timing["detectors_s"].values())
    logger.info(
        "visit %s: %s %.2f s (detectors: min %.2f, median %.2f, max %.2f s; "
        "shutter close %s from %s)",
        visit,
        METRIC,
        timing["visit_s"],
        per[0],
        per[len(per) // 2],
        per[-1],
        timing["shutter_close_utc"],
        timing["source"],
    )


def _latency_lines(timing: dict | None) -> list[str]:
    if not timing or timing["visit_s"] is None:
        return []
    return [
        f"- {METRIC}: {timing['visit_s']:.2f} s to the last alert (shutter close "
        f"{timing['shutter_close_utc']}, from {timing['source']}); per detector in the "
        f"table, column `{METRIC}_s`",
    ]


def _write_report(store, visit: int, png: bytes) -> str:
    from alerts.store import _atomic_write

    url = f"{store.location.rstrip('/')}/reports/visit-{int(visit)}.png"
    return _atomic_write(url, png, dict(store.storage_options))


# --------------------------------------------------------------------------- without Prefect


def run_visit_plain(
    bundle_root: str,
    visit: int,
    config: PipelineConfig,
    *,
    detectors: list[int] | None = None,
    executor=None,
) -> VisitResult:
    """The same stage table and grouping as :func:`process_visit`, with plain function calls.

    No Prefect: no task runs, no retries, no artifacts, and no recovery of
    stored detectors (it runs every detector through :data:`~flows.stages.PIPELINE`).
    Groups run in a thread pool of ``orchestration.max_workers`` like the
    default task runner, or on ``executor`` (e.g. a ``ProcessPoolExecutor``, the
    baseline of the Dask runner: each group's stages in one process, only light
    results sent back). Used by ``python -m bench orchestration`` and
    ``python -m bench visit`` to measure what Prefect costs.
    """
    from concurrent.futures import ThreadPoolExecutor

    t_start = time.perf_counter()
    info = read_visit_info(bundle_root, visit)
    dets = select_detectors(bundle_root, info, detectors)
    close = shutter_close(bundle_root, info)
    order = wait_for_earlier_visits(bundle_root, info, config)
    ctx = StageContext(bundle_root, info, config, _now_mjd_tai())
    groups = _chunks(dets, config.orchestration.detectors_per_task)
    run = functools.partial(run_table, TABLES["visit"], ctx)
    if executor is not None:
        outcomes = list(executor.map(run, groups))
    else:
        with ThreadPoolExecutor(config.orchestration.max_workers) as pool:
            outcomes = list(pool.map(run, groups))
    D.forget_bundles()
    result = _collect(info, groups, outcomes, time.perf_counter() - t_start)
    result["waited_for_earlier"] = order
    add_latency(result, close)
    return result


# --------------------------------------------------------------------------- command line


def _task_runner(spec: str, max_workers: int):
    if spec == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers)
    DaskTaskRunner = import_extra("prefect_dask", "dask", f"Task runner {spec!r}").DaskTaskRunner
    if spec.startswith("dask="):
        return DaskTaskRunner(address=spec.split("=", 1)[1])
    return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs())


def local_cluster_kwargs() -> dict[str, Any]:
    """Settings of the local Dask cluster that ``task_runner='dask'`` starts.

    One single-threaded worker process per core: stage code holds the GIL, so a
    second thread in a worker adds contention, not throughput. Work stealing is
    off: it would move a group's later stages to another worker (see
    :func:`_placement`) and ship their inputs across; a group still moves when
    its worker is lost.
    """
    dask = import_extra("dask", "dask", "The local Dask cluster")
    import_extra("distributed", "dask", "The local Dask cluster")
    from distributed.scheduler import DEFAULT_EXTENSIONS

    # Dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536 before it spawns a worker (into
    # this process's environment too, so every later child inherits it): glibc then
    # returns freed heap to the system whenever 64 KiB lie free at its top, and the next
    # allocation faults the pages in again. The stages allocate and free many
    # multi-megabyte buffers per detector (history frames, stamps, alert bytes); with
    # that setting a 189-detector visit took ~20 % more CPU (bench/RESULTS.md "visit").
    # Unset, glibc keeps its default, adaptive threshold. The nanny reads this setting
    # when it is created, so it is set here, before the cluster starts.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})

    return {
        "n_workers": max(1, os.cpu_count() or 1),
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": ":0",
        "env": _worker_api_env(),
        "scheduler_kwargs": {
            "extensions": {k: v for k, v in DEFAULT_EXTENSIONS.items() if k != "stealing"}
        },
        # Dask's statistical profiler samples every worker thread's stack 100 times a
        # second, under the GIL the stages need.
        # (The nanny merges this one level deep: the whole "distributed" section.)
        "config": {
            "distributed": dask.config.merge(
                dask.config.get("distributed"), {"worker": {"profile": {"enabled": False}}}
            )
        },
    }


def _worker_api_env() -> dict[str, str]:
    """Environment that points local Dask workers at this process's Prefect API.

    With no ``PREFECT_API_URL`` set, Prefect runs an ephemeral API server per
    process: every worker would start its own (~10 s each, all on one database).
    Starting this process's ephemeral server first and handing its URL to the
    workers gives one server for the flow and its tasks.
    """
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return {}
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the same instance Prefect's own client uses
    server.start()
    return {"PREFECT_API_URL": server.api_url}


def run_visit(
    bundle_root: str, visit: int, config: PipelineConfig, *, detectors=None, progress=False
):
    """Run :func:`process_visit` with the task runner the config names; return the result."""
    o = config.orchestration
    f = process_visit.with_options(task_runner=_task_runner(o.task_runner, o.max_workers))
    state = f(bundle_root, visit, detectors, config, progress, return_state=True)
    return state, state.result(raise_on_failure=False)


def _detector_list(text: str) -> list[int]:
    """``--detectors 91,94``: comma-separated non-negative integers."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t.isdigit() for t in items):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated detector numbers such as 91,94, got {text!r}"
        )
    return [int(t) for t in items]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.visit",
        description="Process a visit end to end. With no arguments: simulate a small survey "
        "(3 visits x 4 detectors) under ./run/ and process it on SQLite and local files.",
    )
    p.add_argument("--root", help="bundle root (local path or s3://); default: simulate one")
    p.add_argument(
        "--visit",
        type=int,
        action="append",
        help="visit(s) to process (repeatable), LSSTCam numbers day_obs·10⁵ + seq_num",
    )
    p.add_argument("--detectors", type=_detector_list, help="comma-separated detector subset")
    p.add_argument("--workdir", default="run", help="where simulated bundles, APDB and alerts go")
    p.add_argument("--apdb", help="APDB URL (default: SQLite file in --workdir)")
    p.add_argument("--alerts", help="alert location (default: --workdir/alerts)")
    p.add_argument("--kafka", metavar="SERVERS", help="produce to Kafka at these bootstrap servers")
    p.add_argument("--topic", default="alerts", help="Kafka topic (with --kafka)")
    p.add_argument(
        "--preset",
        choices=("lsstcam", "ztf", "decam"),
        default="lsstcam",
        help="instrument preset: association gate, bands, ID layout, stamp size",
    )
    p.add_argument("--runner", default="thread", help="thread | dask | dask=tcp://host:port")
    p.add_argument("--detectors-per-task", type=_positive_int, default=None)
    p.add_argument(
        "--max-workers", type=_positive_int, default=None, help="threads of the task runner"
    )
    p.add_argument(
        "--sim-visits", type=_positive_int, default=3, help="visits to simulate (no --root)"
    )
    p.add_argument(
        "--sim-detectors", type=_positive_int, default=4, help="detectors to simulate (no --root)"
    )
    p.add_argument(
        "--sim-sources", type=float, default=53, help="DiaSources per detector (no --root)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-cache", action="store_true", help="do not cache stage results")
    return p


def _parse(argv):
    return _parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line; bad arguments and settings give one ``error:`` line and status 2."""
    from pydantic import ValidationError

    from core.errors import ConfigError, one_line

    try:
        return _main(argv)
    except (ValidationError, ConfigError, InputError) as exc:
        _parser().print_usage(sys.stderr)
        print(f"python -m flows.visit: error: {one_line(exc)}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    root = args.root
    visits = args.visit
    if root is None:
        from sim.config import SurveyConfig
        from sim.survey import Survey

        root = str(work / "bundles")
        sim_config = SurveyConfig(
            seed=args.seed,
            n_detectors=args.sim_detectors,
            n_visits=args.sim_visits,
            sources_per_detector=args.sim_sources,
        )
        # the survey's visits k = 0, 1, ... carry LSSTCam numbers day_obs·10⁵ + seq_num
        try:
            indices = [sim_config.visit_index(v) for v in visits or ()]
        except ValueError as exc:
            _parser().error(f"--visit: {exc}")
        indices = indices or list(range(args.sim_visits))
        visits = [sim_config.visit_number(k) for k in indices]
        survey = Survey(sim_config)
        print(f"simulating {len(visits)} visit(s) x {args.sim_detectors} detectors into {root}")
        for k in indices:
            survey.write_visit(root, k)
    elif not visits:
        _parser().error("--visit is required with --root")

    kafka_opts: dict[str, Any] = {}
    if args.kafka:
        kafka_opts = {"servers": args.kafka, "topic": args.topic}
    orch: dict[str, Any] = {"task_runner": args.runner, "cache": not args.no_cache}
    if args.detectors_per_task:
        orch["detectors_per_task"] = args.detectors_per_task
    if args.max_workers:
        orch["max_workers"] = args.max_workers
    config = PipelineConfig.model_validate(
        {
            "preset": args.preset,
            "apdb": {"url": args.apdb or str(work / "apdb.sqlite3")},
            "output": {
                "store": {"location": args.alerts or str(work / "alerts")},
                "dead_letter_location": str(work / "dead-letters"),
                "do_produce_alerts": bool(args.kafka),
            },
            "kafka": kafka_opts,
            "orchestration": {**orch, "result_storage": str(work / "prefect-results")},
        }
    )
    detectors = args.detectors or None
    status = 0
    for v in visits:
        print(f"visit {v}: processing")
        state, result = run_visit(root, v, config, detectors=detectors, progress=True)
        if isinstance(result, BaseException):
            print(f"visit {v}: FAILED: {result}")
            status = 1
            continue
        print(
            f"visit {v}: {result['alerts']} alerts from {len(result['succeeded'])}/"
            f"{len(result['detectors'])} detectors in {result['wall_s']:.1f} s ({state.name})"
        )
        for det, err in sorted(result["failed"].items()):
            print(f"  detector {det} failed: {err}")
            status = 1
    print(f"alerts are in {config.output.store.location}")
    print(
        f"APDB: {config.apdb.safe_url()}  (inspect: python -m apdb info {config.apdb.safe_url()})"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
