"""``python -m bench quality``: the science stages scored against the simulator's truth.

Simulates a survey (``sim.survey.Survey``: 4 detectors of 2048² px at
0.2″/px, 53 DiaSources per detector per visit — Rubin's 10,000 per visit over
189 detectors — 20 % bogus, static / variable / transient / moving
populations). On 2048² detectors that is ~4× Rubin's DiaSources per sky area
(LSSTCam detectors are 4072×4000 px); ``--detector-size 512`` is a ~60×
crowding stress test. Each visit's bundles are written, and each detector runs
through read → calibrate → associate → summarise → forced photometry with an
in-memory APDB (latest DiaObjects, DiaSource and DiaForcedSource history,
footprint loads with the 10-px bbox padding of docs/design.md §4.1 and the 360-day
window). Then :mod:`sim.scoring` reports association purity, completeness,
false new objects and forced-photometry pulls.

Pulls have two sources: (1) the pipeline's own DiaForcedSources, traced to
truth through the DiaObject's sources; (2) forced photometry (the same
:func:`tasks.forced.forced_photometry`) at the true positions of every static
star on each detector and visit — the non-variable objects the headline
``pull_mean``/``pull_std`` are measured on (their true difference flux is 0,
so the pull tests the estimator and its error, not the PSF model's flux
scale). Only isolated stars count (no other true object or bogus detection
within ``--isolation-px``, default 20 px ≈ 4″, and a footprint wholly on the
image): a neighbour inside the PSF footprint adds its flux to the forced
measurement, which is blending, not estimator error. Science-image pulls of
the same stars, and pulls per brightness quintile, are reported beside them.

Completeness is reported against two sets of true detections, because the
production source filters (reliability below 0.5, long trails) drop real
detections on purpose: ``association_passed_cuts`` scores association on the
detections that passed them (what the pipeline is meant to keep), and
``association`` on every injected detection (what reaches the APDB of all
that was there). The headline takes ``completeness`` and
``completeness_kept_detections`` from the first and
``completeness_all_detections`` from the second; the JSON's ``definitions``
says what each headline figure counts.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from apdb import sdm
from core.bundle import detector_path, read_detector_bundle
from core.ids import IdPacker
from sim.scoring import load_truth, pull_statistics, score_association, score_forced
from tasks.associate import AssociationConfig, associate
from tasks.calibrate import CalibrateConfig, calibrate
from tasks.forced import ForcedConfig, forced_photometry
from tasks.sourcefilters import SourceFilterConfig, filter_sources, good_dia_object_ids
from tasks.ssoassociate import SsoAssociationConfig, associate_solar_system
from tasks.summarise import SummaryConfig, summarise

HISTORY_DAYS = 360.0
BBOX_PAD_PX = 10.0

#: What each ``headline`` figure counts (written into the JSON beside it).
HEADLINE_DEFINITIONS = {
    "purity": "DiaObjects whose DiaSources all come from one true identity (each bogus "
    "detection its own), over all DiaObjects",
    "completeness": "true non-moving objects with >= 2 detections passing the production "
    "source filters whose stored detections all sit in one DiaObject, over those objects",
    "completeness_kept_detections": "the same objects whose detections passing the production "
    "source filters are all stored, in one DiaObject (also counts what association itself "
    "drops: non-finite positions, new-object quality cut)",
    "completeness_all_detections": "true non-moving objects with >= 2 injected detections "
    "whose injected detections are all stored, in one DiaObject (also counts the real "
    "detections the production source filters drop)",
    "false_new_fraction": "new DiaObjects made by a real non-moving object that already had "
    "one, over all new DiaObjects",
    "pull_mean": "mean of (forced difference flux - 0)/sigma at isolated static stars",
    "pull_std": "standard deviation of the same pulls",
    "sso_matched_fraction": "known-asteroid detections passing the source filters matched to "
    "their own ssObjectId",
    "sso_dia_objects": "DiaObjects created by a known-asteroid detection",
    "sso_false_matches": "non-moving sources passing the source filters given an ssObjectId, "
    "over those sources",
}


@dataclass
class MemoryApdb:
    """The smallest APDB the stages need: latest objects, source and forced history."""

    objects: pd.DataFrame = field(default_factory=lambda: sdm.empty_frame("DiaObject"))
    sources: list[pd.DataFrame] = field(default_factory=list)
    forced: list[pd.DataFrame] = field(default_factory=list)
    _src_cache: pd.DataFrame | None = None
    _fs_cache: pd.DataFrame | None = None

    def _all(self, kind: str) -> pd.DataFrame:
        if kind == "sources":
            if self._src_cache is None or len(self._src_cache) != sum(map(len, self.sources)):
                self._src_cache = (
                    pd.concat(self.sources, ignore_index=True)
                    if self.sources
                    else sdm.empty_frame("DiaSource")
                )
            return self._src_cache
        if self._fs_cache is None or len(self._fs_cache) != sum(map(len, self.forced)):
            self._fs_cache = (
                pd.concat(self.forced, ignore_index=True)
                if self.forced
                else sdm.empty_frame("DiaForcedSource")
            )
        return self._fs_cache

    def load(self, wcs, shape, mjd: float):
        """Objects whose position falls in the image bbox grown by 10 px, and their history."""
        ny, nx = shape
        obj = self.objects
        if len(obj):
            x, y = wcs.all_world2pix(obj["ra"].to_numpy(), obj["dec"].to_numpy(), 0)
            inside = (
                (x >= -BBOX_PAD_PX)
                & (x <= nx - 1 + BBOX_PAD_PX)
                & (y >= -BBOX_PAD_PX)
                & (y <= ny - 1 + BBOX_PAD_PX)
            )
            obj = obj[inside]
        ids = obj["diaObjectId"].to_numpy(dtype=np.int64)
        src = self._all("sources")
        hist = src[
            np.isin(src["diaObjectId"].to_numpy(dtype=np.float64, na_value=-1), ids)
            & (src["midpointMjdTai"].to_numpy() >= mjd - HISTORY_DAYS)
        ]
        fs = self._all("forced")
        fhist = fs[
            np.isin(fs["diaObjectId"].to_numpy(dtype=np.int64), ids)
            & (fs["midpointMjdTai"].to_numpy() >= mjd - HISTORY_DAYS)
        ]
        return obj.reset_index(drop=True), hist, fhist

    def store(self, objects: pd.DataFrame, sources: pd.DataFrame, forced: pd.DataFrame) -> None:
        """Replace the latest versions of ``objects``; append sources and forced sources."""
        objects = sdm.conform(objects, "DiaObject")
        if len(objects):
            keep = ~np.isin(
                self.objects["diaObjectId"].to_numpy(dtype=np.int64),
                objects["diaObjectId"].to_numpy(dtype=np.int64),
            )
            parts = [p for p in (self.objects[keep], objects) if len(p)]
            self.objects = pd.concat(parts, ignore_index=True)
        if len(sources):
            self.sources.append(sources)
        if len(forced):
            self.forced.append(forced)


def fsspec_exists(url: str) -> bool:
    """Whether ``url`` exists (local path or fsspec URL)."""
    import fsspec

    fs, _, (path,) = fsspec.get_fs_token_paths(url)
    return fs.exists(path)


def _isolated(here: pd.DataFrame, root: str, visit: int, detector: int, radius: float):
    """Static stars with no other true object or bogus detection within ``radius`` px."""
    rows = pd.read_parquet(f"{detector_path(root, visit, detector)}/truth.parquet")
    bogus = rows[rows["truthId"] < 0]
    px = np.r_[here["x"].to_numpy(), bogus["trueX"].to_numpy()]
    py = np.r_[here["y"].to_numpy(), bogus["trueY"].to_numpy()]
    if px.size < 2:
        return np.ones(len(here), dtype=bool)
    tree = cKDTree(np.c_[px, py])
    dist, _ = tree.query(np.c_[here["x"].to_numpy(), here["y"].to_numpy()], k=2)
    return dist[:, 1] > radius


def _merge_objects(loaded: pd.DataFrame, updated: pd.DataFrame) -> pd.DataFrame:
    """Loaded objects with their updated versions swapped in, plus the new objects."""
    if not len(loaded):
        return updated
    keep = ~np.isin(
        loaded["diaObjectId"].to_numpy(dtype=np.int64),
        updated["diaObjectId"].to_numpy(dtype=np.int64),
    )
    parts = [p for p in (sdm.conform(loaded[keep], "DiaObject"), updated) if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else updated


def run(
    *,
    visits: int = 20,
    detectors: int = 4,
    seed: int = 1,
    detector_size: int = 2048,
    sources_per_detector: float = 53.0,
    root: str | None = None,
    association: AssociationConfig | None = None,
    isolation_px: float = 20.0,
    return_frames: bool = False,
    drop_images: bool | None = None,
) -> dict:
    """Simulate, run the four stages per detector, score. Returns every figure."""
    from sim.config import SurveyConfig
    from sim.survey import Survey

    association = association or AssociationConfig()
    packer = IdPacker()
    survey = Survey(
        SurveyConfig(
            seed=seed,
            n_detectors=detectors,
            n_visits=visits,
            detector_size=(detector_size, detector_size),
            sources_per_detector=sources_per_detector,
        )
    )
    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="diapipe-quality-")
        root = tmp.name
    if drop_images is None:
        drop_images = tmp is not None  # a temporary root keeps only the parquet files
    dets = list(survey.detectors)
    t_sim = 0.0
    t0 = time.perf_counter()
    apdb = MemoryApdb()
    cal_cfg, sum_cfg, fc_cfg = CalibrateConfig(), SummaryConfig(), ForcedConfig()
    filt_cfg, sso_cfg = SourceFilterConfig(), SsoAssociationConfig()
    stage_s = {
        "read": 0.0,
        "calibrate": 0.0,
        "ssoassociate": 0.0,
        "associate": 0.0,
        "summarise": 0.0,
        "forced": 0.0,
    }
    static_forced = []
    counts = {
        "n_unreliable": 0,
        "n_trailed": 0,
        "n_sso_associated": 0,
        "n_matched": 0,
        "n_new": 0,
        "n_rejected": 0,
        "n_nan_dropped": 0,
        "n_forced": 0,
        "n_not_good_objects": 0,
    }
    truth_parts = []
    numbers = [survey.config.visit_number(k) for k in range(visits)]  # day_obs·10⁵ + seq_num
    sso_inputs, sso_matches = [], []
    for index, v in enumerate(numbers):
        t = time.perf_counter()
        if not fsspec_exists(f"{detector_path(root, v, dets[-1])}/difference.fits"):
            survey.write_visit(root, index, dets)  # a kept --root is reused as is
        t_sim += time.perf_counter() - t
        truth_parts.append(load_truth(root, [v], dets, packer, objects=True))
        truth_objects = truth_parts[-1]
        eph_url = f"{root}/{v}/ephemerides.parquet"
        ephemerides = pd.read_parquet(eph_url) if fsspec_exists(eph_url) else None
        for d in dets:
            t = time.perf_counter()
            bundle = read_detector_bundle(root, v, d)
            stage_s["read"] += time.perf_counter() - t
            mjd = bundle.visit.midpointMjdTai
            objects, history, fhist = apdb.load(bundle.difference.wcs, bundle.difference.shape, mjd)
            t = time.perf_counter()
            cal = calibrate(
                bundle.sources, bundle, cal_cfg, id_packer=packer, time_processed_mjd=mjd
            )
            t1 = time.perf_counter()
            kept = filter_sources(cal, bundle.visit.exposureTime, filt_cfg)
            solar = associate_solar_system(
                kept.sources,
                ephemerides,
                bundle.difference.wcs,
                bundle.difference.shape,
                sso_cfg,
                ephemeris_file=eph_url,
            )
            sso_inputs.append(kept.sources["diaSourceId"].to_numpy(dtype=np.int64))
            sso_matches.append(solar.ss_sources[["diaSourceId", "ssObjectId"]])
            t1b = time.perf_counter()
            assoc = associate(solar.sources, objects, association)
            t2 = time.perf_counter()
            updated = summarise(
                objects, history, assoc.sources, sum_cfg, time_mjd=mjd, forced_sources=fhist
            )
            t3 = time.perf_counter()
            everything = _merge_objects(objects, updated)
            hist = [h for h in (history, assoc.sources) if len(h)]
            good = (
                good_dia_object_ids(pd.concat(hist, ignore_index=True), filt_cfg)
                if hist
                else np.zeros(0, np.int64)
            )
            measured = everything[np.isin(everything["diaObjectId"].to_numpy(np.int64), good)]
            forced = forced_photometry(
                measured, bundle, fc_cfg, id_packer=packer, time_processed_mjd=mjd
            )
            t4 = time.perf_counter()
            stage_s["calibrate"] += t1 - t
            stage_s["ssoassociate"] += t1b - t1
            stage_s["associate"] += t2 - t1b
            stage_s["summarise"] += t3 - t2
            stage_s["forced"] += t4 - t3
            new_sources = (
                pd.concat([assoc.sources, solar.sso_sources], ignore_index=True)
                if len(solar.sso_sources)
                else assoc.sources
            )
            apdb.store(updated, new_sources, forced.sources)
            for k in ("n_matched", "n_new", "n_rejected", "n_nan_dropped"):
                counts[k] += getattr(assoc, k)
            counts["n_unreliable"] += kept.n_unreliable
            counts["n_trailed"] += kept.n_trailed
            counts["n_sso_associated"] += solar.n_associated
            counts["n_forced"] += len(forced.sources)
            counts["n_not_good_objects"] += len(everything) - len(measured)
            # forced photometry at the true positions of the static stars
            here = truth_objects[(truth_objects["visit"] == v) & (truth_objects["detector"] == d)]
            st = here[(here["kind"] == "static") & _isolated(here, root, v, d, isolation_px)]
            probe = pd.DataFrame(
                {
                    "diaObjectId": st["truthId"].to_numpy(dtype=np.int64),
                    "ra": st["ra"].to_numpy(),
                    "dec": st["dec"].to_numpy(),
                    "nDiaSources": np.full(len(st), fc_cfg.min_dia_sources, dtype=np.int32),
                }
            )
            res = forced_photometry(probe, bundle, fc_cfg, id_packer=packer, time_processed_mjd=mjd)
            fs = res.sources.assign(truthId=res.sources["diaObjectId"], edge=res.edge)
            static_forced.append(fs[~fs["edge"]])
            if drop_images:
                for kind in ("difference", "science", "template"):
                    os.remove(f"{detector_path(root, v, d)}/{kind}.fits")
    truth_objects = pd.concat(truth_parts, ignore_index=True)
    t_pipe = time.perf_counter() - t0 - t_sim

    truth = load_truth(root, numbers, dets, packer)
    stored = apdb._all("sources")
    sso_score = score_solar_system(
        truth,
        pd.read_parquet(f"{root}/truth/solarsystem.parquet"),
        np.concatenate(sso_inputs) if sso_inputs else np.zeros(0, np.int64),
        pd.concat(sso_matches, ignore_index=True),
        apdb.objects,
    )
    # DIA association is scored on the DiaSources it saw: the solar-system ones
    # (diaObjectId 0) are scored by score_solar_system
    stored = stored[stored["diaObjectId"].to_numpy(dtype=np.float64, na_value=-1) != 0]
    assoc_score, kept_score = score_association_both(
        stored, truth, np.concatenate(sso_inputs) if sso_inputs else np.zeros(0, np.int64)
    )
    # pipeline forced sources: DiaObject → the true object most of its sources come from
    merged = stored[["diaSourceId", "diaObjectId"]].merge(
        truth[["diaSourceId", "truthId"]], on="diaSourceId"
    )
    merged = merged[merged["truthId"] >= 0]
    object_truth = (
        merged.groupby("diaObjectId")["truthId"].agg(lambda s: s.value_counts().index[0])
        if len(merged)
        else pd.Series(dtype=np.int64)
    )
    object_truth.index = object_truth.index.astype(np.int64)
    pipeline_pulls = score_forced(apdb._all("forced"), truth_objects, object_truth)
    static = pd.concat(static_forced, ignore_index=True)
    static_score = score_forced(static, truth_objects)
    by_flux = _pulls_by_brightness(static, truth_objects)
    diff_pulls = static_score.get("static", {}).get("diff", pull_statistics([]))
    sci_pulls = static_score.get("static", {}).get("science", pull_statistics([]))
    if tmp is not None:
        tmp.cleanup()
    frames = (
        {
            "sources": stored,
            "objects": apdb.objects,
            "forced": apdb._all("forced"),
            "truth": truth,
            "truth_objects": truth_objects,
            "static_forced": static,
        }
        if return_frames
        else {}
    )
    return {
        **frames,
        "headline": {
            "purity": assoc_score["purity"],
            "completeness": kept_score["completeness"],
            "completeness_kept_detections": kept_score["completeness_all_detections"],
            "completeness_all_detections": assoc_score["completeness_all_detections"],
            "false_new_fraction": assoc_score["false_new_fraction"],
            "pull_mean": diff_pulls["mean"],
            "pull_std": diff_pulls["std"],
            "sso_matched_fraction": sso_score["matched_fraction"],
            "sso_dia_objects": sso_score["n_dia_objects"],
            "sso_false_matches": sso_score["false_match_fraction"],
        },
        "config": {
            "visits": visits,
            "detectors": dets,
            "seed": seed,
            "detector_size": detector_size,
            "sources_per_detector": sources_per_detector,
            "isolation_px": isolation_px,
        },
        "definitions": HEADLINE_DEFINITIONS,
        "association": assoc_score,
        "association_passed_cuts": kept_score,
        "solar_system": sso_score,
        "counts": counts,
        "static_forced_pulls": {"diff": diff_pulls, "science": sci_pulls, "by_flux": by_flux},
        "pipeline_forced_pulls": pipeline_pulls,
        "seconds": {"simulate": t_sim, "pipeline": t_pipe, **stage_s},
    }


def score_association_both(
    stored: pd.DataFrame, truth: pd.DataFrame, passed: np.ndarray
) -> tuple[dict, dict]:
    """:func:`sim.scoring.score_association` over all detections and over those kept.

    Parameters
    ----------
    stored : pandas.DataFrame
        The DIA-associated DiaSources stored (``diaSourceId``, ``diaObjectId``,
        ``midpointMjdTai``).
    truth : pandas.DataFrame
        :func:`sim.scoring.load_truth` detections of the run.
    passed : numpy.ndarray
        ``diaSourceId`` of every detection that passed the production source
        filters (:func:`tasks.sourcefilters.filter_sources`).

    Returns
    -------
    (dict, dict)
        The scores against every injected detection, and against the
        detections in ``passed`` only: there a true object is eligible for
        completeness when ≥ 2 of its detections passed, and its
        ``completeness_all_detections`` asks for those detections only.
        Purity and the new-object figures are the same in both.

    Raises
    ------
    ValueError
        A stored DiaSource is not among ``passed`` (or has no truth row).
    """
    ids = stored["diaSourceId"].to_numpy(np.int64)
    outside = ~np.isin(ids, passed)
    if outside.any():
        raise ValueError(
            f"{int(outside.sum())} stored DiaSource(s) (e.g. {int(ids[outside][0])}) did not "
            "pass the source filters"
        )
    kept = truth[np.isin(truth["diaSourceId"].to_numpy(np.int64), passed)]
    return score_association(stored, truth), score_association(stored, kept)


def score_solar_system(
    truth: pd.DataFrame,
    bodies: pd.DataFrame,
    entered: np.ndarray,
    matches: pd.DataFrame,
    objects: pd.DataFrame,
) -> dict:
    """Solar-system association scored against the simulator's truth.

    Parameters
    ----------
    truth : pandas.DataFrame
        :func:`sim.scoring.load_truth` detections (``diaSourceId``, ``truthId``, ``kind``).
    bodies : pandas.DataFrame
        ``truth/solarsystem.parquet``: ``truthId``, ``ssObjectId``, ``known``.
    entered : numpy.ndarray
        ``diaSourceId`` of every source that reached solar-system association
        (after the reliability and long-trail cuts).
    matches : pandas.DataFrame
        ``diaSourceId``, ``ssObjectId`` of every match made.
    objects : pandas.DataFrame
        Every DiaObject made (``diaObjectId`` = the creating ``diaSourceId``).

    Returns
    -------
    dict
        ``matched_fraction``: known-asteroid detections among ``entered``
        matched to their own ``ssObjectId``; ``n_dia_objects``: DiaObjects
        created by a known-asteroid detection; ``false_match_fraction``:
        non-moving sources among ``entered`` given any ``ssObjectId``; and the
        counts behind them (``n_wrong_object``: known-asteroid detections
        matched to another body; ``n_unknown_matched``: detections of unknown
        bodies matched to a known one).
    """
    t = truth[["diaSourceId", "truthId", "kind"]].merge(
        bodies[["truthId", "ssObjectId", "known"]]
        .astype({"ssObjectId": "Int64"})  # ids exceed 2**53: never as floats
        .rename(columns={"ssObjectId": "trueSsObjectId"}),
        on="truthId",
        how="left",
    )
    t["known"] = t["known"].fillna(False).astype(bool)
    t = t.merge(matches.astype({"ssObjectId": "Int64"}), on="diaSourceId", how="left")
    moving = (t["kind"] == "moving").to_numpy()
    known = moving & t["known"].to_numpy()
    came = np.isin(t["diaSourceId"].to_numpy(np.int64), entered)
    got = t["ssObjectId"].notna().to_numpy()
    # ssObjectIds exceed 2**53: compare them as integers, never as floats
    same = t["ssObjectId"].astype("Int64") == t["trueSsObjectId"].astype("Int64")
    right = got & same.fillna(False).to_numpy(dtype=bool)
    n_known = int((known & came).sum())
    n_static = int((~moving & came).sum())
    n_false = int((~moving & came & got).sum())
    known_ids = t["diaSourceId"].to_numpy(np.int64)[known]
    n_obj = int(np.isin(objects["diaObjectId"].to_numpy(np.int64), known_ids).sum())
    return {
        "matched_fraction": float((known & came & right).sum() / n_known) if n_known else 1.0,
        "n_dia_objects": n_obj,
        "false_match_fraction": n_false / n_static if n_static else 0.0,
        "n_known_detections": int(known.sum()),
        "n_known_entered": n_known,
        "n_matched_right": int((known & came & right).sum()),
        "n_wrong_object": int((known & came & got & ~right).sum()),
        "n_unknown_matched": int((moving & ~known & came & got).sum()),
        "n_non_moving_entered": n_static,
        "n_false_matches": n_false,
    }


def _pulls_by_brightness(static: pd.DataFrame, truth_objects: pd.DataFrame) -> list[dict]:
    """Difference-image pull statistics per quintile of true science flux."""
    if not len(static):
        return []
    t = truth_objects[["visit", "detector", "truthId", "diffFlux", "scienceFlux"]].rename(
        columns={"scienceFlux": "trueScience"}
    )
    m = static.merge(t, on=["visit", "detector", "truthId"])
    pull = (m["psfFlux"].to_numpy(float) - m["diffFlux"].to_numpy(float)) / m[
        "psfFluxErr"
    ].to_numpy(float)
    edges = np.quantile(m["trueScience"], [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (m["trueScience"] >= lo) & (m["trueScience"] <= hi)
        out.append({"science_flux_njy": [float(lo), float(hi)], **pull_statistics(pull[sel])})
    return out


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench quality", description=__doc__.split("\n")[0])
    p.add_argument("--visits", type=int, default=20)
    p.add_argument("--detectors", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--detector-size",
        type=int,
        default=2048,
        help="detector side (px); 53 sources per detector at 2048² is ~4× Rubin's sources per "
        "sky area (4072×4000 px detectors), at 512² ~60×",
    )
    p.add_argument("--sources-per-detector", type=float, default=53.0)
    p.add_argument("--root", default=None, help="keep the simulated bundles here")
    p.add_argument(
        "--drop-images",
        action="store_true",
        default=None,
        help="delete each detector's FITS files once processed (default: when no --root)",
    )
    p.add_argument(
        "--isolation-px",
        type=float,
        default=20.0,
        help="static stars used for pulls have no other true object this close (px)",
    )
    a = p.parse_args(argv)
    out = run(
        visits=a.visits,
        detectors=a.detectors,
        seed=a.seed,
        detector_size=a.detector_size,
        sources_per_detector=a.sources_per_detector,
        root=a.root,
        isolation_px=a.isolation_px,
        drop_images=a.drop_images,
    )
    s = out["association"]
    kept = out["association_passed_cuts"]
    print(f"{'figure':<34}{'value':>12}")
    for k, v in out["headline"].items():
        if not k.startswith("pull_") and not k.startswith("sso_"):
            print(f"{k:<34}{_fmt(v):>12}")
    for label, k, score in (
        ("objects, >= 2 passed detections", "n_true_objects_2plus", kept),
        ("  split", "n_split", kept),
        ("  a passed detection not stored", "n_not_all_stored", kept),
        ("objects, >= 2 injected detections", "n_true_objects_2plus", s),
        ("  an injected detection not stored", "n_not_all_stored", s),
    ):
        print(f"{label:<34}{_fmt(score[k]):>12}")
    for k in (
        "bogus_new_fraction",
        "n_dia_objects",
        "n_impure",
        "n_new",
        "n_false_new",
        "n_bogus_new",
        "n_moving_new",
    ):
        print(f"{k:<34}{_fmt(s[k]):>12}")
    for which in ("diff", "science"):
        ps = out["static_forced_pulls"][which]
        print(
            f"static {which} pull mean/std/robust  {ps['mean']:+.4f} {ps['std']:.4f} "
            f"{ps['robust_std']:.4f}  (n={ps['n']})"
        )
    for b in out["static_forced_pulls"]["by_flux"]:
        lo, hi = b["science_flux_njy"]
        print(
            f"  static stars {lo:>10.0f}-{hi:<10.0f} nJy: diff pull {b['mean']:+.3f} ± "
            f"{b['std']:.3f} (n={b['n']})"
        )
    for kind, v in out["pipeline_forced_pulls"].items():
        if isinstance(v, dict):
            print(
                f"pipeline forced {kind:<10} diff pull {v['diff']['mean']:+.3f} ± "
                f"{v['diff']['std']:.3f} (n={v['diff']['n']})"
            )
    for k, v in out["solar_system"].items():
        print(f"sso {k:<30}{_fmt(v):>12}")
    print("seconds:", {k: round(v, 2) for k, v in out["seconds"].items()})
    return out


def read_alert_histories(path) -> pd.DataFrame:
    """The DiaSources of the alerts in an Avro file that carry a DiaObject.

    Every alert with a ``diaObject`` contributes its ``prvDiaSources`` and its
    ``diaSource``; duplicates (the same ``diaSourceId`` in several alerts) are
    dropped. Returns the SDM DiaSource columns with ``diaObjectId`` renamed
    ``truthId`` (the object Rubin's own association gave the source), sorted
    by ``midpointMjdTai``.
    """
    import fastavro

    with open(path, "rb") as fh:
        records = list(fastavro.reader(fh))
    rows = []
    for rec in records:
        obj = rec.get("diaObject") or {}
        if obj.get("diaObjectId") is None:  # solar-system alert (or an all-null record)
            continue
        for src in [*(rec.get("prvDiaSources") or []), rec["diaSource"]]:
            rows.append({**src, "truthId": obj["diaObjectId"]})
    df = pd.DataFrame(rows).drop_duplicates("diaSourceId").drop(columns=["diaObjectId"])
    return df.sort_values(["midpointMjdTai", "diaSourceId"], kind="stable").reset_index(drop=True)


def _nearest_within_gate(sources: pd.DataFrame, objects: pd.DataFrame, gate_arcsec: float):
    """Rubin's association rule: each source's nearest object within the gate,
    taken in order of distance, one source per object (ap_association
    ``AssociationTask.score`` + ``match``). Returns the object index per source, -1 none."""
    from tasks.calibrate import unit_vectors

    out = np.full(len(sources), -1, dtype=np.int64)
    if not len(objects) or not len(sources):
        return out
    vo = unit_vectors(objects["ra"].to_numpy(float), objects["dec"].to_numpy(float))
    vs = unit_vectors(sources["ra"].to_numpy(float), sources["dec"].to_numpy(float))
    dist, idx = cKDTree(vo).query(vs)
    chord = 2.0 * np.sin(gate_arcsec / 3600.0 * np.pi / 180.0 / 2.0)
    taken = set()
    for s in np.argsort(dist, kind="stable"):
        if dist[s] < chord and idx[s] not in taken:
            taken.add(int(idx[s]))
            out[s] = idx[s]
    return out


def replay_histories(
    sources: pd.DataFrame, association: AssociationConfig | None = None, *, rubin: bool = False
) -> dict:
    """Replay DiaSources visit by visit through associate + summarise from an empty APDB.

    Parameters
    ----------
    sources : pandas.DataFrame
        :func:`read_alert_histories` output (``truthId`` = the reference object).
    association : AssociationConfig, optional
        The association to replay (default configuration).
    rubin : bool
        Associate with Rubin's rule (nearest object within the gate, one
        source per object per visit) instead of :func:`tasks.associate.associate`.

    Returns
    -------
    dict
        ``n_dia_objects``; per reference object the share of its sources its
        main (largest) DiaObject holds (``main_share``) and the number of
        DiaObjects its sources ended in (``n_pieces``); ``n_impure`` DiaObjects
        mixing reference objects; ``assignment`` (diaSourceId → diaObjectId).
    """
    association = association or AssociationConfig()
    sum_cfg = SummaryConfig()
    truth = sources[["diaSourceId", "truthId"]]
    table = sdm.conform(sources.drop(columns=["truthId"]), "DiaSource")  # once, not per visit
    objects = sdm.empty_frame("DiaObject")
    stored: list[pd.DataFrame] = []
    history = table.iloc[:0]
    for _, rows in table.groupby("visit", sort=False).indices.items():
        batch = table.iloc[rows].reset_index(drop=True)
        mjd = float(batch["midpointMjdTai"].max())
        if rubin:
            match = _nearest_within_gate(batch, objects, association.max_distance_arcsec)
            ids = batch["diaSourceId"].to_numpy(np.int64).copy()
            ids[match >= 0] = objects["diaObjectId"].to_numpy(np.int64)[match[match >= 0]]
            new_sources = batch.assign(diaObjectId=pd.array(ids, dtype="Int64"))
        else:
            new_sources = associate(batch, objects, association).sources
        updated = summarise(objects, history, new_sources, sum_cfg, time_mjd=mjd)
        if len(objects):
            keep = ~objects["diaObjectId"].isin(updated["diaObjectId"]).to_numpy()
            objects = pd.concat([objects[keep], updated], ignore_index=True)
        else:
            objects = updated
        stored.append(new_sources)
        history = pd.concat([history, new_sources], ignore_index=True)
    assigned = pd.concat(stored, ignore_index=True)[["diaSourceId", "diaObjectId"]]
    m = assigned.merge(truth, on="diaSourceId")
    m["diaObjectId"] = m["diaObjectId"].astype(np.int64)
    per_truth = m.groupby("truthId")["diaObjectId"]
    main_share = per_truth.agg(lambda s: s.value_counts().iloc[0] / len(s))
    return {
        "n_sources": int(len(sources)),
        "n_stored": int(len(m)),
        "n_reference_objects": int(m["truthId"].nunique()),
        "n_dia_objects": int(m["diaObjectId"].nunique()),
        "n_impure": int((m.groupby("diaObjectId")["truthId"].nunique() > 1).sum()),
        "main_share": {int(k): float(v) for k, v in main_share.items()},
        "n_pieces": {int(k): int(v) for k, v in per_truth.nunique().items()},
        "assignment": dict(zip(m["diaSourceId"], m["diaObjectId"], strict=True)),
    }
