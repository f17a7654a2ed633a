"""A steady-state APDB for the visit benchmarks: 12 months of prior visits, built fast.

:func:`prepare` makes (once, cached on disk under ``.bench-cache/``) what
``python -m bench visit`` and ``python -m bench orchestration`` time:

- the docs/design.md §2 bundle of the *new* visit (rendered images, 189 detectors), and
- an APDB holding the 12-month history before it: DiaObjects, DiaSources and
  DiaForcedSources of every prior visit of the same simulated field.

The history is not produced by running the pipeline 120 times (that would
take hours); it is built directly, vectorised over whole visits:

1. DiaSources: :meth:`sim.survey.Survey.visit_catalog` (the simulator's fast
   path: the same sources and detection rule as the rendered bundles, with
   analytic measurement noise) turned into SDM ``DiaSource`` rows — positions
   from the detector WCS, instrumental fluxes × PHOTCALIB → nJy, IDs from
   :class:`core.ids.IdPacker` exactly as the calibrate stage makes them.
2. Association by truth: every detection of a variable star or transient
   joins the DiaObject created by that object's first detection that passes
   the association quality cut (:class:`tasks.associate.AssociationConfig`:
   bad-pixel flags, ``reliability``); bogus detections and moving objects
   make one-source DiaObjects when they pass the cut and are dropped
   otherwise — what a perfect 1″ association would do.
3. DiaForcedSources: one per DiaObject with ≥ 2 DiaSources per prior visit
   whose focal plane covers it, from its second detection on, with flux drawn
   from the truth light curve plus the simulator's analytic PSF-photometry
   noise (difference and science image), at the DiaObject's position.
4. DiaObjects: :func:`tasks.summarise.summarise` over each object's whole
   history (with its forced sources), as the pipeline's summarise stage does.
5. Bulk load: :meth:`apdb.Apdb.bulk_load`, one transaction writing the
   layout :meth:`apdb.Apdb.store` writes, plus one ``ApdbVisitDetector``
   marker per prior (visit, detector).

Each built APDB is a template: SQLite as a file, PostgreSQL as a database that
:func:`fresh_apdb` copies (``CREATE DATABASE ... TEMPLATE``) before each run,
so every timed run starts from the same state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from apdb import sdm
from apdb.config import ApdbConfig
from apdb.interface import Apdb
from apdb.sql import ApdbSql
from core.ids import IdConfig, IdPacker
from tasks.associate import AssociationConfig
from tasks.summarise import SummaryConfig, summarise

__all__ = ["HistorySpec", "Prepared", "adopt", "fresh_apdb", "prepare"]

#: Bump when the build changes what it writes (invalidates every cache).
BUILD_VERSION = 3
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
_FLAG_COLUMNS = (
    "isDipole",
    "isNegative",
    "centroid_flag",
    "psfFlux_flag",
    "psfFlux_flag_edge",
    "forced_PsfFlux_flag_edge",
    "pixelFlags",
    "pixelFlags_bad",
    "pixelFlags_cr",
    "pixelFlags_crCenter",
    "pixelFlags_edge",
    "pixelFlags_interpolated",
    "pixelFlags_interpolatedCenter",
    "pixelFlags_saturated",
    "pixelFlags_saturatedCenter",
    "pixelFlags_suspect",
    "pixelFlags_suspectCenter",
    "pixelFlags_offimage",
    "pixelFlags_streak",
    "pixelFlags_streakCenter",
    "glint_trail",
)
_PROCESS_DELAY_DAYS = 60.0 / 86400.0  # timeProcessedMjdTai: a minute after the midpoint


@dataclasses.dataclass(frozen=True)
class HistorySpec:
    """What the steady-state survey looks like; its :meth:`key` names the cache.

    Attributes
    ----------
    seed : int
        Survey seed (sky, visits, noise).
    prior_visits : int
        Visits before the timed one; with ``cadence_days`` = 3, 120 visits
        span the 360-day history window exactly.
    cadence_days : float
        Days between visits of the field.
    n_detectors : int
        Detectors per visit (LSSTCam: 189).
    detector_px : int
        Detector side (pixels).
    sources_per_detector : float
        Mean DiaSources per detector per visit (Rubin design: 53).
    """

    seed: int = 1
    prior_visits: int = 120
    cadence_days: float = 3.0
    n_detectors: int = 189
    detector_px: int = 512
    sources_per_detector: float = 53.0

    @property
    def visit(self) -> int:
        """Index of the timed visit in the survey (the one after the history)."""
        return self.prior_visits

    @property
    def visit_number(self) -> int:
        """LSSTCam visit number (day_obs·10⁵ + seq_num) of the timed visit: its bundle directory."""
        return self.survey_config().visit_number(self.visit)

    def survey_config(self):
        from sim.config import SurveyConfig

        return SurveyConfig(
            seed=self.seed,
            n_visits=self.prior_visits + 1,
            cadence_days=self.cadence_days,
            n_detectors=self.n_detectors,
            detector_size=(self.detector_px, self.detector_px),
            sources_per_detector=self.sources_per_detector,
        )

    def key(self) -> str:
        text = json.dumps({**dataclasses.asdict(self), "build": BUILD_VERSION}, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A built benchmark case."""

    spec: HistorySpec
    directory: Path
    bundle_root: str
    visit: int  # LSSTCam visit number of the timed visit
    stats: dict


