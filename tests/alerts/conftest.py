"""Seeded factories for the alert tests: detector bundles and SDM catalogs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.wcs import WCS

from apdb import sdm
from core.bundle import DetectorBundle, Exposure, VisitInfo

NX, NY = 400, 300
PIXEL_SCALE_DEG = 0.2 / 3600.0


def make_wcs(ra0: float = 150.0, dec0: float = -30.0, rot_deg: float = 30.0) -> WCS:
    """A TAN WCS with 0.2″ pixels, rotated by ``rot_deg``, centred on the image."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [NX / 2 + 1, NY / 2 + 1]
    c, s = np.cos(np.deg2rad(rot_deg)), np.sin(np.deg2rad(rot_deg))
    w.wcs.cd = PIXEL_SCALE_DEG * np.array([[-c, s], [s, c]])
    return w


def gaussian_psf(side: int, sigma: float) -> np.ndarray:
    r = np.arange(side) - side // 2
    k = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return k / k.sum()


def make_exposure(rng, wcs, calib: float, psf_side: int, name: str) -> Exposure:
    image = rng.normal(0.0, 5.0, (NY, NX)).astype(np.float32)
    variance = np.full((NY, NX), 25.0, dtype=np.float32) + rng.random((NY, NX), dtype=np.float32)
    mask = rng.integers(0, 4, (NY, NX)).astype(np.int32)
    return Exposure(
        image=image,
        mask=mask,
        variance=variance,
        psf=gaussian_psf(psf_side, 2.0),
        wcs=wcs,
        photo_calib=calib,
        path=f"/sim/{name}.fits",
        header={"ROTPA": 30.0},
    )


def make_visit(visit: int = 7001, mjd: float = 61000.3) -> VisitInfo:
    return VisitInfo(
        visit=visit,
        band="r",
        midpointMjdTai=mjd,
        exposureTime=30.0,
        boresightRa=150.0,
        boresightDec=-30.0,
        rotAngle=30.0,
        observation_reason="wfd",
        target_name="field_1",
        detectors=(3,),
    )


def make_bundle(seed: int = 1, visit: VisitInfo | None = None) -> DetectorBundle:
    rng = np.random.default_rng(seed)
    wcs = make_wcs()
    visit = visit or make_visit()
    return DetectorBundle(
        visit=visit,
        detector=3,
        sources=pd.DataFrame({"x": [], "y": [], "psfInstFlux": [], "psfInstFluxErr": []}),
        difference=make_exposure(rng, wcs, 2.5, 41, "difference"),
        science=make_exposure(rng, wcs, 2.5, 41, "science"),
        template=make_exposure(rng, wcs, 3.0, 55, "template"),
    )


def make_dia_sources(
    rng, n: int, visit: int, detector: int, mjd: float, first_id: int, object_ids, wcs
) -> pd.DataFrame:
    """``n`` SDM DiaSource rows with realistic values and some nulls."""
    x = rng.uniform(5.0, NX - 5.0, n)
    y = rng.uniform(5.0, NY - 5.0, n)
    sky = wcs.all_pix2world(np.column_stack([x, y]), 0)
    df = pd.DataFrame(
        {
            "diaSourceId": np.arange(first_id, first_id + n, dtype=np.int64),
            "visit": np.full(n, visit, dtype=np.int64),
            "detector": np.full(n, detector, dtype=np.int16),
            "diaObjectId": pd.array(np.asarray(object_ids, dtype=np.int64), dtype="Int64"),
            "midpointMjdTai": np.full(n, mjd),
            "ra": sky[:, 0],
            "dec": sky[:, 1],
            "raErr": rng.uniform(1e-5, 2e-5, n).astype(np.float32),
            "decErr": rng.uniform(1e-5, 2e-5, n).astype(np.float32),
            "x": x.astype(np.float32),
            "y": y.astype(np.float32),
            "xErr": np.where(rng.random(n) < 0.3, np.nan, 0.1).astype(np.float32),
            "psfFlux": rng.normal(1000, 300, n).astype(np.float32),
            "psfFluxErr": rng.uniform(50, 80, n).astype(np.float32),
            "psfNdata": np.full(n, 441, dtype=np.int32),
            "trailNdata": np.zeros(n, dtype=np.int32),
            "dipoleNdata": np.zeros(n, dtype=np.int32),
            "snr": rng.uniform(5, 50, n).astype(np.float32),
            "band": np.array(["r"] * n, dtype=object),
            "timeProcessedMjdTai": np.full(n, mjd + 0.001),
            "bboxSize": rng.integers(10, 120, n).astype(np.int64),
            "pixelFlags_bad": rng.random(n) < 0.1,
            "isDipole": pd.array(
                [None if k % 3 == 0 else bool(k % 2) for k in range(n)], dtype="boolean"
            ),
            "reliability": np.where(rng.random(n) < 0.5, np.nan, 0.9).astype(np.float32),
        }
    )
    return sdm.conform(df, "DiaSource")


