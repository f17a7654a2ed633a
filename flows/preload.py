"""Preload a visit's APDB rows from its next-visit message, and use them at load time.

:func:`preload_visit` runs when the next-visit message arrives, before the
exposure ends: for every detector whose predicted corners the message gives
(:meth:`core.nextvisit.NextVisit.corners`) it reads the DiaObjects inside the
predicted footprint padded by ``orchestration.preload_pad_arcsec`` (20″, as
Rubin's Prompt Processing) and their DiaSource history, and keeps them (in
memory or in ``orchestration.preload_dir``, below) within
``orchestration.preload_cache_mb``.

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

Where the preload is kept: with ``orchestration.preload_dir`` set, as files in
that local directory (:class:`PreloadDir`), where any process of the machine
finds it: the ``visit-on-ready`` deployment's run and its Dask workers, while
``preload-on-next`` ran in another process (Prefect runs every flow run of a
worker or of ``serve`` in its own subprocess). Without it, in the memory of the
process that ran :func:`preload_visit`: only a visit processed later in that
same process finds it (a long-lived service calling both flows). A detector
that finds no preload loads as without one (``preload_used`` 0): correct, only
not faster.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

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
    "PreloadDir",
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
    """Put ``entry`` in this process's cache within ``budget_bytes``; returns how many were evicted."""
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