# --------------------------------------------------------------------------- catalogs

_SURVEY = None


def _init_worker(config_json: str) -> None:
    global _SURVEY
    from sim.config import SurveyConfig
    from sim.survey import Survey

    _SURVEY = Survey(SurveyConfig.model_validate_json(config_json))


def _catalog(visit: int) -> pd.DataFrame:
    cat = _SURVEY.visit_catalog(visit)
    keep = [
        c
        for c in cat.columns
        if c not in ("trueDiffFlux", "trueScienceFlux")  # truth not needed downstream
    ]
    cat = cat[keep]
    psf = _SURVEY.visit_params(visit).psf
    cat.attrs["psfNdata"] = int(psf.kernel().size)
    return cat


def catalogs(spec: HistorySpec, workers: int = 2) -> list[pd.DataFrame]:
    """The fast-path catalogs of the prior visits, computed in ``workers`` processes."""
    cfg = spec.survey_config().model_dump_json()
    visits = list(range(spec.prior_visits))
    if workers <= 1:
        _init_worker(cfg)
        return [_catalog(v) for v in visits]
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        return list(pool.map(_catalog, visits, chunksize=4))


def dia_sources(cat: pd.DataFrame, packer: IdPacker, pixel_scale_arcsec: float) -> pd.DataFrame:
    """One visit's fast-path catalog → SDM ``DiaSource`` rows (``diaObjectId`` null).

    The same conversions as :func:`tasks.calibrate.calibrate`, for a whole
    visit at once: nJy = counts × PHOTCALIB, ``raErr``/``decErr`` from the
    (isotropic) pixel errors at the nominal pixel scale, ``trailLength`` in
    arcsec, IDs ``(ccdVisitId << counterBits) | row`` with ``row`` the row
    within the detector's catalog.
    """
    n = len(cat)
    visit = int(cat["visit"].iloc[0])
    det = cat["detector"].to_numpy(np.int64)
    # row within each detector (catalogs are concatenated detector by detector)
    starts = np.r_[0, np.flatnonzero(det[1:] != det[:-1]) + 1]
    lengths = np.diff(np.r_[starts, n])
    row = np.arange(n) - np.repeat(starts, lengths)
    ccd = np.array([packer.ccd_visit_id(visit, d) for d in det[starts]], dtype=np.int64)
    ids = (np.repeat(ccd, lengths) << np.int64(packer.counter_bits)) | row
    if row.max(initial=0) > packer.max_row:
        raise ValueError("row counter overflow")
    calib = cat["photoCalib"].to_numpy(np.float64)
    scale = pixel_scale_arcsec / 3600.0
    out: dict[str, object] = {
        "diaSourceId": ids,
        "visit": np.full(n, visit, np.int64),
        "detector": det.astype(np.int16),
        "band": cat["band"].to_numpy(object),
        "midpointMjdTai": cat["midpointMjdTai"].to_numpy(np.float64),
        "exposureTime": np.full(n, 30.0, np.float32),
        "timeProcessedMjdTai": cat["midpointMjdTai"].to_numpy(np.float64) + _PROCESS_DELAY_DAYS,
        "ra": cat["ra"].to_numpy(np.float64),
        "dec": cat["dec"].to_numpy(np.float64),
        "raErr": cat["xErr"].to_numpy(np.float64) * scale,
        "decErr": cat["yErr"].to_numpy(np.float64) * scale,
        "ra_dec_Cov": np.zeros(n),
        "x": cat["x"].to_numpy(np.float64),
        "y": cat["y"].to_numpy(np.float64),
        "xErr": cat["xErr"].to_numpy(np.float32),
        "yErr": cat["yErr"].to_numpy(np.float32),
        "snr": cat["snr"].to_numpy(np.float32),
        "bboxSize": cat["bboxSize"].to_numpy(np.int32),
        "reliability": cat["reliability"].to_numpy(np.float32),
        "trailLength": cat["trailLength"].to_numpy(np.float64) * pixel_scale_arcsec,
        "psfNdata": np.full(n, cat.attrs.get("psfNdata", 0), np.int32),
        "trailNdata": np.zeros(n, np.int32),
        "dipoleNdata": np.zeros(n, np.int32),
    }
    for inst, cal in (
        ("psfInstFlux", "psfFlux"),
        ("apInstFlux", "apFlux"),
        ("scienceInstFlux", "scienceFlux"),
        ("templateInstFlux", "templateFlux"),
    ):
        out[cal] = cat[inst].to_numpy(np.float64) * calib
        out[cal + "Err"] = np.abs(cat[inst + "Err"].to_numpy(np.float64)) * calib
    for flag in _FLAG_COLUMNS:
        if flag in cat.columns:
            out[flag] = cat[flag].to_numpy(bool)
    return pd.DataFrame(out)