@pytest.fixture
def bundle() -> DetectorBundle:
    return make_bundle()


def make_dia_objects(rng, object_ids, ra, dec, n_sources, mjd: float) -> pd.DataFrame:
    n = len(object_ids)
    df = {
        "diaObjectId": np.asarray(object_ids, dtype=np.int64),
        "validityStartMjdTai": np.full(n, mjd),
        "ra": np.asarray(ra, dtype=np.float64),
        "dec": np.asarray(dec, dtype=np.float64),
        "nDiaSources": np.asarray(n_sources, dtype=np.int32),
        "r_psfFluxMean": rng.normal(1000, 100, n).astype(np.float32),
        "r_psfFluxSigma": np.where(rng.random(n) < 0.5, np.nan, 12.0).astype(np.float32),
        "firstDiaSourceMjdTai": np.full(n, mjd - 100),
    }
    for b in "ugrizy":
        df[f"{b}_psfFluxNdata"] = np.where(b == "r", n_sources, 0).astype(np.int32)
    return sdm.conform(pd.DataFrame(df), "DiaObject")


def make_forced(rng, object_ids, per_object: int, mjd0: float, first_id: int) -> pd.DataFrame:
    obj = np.repeat(np.asarray(object_ids, dtype=np.int64), per_object)
    n = len(obj)
    df = pd.DataFrame(
        {
            "diaForcedSourceId": np.arange(first_id, first_id + n, dtype=np.int64),
            "diaObjectId": obj,
            "ra": rng.uniform(149.9, 150.1, n),
            "dec": rng.uniform(-30.1, -29.9, n),
            "visit": rng.integers(1000, 7000, n).astype(np.int64),
            "detector": np.full(n, 3, dtype=np.int16),
            "midpointMjdTai": mjd0 - rng.uniform(0, 400, n),
            "psfFlux": rng.normal(0, 50, n).astype(np.float32),
            "psfFluxErr": np.where(rng.random(n) < 0.2, np.nan, 40.0).astype(np.float32),
            "band": np.array(["g", "r"] * (n // 2) + ["r"] * (n % 2), dtype=object),
            "timeProcessedMjdTai": np.full(n, mjd0),
        }
    )
    return sdm.conform(df, "DiaForcedSource")


def make_alert_inputs(seed: int = 3, n_alerts: int = 40, depth: int = 12, forced: int = 8):
    """A simulated detector: new sources, objects, history and forced history.

    Object ``k`` has ``k % (depth + 1)`` earlier DiaSources (ages 0-400 days, so
    some fall outside the 360-day window); every 5th new source has no
    DiaObject (``diaObjectId`` null).
    """
    rng = np.random.default_rng(seed)
    bundle = make_bundle(seed)
    visit = bundle.visit
    object_ids = np.arange(10_000, 10_000 + n_alerts, dtype=np.int64)
    new = make_dia_sources(
        rng,
        n_alerts,
        visit.visit,
        3,
        visit.midpointMjdTai,
        5_000_000,
        object_ids,
        bundle.difference.wcs,
    )
    new["diaObjectId"] = new["diaObjectId"].where(np.arange(n_alerts) % 5 != 4, pd.NA)
    counts = np.arange(n_alerts) % (depth + 1)
    hist_obj = np.repeat(object_ids, counts)
    hist = make_dia_sources(
        rng, len(hist_obj), 6000, 3, 0.0, 1_000, hist_obj, bundle.difference.wcs
    )
    hist["midpointMjdTai"] = visit.midpointMjdTai - rng.uniform(1, 400, len(hist_obj))
    hist["visit"] = rng.integers(1000, 7000, len(hist_obj)).astype(np.int64)
    sky = new[["ra", "dec"]].to_numpy()
    objects = make_dia_objects(rng, object_ids, sky[:, 0], sky[:, 1], counts + 1, 60000.0)
    forced_df = make_forced(rng, object_ids, forced, visit.midpointMjdTai, 9_000_000)
    return bundle, new, objects, hist, forced_df
