"""The stage table: every stage of a visit declared once, and the code that walks it.

A :class:`Stage` row names the stage, the pure function it runs for one
detector, the named inputs it takes from earlier stages, and its cache policy.
:data:`PIPELINE` is the visit, :data:`RECOVERY` the rebuild of a detector
stored by an earlier run whose alerts never went out. :func:`run_table` walks
a table for one group of detectors; the Prefect flow
(:mod:`flows.visit`) calls it inside one task run per group with every stage
as a nested, retried Prefect task run, and the plain runner of the benchmark
calls it with direct function calls. Adding a stage is adding a row.

Groups: a task run per *group* of ``detectors_per_task`` detectors, with the
group's stages inside it as nested task runs in the same process, keeps each
stage visible and retried on its own while the per-submit cost of the task
runner (on Dask, ~0.1 s of CPU to serialise and rebuild Prefect's settings
context) is paid once per group, and the stage values (history, stamps, alert
bytes: hundreds of MB per group) never leave the process that made them.

A stage returns a :class:`GroupResult`: per-detector values, errors, timings
and counts. A detector that fails (bad input, too many new objects, a bug) is
recorded in ``errors`` and skipped by later stages; its siblings go on. A
:class:`~core.errors.TransientError` on any detector fails the stage's task run
so Prefect retries it (exponential backoff with jitter); nothing else is
retried.

Caching — what each key covers and why that is enough
-----------------------------------------------------

Only a stage whose output is a pure function of files and settings may be
cached (``cache="files"``); a stage that reads the APDB, or takes anything
derived from it, is ``cache="never"``, because the APDB changes between runs
(later visits, a restore, a failed store) and no key could name what it held.

* ``ssoassociate`` reads the ephemeris file, which the calibrate key does not
  cover: ``never`` (it is cheap; the file is read once per process).
* ``load`` reads the APDB; ``associate``, ``forced``, ``cutout`` and
  ``package`` take its output; ``store`` writes the APDB; ``produce`` writes
  alerts, Kafka and the receipt; ``recover`` reads the APDB: all ``never``.
  What makes a re-run cheap and correct for them is the APDB's (visit,
  detector) marker and the receipt: a stored and produced detector is skipped,
  a stored one without receipt is rebuilt from the APDB (:data:`RECOVERY`).
* ``calibrate`` (``files``) reads the DiaSource catalog and the image headers
  of one detector and the settings. Its key, per detector: the diapipe code
  (package version and a hash of every source file of the product, so any
  code change misses), the stage name, the bundle root, the whole
  ``visit.json``, the detector, :meth:`PipelineConfig.digest` (every setting
  but orchestration and secrets) and the fsspec ``ukey`` of each input file
  (size and mtime locally, ETag on S3). The stage reads nothing else, so equal
  keys mean equal output. One difference is by design: a cached row keeps the
  ``timeProcessedMjdTai`` of the run that computed it.

Entries are written per detector and only for a detector that succeeded: a
failure is never stored, so it is never served. An entry older than
``orchestration.cache_expiration_hours`` is not used and is deleted at the
start of the next visit (:func:`prune_cache`). See ``docs/caching.md``.
"""

from __future__ import annotations

import gc
import hashlib
import os
import pickle
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec

from core.bundle import IMAGE_KINDS, VisitInfo, detector_path
from core.errors import PipelineError, TransientError
from flows import detector as D
from flows.config import OrchestrationConfig, PipelineConfig
from flows.preload import pop_outcome
from flows.produce import produce_detector

__all__ = [
    "PIPELINE",
    "RECOVERY",
    "STAGES",
    "GroupResult",
    "Stage",
    "StageContext",
    "code_version",
    "prune_cache",
    "run_group",
    "run_table",
]


class StageContext:
    """What every stage of a visit sees besides its inputs: where, which visit, settings, time.

    A plain class (not a dataclass) so that Prefect, which walks the dataclasses
    of a task's parameters looking for futures, sees one leaf.
    """

    __slots__ = ("config", "root", "time_mjd", "visit")

    def __init__(self, root: str, visit: VisitInfo, config: PipelineConfig, time_mjd: float):
        self.root = root
        self.visit = visit
        self.config = config
        self.time_mjd = time_mjd


