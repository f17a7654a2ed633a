"""Preload a visit's APDB rows from its next-visit message, and use them at load time.

:func:`preload_visit` runs when the next-visit message arrives, before the
exposure ends: for every detector whose predicted corners the message gives
(:meth:`core.nextvisit.NextVisit.corners`) it reads the DiaObjects inside the
predicted footprint padded by ``orchestration.preload_pad_arcsec`` (20″, as
Rubin's Prompt Processing) and their DiaSource history, and keeps them in a
per-process cache bounded by ``orchestration.preload_cache_mb``.

When the visit is processed, :func:`load_from_preload` (called at the top of
:func:`flows.detector.load_detector`) takes the detector's preload and uses it
only if

* it is there (same process, same APDB URL, same history window length);
* it is not older than ``orchestration.preload_max_age_s``;
* the visit's real midpoint lies within :data:`WINDOW_MARGIN_DAYS` of the
  message's shutter close, so the preloaded history window starts no later
  than the real one;
* every corner of the real footprint (the WCS polygon padded 2″,
  :func:`flows.detector.footprint`) lies inside the padded predicted polygon;
  both are convex, so the real footprint is covered.

Then the APDB is queried again for the DiaObjects of the *real* footprint at
2″ — the rows there now win, so an object stored after the preload (by an
earlier, overlapping visit) is found and no duplicate is made — and DiaSource
history is read only for the objects the preload does not hold or whose
version changed since (``validityStartMjdTai`` or ``nDiaSources`` differ:
a store that adds a DiaSource to an object writes a new version). The
DiaForcedSource history is always read again: forced photometry by another
visit adds rows to an object without writing a new DiaObject version, so no
version check can tell a preloaded forced history is still complete. The
result equals what the load without preload returns (same rows; row order is
not defined by the APDB either way).

Otherwise the preload is discarded, the reason is logged, and the load runs as
without one. Each detector's load reports ``preload_used`` (0/1) and, when
used, ``preload_refreshed`` (objects whose history was read again) and
``preload_reused`` in its counts (:func:`pop_outcome`).

Where the cache is found: the cache lives in the memory of the process that
ran :func:`preload_visit`. A visit processed later in the same process finds
it (a long-lived service calling both flows, ``process_visit`` on the thread
runner in that process). It is *not* found by a Dask worker process, nor by a
deployment run: Prefect runs every flow run of a worker or of ``serve`` in its
own subprocess, so a ``preload-on-next`` run's cache ends with the run. Then
the load runs as without preload (``preload_used`` 0), which is correct, only
not faster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
from astropy.time import Time
from prefect import flow, get_run_logger

from apdb import Polygon, RegionGuard
from core.bundle import VisitInfo, visit_path
from core.errors import InputError
from core.nextvisit import NEXT_VISIT_FILE, NextVisit, parse_next_visit
from flows import detector as D
from flows.config import PipelineConfig

__all__ = [
    "WINDOW_MARGIN_DAYS",
    "Preloaded",
    "cached_preloads",
    "forget_preloads",
    "load_from_preload",
    "pop_outcome",
    "preload_detector",
    "preload_message",
    "preload_visit",
]

log = logging.getLogger(__name__)

#: The preload reads history from this many days before the window the message's
#: shutter close gives, so that a real midpoint up to this much earlier still has
#: its whole window in the preload; a visit further from its message is refused.
WINDOW_MARGIN_DAYS = 1.0

_VERSION_COLUMNS = ("validityStartMjdTai", "nDiaSources")


@dataclass(frozen=True, eq=False)
class Preloaded:
    """One detector's preloaded rows and what they were loaded for."""

    visit: int
    detector: int
    polygon: Polygon  # the predicted footprint, padded
    objects: pd.DataFrame  # DiaObjects in ``polygon`` at ``loaded_at``
    sources: pd.DataFrame  # their DiaSources with midpointMjdTai >= since_mjd
    since_mjd: float
    expected_mjd: float  # the message's shutter close, MJD TAI
    apdb_url: str
    history_days: float
    loaded_at: float  # time.time() when the rows were read
    nbytes: int