def associate_by_truth(
    sources: pd.DataFrame, truth_id: np.ndarray, kind: np.ndarray, config: AssociationConfig
) -> tuple[np.ndarray, np.ndarray]:
    """``(diaObjectId, stored)`` per source: a perfect association (see module docstring).

    ``sources`` must be sorted by ``(visit, diaSourceId)``; a source is stored
    when it joins an existing object or creates one (passes the quality cut).
    """
    n = len(sources)
    bad = np.zeros(n, bool)
    for name in config.bad_flags:
        if name in sources.columns:
            bad |= sources[name].to_numpy(bool)
    rel = sources["reliability"].to_numpy(np.float64)
    bad |= rel < config.min_reliability
    good = ~bad
    ids = sources["diaSourceId"].to_numpy(np.int64)
    persistent = np.isin(kind, ("variable", "transient")) & (truth_id >= 0)
    obj = np.where(good, ids, -1)
    # persistent objects: the first good detection creates the DiaObject; every
    # later detection (good or not) joins it; earlier bad ones are dropped
    p = np.flatnonzero(persistent)
    if p.size:
        t = truth_id[p]
        order = np.lexsort((np.arange(p.size), t))  # by truthId, then time order
        ps, ts = p[order], t[order]
        g_good = good[ps]
        seg_start = np.r_[True, ts[1:] != ts[:-1]]
        seg = np.cumsum(seg_start) - 1
        # index (in ps) of the first good row of each segment
        first_good = np.full(seg[-1] + 1, -1, np.int64)
        idx = np.flatnonzero(g_good)[::-1]
        first_good[seg[idx]] = idx
        fg = first_good[seg]
        joined = (fg >= 0) & (np.arange(ps.size) >= fg)
        obj[ps] = np.where(joined, ids[ps[np.maximum(fg, 0)]], -1)
    return obj, obj >= 0