@dataclass(frozen=True)
class Stage:
    """One row of a stage table.

    ``run(ctx, detector, **inputs)`` returns ``(value, counts)`` for one
    detector; ``inputs`` maps each of its keyword parameters to the earlier
    stage whose value (for the same detector) it receives. ``cache`` is
    ``"never"`` or ``"files"`` (see the module docstring).
    """

    name: str
    run: Callable[..., tuple[Any, dict[str, int]]]
    inputs: Mapping[str, str] = field(default_factory=dict)
    cache: str = "never"

    def __post_init__(self):
        if self.cache not in ("never", "files"):
            raise ValueError(f"stage {self.name}: cache must be 'never' or 'files'")

    def __str__(self) -> str:
        return self.name


class GroupResult:
    """One stage's outcome for a group of detectors.

    Deliberately a plain class, not a dataclass: Prefect walks every dataclass,
    dict and list in a task's parameters looking for futures, and a group's
    values hold thousands of nested items — stamps, alert payloads, frames —
    that hold none. A plain object is one leaf to it.
    """

    __slots__ = ("cached", "counts", "errors", "seconds", "stage", "values", "worker")

    def __init__(
        self,
        stage: str,
        values: dict[int, Any] | None = None,
        errors: dict[int, str] | None = None,
        seconds: dict[int, float] | None = None,
        counts: dict[int, dict[str, int]] | None = None,
        worker: str = "",
        cached: tuple[int, ...] = (),
    ):
        self.stage = stage
        self.values = values if values is not None else {}
        self.errors = errors if errors is not None else {}
        self.seconds = seconds if seconds is not None else {}
        self.counts = counts if counts is not None else {}
        self.worker = worker  # host:pid of the process that ran the group
        self.cached = cached  # detectors whose value came from the result cache

    def __repr__(self) -> str:
        return (
            f"GroupResult(stage={self.stage!r}, detectors={sorted(self.values)}, "
            f"errors={len(self.errors)}, worker={self.worker!r})"
        )

    def light(self, keep_values: bool = False) -> GroupResult:
        """The same result without the per-detector values (unless ``keep_values``).

        What the flow needs to report a group — errors, timings, counts — is a few
        kilobytes; the values (loaded history, stamps, alert batches) are hundreds of
        megabytes per group and must stay in the process that made them.
        """
        return GroupResult(
            stage=self.stage,
            values=dict(self.values) if keep_values else {},
            errors=dict(self.errors),
            seconds=dict(self.seconds),
            counts={d: dict(c) for d, c in self.counts.items()},
            worker=self.worker,
            cached=self.cached,
        )


# --------------------------------------------------------------------------- the stages
# Each: (ctx, detector, **named inputs) -> (value, counts).


def _load(ctx: StageContext, det: int):
    loaded = D.load_detector(ctx.root, ctx.visit, det, ctx.config)
    return loaded, {
        "objects": len(loaded.objects),
        "sources": len(loaded.sources),
        "forced": len(loaded.forced),
        **pop_outcome(ctx.visit.visit, det),
    }


def _calibrate(ctx: StageContext, det: int):
    cal = D.calibrate_detector(ctx.root, ctx.visit, det, ctx.config, ctx.time_mjd)
    return cal, {"sources": len(cal)}


def _ssoassociate(ctx: StageContext, det: int, *, calibrated):
    p = D.prefilter_detector(ctx.root, ctx.visit, det, ctx.config, calibrated)
    return p, {
        "unreliable": p.filtered.n_unreliable,
        "trailed": p.filtered.n_trailed,
        "candidates": p.solar.n_candidates,
        "associated": p.solar.n_associated,
    }


def _associate(ctx: StageContext, det: int, *, loaded, prefiltered):
    a = D.associate_detector(loaded, prefiltered, ctx.config, ctx.time_mjd)
    s = a.association
    return a, {
        "matched": s.n_matched,
        "new": s.n_new,
        "rejected": s.n_rejected,
        "nan_dropped": s.n_nan_dropped,
        "objects": len(a.objects),
    }


def _forced(ctx: StageContext, det: int, *, loaded, associated):
    good = D.good_objects(loaded, associated, ctx.config)
    forced = D.forced_detector(
        ctx.root, ctx.visit, det, ctx.config, associated, ctx.time_mjd, objects=good
    )
    return forced, {"forced": len(forced), "not_good": len(associated.all_objects) - len(good)}