_cache: OrderedDict[tuple[int, int], Preloaded] = OrderedDict()
_outcomes: dict[tuple[int, int], dict[str, int]] = {}
_lock = threading.Lock()


def _nbytes(*frames: pd.DataFrame) -> int:
    return int(sum(f.memory_usage(index=True, deep=True).sum() for f in frames))


def _keep(entry: Preloaded, budget_bytes: int) -> int:
    """Put ``entry`` in the cache within ``budget_bytes``; returns how many were evicted."""
    key = (entry.visit, entry.detector)
    evicted = 0
    with _lock:
        _cache.pop(key, None)
        if entry.nbytes > budget_bytes:
            return 0
        _cache[key] = entry
        total = sum(e.nbytes for e in _cache.values())
        while total > budget_bytes:
            _, old = _cache.popitem(last=False)
            total -= old.nbytes
            evicted += 1
    return evicted


def cached_preloads() -> list[tuple[int, int]]:
    """(visit, detector) of every preload in this process's cache, oldest first."""
    with _lock:
        return list(_cache)


def forget_preloads() -> None:
    """Drop every preload and every unreported outcome of this process."""
    with _lock:
        _cache.clear()
        _outcomes.clear()


def pop_outcome(visit: int, detector: int) -> dict[str, int]:
    """The preload counts of the last load of (visit, detector) in this process, once."""
    with _lock:
        return _outcomes.pop((int(visit), int(detector)), {})


def _utc_to_mjd_tai(t) -> float:
    return float(Time(t).tai.mjd)


def preload_detector(message: NextVisit, detector: int, config: PipelineConfig) -> Preloaded:
    """Read one detector's DiaObjects and DiaSource history from its predicted footprint.

    Raises
    ------
    InputError
        The message gives no corners for ``detector``, or they form no convex polygon.
    """
    corners = message.corners(detector)
    if corners is None:
        raise InputError(f"visit {message.visit}: the message gives no corners for {detector}")
    polygon = Polygon(*corners).padded(config.orchestration.preload_pad_arcsec)
    apdb = D.get_apdb(config)
    expected = _utc_to_mjd_tai(message.shutter_close)
    since = apdb.history_start(expected - WINDOW_MARGIN_DAYS)
    objects = apdb.get_objects(polygon)
    sources = apdb.get_sources(objects["diaObjectId"].to_numpy(), since)
    return Preloaded(
        visit=message.visit,
        detector=int(detector),
        polygon=polygon,
        objects=objects,
        sources=sources,
        since_mjd=since,
        expected_mjd=expected,
        apdb_url=config.apdb.safe_url(),
        history_days=float(config.apdb.history_days),
        loaded_at=time.time(),
        nbytes=_nbytes(objects, sources),
    )


def _read_message(bundle_root: str, visit: int) -> NextVisit:
    url = f"{visit_path(bundle_root, visit)}/{NEXT_VISIT_FILE}"
    with fsspec.open(url, "rb") as f:
        return parse_next_visit(f.read(), where=url)


