"""The stage tasks: each runs one stage for a group of detectors.

Why groups: Prefect costs ~20-35 ms per task run here (state round trips to its
API), so one task run per detector and stage — 8 × 189 = 1,512 per visit —
would spend 30-50 s of a 60 s budget on orchestration. A task run per *group*
of ``detectors_per_task`` detectors keeps every stage a visible, retried,
cached Prefect task while the overhead stays a few percent; a group size of 1
gives the one-task-per-detector picture.

Every task returns a :class:`GroupResult`: per-detector outputs, errors,
timings and counts. A detector that fails (bad input, too many new objects, a
bug) is recorded in ``errors`` and skipped by later stages; its siblings go on.
A :class:`~core.errors.TransientError` on any detector fails the task run so
Prefect retries it (exponential backoff with jitter); nothing else is retried.

Caching: the key of a task run is built from identities only — stage name,
visit, detectors, :meth:`PipelineConfig.digest`, the input files' checksums
(fsspec ``ukey``: size/mtime locally, ETag on S3) and the keys of the upstream
results — never from hashing arrays. A re-run of a visit thus finds every
finished stage in the cache; the store is idempotent by its (visit, detector)
marker, so even without the cache nothing is stored twice.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import fsspec
from prefect import task
from prefect.cache_policies import NO_CACHE

from core.bundle import IMAGE_KINDS, VisitInfo, detector_path
from core.errors import PipelineError, TransientError
from flows.config import PipelineConfig

__all__ = ["STAGES", "GroupResult", "stage_task", "summary_task"]

#: Stage names in the order they run (docs/design.md §4; summarise runs inside associate).
STAGES = ("load", "calibrate", "associate", "forced", "store", "cutout", "package", "produce")


class GroupResult:
    """One stage's outcome for a group of detectors.

    Deliberately a plain class, not a dataclass: Prefect walks every dataclass,
    dict and list in a task's parameters looking for futures (twice per task
    run), and a group's values hold thousands of nested items — stamps, alert
    payloads, frames — that hold none. A plain object is one leaf to it.
    """

    __slots__ = ("counts", "errors", "key", "seconds", "stage", "values", "worker")

    def __init__(
        self,
        stage: str,
        key: str,
        values: dict[int, Any] | None = None,
        errors: dict[int, str] | None = None,
        seconds: dict[int, float] | None = None,
        counts: dict[int, dict[str, int]] | None = None,
        worker: str = "",
    ):
        self.stage = stage
        self.key = key
        self.values = values if values is not None else {}
        self.errors = errors if errors is not None else {}
        self.seconds = seconds if seconds is not None else {}
        self.counts = counts if counts is not None else {}
        self.worker = worker  # host:pid of the process that ran the group

    def __repr__(self) -> str:
        return (
            f"GroupResult(stage={self.stage!r}, detectors={sorted(self.values)}, "
            f"errors={len(self.errors)}, worker={self.worker!r})"
        )

    def light(self, keep_values: bool = False) -> GroupResult:
        """The same result without the per-detector values (unless ``keep_values``).

        What the flow needs to report a group — errors, timings, counts — is a few
        kilobytes; the values (loaded history, stamps, alert batches) are hundreds of
        megabytes per group and must stay in the worker that made them.
        """
        return GroupResult(
            stage=self.stage,
            key=self.key,
            values=dict(self.values) if keep_values else {},
            errors=dict(self.errors),
            seconds=dict(self.seconds),
            counts={d: dict(c) for d, c in self.counts.items()},
            worker=self.worker,
        )


def _digest(*parts: object) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()


def input_checksums(root: str, visit: int, detectors: list[int]) -> list[str]:
    """Cheap identities of a group's input files (no file content is hashed)."""
    fs, _, _ = fsspec.get_fs_token_paths(root)
    out = []
    for det in detectors:
        base = detector_path(root, visit, det)
        for name in ("diaSources.parquet", *(f"{k}.fits" for k in IMAGE_KINDS)):
            try:
                out.append(str(fs.ukey(f"{base}/{name}")))
            except (OSError, ValueError):
                out.append("missing")
    return out


def _cache_key(context, parameters: dict) -> str:
    visit: VisitInfo = parameters["visit"]
    config: PipelineConfig = parameters["config"]
    detectors = list(parameters["detectors"])
    upstream = [p.key for p in parameters.get("upstream", ()) if isinstance(p, GroupResult)]
    checks = input_checksums(parameters["root"], visit.visit, detectors) if not upstream else []
    return _digest(
        context.task.name,
        parameters["root"],
        visit.to_json_dict(),
        detectors,
        config.digest(),
        upstream,
        checks,
    )


def _retry_on_transient(task, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            return False
    return isinstance(exc, TransientError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PipelineError):
        return f"{type(exc).__name__}: {exc}"
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 2)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


_frozen = threading.Event()


def _freeze_startup_heap() -> None:
    """Once per process, before the first stage: move the objects alive now out of GC's way.

    A worker process holds a million or more long-lived objects (modules,
    classes, Prefect, Dask, astropy) before it runs a stage, and every full
    garbage collection walks them all. The stages allocate many short-lived
    objects (history rows, records), which triggers collections; in a Dask
    worker that made the load stage ~1.7x slower than in a bare process.
    ``gc.freeze`` puts the start-up heap in a permanent generation that
    collections skip; nothing is leaked (those objects were alive anyway).
    """
    if not _frozen.is_set():
        _frozen.set()
        gc.collect()
        gc.freeze()