def _store(ctx: StageContext, det: int, *, loaded, associated, forced):
    n_qa = D.write_qa_detector(ctx.visit, det, ctx.config, associated)
    stored = D.store_guarded(
        ctx.root, ctx.visit, det, ctx.config, loaded, associated, forced, ctx.time_mjd
    )
    if stored.reassociations and stored.associated is not None:
        # the QA tables follow the association that was stored
        n_qa = D.write_qa_detector(ctx.visit, det, ctx.config, stored.associated)
    r = stored.result
    # The value lives until produce: without the association's frames.
    return D.Stored(r, stored.reassociations), {
        "qa_tables": n_qa,
        "ss_sources": 0
        if r.already_stored or associated.ss_sources is None
        else len(associated.ss_sources),
        "objects": r.n_objects,
        "sources": r.n_sources,
        "forced": r.n_forced_sources,
        "already_stored": int(r.already_stored),
        "reassociated": stored.reassociations,
    }


def _cutout(ctx: StageContext, det: int, *, associated):
    stamps = D.cutout_detector(ctx.root, ctx.visit, det, ctx.config, associated)
    return stamps, {"stamps": sum(s is not None for v in stamps.values() for s in v)}


def _package(ctx: StageContext, det: int, *, loaded, associated, forced, cutouts):
    if not ctx.config.packaging.do_package:
        return None, {"alerts": 0}
    batch = D.package_detector(ctx.visit, det, ctx.config, loaded, associated, forced, cutouts)
    return batch, {"alerts": len(batch)}


def _produce(ctx: StageContext, det: int, *, batch, stored=None):
    if stored is not None and stored.alerts_from_apdb and ctx.config.packaging.do_package:
        # The detector was committed before this store ran: by an earlier attempt
        # whose result was lost (a retried store, a Dask worker that died and whose
        # group was recomputed). The recomputed association saw the APDB with this
        # visit already in it, so the alerts are rebuilt from what was committed,
        # as for a detector recovered at flow start. Or the store re-made the
        # association because an overlapping visit stored into the footprint after
        # this load (D.store_guarded): the packaged alerts are of the first one.
        batch = D.recover_detector(ctx.root, ctx.visit, det, ctx.config)
    return produce_detector(ctx.visit, det, ctx.config, batch)


def _recover(ctx: StageContext, det: int):
    batch = D.recover_detector(ctx.root, ctx.visit, det, ctx.config)
    return batch, {"alerts": len(batch)}


#: The visit, in the order the stages run (SPEC §4; summarise runs inside associate).
#: ``ssoassociate`` applies Rubin's source filters, then matches known solar-system
#: objects (docs/solar-system.md); what it leaves goes to DIA association.
PIPELINE: tuple[Stage, ...] = (
    Stage("load", _load),
    Stage("calibrate", _calibrate, cache="files"),
    Stage("ssoassociate", _ssoassociate, {"calibrated": "calibrate"}),
    Stage("associate", _associate, {"loaded": "load", "prefiltered": "ssoassociate"}),
    Stage("forced", _forced, {"loaded": "load", "associated": "associate"}),
    Stage("store", _store, {"loaded": "load", "associated": "associate", "forced": "forced"}),
    Stage("cutout", _cutout, {"associated": "associate"}),
    Stage(
        "package",
        _package,
        {"loaded": "load", "associated": "associate", "forced": "forced", "cutouts": "cutout"},
    ),
    Stage("produce", _produce, {"batch": "package", "stored": "store"}),
)

#: A detector stored by an earlier run, its alerts never out: rebuilt from the APDB.
RECOVERY: tuple[Stage, ...] = (
    Stage("recover", _recover),
    Stage("produce", _produce, {"batch": "recover"}),
)

TABLES: dict[str, tuple[Stage, ...]] = {"visit": PIPELINE, "recover": RECOVERY}

#: Stage names of the visit, in order.
STAGES: tuple[str, ...] = tuple(s.name for s in PIPELINE)


def _check(table: tuple[Stage, ...]) -> None:
    seen: set[str] = set()
    for s in table:
        missing = [src for src in s.inputs.values() if src not in seen]
        if missing:
            raise ValueError(f"stage {s.name}: inputs {missing} are not earlier stages")
        seen.add(s.name)