def forced_sources(
    survey, objects: pd.DataFrame, start_visit: np.ndarray, truth_id: np.ndarray, visits
) -> pd.DataFrame:
    """Synthetic DiaForcedSources of ``objects`` (one per covering prior visit).

    Object ``i`` (truth object ``truth_id[i]``, fixed on the sky) gets a
    forced measurement at every visit of ``visits`` (survey indices) whose LSSTCam
    number is ``>= start_visit[i]`` (a visit number, as the DiaSources carry)
    that puts it on a detector: flux = truth light curve (difference image:
    science − template; science image) plus Gaussian noise with the
    simulator's analytic PSF-photometry σ for that visit's seeing and sky.
    """
    from sim.config import DEFAULT_PHOTCALIB

    cfg = survey.config
    catalog_ids = survey.sky.catalog["truthId"].to_numpy()
    pos = np.searchsorted(catalog_ids, truth_id)
    if not np.array_equal(catalog_ids[pos], truth_id):
        raise ValueError("forced_sources: truth IDs not in the survey catalogue")
    packer = IdPacker(IdConfig())
    ra = objects["ra"].to_numpy(np.float64)
    dec = objects["dec"].to_numpy(np.float64)
    obj_ids = objects["diaObjectId"].to_numpy(np.int64)
    parts = []
    for v in visits:
        vp = survey.visit_params(v)
        live = np.flatnonzero(start_visit <= vp.number)
        if live.size == 0:
            continue
        xi, eta = survey.sky.positions(vp.mjd)
        u, w, _, _ = survey._focal_positions(vp, xi[pos[live]], eta[pos[live]])
        det, _, _ = survey.focal_plane.locate(u, w, survey.detectors)
        on = det >= 0
        live, det = live[on], det[on]
        sci, tmpl = survey.sky.fluxes(vp.mjd, vp.band)
        sci, tmpl = sci[pos[live]], tmpl[pos[live]]
        calib = DEFAULT_PHOTCALIB[vp.band] / vp.transparency
        p2, p3 = vp.psf.sum_p2(), vp.psf.sum_p3()
        sig_diff = survey._expected_sigma(vp, vp.sky, sci / calib, tmpl / calib) * calib
        sig_sci = np.sqrt(vp.sky * p2 + np.maximum(sci / calib, 0) * p3) / p2 * calib
        rng = np.random.default_rng([cfg.seed, 7_000_001, v])
        order = np.lexsort((obj_ids[live], det))
        live, det = live[order], det[order]
        sig_diff, sig_sci = sig_diff[order], sig_sci[order]
        diff, sci = (sci - tmpl)[order], sci[order]
        n = live.size
        starts = np.r_[0, np.flatnonzero(det[1:] != det[:-1]) + 1]
        lengths = np.diff(np.r_[starts, n])
        row = np.arange(n) - np.repeat(starts, lengths)
        ccd = np.array([packer.ccd_visit_id(vp.number, d) for d in det[starts]], dtype=np.int64)
        fid = (np.repeat(ccd, lengths) << np.int64(packer.counter_bits)) | row
        parts.append(
            pd.DataFrame(
                {
                    "diaForcedSourceId": fid,
                    "diaObjectId": obj_ids[live],
                    "ra": ra[live],
                    "dec": dec[live],
                    "visit": np.full(n, vp.number, np.int64),
                    "detector": det.astype(np.int16),
                    "psfFlux": (diff + sig_diff * rng.standard_normal(n)).astype(np.float32),
                    "psfFluxErr": sig_diff.astype(np.float32),
                    "midpointMjdTai": np.full(n, vp.mjd),
                    "scienceFlux": (sci + sig_sci * rng.standard_normal(n)).astype(np.float32),
                    "scienceFluxErr": sig_sci.astype(np.float32),
                    "band": np.full(n, vp.band, object),
                    "timeProcessedMjdTai": np.full(n, vp.mjd + _PROCESS_DELAY_DAYS),
                }
            )
        )
    if not parts:
        return sdm.empty_frame("DiaForcedSource")
    return sdm.conform(pd.concat(parts, ignore_index=True), "DiaForcedSource")


