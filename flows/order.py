"""Store a night's overlapping visits in the order they were taken.

A detector of visit k that loads a sky region after a later visit k+1 stored
there is refused (:class:`core.errors.OutOfOrderError`: an alert may not
depend on a later visit), and a re-run is refused again, so its DiaSources
would never be stored. Visits processed at once (several runs of the
``visit-on-ready`` deployment, one Dask cluster) reach their loads in any
order. So before its first load a visit waits, for at most
``orchestration.wait_for_earlier_s``, until every *earlier, overlapping* visit
of its night under the same bundle root is stored:

* earlier: the same ``day_obs`` and a smaller ``seq_num`` (LSSTCam visit
  numbers ``day_obs·10⁵ + seq_num``, :mod:`core.ids`); the nearest
  :data:`NEAREST` such visits are looked at, as more cannot be in flight;
* overlapping: boresights closer than :data:`OVERLAP_DEG` (LSSTCam's field,
  9.6 deg², is ~3.5° across: two visits farther apart share no sky);
* delivered: ``visit.json`` is there and, under the completion contract,
  the bundle is complete (:mod:`core.completion`); a bundle still arriving is
  waited for too, as its visit will be processed;
* stored: the APDB holds a marker for each of its detectors.

Visit k+1 therefore loads once visit k has stored, while k still cuts,
packages and produces its alerts: the two overlap, and the APDB sees them in
order. An earlier visit that never completes (a detector that fails every
time, a bundle that is never finished) holds the later one back for the
whole wait; after it the later visit goes on, and the earlier one's
remaining detectors are refused when they come (logged). 0 turns the wait
off.
"""

from __future__ import annotations

import logging
import math
import time

import fsspec

from core.bundle import VisitInfo, read_visit_info
from core.completion import COMPLETE_FILE, check_complete
from core.ids import SEQ_NUM_RADIX
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
    night, seq = divmod(int(visit), SEQ_NUM_RADIX)
    if seq <= 1 or not fs.exists(path):
        return []
    found = []
    for p in fs.ls(path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.isdigit():
            v = int(name)
            if v // SEQ_NUM_RADIX == night and v < visit:
                found.append(v)
    return sorted(found)[-NEAREST:]


def unstored_earlier_visits(
    bundle_root: str, info: VisitInfo, config: PipelineConfig, apdb=None
) -> list[int]:
    """Earlier, overlapping visits of ``info``'s night with a detector not yet stored."""
    from flows.detector import get_apdb

    apdb = apdb or get_apdb(config)
    fs, _, (path,) = fsspec.get_fs_token_paths(bundle_root)
    out = []
    for v in _earlier_candidates(bundle_root, info.visit):
        folder = f"{path.rstrip('/')}/{v}"
        try:
            if not fs.exists(f"{folder}/visit.json"):
                continue
            other = read_visit_info(bundle_root, v)
        except Exception as exc:  # a visit.json still being written, or broken
            log.debug("visit %s: earlier visit %s not read: %s", info.visit, v, exc)
            continue
        sep = _separation_deg(
            info.boresightRa, info.boresightDec, other.boresightRa, other.boresightDec
        )
        if sep >= OVERLAP_DEG:
            continue
        if fs.exists(f"{folder}/{COMPLETE_FILE}") and check_complete(bundle_root, v) is None:
            out.append(v)  # still arriving: it will be processed
            continue
        if set(other.detectors) - apdb.done_detectors(v):
            out.append(v)
    return out


def wait_for_earlier_visits(
    bundle_root: str, info: VisitInfo, config: PipelineConfig, logger=log
) -> dict:
    """Wait until :func:`unstored_earlier_visits` is empty or the wait is over.

    Returns ``{"waited_s", "waited_for" (visits), "timed_out"}``.
    """
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
    while pending and time.monotonic() - t0 < limit:
        time.sleep(_POLL_S)
        pending = unstored_earlier_visits(bundle_root, info, config)
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