for _table in TABLES.values():
    _check(_table)


# --------------------------------------------------------------------------- running a group


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


def retry_on_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a task run only when it failed with a TransientError."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            return False
    return isinstance(exc, TransientError)


def run_group(
    stage: Stage, ctx: StageContext, detectors: list[int], inputs: Mapping[str, GroupResult]
) -> GroupResult:
    """Run ``stage`` for each detector not failed upstream; isolate failures.

    ``inputs`` maps the stage's parameter names to the upstream results.
    """
    _freeze_startup_heap()
    errors: dict[int, str] = {}
    for up in inputs.values():
        for det, err in up.errors.items():
            errors.setdefault(det, err)
    cache = _result_cache(ctx.config.orchestration) if stage.cache == "files" else None
    values, seconds, counts, cached = {}, {}, {}, []
    transient: list[tuple[int, TransientError]] = []
    for det in detectors:
        if det in errors:
            continue
        t0 = time.perf_counter()
        try:
            key = cache.key(stage, ctx, det) if cache is not None else None
            hit = cache.get(stage, key) if key is not None else None
            if hit is not None:
                value, n = hit
                cached.append(det)
            else:
                value, n = stage.run(
                    ctx, det, **{name: up.values[det] for name, up in inputs.items()}
                )
                if key is not None:
                    cache.put(stage, key, (value, n))
        except TransientError as exc:
            transient.append((det, exc))
            continue
        except Exception as exc:  # one bad detector never takes down its visit
            errors[det] = f"{stage.name}: {_describe(exc)}"
            continue
        finally:
            seconds[det] = time.perf_counter() - t0
        values[det] = value
        counts[det] = n
    if transient:
        det, exc = transient[0]
        raise TransientError(
            f"{stage.name}: transient failure on {len(transient)} detector(s), "
            f"e.g. detector {det}: {exc}"
        ) from exc
    return GroupResult(
        stage=stage.name,
        values=values,
        errors=errors,
        seconds=seconds,
        counts=counts,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        cached=tuple(cached),
    )


def last_uses(table: tuple[Stage, ...]) -> dict[str, int]:
    """For each stage whose value a later stage reads: the index of the last reader.

    The last stage's value is what the group returns, so it has no entry.
    """
    out: dict[str, int] = {}
    for i, stage in enumerate(table):
        for src in stage.inputs.values():
            out[src] = i
    out.pop(table[-1].name, None)
    return out


def run_table(
    table: tuple[Stage, ...],
    ctx: StageContext,
    detectors: list[int],
    call: Callable[[Stage, StageContext, list[int], dict[str, GroupResult]], GroupResult]
    | None = None,
) -> dict[str, GroupResult | str]:
    """Every stage of ``table`` for one group, in order; light results.

    ``call(stage, ctx, detectors, inputs)`` runs one stage (default:
    :func:`run_group` directly; the flow passes a Prefect task). A stage that
    raises — retries exhausted, a bug outside the per-detector isolation —
    becomes a failure message for the whole group, and the stages that need its
    output get the same message. The group's bundles leave this process's cache
    at the end.
    """
    call = call or run_group
    done: dict[str, GroupResult | str] = {}
    last_use = last_uses(table)
    try:
        for i, stage in enumerate(table):
            ups = {name: done[src] for name, src in stage.inputs.items()}
            failed = next((u for u in ups.values() if not isinstance(u, GroupResult)), None)
            if failed is not None:
                done[stage.name] = failed
            else:
                try:
                    done[stage.name] = call(stage, ctx, detectors, ups)
                except Exception as exc:
                    kind = "retries exhausted" if isinstance(exc, TransientError) else "task failed"
                    done[stage.name] = f"{stage.name}: {kind}: {type(exc).__name__}: {exc}"
            del ups
            # A value no later stage reads is dropped now, not at the end of the group:
            # the group's history frames and stamps are gone before its alerts go out.
            for name, last in last_use.items():
                result = done.get(name)
                if last == i and isinstance(result, GroupResult):
                    done[name] = result.light()
    finally:
        D.forget_bundles(ctx.visit.visit, detectors)
    return {
        k: v.light(keep_values=(k == "produce")) if isinstance(v, GroupResult) else v
        for k, v in done.items()
    }


# --------------------------------------------------------------------------- result cache


def _digest(*parts: object) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()