def build_frames(spec: HistorySpec, workers: int = 2, log=print) -> dict[str, pd.DataFrame]:
    """DiaObjects, DiaSources, DiaForcedSources and markers of the prior visits."""
    from sim.survey import Survey

    t0 = time.perf_counter()
    survey = Survey(spec.survey_config())
    cats = catalogs(spec, workers)
    log(f"  catalogs of {len(cats)} prior visits: {time.perf_counter() - t0:.1f} s")
    packer = IdPacker(IdConfig())
    scale = survey.config.pixel_scale_arcsec
    src = pd.concat([dia_sources(c, packer, scale) for c in cats], ignore_index=True)
    truth = np.concatenate([c["truthId"].to_numpy(np.int64) for c in cats])
    kind = np.concatenate([c["kind"].to_numpy(object) for c in cats]).astype(str)
    numbers = [survey.config.visit_number(k) for k in range(spec.prior_visits)]
    markers = pd.DataFrame(
        [(v, d) for v in numbers for d in survey.detectors],
        columns=["visit", "detector"],
    )
    del cats
    obj_id, stored = associate_by_truth(src, truth, kind, AssociationConfig())
    src = src[stored].reset_index(drop=True)
    src["diaObjectId"] = pd.array(obj_id[stored], dtype="Int64")
    truth, kind = truth[stored], kind[stored]
    src = sdm.conform(src, "DiaSource")
    log(f"  {len(src):,} DiaSources stored of {len(stored):,} detected")

    # objects with >= 2 sources get forced photometry from their second detection on
    oid = src["diaObjectId"].to_numpy(np.int64)
    order = np.lexsort((src["visit"].to_numpy(), oid))
    o_sorted = oid[order]
    first = np.r_[True, o_sorted[1:] != o_sorted[:-1]]
    seg_start = np.flatnonzero(first)
    counts = np.diff(np.r_[seg_start, o_sorted.size])
    multi = counts >= 2
    multi_ids = o_sorted[seg_start[multi]]
    second_visit = src["visit"].to_numpy()[order][seg_start[multi] + 1]
    multi_truth = truth[order][seg_start[multi]]

    last_mjd = float(survey.visit_params(spec.prior_visits - 1).mjd)
    summary_cfg = SummaryConfig()
    objects = summarise(
        sdm.empty_frame("DiaObject"),
        sdm.empty_frame("DiaSource"),
        src,
        summary_cfg,
        time_mjd=last_mjd,
    )
    log(f"  {len(objects):,} DiaObjects summarised ({len(multi_ids):,} with >= 2 sources)")
    mobj = objects.set_index("diaObjectId").loc[multi_ids].reset_index()
    t1 = time.perf_counter()
    forced = forced_sources(survey, mobj, second_visit, multi_truth, range(spec.prior_visits))
    log(f"  {len(forced):,} DiaForcedSources synthesised: {time.perf_counter() - t1:.1f} s")
    # fill fpFluxMean from the forced history, as the pipeline's summarise does
    if len(forced):
        objects = summarise(
            sdm.empty_frame("DiaObject"),
            sdm.empty_frame("DiaSource"),
            src,
            summary_cfg,
            time_mjd=last_mjd,
            forced_sources=forced,
        )
    return {"objects": objects, "sources": src, "forced": forced, "markers": markers}


# --------------------------------------------------------------------------- bulk load


def bulk_load(apdb: Apdb, frames: dict[str, pd.DataFrame]) -> None:
    """Write the built frames with :meth:`apdb.Apdb.bulk_load`, in one transaction.

    Each DiaObject's version starts at its last DiaSource (as if the visit that
    made it last stored it); every prior (visit, detector) gets its marker.
    """
    objects = frames["objects"]
    apdb.bulk_load(
        objects.assign(validityStartMjdTai=objects["lastDiaSourceMjdTai"]),
        frames["sources"],
        frames["forced"],
        markers=frames["markers"],
    )


