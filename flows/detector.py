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
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from alerts.cutouts import make_cutouts
from alerts.packet import AlertBatch, package_alerts
from alerts.store import write_qa_sources
from apdb import Apdb, Polygon, make_apdb
from apdb.config import ApdbConfig
from apdb.interface import RegionGuard, StoreResult
from core.bundle import DetectorBundle, VisitInfo, detector_path, read_detector_bundle, visit_path
from core.errors import ApdbError, InputError, OutOfOrderError, StaleLoadError
from core.ids import IdPacker
from flows.config import PipelineConfig
from tasks.associate import Association, associate
from tasks.calibrate import calibrate
from tasks.forced import forced_photometry, objects_after_visit
from tasks.sourcefilters import FilteredSources, filter_sources, good_dia_object_ids
from tasks.ssoassociate import SsoAssociation, associate_solar_system
from tasks.summarise import summarise

__all__ = [
    "EPHEMERIS_FILE",
    "Associated",
    "Loaded",
    "Prefiltered",
    "Stored",
    "associate_detector",
    "calibrate_detector",
    "cutout_detector",
    "forced_detector",
    "get_apdb",
    "get_bundle",
    "load_detector",
    "package_detector",
    "prefilter_detector",
    "read_ephemerides",
    "recover_detector",
    "store_detector",
    "store_guarded",
]

#: The ephemeris table of known solar-system objects (docs/solar-system.md): per detector
#: ``{root}/{visit}/{detector}/ephemerides.parquet`` when present, else per visit
#: ``{root}/{visit}/ephemerides.parquet``; neither: no solar-system association.
EPHEMERIS_FILE = "ephemerides.parquet"

FOOTPRINT_PAD_ARCSEC = 2.0  # docs/design.md §4.1: the WCS polygon of the corners, padded by 2″
BBOX_GROW_PX = 10.0  # docs/design.md §4.1: objects outside the bbox grown by 10 px are dropped

#: Times a detector is loaded and associated again when its guarded store finds that
#: another visit stored into its footprint first (:func:`store_guarded`).
MAX_REASSOCIATIONS = 3

_LOG = logging.getLogger(__name__)

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


#: Every client :func:`_apdb` has made and not yet closed (for :func:`close_apdbs`).
_opened: list[Apdb] = []


@functools.lru_cache(maxsize=8)
def _apdb(config: ApdbConfig) -> Apdb:
    apdb = make_apdb(config)
    _opened.append(apdb)
    return apdb


def get_apdb(config: PipelineConfig) -> Apdb:
    """The APDB client for this process, built from config (one per URL)."""
    return _apdb(config.apdb)


def close_apdbs() -> None:
    """Close this process's APDB clients; the next :func:`get_apdb` opens a new one.

    For a database replaced under the same URL (a SQLite file restored or copied
    over: an open connection would go on reading the old, unlinked file).
    """
    for apdb in _opened:  # lru_cache does not expose its values
        apdb.close()
    _opened.clear()
    _apdb.cache_clear()


@dataclass(frozen=True, eq=False)
class Loaded:
    """What the APDB held for a detector before this visit."""

    objects: pd.DataFrame
    sources: pd.DataFrame
    forced: pd.DataFrame
    n_in_region: int
    n_outside_bbox: int
    #: The footprint's DiaObject versions as read (before the bbox cut), checked at store.
    guard: RegionGuard | None = None


@dataclass(frozen=True, eq=False)
class Prefiltered:
    """The source filters and solar-system association, before DIA association."""

    filtered: FilteredSources  # kept / unreliable / long-trailed sources
    solar: SsoAssociation  # solar-system matches of the kept sources, and the rest


