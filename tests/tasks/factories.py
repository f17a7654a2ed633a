"""Seeded builders of synthetic exposures, bundles and catalogs for the stage tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
from astropy.wcs import WCS
from scipy.special import erf

from core.bundle import DetectorBundle, Exposure, VisitInfo


def tan_wcs(
    ra0: float, dec0: float, nx: int, ny: int, scale_arcsec: float = 0.2, rot_deg: float = 0.0
) -> WCS:
    """A TAN WCS with (ra0, dec0) at the image centre (0-based (nx-1)/2, (ny-1)/2)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [(nx - 1) / 2 + 1, (ny - 1) / 2 + 1]
    s = scale_arcsec / 3600.0
    c, si = np.cos(np.radians(rot_deg)), np.sin(np.radians(rot_deg))
    w.wcs.cd = [[-s * c, s * si], [s * si, s * c]]
    return w


def pixel_gaussian(dx: np.ndarray, dy: np.ndarray, sigma: float) -> np.ndarray:
    """Fraction of a unit-flux Gaussian (σ px) falling in the pixel at offset (dx, dy)."""
    r2 = np.sqrt(2.0) * sigma

    def one(d):
        return 0.5 * (erf((d + 0.5) / r2) - erf((d - 0.5) / r2))

    return one(dx) * one(dy)


def gaussian_psf(side: int = 21, sigma: float = 1.5) -> np.ndarray:
    """Pixel-integrated Gaussian kernel, normalised to sum 1."""
    h = side // 2
    o = np.arange(-h, h + 1, dtype=np.float64)
    k = pixel_gaussian(o[None, :], o[:, None], sigma)
    return k / k.sum()


def render(shape, x, y, flux, sigma: float = 1.5, half: int = 12) -> np.ndarray:
    """Image (counts) of point sources at 0-based (x, y), pixel-integrated Gaussians."""
    ny, nx = shape
    img = np.zeros(shape, dtype=np.float64)
    for xi, yi, fi in zip(np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(flux), strict=True):
        cx, cy = int(np.floor(xi + 0.5)), int(np.floor(yi + 0.5))
        x0, x1 = max(cx - half, 0), min(cx + half + 1, nx)
        y0, y1 = max(cy - half, 0), min(cy + half + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = np.arange(x0, x1)[None, :]
        ys = np.arange(y0, y1)[:, None]
        img[y0:y1, x0:x1] += fi * pixel_gaussian(xs - xi, ys - yi, sigma)
    return img


def make_exposure(
    shape=(200, 200),
    wcs: WCS | None = None,
    *,
    image=None,
    variance=None,
    mask=None,
    psf=None,
    photo_calib: float = 2.0,
    photo_calib_err: float = 0.0,
    path: str = "synthetic.fits",
) -> Exposure:
    ny, nx = shape
    return Exposure(
        image=np.zeros(shape, np.float32) if image is None else np.asarray(image, np.float32),
        mask=np.zeros(shape, np.int32) if mask is None else np.asarray(mask, np.int32),
        variance=np.ones(shape, np.float32)
        if variance is None
        else np.asarray(variance, np.float32),
        psf=gaussian_psf() if psf is None else psf,
        wcs=wcs if wcs is not None else tan_wcs(150.0, 2.0, nx, ny),
        photo_calib=photo_calib,
        photo_calib_err=photo_calib_err,
        path=path,
    )


def make_visit(visit: int = 1000, band: str = "r", mjd: float = 60000.0) -> VisitInfo:
    return VisitInfo(
        visit=visit,
        band=band,
        midpointMjdTai=mjd,
        exposureTime=30.0,
        boresightRa=150.0,
        boresightDec=2.0,
        rotAngle=0.0,
        observation_reason="test",
        target_name="field",
        detectors=(0, 1, 2, 3),
    )


def make_bundle(
    sources: pd.DataFrame | None = None,
    *,
    difference: Exposure | None = None,
    science: Exposure | None = None,
    template: Exposure | None = None,
    visit: VisitInfo | None = None,
    detector: int = 7,
) -> DetectorBundle:
    diff = difference or make_exposure(path="difference.fits")
    return DetectorBundle(
        visit=visit or make_visit(),
        detector=detector,
        sources=sources if sources is not None else pd.DataFrame(),
        difference=diff,
        science=science
        or make_exposure(diff.shape, diff.wcs, photo_calib=3.0, path="science.fits"),
        template=template
        or make_exposure(diff.shape, diff.wcs, photo_calib=5.0, path="template.fits"),
    )


def raw_sources(n: int = 5, seed: int = 0, shape=(200, 200)) -> pd.DataFrame:
    """A raw instrumental catalog with every optional column (docs/design.md §2)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    return pd.DataFrame(
        {
            "x": rng.uniform(10, nx - 10, n),
            "y": rng.uniform(10, ny - 10, n),
            "xErr": rng.uniform(0.05, 0.3, n).astype(np.float32),
            "yErr": rng.uniform(0.05, 0.3, n).astype(np.float32),
            "psfInstFlux": rng.normal(500, 200, n),
            "psfInstFluxErr": rng.uniform(10, 30, n),
            "apInstFlux": rng.normal(500, 200, n),
            "apInstFluxErr": rng.uniform(10, 30, n),
            "scienceInstFlux": rng.normal(900, 100, n),
            "scienceInstFluxErr": rng.uniform(10, 30, n),
            "templateInstFlux": rng.normal(400, 100, n),
            "templateInstFluxErr": rng.uniform(10, 30, n),
            "snr": rng.uniform(5, 50, n).astype(np.float32),
            "bboxSize": rng.integers(20, 60, n).astype(np.int64),
            "reliability": rng.uniform(0, 1, n).astype(np.float32),
            "isDipole": rng.uniform(0, 1, n) < 0.2,
            "trailLength": rng.uniform(0, 10, n),
            "pixelFlags_bad": rng.uniform(0, 1, n) < 0.2,
            "pixelFlags_cr": rng.uniform(0, 1, n) < 0.2,
        }
    )