# --------------------------------------------------------------------------- APDB copies


def _pg(dbname: str = "postgres") -> str:
    return f"{PG_SERVER}/{dbname}"


def _pg_exec(sql: str, params=None) -> list:
    import psycopg

    with psycopg.connect(_pg(), autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def _pg_exists(dbname: str) -> bool:
    return bool(_pg_exec("SELECT 1 FROM pg_database WHERE datname = %s", [dbname]))


def _pg_drop(dbname: str) -> None:
    _pg_exec(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        [dbname],
    )
    _pg_exec(f'DROP DATABASE IF EXISTS "{dbname}"')


def template_url(prepared_dir: Path, backend: str, key: str) -> str:
    if backend == "sqlite":
        return str(prepared_dir / "apdb-template.sqlite3")
    return _pg(f"diapipe_bench_{key}_template")


def fresh_apdb(prepared: Prepared, backend: str, name: str = "run") -> str:
    """A copy of the built APDB for one timed run; returns its URL."""
    key = prepared.spec.key()
    src = template_url(prepared.directory, backend, key)
    if backend == "sqlite":
        dst = prepared.directory / f"apdb-{name}.sqlite3"
        for suffix in ("", "-wal", "-shm"):
            Path(str(dst) + suffix).unlink(missing_ok=True)
        shutil.copyfile(src, dst)
        url = str(dst)
    else:
        dbname = f"diapipe_bench_{key}_{name}"
        _pg_drop(dbname)
        _pg_exec(f'CREATE DATABASE "{dbname}" TEMPLATE "diapipe_bench_{key}_template"')
        url = _pg(dbname)
    # The copy's gigabytes are written back before the clock starts: otherwise the
    # kernel's writeback runs during the timed visit and throttles its stores.
    os.sync()
    return url


def drop_copy(prepared: Prepared, backend: str, name: str = "run") -> None:
    """Remove the copy made by :func:`fresh_apdb`."""
    if backend == "sqlite":
        dst = prepared.directory / f"apdb-{name}.sqlite3"
        for suffix in ("", "-wal", "-shm"):
            Path(str(dst) + suffix).unlink(missing_ok=True)
    else:
        _pg_drop(f"diapipe_bench_{prepared.spec.key()}_{name}")


# --------------------------------------------------------------------------- prepare


def _depths(frames: dict[str, pd.DataFrame]) -> dict:
    """History depth per object: prior DiaSources and forced sources."""
    ns = frames["sources"]["diaObjectId"].astype("int64").value_counts()
    nf = frames["forced"]["diaObjectId"].astype("int64").value_counts()
    return {"sources": ns, "forced": nf}


def prepare(
    spec: HistorySpec,
    backend: str,
    *,
    cache_root: Path = Path(".bench-cache"),
    rebuild: bool = False,
    workers: int = 2,
    log=print,
) -> Prepared:
    """Build (or find in the cache) the bundle of the new visit and the APDB template.

    A cached template of an older APDB layout is upgraded in place
    (:func:`apdb.migrate.migrate`).

    Parameters
    ----------
    spec : HistorySpec
        The survey; the cache directory is ``cache_root / spec.key()``.
    backend : {'sqlite', 'postgresql'}
        Which APDB template must exist.
    rebuild : bool
        Drop the cached case and build again.
    """
    directory = (cache_root / f"visit-{spec.key()}").resolve()
    if rebuild and directory.exists():
        shutil.rmtree(directory)
        if _pg_available():
            _pg_drop(f"diapipe_bench_{spec.key()}_template")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=1))
    bundles = directory / "bundles"
    done = directory / "bundles.done"
    if not done.exists():
        from sim.survey import Survey

        log(f"simulating visit {spec.visit_number} ({spec.n_detectors} detectors) into {bundles}")
        t0 = time.perf_counter()
        survey = Survey(spec.survey_config().model_copy(update={"workers": workers}))
        survey.write_visit(str(bundles), spec.visit)
        done.write_text(f"{time.perf_counter() - t0:.1f}\n")
        log(f"  {time.perf_counter() - t0:.1f} s")

    frames_dir = directory / "history"
    if not (frames_dir / "done").exists():
        log(f"building {spec.prior_visits} prior visits of history")
        t0 = time.perf_counter()
        frames = build_frames(spec, workers, log)
        frames_dir.mkdir(exist_ok=True)
        for name, frame in frames.items():
            frame.to_parquet(frames_dir / f"{name}.parquet")
        (frames_dir / "done").write_text(f"{time.perf_counter() - t0:.1f}\n")
        log(f"  history frames: {time.perf_counter() - t0:.1f} s")
    frames = None

    def load_frames():
        nonlocal frames
        if frames is None:
            frames = {
                n: pd.read_parquet(frames_dir / f"{n}.parquet")
                for n in ("objects", "sources", "forced", "markers")
            }
        return frames

    stats_path = directory / "history-stats.json"
    if not stats_path.exists():
        stats_path.write_text(json.dumps(history_stats(load_frames()), indent=1) + "\n")
    stats = json.loads(stats_path.read_text())

    key = spec.key()
    url = template_url(directory, backend, key)
    marker = directory / f"template-{backend}.done"
    exists = (
        Path(url).exists() if backend == "sqlite" else _pg_exists(f"diapipe_bench_{key}_template")
    )
    if not (marker.exists() and exists):
        log(f"bulk-loading the {backend} APDB template")
        t0 = time.perf_counter()
        if backend == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(url + suffix).unlink(missing_ok=True)
        else:
            _pg_drop(f"diapipe_bench_{key}_template")
            _pg_exec(f'CREATE DATABASE "diapipe_bench_{key}_template"')
        apdb = ApdbSql.create(ApdbConfig(url=url))
        try:
            bulk_load(apdb, load_frames())
            apdb.optimize()
        finally:
            apdb.close()
        seconds = time.perf_counter() - t0
        marker.write_text(f"{seconds:.1f}\n")
        log(f"  {seconds:.1f} s")
    else:
        _upgrade_template(url, log)  # a template of an older layout
    stats = {**stats, f"load_{backend}_s": float(marker.read_text())}
    stats["frames_s"] = float((frames_dir / "done").read_text())
    stats["bundle_s"] = float(done.read_text())
    return Prepared(spec, directory, str(bundles), spec.visit_number, stats)