@dataclass(frozen=True, eq=False)
class Associated:
    """Association result and the DiaObjects it touched, summarised."""

    association: Association
    objects: pd.DataFrame  # new and updated DiaObjects (SDM columns)
    all_objects: pd.DataFrame  # every DiaObject on the detector after this visit (OBJECT_COLUMNS)
    prefiltered: Prefiltered | None = None

    @property
    def new_sources(self) -> pd.DataFrame:
        """Every DiaSource this detector stores and alerts on: DIA and solar-system, by id."""
        dia = self.association.sources
        sso = self.prefiltered.solar.sso_sources if self.prefiltered is not None else None
        if sso is None or len(sso) == 0:
            return dia.sort_values("diaSourceId")
        return pd.concat([dia, sso], ignore_index=True).sort_values("diaSourceId")

    @property
    def ss_sources(self) -> pd.DataFrame | None:
        """SDM ``SSSource`` rows of the solar-system sources (None without the stage)."""
        return self.prefiltered.solar.ss_sources if self.prefiltered is not None else None

    @property
    def orbits(self) -> pd.DataFrame | None:
        """Ephemeris rows (orbit record included) of the matched solar-system objects."""
        return self.prefiltered.solar.orbits if self.prefiltered is not None else None


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
    region = footprint(bundle)
    objects = apdb.get_objects(region)
    guard = RegionGuard.of(region, objects)
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
        sources=_before(sources, t),
        forced=_before(forced, t),
        n_in_region=n_region,
        n_outside_bbox=int(n_region - keep.sum()),
        guard=guard,
    )


def _before(history: pd.DataFrame, t: float) -> pd.DataFrame:
    """The rows of ``history`` with ``midpointMjdTai < t``; the frame itself when that is all.

    A load's history ends before its visit, so the copy of a ~100-column frame that
    a selection makes is only paid when a row is dropped.
    """
    keep = history["midpointMjdTai"].to_numpy() < t
    if keep.all():
        return history
    return history[keep].reset_index(drop=True)


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


_ephemeris_cache: OrderedDict[tuple[str, str], pd.DataFrame] = OrderedDict()
_ephemeris_lock = threading.Lock()


def ephemeris_url(root: str, visit: int, detector: int) -> str | None:
    """The ephemeris file that applies to a detector (per-detector first), or None."""
    import fsspec

    fs, _, _ = fsspec.get_fs_token_paths(root)
    for url in (
        f"{detector_path(root, visit, detector)}/{EPHEMERIS_FILE}",
        f"{visit_path(root, visit)}/{EPHEMERIS_FILE}",
    ):
        if fs.exists(fsspec.core.strip_protocol(url)):
            return url
    return None


def read_ephemerides(root: str, visit: int, detector: int) -> tuple[pd.DataFrame | None, str]:
    """The detector's ephemeris table and its URL; ``(None, "")`` when there is none.

    A per-visit table is read once per process while its file is unchanged
    (keyed by URL and the file's fsspec ``ukey``); its validation
    (:func:`tasks.ssoassociate.associate_solar_system`) runs per detector.

    Raises
    ------
    InputError
        The file exists but is not a readable parquet table.
    """
    import fsspec

    url = ephemeris_url(root, visit, detector)
    if url is None:
        return None, ""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        key = (url, str(fs.ukey(path)))
    except (OSError, ValueError):
        key = None
    if key is not None:
        with _ephemeris_lock:
            if key in _ephemeris_cache:
                _ephemeris_cache.move_to_end(key)
                return _ephemeris_cache[key], url
    try:
        with fs.open(path, "rb") as f:
            table = pd.read_parquet(f)
    except FileNotFoundError:
        return None, ""
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise InputError(
            f"{url}: not a readable parquet table ({type(exc).__name__}: {exc})"
        ) from exc
    if key is not None:
        with _ephemeris_lock:
            _ephemeris_cache[key] = table
            while len(_ephemeris_cache) > 4:
                _ephemeris_cache.popitem(last=False)
    return table, url