_PRODUCT_PACKAGES = ("core", "apdb", "tasks", "alerts", "flows")


def code_version() -> str:
    """The installed diapipe version and a hash of every product source file."""
    return _code_version()


def _source_hash() -> str:
    h = hashlib.blake2b(digest_size=16)
    top = Path(__file__).resolve().parent.parent
    for pkg in _PRODUCT_PACKAGES:
        for p in sorted((top / pkg).rglob("*.py")):
            h.update(str(p.relative_to(top)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


_code_lock = threading.Lock()
_code: list[str] = []


def _code_version() -> str:
    with _code_lock:
        if not _code:
            try:
                version = metadata.version("diapipe")
            except metadata.PackageNotFoundError:
                version = "unknown"
            _code.append(f"{version}+{_source_hash()}")
        return _code[0]


def input_checksums(root: str, visit: int, detector: int) -> list[str]:
    """Cheap identities of one detector's input files (no file content is hashed)."""
    fs, _, _ = fsspec.get_fs_token_paths(root)
    base = detector_path(root, visit, detector)
    out = []
    for name in ("diaSources.parquet", *(f"{k}.fits" for k in IMAGE_KINDS)):
        try:
            out.append(str(fs.ukey(f"{base}/{name}")))
        except (OSError, ValueError):
            out.append("missing")
    return out


def _cache_location(o: OrchestrationConfig) -> str:
    if o.result_storage:
        return o.result_storage.rstrip("/")
    from prefect.settings import get_current_settings

    return str(get_current_settings().results.local_storage_path) + "/diapipe"


class _ResultCache:
    """Per-detector values of ``cache="files"`` stages under ``{location}/{stage}/{key}.pkl``.

    Entries are pickles written by this pipeline (``_atomic_write``: whole or
    absent); the location must be writable only by the pipeline's operators, as
    for Prefect's own result storage.
    """

    def __init__(self, location: str, expiration_s: float):
        self.location = location
        self.expiration_s = expiration_s

    def key(self, stage: Stage, ctx: StageContext, det: int) -> str:
        return _digest(
            code_version(),
            stage.name,
            ctx.root,
            ctx.visit.to_json_dict(),
            int(det),
            ctx.config.digest(),
            input_checksums(ctx.root, ctx.visit.visit, det),
        )

    def _url(self, stage: Stage, key: str) -> str:
        return f"{self.location}/{stage.name}/{key}.pkl"

    def get(self, stage: Stage, key: str):
        fs, path = fsspec.core.url_to_fs(self._url(stage, key))
        try:
            with fs.open(path, "rb") as f:
                entry = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
            return None
        if entry.get("key") != key or time.time() - entry["created"] > self.expiration_s:
            return None
        return entry["value"]

    def put(self, stage: Stage, key: str, value) -> None:
        from alerts.store import _atomic_write

        entry = {"key": key, "created": time.time(), "value": value}
        try:
            _atomic_write(self._url(stage, key), pickle.dumps(entry, protocol=5))
        except Exception:  # a cache that cannot be written costs a recomputation only
            return


_caches: dict[tuple[str, float], _ResultCache] = {}


def _result_cache(o: OrchestrationConfig) -> _ResultCache | None:
    if not o.cache:
        return None
    k = (_cache_location(o), o.cache_expiration_hours * 3600.0)
    if k not in _caches:
        _caches[k] = _ResultCache(*k)
    return _caches[k]


def prune_cache(o: OrchestrationConfig) -> int:
    """Delete cache entries older than ``cache_expiration_hours``; return how many."""
    cache = _result_cache(o)
    if cache is None:
        return 0
    cutoff = time.time() - cache.expiration_s
    n = 0
    for stage in {s.name for t in TABLES.values() for s in t if s.cache != "never"}:
        fs, path = fsspec.core.url_to_fs(f"{cache.location}/{stage}")
        try:
            entries = fs.ls(path, detail=True)
        except (FileNotFoundError, OSError):
            continue
        for e in entries:
            modified = e.get("mtime") or e.get("LastModified") or e.get("created")
            if hasattr(modified, "timestamp"):
                modified = modified.timestamp()
            if modified is not None and float(modified) < cutoff:
                try:
                    fs.rm(e["name"])
                    n += 1
                except OSError:
                    pass
    return n