def adopt(directory: Path, backend: str, *, log=print) -> Prepared:
    """A case built elsewhere, e.g. by an older diapipe's ``bench history``, as it is.

    ``directory`` holds ``spec.json``, ``history-stats.json``, ``bundles/`` with
    one visit and ``apdb-template.sqlite3``; the template is upgraded in place
    to the current layout (:func:`apdb.migrate.migrate`). The timed visit is
    the bundle's own (an older simulator named its folder by visit index).
    SQLite only: a PostgreSQL template's name depends on the spec's build key.
    """
    if backend != "sqlite":
        raise SystemExit("--case-dir: only an SQLite template can be adopted")
    directory = Path(directory).resolve()
    spec = HistorySpec(**json.loads((directory / "spec.json").read_text()))
    bundles = directory / "bundles"
    visits = sorted(p for p in bundles.iterdir() if (p / "visit.json").is_file())
    if len(visits) != 1:
        raise SystemExit(f"--case-dir: {bundles} must hold one visit, found {len(visits)}")
    visit = int(json.loads((visits[0] / "visit.json").read_text())["visit"])
    _upgrade_template(template_url(directory, backend, spec.key()), log)
    stats = json.loads((directory / "history-stats.json").read_text())
    return Prepared(spec, directory, str(bundles), visit, stats)


def _upgrade_template(url: str, log) -> None:
    """Upgrade the APDB template at ``url`` in place to the current layout, logging the plan."""
    from apdb.migrate import migrate

    upgrade = migrate(url)
    if upgrade.steps:
        log(upgrade.describe())