def prefilter_detector(
    root: str, visit: VisitInfo, detector: int, config: PipelineConfig, calibrated: pd.DataFrame
) -> Prefiltered:
    """Stage 3a: Rubin's source filters, then association with known solar-system objects.

    The reliability cut and the long-trail cut (:func:`tasks.sourcefilters.filter_sources`)
    come first, as in Rubin's ``DiaPipelineTask``; the kept sources are matched to
    the ephemeris table's predictions on the detector
    (:func:`tasks.ssoassociate.associate_solar_system`); the rest go on to DIA
    association. No ephemeris file: no solar-system association.
    """
    filtered = filter_sources(calibrated, visit.exposureTime, config.source_filters)
    ephemerides, url = (None, "")
    if config.solar_system.do_solar_system_association:
        ephemerides, url = read_ephemerides(root, visit.visit, detector)
    if ephemerides is None:
        solar = associate_solar_system(filtered.sources, None, None, (0, 0), config.solar_system)
    else:
        bundle = get_bundle(root, visit, detector, config)
        solar = associate_solar_system(
            filtered.sources,
            ephemerides,
            bundle.difference.wcs,
            bundle.difference.shape,
            config.solar_system,
            ephemeris_file=url,
        )
    return Prefiltered(filtered=filtered, solar=solar)


def associate_detector(
    loaded: Loaded,
    calibrated: pd.DataFrame | Prefiltered,
    config: PipelineConfig,
    time_mjd: float,
) -> Associated:
    """Stage 3b and 4: associate with DiaObjects, then summarise every touched DiaObject.

    ``calibrated`` is the :class:`Prefiltered` result (its sources not matched to
    a solar-system object go on) or, without the filters, the calibrated sources.
    """
    pre = calibrated if isinstance(calibrated, Prefiltered) else None
    sources = pre.solar.sources if pre is not None else calibrated
    assoc = associate(sources, loaded.objects, config.association)
    updated = summarise(
        loaded.objects,
        loaded.sources,
        assoc.sources,
        config.summary,
        time_mjd=time_mjd,
        forced_sources=loaded.forced,
    )
    all_objects = objects_after_visit(loaded.objects, updated)
    return Associated(association=assoc, objects=updated, all_objects=all_objects, prefiltered=pre)


def good_objects(loaded: Loaded, associated: Associated, config: PipelineConfig) -> pd.DataFrame:
    """The DiaObjects forced photometry measures: Rubin's good-DiaObject rule.

    A DiaObject qualifies with at least ``min_good_sources`` good DiaSources
    among its loaded history (the ``history_days`` window) and this visit's
    sources (:func:`tasks.sourcefilters.good_dia_object_ids`). Off
    (``do_select_good_dia_objects``): every DiaObject on the detector.
    """
    objects = associated.all_objects
    if not config.source_filters.do_select_good_dia_objects or len(objects) == 0:
        return objects
    cols = ["diaObjectId", "reliability", "trailLength", "glint_trail", "isDipole"]
    parts = [
        df[[c for c in cols if c in df.columns]]
        for df in (loaded.sources, associated.association.sources)
        if len(df)
    ]
    if not parts:
        return objects.iloc[:0]
    good = good_dia_object_ids(pd.concat(parts, ignore_index=True), config.source_filters)
    ids = objects["diaObjectId"].to_numpy(dtype=np.int64)
    return objects[np.isin(ids, good)].reset_index(drop=True)