def run_group(
    stage: str,
    fn: Callable[..., tuple[Any, dict[str, int]]],
    root: str,
    visit: VisitInfo,
    detectors: list[int],
    config: PipelineConfig,
    upstream: tuple[GroupResult, ...],
    time_mjd: float,
) -> GroupResult:
    """Run ``fn`` for each detector not failed upstream; isolate failures.

    ``fn(root, visit, detector, config, inputs, time_mjd)`` gets the upstream
    values of that detector (in ``upstream`` order) and returns ``(value, counts)``.
    """
    _freeze_startup_heap()
    errors: dict[int, str] = {}
    for up in upstream:
        for det, err in up.errors.items():
            errors.setdefault(det, err)
    values, seconds, counts = {}, {}, {}
    transient: list[tuple[int, TransientError]] = []
    for det in detectors:
        if det in errors:
            continue
        inputs = [up.values[det] for up in upstream]
        t0 = time.perf_counter()
        try:
            value, n = fn(root, visit, det, config, inputs, time_mjd)
        except TransientError as exc:
            transient.append((det, exc))
            continue
        except Exception as exc:  # one bad detector never takes down its visit
            errors[det] = f"{stage}: {_describe(exc)}"
            continue
        finally:
            seconds[det] = time.perf_counter() - t0
        values[det] = value
        counts[det] = n
    if transient:
        det, exc = transient[0]
        raise TransientError(
            f"{stage}: transient failure on {len(transient)} detector(s), e.g. detector {det}: {exc}"
        ) from exc
    key = _digest(stage, visit.visit, detectors, config.digest(), [u.key for u in upstream])
    return GroupResult(
        stage=stage,
        key=key,
        values=values,
        errors=errors,
        seconds=seconds,
        counts=counts,
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )


def stage_task(stage: str, fn, *, cached: bool = True):
    """A Prefect task running ``fn`` for a group of detectors (see :func:`run_group`)."""

    def _run(
        root: str,
        visit: VisitInfo,
        detectors: list[int],
        config: PipelineConfig,
        time_mjd: float,
        upstream: tuple[GroupResult, ...] = (),
    ) -> GroupResult:
        return run_group(stage, fn, root, visit, list(detectors), config, tuple(upstream), time_mjd)

    _run.__name__ = f"{stage}_group"
    _run.__qualname__ = _run.__name__
    _run.__doc__ = f"Stage {stage!r} for a group of detectors."
    common = {
        "name": stage,
        "task_run_name": f"{stage}-{{visit.visit}}-d{{detectors[0]}}",
        "retry_condition_fn": _retry_on_transient,
    }
    uncached = task(_run, cache_policy=NO_CACHE, **common)
    if not cached:
        return uncached
    cached_task = task(_run, cache_key_fn=_cache_key, **common)
    _UNCACHED[id(cached_task)] = uncached
    return cached_task


@task(name="summary", task_run_name="summary-{visit}-d{detectors[0]}", cache_policy=NO_CACHE)
def summary_task(
    visit: int, detectors: list[int], results: dict[str, GroupResult]
) -> dict[str, GroupResult]:
    """A group's stage results without their values (the produce receipts kept).

    It runs beside the group's stages (on the same Dask worker), so only this small
    summary travels back to the flow, not the frames and alert bytes. The group is
    finished then: its bundles leave this process's cache.
    """
    from flows.detector import forget_bundles

    forget_bundles(visit, detectors)
    return {stage: r.light(keep_values=(stage == "produce")) for stage, r in results.items()}


#: The uncached twin of every cached stage task (Prefect cannot drop a cache_key_fn).
_UNCACHED: dict[int, Any] = {}


def configure(t, config: PipelineConfig, *, cached: bool):
    """Apply the run's orchestration settings (retries, cache, storage) to a stage task."""
    o = config.orchestration
    options: dict[str, Any] = {
        "retries": o.retries,
        "retry_delay_seconds": [o.retry_backoff_s * 2**i for i in range(max(o.retries, 1))],
        "retry_jitter_factor": o.retry_jitter_factor,
    }
    if cached and o.cache:
        options["persist_result"] = True
        options["cache_expiration"] = timedelta(hours=o.cache_expiration_hours)
        if o.result_storage:
            options["result_storage"] = _storage_block(o.result_storage)
    else:
        t = _UNCACHED.get(id(t), t)
    return t.with_options(**options)


@functools.lru_cache(maxsize=16)
def _storage_block(location: str) -> str:
    """Save (once per process) a storage block for ``location``; return its slug.

    Prefect needs result storage saved server-side so that a later run, or
    another worker, can read the cached results back.
    """
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    name = "diapipe-results-" + _digest(location)[:12]
    if "://" in location and not location.startswith("file://"):
        block = RemoteFileSystem(basepath=location)
        kind = "remote-file-system"
    else:
        path = location.removeprefix("file://")
        Path(path).mkdir(parents=True, exist_ok=True)
        block = LocalFileSystem(basepath=str(Path(path).resolve()))
        kind = "local-file-system"
    block.save(name, overwrite=True)
    return f"{kind}/{name}"