@flow(name="preload-visit", log_prints=False, validate_parameters=True)
def preload_visit(
    bundle_root: str,
    message: dict | None = None,
    visit: int | None = None,
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - frozen pydantic model
) -> dict:
    """Preload every announced detector's APDB rows into this process's cache.

    Parameters
    ----------
    bundle_root : str
        Root of the visit bundles; used only to read
        ``{bundle_root}/{visit}/next-visit.json`` when ``message`` is not given.
    message : dict, optional
        The next-visit message (the ``diapipe.visit.next`` event payload).
    visit : int, optional
        The visit whose next-visit file to read when ``message`` is None.
    config : PipelineConfig
        The APDB, the pad, the cache budget (``orchestration.preload_*``).

    Returns
    -------
    dict
        ``visit``, ``preloaded`` and ``skipped`` detectors (no corners in the
        message, or not kept within the budget), ``objects``, ``sources``,
        ``bytes``, ``evicted`` (older preloads dropped) and ``seconds``.
    """
    if message is None:
        if visit is None:
            raise InputError("preload_visit needs a message or a visit")
        nv = _read_message(bundle_root, visit)
    else:
        nv = parse_next_visit(message, where="diapipe.visit.next payload")
        if visit is not None and visit != nv.visit:
            raise InputError(f"preload_visit: visit {visit} but the message is for {nv.visit}")
    return preload_message(nv, config, get_run_logger())


def preload_message(nv: NextVisit, config: PipelineConfig, logger=log) -> dict:
    """The body of :func:`preload_visit` for a parsed message (no Prefect needed)."""
    t0 = time.perf_counter()
    budget = config.orchestration.preload_cache_mb * 2**20
    done: list[Preloaded] = []
    skipped: list[int] = []
    evicted = 0
    for det in nv.detectors:
        if nv.corners(det) is None:
            skipped.append(det)
            continue
        try:
            entry = preload_detector(nv, det, config)
        except InputError as exc:
            logger.warning("visit %s detector %s: not preloaded: %s", nv.visit, det, exc)
            skipped.append(det)
            continue
        evicted += _keep(entry, budget)
        if (nv.visit, det) not in cached_preloads():
            logger.warning(
                "visit %s detector %s: preload of %.1f MiB exceeds preload_cache_mb",
                nv.visit,
                det,
                entry.nbytes / 2**20,
            )
            skipped.append(det)
            continue
        done.append(entry)
    kept = set(cached_preloads())  # a later detector may have evicted an earlier one
    skipped += [e.detector for e in done if (e.visit, e.detector) not in kept]
    done = [e for e in done if (e.visit, e.detector) in kept]
    n_obj = sum(len(e.objects) for e in done)
    n_src = sum(len(e.sources) for e in done)
    nbytes = sum(e.nbytes for e in done)
    seconds = time.perf_counter() - t0
    logger.info(
        "visit %s: preloaded %d detectors (%d objects, %d DiaSources, %.1f MiB) in %.2f s; "
        "%d skipped, %d older preloads evicted",
        nv.visit,
        len(done),
        n_obj,
        n_src,
        nbytes / 2**20,
        seconds,
        len(skipped),
        evicted,
    )
    return {
        "visit": nv.visit,
        "preloaded": [e.detector for e in done],
        "skipped": sorted(skipped),
        "objects": n_obj,
        "sources": n_src,
        "bytes": nbytes,
        "evicted": evicted,
        "seconds": round(seconds, 3),
    }


def _take(visit: int, detector: int) -> Preloaded | None:
    with _lock:
        return _cache.pop((int(visit), int(detector)), None)


def _record(visit: int, detector: int, counts: dict[str, int]) -> None:
    with _lock:
        _outcomes[(int(visit), int(detector))] = counts


def _unusable(entry: Preloaded, visit: VisitInfo, real: Polygon, config) -> str | None:
    """Why ``entry`` cannot stand in for the load of ``visit``, or None when it can."""
    age = time.time() - entry.loaded_at
    if age > config.orchestration.preload_max_age_s:
        return f"stale: loaded {age:.0f} s ago (preload_max_age_s {config.orchestration.preload_max_age_s:g})"
    if entry.apdb_url != config.apdb.safe_url() or entry.history_days != config.apdb.history_days:
        return "loaded from another APDB or with another history window"
    if abs(visit.midpointMjdTai - entry.expected_mjd) > WINDOW_MARGIN_DAYS:
        return (
            f"the visit's midpoint (MJD {visit.midpointMjdTai:.5f}) is more than "
            f"{WINDOW_MARGIN_DAYS:g} d from the message's shutter close (MJD {entry.expected_mjd:.5f})"
        )
    inside = entry.polygon.contains(real.ra, real.dec)
    if not inside.all():
        return (
            f"the real footprint is not inside the predicted one "
            f"({int((~inside).sum())} of {inside.size} corners outside)"
        )
    return None