def forced_detector(
    root: str,
    visit: VisitInfo,
    detector: int,
    config: PipelineConfig,
    associated: Associated,
    time_mjd: float,
    objects: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Stage 5: forced photometry of every eligible DiaObject on the detector.

    ``objects``: the DiaObjects to measure (default: every one on the detector,
    ``associated.all_objects``); the flow passes :func:`good_objects`.
    """
    bundle = get_bundle(root, visit, detector, config)
    result = forced_photometry(
        associated.all_objects if objects is None else objects,
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
    guard: RegionGuard | None = None,
) -> StoreResult:
    """Stage 6: one transaction with the (visit, detector) marker; idempotent.

    DIA and solar-system DiaSources, their ``SSSource`` rows, the DiaObjects and
    the DiaForcedSources go in together. ``guard``: see :func:`store_guarded`.
    """
    return get_apdb(config).store(
        visit.visit,
        detector,
        associated.objects,
        associated.new_sources,
        forced,
        time_mjd=time_mjd,
        ss_sources=associated.ss_sources,
        guard=guard,
    )


@dataclass(frozen=True, eq=False)
class Stored:
    """What the guarded store of one detector did, and the association it stored."""

    result: StoreResult
    reassociations: int = 0  # times load, association and forced photometry were redone
    associated: Associated | None = None  # the association stored; None once not needed

    @property
    def already_stored(self) -> bool:
        """The (visit, detector) had been stored before: nothing was written."""
        return self.result.already_stored

    @property
    def alerts_from_apdb(self) -> bool:
        """The alerts must be rebuilt from what was committed (:func:`recover_detector`).

        True when the detector was stored before, or when what was stored is a
        re-made association, not the one the cutout and package stages see.
        """
        return self.result.already_stored or self.reassociations > 0


def store_guarded(
    root: str,
    visit: VisitInfo,
    detector: int,
    config: PipelineConfig,
    loaded: Loaded,
    associated: Associated,
    forced: pd.DataFrame,
    time_mjd: float,
) -> Stored:
    """Stage 6 for two visits of one sky area processed at once: store, re-associating if stale.

    The store checks, under a lock on the footprint's sky pixels and in its
    transaction, that the footprint's DiaObjects are still those ``loaded``
    read (:class:`apdb.interface.RegionGuard`). When visit k+1 loaded before an
    overlapping visit k stored, that check fails at k+1's store, nothing of
    k+1's detector is written, and its load, association and forced photometry
    are run again against the APDB that now holds visit k (at most
    :data:`MAX_REASSOCIATIONS` times): k+1's sources join the DiaObjects k
    created or updated instead of creating second ones, and its alerts carry k
    in their history. The caller rebuilds the alerts from what was committed
    (:attr:`Stored.alerts_from_apdb`), so each DiaSource is stored and alerted
    once. DiaObjects written by other detectors of the same visit run (same
    ``time_mjd``) are not a conflict.

    Which of two overlapping visits stores first is not fixed: when the later
    visit stored first, the earlier one's re-load finds the later visit's
    sources and its detector fails with :class:`~core.errors.OutOfOrderError`
    (nothing stored; the visit's other detectors go on).

    Raises
    ------
    StaleLoadError
        The footprint changed again after each of the re-associations, or the
        association was made without the source-filter stage (no
        :class:`Prefiltered` to re-associate from).
    """
    guard = loaded.guard
    for n in range(MAX_REASSOCIATIONS + 1):
        try:
            result = store_detector(
                visit, detector, config, associated, forced, time_mjd, guard=guard
            )
            return Stored(result=result, reassociations=n, associated=associated)
        except StaleLoadError as exc:
            if n == MAX_REASSOCIATIONS or associated.prefiltered is None:
                raise
            _LOG.warning("%s; re-associating (%d of %d)", exc, n + 1, MAX_REASSOCIATIONS)
        loaded = load_detector(root, visit, detector, config)
        guard = loaded.guard
        associated = associate_detector(loaded, associated.prefiltered, config, time_mjd)
        good = good_objects(loaded, associated, config)
        forced = forced_detector(root, visit, detector, config, associated, time_mjd, objects=good)
    raise AssertionError("unreachable")  # the loop returns or raises


def write_qa_detector(
    visit: VisitInfo, detector: int, config: PipelineConfig, associated: Associated
) -> int:
    """The detector's QA source tables beside its alerts (``output.do_write_qa_sources``).

    ``marginal``: unassociated sources failing the new-object cut;
    ``trailed``: the long-trailed sources set aside before association.
    Written before the store, so a stored detector always has them; a re-run
    rewrites them whole. Returns the number of tables written.
    """
    out = config.output
    if not out.do_write_qa_sources:
        return 0
    pre = associated.prefiltered
    tables = {"marginal": associated.association.rejected}
    if pre is not None:
        tables["trailed"] = pre.filtered.trailed
    for kind, frame in tables.items():
        write_qa_sources(
            out.store.location,
            visit.visit,
            detector,
            kind,
            frame,
            dict(out.store.storage_options),
        )
    return len(tables)


def cutout_detector(
    root: str, visit: VisitInfo, detector: int, config: PipelineConfig, associated: Associated
) -> dict:
    """Stage 7: three stamps per new DiaSource (solar-system ones included)."""
    bundle = get_bundle(root, visit, detector, config)
    return make_cutouts(associated.new_sources, bundle, config.cutouts)


def package_detector(
    visit: VisitInfo,
    detector: int,
    config: PipelineConfig,
    loaded: Loaded,
    associated: Associated,
    forced: pd.DataFrame,
    cutouts: dict,
) -> AlertBatch:
    """Stage 8: one Avro alert per new DiaSource.

    A solar-system source's alert carries ``ssSource`` and ``mpc_orbits``, a null
    ``diaObject`` and no history.
    """
    history_forced = (
        pd.concat([loaded.forced, forced], ignore_index=True) if len(forced) else loaded.forced
    )
    return package_alerts(
        associated.new_sources,
        associated.objects,
        loaded.sources,
        history_forced,
        cutouts,
        visit,
        config.packaging,
        detector=detector,
        ss_sources=associated.ss_sources,
        orbits=associated.orbits,
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
      ``history_days`` window as :func:`load_detector`;
    * the solar-system DiaSources of this (visit, detector) (``diaObjectId`` 0,
      ``ssObjectId`` set), their stored ``SSSource`` rows and, for
      ``mpc_orbits``, the orbit rows of the ephemeris file the visit read.

    Association is not re-run against a database that already holds this visit.
    """
    bundle = get_bundle(root, visit, detector, config)
    apdb = get_apdb(config)
    t = visit.midpointMjdTai
    region_objects = apdb.get_objects(footprint(bundle))
    since = apdb.history_start(t)
    sources = apdb.get_sources(region_objects["diaObjectId"].to_numpy(), since)
    mine = (sources["visit"] == visit.visit) & (sources["detector"] == detector)
    new = sources[mine]
    sso, ss_sources, orbits = _committed_solar_system(root, apdb, visit, detector, since)
    if len(sso):
        new = pd.concat([new, sso], ignore_index=True)
    new = new.sort_values("diaSourceId").reset_index(drop=True)
    obj_ids = new["diaObjectId"].dropna().astype("int64").to_numpy()
    obj_ids = obj_ids[obj_ids != 0]
    history = sources[sources["diaObjectId"].isin(obj_ids) & (sources["midpointMjdTai"] < t)]
    forced = apdb.get_forced_sources(obj_ids, since)
    own = (forced["visit"] == visit.visit) & (forced["detector"] == detector)
    forced = forced[(forced["midpointMjdTai"] < t) | own]
    objects = _committed_objects(apdb, visit, detector, obj_ids)
    cutouts = make_cutouts(new, bundle, config.cutouts)
    return package_alerts(
        new,
        objects,
        history,
        forced,
        cutouts,
        visit,
        config.packaging,
        detector=detector,
        ss_sources=ss_sources,
        orbits=orbits,
    )


def _committed_solar_system(root: str, apdb: Apdb, visit: VisitInfo, detector: int, since):
    """Solar-system DiaSources of (visit, detector) as stored, their SSSource and orbit rows.

    They are the stored DiaSources with ``diaObjectId`` 0 (read through the
    ``(diaObjectId, midpointMjdTai)`` index from the visit's time on) and
    ``ssObjectId`` set. The orbit rows come from the ephemeris file, which the
    alerts took them from.
    """
    t = visit.midpointMjdTai
    rows = apdb.get_sources(np.array([0], dtype=np.int64), max(float(since), t))
    ss_id = rows["ssObjectId"].to_numpy(dtype=np.float64, na_value=np.nan)
    mine = (
        (rows["visit"].to_numpy() == visit.visit)
        & (rows["detector"].to_numpy() == detector)
        & np.isfinite(ss_id)
        & (ss_id != 0)
    )
    sso = rows[mine]
    if len(sso) == 0:
        return sso, None, None
    ss_sources = apdb.get_ss_sources(sso["diaSourceId"].to_numpy(dtype=np.int64))
    ephemerides, _ = read_ephemerides(root, visit.visit, detector)
    orbits = None
    if ephemerides is not None:
        want = ss_sources["ssObjectId"].to_numpy(dtype=np.int64)
        orbits = ephemerides[ephemerides["ssObjectId"].isin(want)].reset_index(drop=True)
    return sso, ss_sources, orbits


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
