"""Seeded factories for the alert tests: detector bundles and SDM catalogs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.wcs import WCS

from apdb import sdm
from tasks.bundle import DetectorBundle, Exposure, VisitInfo

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
