"""One detector through every stage: the glue between the stage functions.

Each ``*_detector`` function runs one stage for one detector by calling the
pure stage function from :mod:`tasks` or :mod:`alerts`; the Prefect tasks in
:mod:`flows.stages` call them for a group of detectors. No science lives here:
only which inputs each stage gets.

Images are not passed between tasks (a detector's three images are ~12 MB in
the simulator, ~200 MB for LSSTCam): each stage that needs pixels gets the
bundle from :func:`get_bundle`, a per-process LRU cache within
``orchestration.bundle_cache_mb``, so threads share one read and a Dask worker
reads its own groups' bundles once. A group's summary task drops them.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from alerts.cutouts import make_cutouts
from alerts.packet import AlertBatch, package_alerts
from apdb import Apdb, Polygon, make_apdb
from apdb.config import ApdbConfig
from apdb.interface import StoreResult
from core.bundle import DetectorBundle, VisitInfo, read_detector_bundle
from core.errors import ApdbError, OutOfOrderError
from core.ids import IdPacker
from flows.config import PipelineConfig
from tasks.associate import Association, associate
from tasks.calibrate import calibrate
from tasks.forced import forced_photometry, objects_after_visit
from tasks.summarise import summarise

__all__ = [
    "Associated",
    "Loaded",
    "associate_detector",
    "calibrate_detector",
    "cutout_detector",
    "forced_detector",
    "get_apdb",
    "get_bundle",
    "load_detector",
    "package_detector",
    "recover_detector",
    "store_detector",
]

FOOTPRINT_PAD_ARCSEC = 2.0  # docs/design.md §4.1: the WCS polygon of the corners, padded by 2″
BBOX_GROW_PX = 10.0  # docs/design.md §4.1: objects outside the bbox grown by 10 px are dropped

_bundles: OrderedDict[tuple, tuple[DetectorBundle, int]] = OrderedDict()
_bundles_lock = threading.Lock()


def bundle_nbytes(bundle: DetectorBundle) -> int:
    """Bytes of a bundle's pixel planes (what the cache budget counts)."""
    total = 0
    for e in (bundle.difference, bundle.science, bundle.template):
        total += e.image.nbytes + e.mask.nbytes + e.variance.nbytes + e.psf.nbytes
    return total


def get_bundle(
    root: str, visit: VisitInfo, detector: int, config: PipelineConfig
) -> DetectorBundle:
    """The detector's bundle, read once per process while it fits the cache budget.

    The cache keeps the most recently used bundles within
    ``orchestration.bundle_cache_mb`` (always at least the newest one). A
    group's stages use its bundles one stage after another, so the budget must
    hold the groups a process works on at once, or every later stage reads the
    files again (correct, only slower).
    """
    key = (root, visit.visit, int(detector), config.reader)
    with _bundles_lock:
        if key in _bundles:
            _bundles.move_to_end(key)
            return _bundles[key][0]
    bundle = read_detector_bundle(
        root, visit.visit, detector, visit_info=visit, config=config.reader
    )
    budget = config.orchestration.bundle_cache_mb * 2**20
    with _bundles_lock:
        _bundles[key] = (bundle, bundle_nbytes(bundle))
        total = sum(n for _, n in _bundles.values())
        while total > budget and len(_bundles) > 1:
            _, (_, n) = _bundles.popitem(last=False)
            total -= n
    return bundle


def forget_bundles(visit: int | None = None, detectors=None) -> None:
    """Drop cached bundles: all of them, or those of ``detectors`` of ``visit``."""
    with _bundles_lock:
        if visit is None:
            _bundles.clear()
            return
        dets = {int(d) for d in detectors or ()}
        for key in [k for k in _bundles if k[1] == int(visit) and k[2] in dets]:
            del _bundles[key]


@functools.lru_cache(maxsize=8)
def _apdb(config: ApdbConfig) -> Apdb:
    return make_apdb(config)


def get_apdb(config: PipelineConfig) -> Apdb:
    """The APDB client for this process, built from config (one per URL)."""
    return _apdb(config.apdb)


@dataclass(frozen=True, eq=False)
class Loaded:
    """What the APDB held for a detector before this visit."""

    objects: pd.DataFrame
    sources: pd.DataFrame
    forced: pd.DataFrame
    n_in_region: int
    n_outside_bbox: int


@dataclass(frozen=True, eq=False)
class Associated:
    """Association result and the DiaObjects it touched, summarised."""

    association: Association
    objects: pd.DataFrame  # new and updated DiaObjects (SDM columns)
    all_objects: pd.DataFrame  # every DiaObject on the detector after this visit (OBJECT_COLUMNS)


