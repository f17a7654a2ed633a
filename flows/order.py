"""Store a night's overlapping visits in the order they were taken.

A detector of visit k that loads a sky region after a later visit k+1 stored
there is refused (:class:`core.errors.OutOfOrderError`: an alert may not
depend on a later visit), and a re-run is refused again, so its DiaSources
would never be stored. Visits processed at once (several runs of the
``visit-on-ready`` deployment, one Dask cluster) reach their loads in any
order. So before its first load a visit waits, for at most
``orchestration.wait_for_earlier_s`` (*W*), until every *earlier, overlapping,
recent* visit under the same bundle root is stored:

* earlier: a smaller visit number (LSSTCam numbers ``day_obs·10⁵ + seq_num``
  grow with time, :mod:`core.ids`); the nearest :data:`NEAREST` such visits
  are looked at, as more cannot be in flight;
* overlapping: boresights closer than :data:`OVERLAP_DEG` (LSSTCam's field,
  9.6 deg², is ~3.5° across: two visits farther apart share no sky);
* recent: delivered under the completion contract (:mod:`core.completion`:
  the watcher's and the simulator's bundles) at most *W* before this visit's
  own bundle was complete (a bundle still arriving counts from its marker;
  this visit, without a marker, from now). Arrivals are compared with each
  other, not with the clock, so a backlog does not make an earlier visit
  look abandoned. One that arrived longer before failed or was abandoned
  and is not waited for, so a detector that fails every time holds back
  only the visits that arrive within *W* after it; a bundle without a
  marker has no arrival time and is not waited for;
* not stored: the APDB lacks the marker of one of its detectors.

Visit k+1 therefore loads once visit k has stored, while k still cuts,
packages and produces its alerts: the two overlap, and the APDB sees them in
order. After the wait the later visit goes on; an earlier one's detectors
that load after it stored are refused (logged). 0 turns the wait off.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime

import fsspec

from core.bundle import VisitInfo, read_visit_info
from core.completion import COMPLETE_FILE, check_complete
from flows.config import PipelineConfig

__all__ = ["NEAREST", "OVERLAP_DEG", "unstored_earlier_visits", "wait_for_earlier_visits"]

log = logging.getLogger(__name__)

#: Boresights closer than this (deg) may share sky (LSSTCam: ~3.5° field).
OVERLAP_DEG = 3.5
#: How many of the nearest earlier visits of the night are looked at.
NEAREST = 8
_POLL_S = 0.5


def _separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def _earlier_candidates(bundle_root: str, visit: int) -> list[int]:
    fs, _, (path,) = fsspec.get_fs_token_paths(bundle_root)
    if not fs.exists(path):
        return []
    found = []
    for p in fs.ls(path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.isdigit() and int(name) < visit:
            found.append(int(name))
    return sorted(found)[-NEAREST:]


def _modified(fs, path: str) -> datetime:
    modified = fs.modified(path)
    return modified if modified.tzinfo is not None else modified.replace(tzinfo=UTC)


def unstored_earlier_visits(
    bundle_root: str, info: VisitInfo, config: PipelineConfig, apdb=None
) -> list[int]:
    """Earlier, overlapping, recent visits under the root with a detector not yet stored."""
    from flows.detector import get_apdb

    apdb = apdb or get_apdb(config)
    limit = config.orchestration.wait_for_earlier_s
    fs, _, (path,) = fsspec.get_fs_token_paths(bundle_root)
    try:  # arrivals are compared with this visit's own, so a backlog does not age them
        mine = check_complete(bundle_root, info.visit)
    except Exception:
        mine = None
    arrived = mine.completed_at if mine is not None else datetime.now(UTC)
    out = []
    for v in _earlier_candidates(bundle_root, info.visit):
        folder = f"{path.rstrip('/')}/{v}"
        try:
            if not fs.exists(f"{folder}/visit.json"):
                continue
            other = read_visit_info(bundle_root, v)
            sep = _separation_deg(
                info.boresightRa, info.boresightDec, other.boresightRa, other.boresightDec
            )
            if sep >= OVERLAP_DEG or not set(other.detectors) - apdb.done_detectors(v):
                continue
            marker = f"{folder}/{COMPLETE_FILE}"
            if not fs.exists(marker):
                continue  # delivered outside the completion contract: no arrival time
            done = check_complete(bundle_root, v)
            theirs = _modified(fs, marker) if done is None else done.completed_at
            age = (arrived - theirs).total_seconds()
        except Exception as exc:  # a visit.json or marker still being written, or broken
            log.debug("visit %s: earlier visit %s not read: %s", info.visit, v, exc)
            continue
        if age <= limit:  # older: failed or abandoned long ago, not in flight
            out.append(v)
    return out


def wait_for_earlier_visits(
    bundle_root: str, info: VisitInfo, config: PipelineConfig, logger=log
) -> dict:
    """Wait until the visits :func:`unstored_earlier_visits` gives now are stored, or the wait is over.

    Returns ``{"waited_s", "waited_for" (visits), "timed_out"}``.
    """
    from flows.detector import get_apdb

    limit = config.orchestration.wait_for_earlier_s
    t0 = time.monotonic()
    if limit <= 0:
        return {"waited_s": 0.0, "waited_for": [], "timed_out": False}
    first = pending = unstored_earlier_visits(bundle_root, info, config)
    if pending:
        logger.info(
            "visit %s: waiting for earlier overlapping visit(s) %s to be stored",
            info.visit,
            pending,
        )
    apdb = get_apdb(config)
    wanted = {v: set(read_visit_info(bundle_root, v).detectors) for v in pending}
    while pending and time.monotonic() - t0 < limit:
        time.sleep(_POLL_S)
        pending = [v for v in pending if wanted[v] - apdb.done_detectors(v)]
    waited = round(time.monotonic() - t0, 3)
    if pending:
        logger.warning(
            "visit %s: earlier visit(s) %s still not stored after %.0f s; going on (their "
            "detectors that load after this visit stores are refused)",
            info.visit,
            pending,
            waited,
        )
    elif first:
        logger.info("visit %s: earlier visits stored after %.1f s", info.visit, waited)
    return {"waited_s": waited, "waited_for": first, "timed_out": bool(pending)}
