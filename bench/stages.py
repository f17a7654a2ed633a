"""``python -m bench stages``: the four science stages on one detector, timed.

The Rubin design case per detector: 53 new DiaSources (10,000 per visit over
189 detectors) against 2,000 loaded DiaObjects, each with a 30-visit DiaSource
history (60,000 history rows, six bands) and 30 forced sources. One
``calibrate → associate → summarise → forced_photometry`` pass is what a
detector costs in the science part of the pipeline; I/O (bundle read, APDB
load and store) is not included. Forced photometry measures every one of the
2,000 objects (all have ≥ 2 DiaSources) on the difference and science images,
each with planes of its own (``--shared-planes``: one exposure for both, as
this bench had it until 2026-11-22).

Times are per-process CPU time (``time.process_time``: what the detector
costs, robust to other work on a shared machine; the headline) and wall time.

Inputs are synthetic and seeded: a 4072×4000 LSSTCam-sized detector with a TAN
WCS (0.2″/px), a 25×25 Gaussian PSF (σ = 1.7 px), 40 of the 53 sources at
loaded objects (0.05″ scatter), 13 elsewhere.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd
from astropy.wcs import WCS

from apdb import sdm
from core.bundle import BANDS, DetectorBundle, Exposure, VisitInfo
from core.ids import IdPacker
from tasks.associate import AssociationConfig, associate
from tasks.calibrate import CalibrateConfig, calibrate
from tasks.forced import ForcedConfig, forced_photometry, objects_after_visit
from tasks.summarise import SummaryConfig, summarise

NX, NY = 4072, 4000


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [53.1, -28.1]
    w.wcs.crpix = [NX / 2, NY / 2]
    s = 0.2 / 3600
    w.wcs.cd = [[-s, 0.0], [0.0, s]]
    return w


def _psf(side: int = 25, sigma: float = 1.7) -> np.ndarray:
    o = np.arange(side) - side // 2
    k = np.exp(-0.5 * (o[None, :] ** 2 + o[:, None] ** 2) / sigma**2)
    return k / k.sum()


def _exposure(rng: np.random.Generator, wcs: WCS, sky: float, path: str) -> Exposure:
    """Noise of σ = 10 counts around ``sky``, constant variance, an empty mask."""
    image = (rng.normal(0, 10, (NY, NX)) + sky).astype(np.float32)
    variance = np.full((NY, NX), 100.0, np.float32)
    mask = np.zeros((NY, NX), np.int32)
    return Exposure(image, mask, variance, _psf(), wcs, photo_calib=0.5, path=path)


def make_case(
    n_objects: int, n_history: int, n_sources: int, seed: int = 0, shared_planes: bool = False
):
    """Synthetic bundle, raw catalog, loaded objects, source and forced history.

    The difference and science images have planes of their own, as in the
    pipeline; ``shared_planes`` makes them one exposure (and the template),
    the case this bench measured until 2026-11-22 (the second image's pixels
    are then already in cache).
    """
    rng = np.random.default_rng(seed)
    wcs = _wcs()
    exp = _exposure(rng, wcs, 0.0, "difference.fits")
    if shared_planes:
        science = exp
    else:  # its own generator: the rest of the case is the same either way
        science = _exposure(np.random.default_rng(seed + 1), wcs, 500.0, "science.fits")
    visit = VisitInfo(
        visit=5000,
        band="r",
        midpointMjdTai=61090.0,
        exposureTime=30.0,
        boresightRa=53.1,
        boresightDec=-28.1,
        rotAngle=0.0,
        observation_reason="bench",
        target_name="bench",
        detectors=(0,),
    )
    # loaded objects spread over the detector
    ox = rng.uniform(20, NX - 20, n_objects)
    oy = rng.uniform(20, NY - 20, n_objects)
    ora, odec = wcs.all_pix2world(ox, oy, 0)
    obj_ids = np.arange(1, n_objects + 1, dtype=np.int64) << 20
    objects = sdm.conform(
        pd.DataFrame(
            {
                "diaObjectId": obj_ids,
                "validityStartMjdTai": 61087.0,
                "ra": ora,
                "dec": odec,
                "raErr": np.float32(0.03 / 3600),
                "decErr": np.float32(0.03 / 3600),
                "nDiaSources": n_history,
                **{f"{b}_psfFluxNdata": n_history // 6 for b in BANDS},
            }
        ),
        "DiaObject",
    )
    # history: n_history visits per object, 3 days apart, six bands
    n_h = n_objects * n_history
    hist = pd.DataFrame(
        {
            "diaSourceId": np.arange(n_h, dtype=np.int64) + (1 << 40),
            "diaObjectId": pd.array(np.repeat(obj_ids, n_history), dtype="Int64"),
            "ra": np.repeat(ora, n_history) + rng.normal(0, 0.05 / 3600, n_h),
            "dec": np.repeat(odec, n_history) + rng.normal(0, 0.05 / 3600, n_h),
            "raErr": np.float32(0.05 / 3600),
            "decErr": np.float32(0.05 / 3600),
            "band": np.tile(np.array(BANDS, dtype=object), n_h // 6 + 1)[:n_h],
            "midpointMjdTai": 61090.0 - 3.0 * np.tile(np.arange(1, n_history + 1), n_objects),
            "psfFlux": rng.normal(1000, 100, n_h).astype(np.float32),
            "psfFluxErr": np.float32(50),
            "scienceFlux": rng.normal(5000, 100, n_h).astype(np.float32),
            "scienceFluxErr": np.float32(60),
            "visit": np.int64(4000),
            "detector": np.int16(0),
            "timeProcessedMjdTai": 61000.0,
            "x": np.float32(100.0),
            "y": np.float32(100.0),
            "psfNdata": np.int32(625),
            "trailNdata": np.int32(0),
            "dipoleNdata": np.int32(0),
            "bboxSize": np.int32(40),
        }
    )
    history = sdm.conform(hist, "DiaSource")
    forced = sdm.conform(
        pd.DataFrame(
            {
                "diaForcedSourceId": np.arange(n_h, dtype=np.int64) + (1 << 41),
                "diaObjectId": np.repeat(obj_ids, n_history),
                "ra": np.repeat(ora, n_history),
                "dec": np.repeat(odec, n_history),
                "visit": np.int64(4000),
                "detector": np.int16(0),
                "psfFlux": rng.normal(1000, 100, n_h).astype(np.float32),
                "psfFluxErr": np.float32(50),
                "midpointMjdTai": hist["midpointMjdTai"].to_numpy(),
                "band": hist["band"].to_numpy(),
                "timeProcessedMjdTai": 61000.0,
            }
        ),
        "DiaForcedSource",
    )
    # raw catalog: most sources on loaded objects
    n_on = min(int(round(n_sources * 0.75)), n_objects)
    pick = rng.choice(n_objects, n_on, replace=False)
    sx = np.r_[ox[pick] + rng.normal(0, 0.25, n_on), rng.uniform(20, NX - 20, n_sources - n_on)]
    sy = np.r_[oy[pick] + rng.normal(0, 0.25, n_on), rng.uniform(20, NY - 20, n_sources - n_on)]
    raw = pd.DataFrame(
        {
            "x": sx,
            "y": sy,
            "xErr": np.float32(0.25),
            "yErr": np.float32(0.25),
            "psfInstFlux": rng.normal(2000, 300, n_sources).astype(np.float32),
            "psfInstFluxErr": np.float32(100),
            "scienceInstFlux": rng.normal(10000, 300, n_sources).astype(np.float32),
            "scienceInstFluxErr": np.float32(120),
            "templateInstFlux": rng.normal(8000, 300, n_sources).astype(np.float32),
            "templateInstFluxErr": np.float32(30),
            "snr": np.float32(20),
            "reliability": np.float32(0.9),
            "bboxSize": np.int32(40),
            "pixelFlags_bad": False,
        }
    )
    bundle = DetectorBundle(visit, 0, raw, exp, science, exp)
    return bundle, objects, history, forced


def run_once(bundle, objects, history, forced, packer, configs) -> dict[str, float]:
    """One detector through the four stages; seconds per stage."""
    cal_cfg, assoc_cfg, sum_cfg, fc_cfg = configs
    mjd = bundle.visit.midpointMjdTai
    clock = time.perf_counter
    cpu = time.process_time
    w0, c0 = clock(), cpu()
    cal = calibrate(bundle.sources, bundle, cal_cfg, id_packer=packer, time_processed_mjd=mjd)
    w1, c1 = clock(), cpu()
    assoc = associate(cal, objects, assoc_cfg)
    w2, c2 = clock(), cpu()
    updated = summarise(
        objects, history, assoc.sources, sum_cfg, time_mjd=mjd, forced_sources=forced
    )
    w3, c3 = clock(), cpu()
    everything = objects_after_visit(objects, updated)
    res = forced_photometry(everything, bundle, fc_cfg, id_packer=packer, time_processed_mjd=mjd)
    w4, c4 = clock(), cpu()
    return {
        "calibrate": w1 - w0,
        "associate": w2 - w1,
        "summarise": w3 - w2,
        "forced": w4 - w3,
        "total": w4 - w0,
        "cpu_calibrate": c1 - c0,
        "cpu_associate": c2 - c1,
        "cpu_summarise": c3 - c2,
        "cpu_forced": c4 - c3,
        "cpu_total": c4 - c0,
        "n_matched": assoc.n_matched,
        "n_new": assoc.n_new,
        "n_updated": len(updated),
        "n_forced": len(res.sources),
    }


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench stages", description=__doc__.split("\n")[0])
    p.add_argument("--objects", type=int, default=2000)
    p.add_argument("--history", type=int, default=30, help="visits of history per object")
    p.add_argument("--sources", type=int, default=53)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--plugins", action="store_true", help="switch on every summary plugin")
    p.add_argument(
        "--shared-planes",
        action="store_true",
        help="difference and science image are one exposure (the case measured until 2026-11-22)",
    )
    a = p.parse_args(argv)
    bundle, objects, history, forced = make_case(
        a.objects, a.history, a.sources, shared_planes=a.shared_planes
    )
    packer = IdPacker()
    sum_cfg = SummaryConfig(
        percentiles=a.plugins,
        chi2=a.plugins,
        mad=a.plugins,
        skew=a.plugins,
        linear_fit=a.plugins,
        stetson_j=a.plugins,
        lomb_scargle=a.plugins,
    )
    configs = (CalibrateConfig(), AssociationConfig(), sum_cfg, ForcedConfig())
    run_once(bundle, objects, history, forced, packer, configs)  # warm-up (imports, caches)
    runs = [run_once(bundle, objects, history, forced, packer, configs) for _ in range(a.repeats)]
    stages = ("calibrate", "associate", "summarise", "forced", "total")
    ms = {s: statistics.median(r[s] for r in runs) * 1e3 for s in stages}
    cpu_ms = {s: statistics.median(r["cpu_" + s] for r in runs) * 1e3 for s in stages}
    p90 = {s: float(np.percentile([r[s] for r in runs], 90)) * 1e3 for s in stages}
    print(
        f"{a.sources} sources vs {a.objects} objects × {a.history}-visit history, "
        f"{a.repeats} repeats, plugins={'on' if a.plugins else 'off'}"
    )
    print(f"{'stage':<12}{'CPU ms':>10}{'wall ms':>10}{'wall p90':>10}")
    for s in stages:
        print(f"{s:<12}{cpu_ms[s]:>10.2f}{ms[s]:>10.2f}{p90[s]:>10.2f}")
    last = runs[-1]
    print(
        f"matched {last['n_matched']}, new {last['n_new']}, updated objects "
        f"{last['n_updated']}, forced sources {last['n_forced']}"
    )
    return {
        "headline": {"ms_per_detector": cpu_ms["total"], "wall_ms_per_detector": ms["total"]},
        "cpu_median_ms": cpu_ms,
        "wall_median_ms": ms,
        "wall_p90_ms": p90,
        "counts": {k: last[k] for k in ("n_matched", "n_new", "n_updated", "n_forced")},
        "config": vars(a),
    }