def footprint(bundle: DetectorBundle) -> Polygon:
    """Sky polygon of the detector's pixel-edge corners, every edge padded outward by 2″."""
    ny, nx = bundle.difference.shape
    corners = np.array([[-0.5, -0.5], [nx - 0.5, -0.5], [nx - 0.5, ny - 0.5], [-0.5, ny - 0.5]])
    ra, dec = bundle.difference.wcs.all_pix2world(corners, 0).T
    return Polygon(ra, dec).padded(FOOTPRINT_PAD_ARCSEC)


def _in_bbox(bundle: DetectorBundle, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    if len(ra) == 0:
        return np.zeros(0, bool)
    ny, nx = bundle.difference.shape
    x, y = bundle.difference.wcs.all_world2pix(ra, dec, 0)
    g = BBOX_GROW_PX
    return (x >= -0.5 - g) & (x <= nx - 0.5 + g) & (y >= -0.5 - g) & (y <= ny - 0.5 + g)


def load_detector(root: str, visit: VisitInfo, detector: int, config: PipelineConfig) -> Loaded:
    """Stage 1: DiaObjects in the footprint and their 12-month history before the visit.

    History is bounded on both sides: ``visit - history_days <= midpointMjdTai <
    visit``, so an alert is a function of the visit and what came before it
    (recovery reads the same window, :func:`recover_detector`).

    Raises
    ------
    OutOfOrderError
        The footprint already holds DiaSources or DiaForcedSources of a later
        visit: the DiaObjects loaded would include that visit, so the alerts
        and the stored object versions would differ from those of processing
        in time order. Visits of one sky area must be processed in time order.
    """
    from flows.preload import load_from_preload  # flows.preload imports this module

    preloaded = load_from_preload(root, visit, detector, config)
    if preloaded is not None:
        return preloaded
    bundle = get_bundle(root, visit, detector, config)
    apdb = get_apdb(config)
    objects = apdb.get_objects(footprint(bundle))
    n_region = len(objects)
    keep = _in_bbox(bundle, objects["ra"].to_numpy(), objects["dec"].to_numpy())
    objects = objects[keep].reset_index(drop=True)
    ids = objects["diaObjectId"].to_numpy()
    since = apdb.history_start(visit.midpointMjdTai)
    sources = apdb.get_sources(ids, since)
    forced = apdb.get_forced_sources(ids, since)
    _refuse_later_visits(visit, detector, sources, forced)
    t = visit.midpointMjdTai
    return Loaded(
        objects=objects,
        sources=sources[sources["midpointMjdTai"].to_numpy() < t].reset_index(drop=True),
        forced=forced[forced["midpointMjdTai"].to_numpy() < t].reset_index(drop=True),
        n_in_region=n_region,
        n_outside_bbox=int(n_region - keep.sum()),
    )


def _refuse_later_visits(
    visit: VisitInfo, detector: int, sources: pd.DataFrame, forced: pd.DataFrame
) -> None:
    """Raise :class:`OutOfOrderError` when the history holds rows after the visit."""
    t = visit.midpointMjdTai
    later = []
    for name, df in (("DiaSource", sources), ("DiaForcedSource", forced)):
        mjd = df["midpointMjdTai"].to_numpy(dtype=float)
        after = mjd > t
        if after.any():
            visits = sorted(int(v) for v in np.unique(df["visit"].to_numpy()[after]))
            later.append(
                f"{int(after.sum())} {name} row(s) of visit(s) {visits[:5]} "
                f"(up to MJD {mjd[after].max():.5f})"
            )
    if later:
        raise OutOfOrderError(
            f"visit {visit.visit} (MJD {t:.5f}) detector {detector}: the APDB already holds "
            f"{' and '.join(later)} of DiaObjects in this footprint. Visits of one sky area "
            f"must be processed in time order: the DiaObjects now in the APDB include those "
            f"later visits, so this visit's alerts and object versions would differ from "
            f"an in-order run"
        )


def calibrate_detector(
    root: str, visit: VisitInfo, detector: int, config: PipelineConfig, time_mjd: float
) -> pd.DataFrame:
    """Stage 2: instrumental catalog → APDB DiaSource rows."""
    bundle = get_bundle(root, visit, detector, config)
    return calibrate(
        bundle.sources,
        bundle,
        config.calibrate,
        id_packer=IdPacker(config.ids),
        time_processed_mjd=time_mjd,
    )


def associate_detector(
    loaded: Loaded, calibrated: pd.DataFrame, config: PipelineConfig, time_mjd: float
) -> Associated:
    """Stage 3 and 4: associate, then summarise every touched DiaObject."""
    assoc = associate(calibrated, loaded.objects, config.association)
    updated = summarise(
        loaded.objects,
        loaded.sources,
        assoc.sources,
        config.summary,
        time_mjd=time_mjd,
        forced_sources=loaded.forced,
    )
    all_objects = objects_after_visit(loaded.objects, updated)
    return Associated(association=assoc, objects=updated, all_objects=all_objects)


def forced_detector(
    root: str,
    visit: VisitInfo,
    detector: int,
    config: PipelineConfig,
    associated: Associated,
    time_mjd: float,
) -> pd.DataFrame:
    """Stage 5: forced photometry of every eligible DiaObject on the detector."""
    bundle = get_bundle(root, visit, detector, config)
    result = forced_photometry(
        associated.all_objects,
        bundle,
        config.forced,
        id_packer=IdPacker(config.ids),
        time_processed_mjd=time_mjd,
    )
    return result.sources


def store_detector(
    visit: VisitInfo,
    detector: int,
    config: PipelineConfig,
    associated: Associated,
    forced: pd.DataFrame,
    time_mjd: float,
) -> StoreResult:
    """Stage 6: one transaction with the (visit, detector) marker; idempotent."""
    return get_apdb(config).store(
        visit.visit,
        detector,
        associated.objects,
        associated.association.sources,
        forced,
        time_mjd=time_mjd,
    )


def cutout_detector(
    root: str, visit: VisitInfo, detector: int, config: PipelineConfig, associated: Associated
) -> dict:
    """Stage 7: three stamps per new DiaSource."""
    bundle = get_bundle(root, visit, detector, config)
    return make_cutouts(associated.association.sources, bundle, config.cutouts)


def package_detector(
    visit: VisitInfo,
    detector: int,
    config: PipelineConfig,
    loaded: Loaded,
    associated: Associated,
    forced: pd.DataFrame,
    cutouts: dict,
) -> AlertBatch:
    """Stage 8: one Avro alert per new DiaSource."""
    history_forced = (
        pd.concat([loaded.forced, forced], ignore_index=True) if len(forced) else loaded.forced
    )
    return package_alerts(
        associated.association.sources.sort_values("diaSourceId"),
        associated.objects,
        loaded.sources,
        history_forced,
        cutouts,
        visit,
        config.packaging,
        detector=detector,
    )


def recover_detector(
    root: str, visit: VisitInfo, detector: int, config: PipelineConfig
) -> AlertBatch:
    """Rebuild a stored detector's alerts from the APDB (stages 7-8 only).

    Used when the (visit, detector) marker is in the APDB but its alerts never
    went out (the process died between the store and the produce). What this
    store committed is read back, so the payloads are byte-identical to the
    first ones even after later visits of the same sky area were stored:

    * the stored DiaSources of this (visit, detector);
    * their DiaObjects *as committed by this store*: the ``DiaObject`` version
      whose ``validityStartMjdTai`` is the marker's (open then, so its
      ``validityEndMjdTai`` is null), not the latest version;
    * their DiaSource history before the visit, and their DiaForcedSources
      before the visit plus the ones this detector stored, in the same
      ``history_days`` window as :func:`load_detector`.

    Association is not re-run against a database that already holds this visit.
    """
    bundle = get_bundle(root, visit, detector, config)
    apdb = get_apdb(config)
    t = visit.midpointMjdTai
    region_objects = apdb.get_objects(footprint(bundle))
    since = apdb.history_start(t)
    sources = apdb.get_sources(region_objects["diaObjectId"].to_numpy(), since)
    mine = (sources["visit"] == visit.visit) & (sources["detector"] == detector)
    new = sources[mine].sort_values("diaSourceId").reset_index(drop=True)
    obj_ids = new["diaObjectId"].dropna().astype("int64").to_numpy()
    history = sources[sources["diaObjectId"].isin(obj_ids) & (sources["midpointMjdTai"] < t)]
    forced = apdb.get_forced_sources(obj_ids, since)
    own = (forced["visit"] == visit.visit) & (forced["detector"] == detector)
    forced = forced[(forced["midpointMjdTai"] < t) | own]
    objects = _committed_objects(apdb, visit, detector, obj_ids)
    cutouts = make_cutouts(new, bundle, config.cutouts)
    return package_alerts(
        new, objects, history, forced, cutouts, visit, config.packaging, detector=detector
    )


def _committed_objects(apdb: Apdb, visit: VisitInfo, detector: int, obj_ids) -> pd.DataFrame:
    """The DiaObject versions the store of (visit, detector) wrote, as it wrote them."""
    markers = apdb.visit_summary(visit.visit)
    row = markers[markers["detector"] == int(detector)]
    if row.empty:
        raise ApdbError(f"visit {visit.visit} detector {detector}: no marker in the APDB")
    start = float(row["validityStartMjdTai"].iloc[0])
    versions = apdb.get_object_history(obj_ids)
    objects = versions[versions["validityStartMjdTai"] == start].copy()
    missing = sorted(set(obj_ids.tolist()) - set(objects["diaObjectId"].tolist()))
    if missing:
        raise ApdbError(
            f"visit {visit.visit} detector {detector}: DiaObject {missing[:5]} has no version "
            f"with validityStartMjdTai = {start} (the marker's store time)"
        )
    # The version was open when it was committed; a later visit may have closed it since.
    objects["validityEndMjdTai"] = np.nan
    return objects.reset_index(drop=True)