def _pg_available() -> bool:
    try:
        _pg_exec("SELECT 1")
        return True
    except Exception:
        return False


def history_stats(frames: dict[str, pd.DataFrame]) -> dict:
    """Row counts and DiaObject history-depth distribution of the built history."""
    d = _depths(frames)
    ns, nf = d["sources"], d["forced"]

    def dist(counts: pd.Series) -> dict:
        a = counts.to_numpy()
        if a.size == 0:
            return {"n": 0}
        q = np.percentile(a, [10, 25, 50, 75, 90, 99])
        return {
            "n": int(a.size),
            "mean": float(a.mean()),
            **{f"p{p}": float(v) for p, v in zip((10, 25, 50, 75, 90, 99), q, strict=True)},
            "max": int(a.max()),
        }

    return {
        "rows": {
            "DiaObject": len(frames["objects"]),
            "DiaSource": len(frames["sources"]),
            "DiaForcedSource": len(frames["forced"]),
            "markers": len(frames["markers"]),
        },
        "sources_per_object": dist(ns),
        "forced_per_object": dist(nf),
    }


def alert_depths(prepared: Prepared, alert_object_ids: np.ndarray, visit_mjd: float) -> dict:
    """History depth of the DiaObjects that alerted: prior DiaSources and forced sources."""
    frames_dir = prepared.directory / "history"
    src = pd.read_parquet(frames_dir / "sources.parquet", columns=["diaObjectId", "midpointMjdTai"])
    fsrc = pd.read_parquet(frames_dir / "forced.parquet", columns=["diaObjectId", "midpointMjdTai"])
    since = visit_mjd - 360.0
    ids = pd.Index(np.asarray(alert_object_ids, np.int64))
    out = {}
    for name, frame in (("prv_sources", src), ("prv_forced", fsrc)):
        frame = frame[frame["midpointMjdTai"] >= since]
        counts = frame["diaObjectId"].astype("int64").value_counts()
        a = counts.reindex(ids, fill_value=0).to_numpy()
        hist = np.bincount(np.minimum(a // 10, 12), minlength=13)
        out[name] = {
            "mean": float(a.mean()) if a.size else math.nan,
            "mean_with_history": float(a[a > 0].mean()) if (a > 0).any() else math.nan,
            "median": float(np.median(a)) if a.size else math.nan,
            "p90": float(np.percentile(a, 90)) if a.size else math.nan,
            "zero_fraction": float((a == 0).mean()) if a.size else math.nan,
            "histogram_by_10": {
                (f"{10 * i}-{10 * i + 9}" if i < 12 else "120+"): int(c) for i, c in enumerate(hist)
            },
        }
    return out


def main(argv: list[str]) -> dict:
    """``python -m bench history``: build (or find) the steady-state case; report it."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench history", description=main.__doc__)
    p.add_argument("--apdb", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--prior-visits", type=int, default=120)
    p.add_argument("--detectors", type=int, default=189)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--cache-root", type=Path, default=Path(".bench-cache"))
    args = p.parse_args(argv)
    spec = HistorySpec(seed=args.seed, prior_visits=args.prior_visits, n_detectors=args.detectors)
    prepared = prepare(spec, args.apdb, cache_root=args.cache_root, rebuild=args.rebuild)
    s = prepared.stats
    print(f"case {prepared.directory}")
    print(f"rows: {s['rows']}")
    for name in ("sources_per_object", "forced_per_object"):
        d = s[name]
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in d.items()))
    print(
        f"build: bundle {s['bundle_s']:.0f} s, history frames {s['frames_s']:.0f} s, "
        f"{args.apdb} bulk load {s[f'load_{args.apdb}_s']:.0f} s"
    )
    return {
        **s,
        "headline": {
            "DiaSource": s["rows"]["DiaSource"],
            "DiaForcedSource": s["rows"]["DiaForcedSource"],
            f"load_{args.apdb}_s": s[f"load_{args.apdb}_s"],
        },
    }