class PreloadDir:
    """Preloads kept as files in one local directory, for another process to take.

    Each detector's preload is three files named ``{visit}_{detector}``:
    ``.objects.arrow`` and ``.sources.arrow`` (Arrow IPC, uncompressed, with
    pandas' metadata, so the frames read back with their dtypes) and ``.json``
    (what the rows were loaded for, :class:`Preloaded` without the frames).
    Every file is written under a temporary name and renamed into place, the
    JSON last, so an entry without its JSON is incomplete and never read.

    Taking an entry renames its JSON to a name unique to the taker first: of
    two processes taking the same detector, one gets it and the other finds
    nothing, so a preload is used at most once. A taken entry's files are
    deleted. Entries older than ``preload_max_age_s`` can never be used and
    are deleted whenever an entry is added; the rest are kept within the byte
    budget, oldest dropped first.

    The directory must be on a file system every process that processes the
    visit sees (local disk for one machine's Prefect worker and Dask workers).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _stem(self, visit: int, detector: int) -> Path:
        return self.root / f"{int(visit)}_{int(detector)}"

    def _files(self, stem: Path) -> list[Path]:
        return [stem.with_name(stem.name + ext) for ext in (".json", *_ARROW_PARTS.values())]

    def _entries(self) -> list[tuple[float, Path, int]]:
        """(loaded_at, stem, bytes) of every complete entry, oldest first."""
        out = []
        for meta in self.root.glob("*_*.json"):
            try:
                info = json.loads(meta.read_text())
                stem = meta.with_suffix("")
                size = sum(f.stat().st_size for f in self._files(stem))
            except (OSError, ValueError):
                continue  # being taken or written by another process
            out.append((float(info["loaded_at"]), stem, size))
        return sorted(out, key=lambda e: e[0])

    def keys(self) -> list[tuple[int, int]]:
        """(visit, detector) of every complete entry, oldest first."""
        return [tuple(int(x) for x in stem.name.split("_")) for _, stem, _ in self._entries()]

    def _remove(self, stem: Path) -> None:
        for f in self._files(stem):
            f.unlink(missing_ok=True)

    def keep(self, entry: Preloaded, budget_bytes: int, max_age_s: float) -> tuple[bool, int]:
        """Write ``entry``; returns (kept within ``budget_bytes``, entries evicted)."""
        import pyarrow as pa
        import pyarrow.feather as feather

        self.root.mkdir(parents=True, exist_ok=True)
        stem = self._stem(entry.visit, entry.detector)
        self._remove(stem)
        tmp = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        size = 0
        object_columns = {}
        for attr, ext in _ARROW_PARTS.items():
            frame = getattr(entry, attr)
            object_columns[attr] = [c for c in frame.columns if frame[c].dtype == object]
            path = stem.with_name(stem.name + ext)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            feather.write_feather(table, f"{path}{tmp}", compression="uncompressed")
            os.replace(f"{path}{tmp}", path)
            size += path.stat().st_size
        meta = stem.with_name(stem.name + ".json")
        info = {
            "visit": entry.visit,
            "detector": entry.detector,
            "polygon_ra": entry.polygon.ra.tolist(),
            "polygon_dec": entry.polygon.dec.tolist(),
            "since_mjd": entry.since_mjd,
            "expected_mjd": entry.expected_mjd,
            "apdb_url": entry.apdb_url,
            "history_days": entry.history_days,
            "loaded_at": entry.loaded_at,
            "nbytes": size,
            # Arrow reads strings back as pandas' string dtype: these are cast back
            "object_columns": object_columns,
        }
        Path(f"{meta}{tmp}").write_text(json.dumps(info))
        os.replace(f"{meta}{tmp}", meta)
        if size > budget_bytes:
            self._remove(stem)
            return False, 0
        now = time.time()
        evicted = 0
        entries = self._entries()
        total = sum(n for _, _, n in entries)
        for loaded_at, old, n in entries:
            if old == stem:
                continue
            if total <= budget_bytes and now - loaded_at <= max_age_s:
                break
            self._remove(old)
            total -= n
            evicted += 1
        return True, evicted

    def take(self, visit: int, detector: int) -> Preloaded | None:
        """The entry of (visit, detector), removed from the directory; None if there is none."""
        import pyarrow.feather as feather

        stem = self._stem(visit, detector)
        meta = stem.with_name(stem.name + ".json")
        claimed = meta.with_name(f"{meta.name}.taken-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(meta, claimed)
        except FileNotFoundError:
            return None
        try:
            info = json.loads(claimed.read_text())
            frames = {}
            for attr, ext in _ARROW_PARTS.items():
                frame = feather.read_feather(stem.with_name(stem.name + ext))
                cols = info["object_columns"][attr]
                if cols:
                    frame = frame.astype(dict.fromkeys(cols, object))
                frames[attr] = frame
            return Preloaded(
                visit=int(info["visit"]),
                detector=int(info["detector"]),
                polygon=Polygon(info["polygon_ra"], info["polygon_dec"]),
                since_mjd=float(info["since_mjd"]),
                expected_mjd=float(info["expected_mjd"]),
                apdb_url=str(info["apdb_url"]),
                history_days=float(info["history_days"]),
                loaded_at=float(info["loaded_at"]),
                nbytes=int(info["nbytes"]),
                **frames,
            )
        except (OSError, ValueError, KeyError, InputError) as exc:
            log.warning("visit %s detector %s: preload file unreadable: %s", visit, detector, exc)
            return None
        finally:
            claimed.unlink(missing_ok=True)
            self._remove(stem)


#: The frames of a :class:`Preloaded` and the file ending each is kept under in a PreloadDir.
_ARROW_PARTS = {"objects": ".objects.arrow", "sources": ".sources.arrow"}


def _preload_dir(config: PipelineConfig) -> PreloadDir | None:
    where = config.orchestration.preload_dir
    return PreloadDir(where) if where else None


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
    spool = _preload_dir(config)
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
        if spool is None:
            evicted += _keep(entry, budget)
            kept_it = (nv.visit, det) in cached_preloads()
        else:
            kept_it, n = spool.keep(entry, budget, config.orchestration.preload_max_age_s)
            evicted += n
        if not kept_it:
            logger.warning(
                "visit %s detector %s: preload of %.1f MiB exceeds preload_cache_mb",
                nv.visit,
                det,
                entry.nbytes / 2**20,
            )
            skipped.append(det)
            continue
        done.append(entry)
    # a later detector may have evicted an earlier one
    kept = set(cached_preloads() if spool is None else spool.keys())
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


def _take(visit: int, detector: int, config: PipelineConfig) -> Preloaded | None:
    with _lock:
        entry = _cache.pop((int(visit), int(detector)), None)
    spool = _preload_dir(config)
    if entry is None and spool is not None:
        entry = spool.take(visit, detector)
    return entry


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
    entry = _take(visit.visit, detector, config)
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
