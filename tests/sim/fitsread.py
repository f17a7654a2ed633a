"""Tiny independent readers for the tests: astropy FITS and pyarrow parquet only."""

from __future__ import annotations

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage


def read_image(path) -> dict:
    with fits.open(path) as hdul:
        h = hdul["IMAGE"].header
        return {
            "names": [hdu.name for hdu in hdul],
            "image": hdul["IMAGE"].data.astype(np.float64),
            "mask": hdul["MASK"].data.copy(),
            "variance": hdul["VARIANCE"].data.astype(np.float64),
            "psf": hdul["PSF"].data.copy(),
            "header": h.copy(),
            "mask_header": hdul["MASK"].header.copy(),
            "wcs": WCS(h),
            "photcalib": float(h["PHOTCALIB"]),
            "dtypes": {hdu.name: hdu.data.dtype for hdu in hdul[1:]},
        }


def read_parquet(path) -> pd.DataFrame:
    return pd.read_parquet(path)


def shifted_psf(kernel: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """The kernel moved by a sub-pixel offset (Fourier shift on a zero-padded copy)."""
    pad = 4
    k = np.pad(kernel, pad)
    shifted = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(k), (fy, fx))).real
    return shifted[pad:-pad, pad:-pad]


def forced_psf_flux(image, variance, mask, kernel, x, y):
    """docs/design.md §4.5 forced PSF photometry at (x, y): F = ΣP·I/ΣP², σ = sqrt(ΣP²V)/ΣP².

    Returns (flux, err, clean) with clean False when the stamp leaves the image
    or touches a masked pixel.
    """
    half = kernel.shape[0] // 2
    ny, nx = image.shape
    out_f, out_e, clean = [], [], []
    for xi, yi in zip(x, y, strict=True):
        ix, iy = int(np.floor(xi + 0.5)), int(np.floor(yi + 0.5))
        x0, x1, y0, y1 = ix - half, ix + half + 1, iy - half, iy + half + 1
        if x0 < 0 or y0 < 0 or x1 > nx or y1 > ny:
            out_f.append(np.nan)
            out_e.append(np.nan)
            clean.append(False)
            continue
        p = shifted_psf(kernel, xi - ix, yi - iy)
        img = image[y0:y1, x0:x1]
        var = variance[y0:y1, x0:x1]
        s2 = np.sum(p * p)
        out_f.append(np.sum(p * img) / s2)
        out_e.append(np.sqrt(np.sum(p * p * var)) / s2)
        clean.append(not np.any(mask[y0:y1, x0:x1]))
    return np.array(out_f), np.array(out_e), np.array(clean, dtype=bool)