def load_from_preload(
    root: str, visit: VisitInfo, detector: int, config: PipelineConfig
) -> D.Loaded | None:
    """The detector's :class:`~flows.detector.Loaded` built on its preload, or None.

    None (after logging why) when there is no usable preload; the caller then
    runs the load as without one. See the module docstring for the rules.

    Raises
    ------
    core.errors.OutOfOrderError
        As :func:`flows.detector.load_detector`.
    """
    entry = _take(visit.visit, detector)
    if entry is None:
        _record(visit.visit, detector, {"preload_used": 0})
        return None
    bundle = D.get_bundle(root, visit, detector, config)
    real = D.footprint(bundle)
    why = _unusable(entry, visit, real, config)
    if why is not None:
        log.info("visit %s detector %s: preload discarded, %s", visit.visit, detector, why)
        _record(visit.visit, detector, {"preload_used": 0})
        return None
    apdb = D.get_apdb(config)
    objects = apdb.get_objects(real)
    guard = RegionGuard.of(real, objects)
    n_region = len(objects)
    keep = D._in_bbox(bundle, objects["ra"].to_numpy(), objects["dec"].to_numpy())
    objects = objects[keep].reset_index(drop=True)
    ids = objects["diaObjectId"].to_numpy()
    since = apdb.history_start(visit.midpointMjdTai)
    reused = _unchanged(objects, entry.objects)
    pre = entry.sources
    mine = np.isin(pre["diaObjectId"].to_numpy(), ids[reused])
    old = pre[mine & (pre["midpointMjdTai"].to_numpy() >= since)]
    if reused.all():  # nothing to read again (an empty APDB read still builds a frame)
        sources = old
    else:
        fresh = apdb.get_sources(ids[~reused], since)
        sources = pd.concat([old, fresh], ignore_index=True) if len(old) else fresh
    forced = apdb.get_forced_sources(ids, since)
    D._refuse_later_visits(visit, detector, sources, forced)
    t = visit.midpointMjdTai
    _record(
        visit.visit,
        detector,
        {
            "preload_used": 1,
            "preload_refreshed": int((~reused).sum()),
            "preload_reused": int(reused.sum()),
        },
    )
    return D.Loaded(
        objects=objects,
        sources=sources[sources["midpointMjdTai"].to_numpy() < t].reset_index(drop=True),
        forced=forced[forced["midpointMjdTai"].to_numpy() < t].reset_index(drop=True),
        n_in_region=n_region,
        n_outside_bbox=int(n_region - keep.sum()),
        guard=guard,
    )


def _unchanged(fresh: pd.DataFrame, preloaded: pd.DataFrame) -> np.ndarray:
    """Per row of ``fresh``: the preload holds this DiaObject in the same version."""
    if len(fresh) == 0 or len(preloaded) == 0:
        return np.zeros(len(fresh), bool)
    cols = ["diaObjectId", *_VERSION_COLUMNS]
    old = preloaded[cols].drop_duplicates("diaObjectId").set_index("diaObjectId")
    ids = fresh["diaObjectId"].to_numpy()
    present = np.isin(ids, old.index.to_numpy())
    same = present.copy()
    aligned = old.reindex(ids)
    for c in _VERSION_COLUMNS:
        a = pd.to_numeric(fresh[c], errors="coerce").to_numpy(dtype=float)
        b = pd.to_numeric(aligned[c], errors="coerce").to_numpy(dtype=float)
        same &= a == b  # NaN compares unequal: such an object is read again
    return same
