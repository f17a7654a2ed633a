"""The LSSTCam-like focal plane and its per-visit TAN WCS.

Layout: 21 rafts of 3×3 detectors in a 5×5 raft grid without the four corner
rafts, numbered as LSSTCam numbers its science detectors: rafts in the order
R01, R02, R03, R10, ..., R43 (row, column), detectors S00..S22 within a raft,
so detector 94 is R22_S11 at the centre. Detectors are separated by gaps, so
no two overlap on the sky.

All detectors of a visit share one gnomonic (TAN) projection about the
boresight; each detector's FITS WCS is that projection with its own CRPIX.
Focal-plane pixel coordinates ``(u, v)`` are measured from the boresight;
detector pixel ``(x, y)`` (0-based) maps to ``u = x - (nx-1)/2 + cu``,
``v = y - (ny-1)/2 + cv`` with ``(cu, cv)`` the detector centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

__all__ = [
    "FocalPlane",
    "cd_matrix",
    "gnomonic_forward",
    "gnomonic_inverse",
    "wcs_header",
]

N_DETECTORS = 189


@dataclass(frozen=True)
class FocalPlane:
    """Detector centres of the 189-detector grid, in focal-plane pixels.

    Attributes
    ----------
    nx, ny : int
        Detector size (pixels).
    centres : numpy.ndarray
        float64 (189, 2): ``(cu, cv)`` of each detector id.
    names : tuple of str
        ``R{rr}_S{ss}`` per detector id.
    """

    nx: int
    ny: int
    centres: np.ndarray
    names: tuple[str, ...]

    @classmethod
    def lsstcam_like(cls, nx: int, ny: int, gap: float, raft_gap: float) -> FocalPlane:
        """Build the grid for detectors of ``nx × ny`` pixels.

        ``gap`` and ``raft_gap`` are fractions of the detector size.
        """
        pitch = np.array([nx, ny], float) * (1.0 + gap)
        raft_pitch = 3.0 * pitch + np.array([nx, ny], float) * raft_gap
        centres, names = [], []
        for rr in range(5):
            for rc in range(5):
                if rr in (0, 4) and rc in (0, 4):
                    continue
                for sr in range(3):
                    for sc in range(3):
                        centres.append(
                            (
                                (rc - 2) * raft_pitch[0] + (sc - 1) * pitch[0],
                                (rr - 2) * raft_pitch[1] + (sr - 1) * pitch[1],
                            )
                        )
                        names.append(f"R{rr}{rc}_S{sr}{sc}")
        return cls(nx, ny, np.asarray(centres, dtype=np.float64), tuple(names))

    def central(self, k: int) -> tuple[int, ...]:
        """The ``k`` detector ids closest to the boresight, sorted by id."""
        if not 1 <= k <= len(self.centres):
            raise ValueError(f"number of detectors must be in 1..{len(self.centres)}, got {k}")
        r2 = np.round(np.sum(self.centres**2, axis=1), 6)
        order = np.lexsort((np.arange(len(r2)), r2))
        return tuple(sorted(int(i) for i in order[:k]))

    @property
    def radius(self) -> float:
        """Distance (pixels) from the boresight to the farthest detector corner."""
        half = np.array([self.nx, self.ny]) / 2.0
        corners = np.abs(self.centres) + half
        return float(np.sqrt(np.sum(corners**2, axis=1)).max())

    def to_detector(self, detector: int, u: np.ndarray, v: np.ndarray):
        """Focal-plane pixels → 0-based pixel coordinates on ``detector``."""
        cu, cv = self.centres[detector]
        return u - cu + (self.nx - 1) / 2.0, v - cv + (self.ny - 1) / 2.0

    def from_detector(self, detector: int, x: np.ndarray, y: np.ndarray):
        """0-based pixel coordinates on ``detector`` → focal-plane pixels."""
        cu, cv = self.centres[detector]
        return x + cu - (self.nx - 1) / 2.0, y + cv - (self.ny - 1) / 2.0

    def locate(self, u: np.ndarray, v: np.ndarray, detectors=None) -> tuple[np.ndarray, ...]:
        """Which detector each focal-plane point falls on.

        Parameters
        ----------
        u, v : numpy.ndarray
            Focal-plane pixel coordinates.
        detectors : iterable of int, optional
            Only these detectors count (default: all).

        Returns
        -------
        det : numpy.ndarray
            int64 detector id per point, -1 where it lands in a gap or off
            the listed detectors.
        x, y : numpy.ndarray
            float64 0-based pixel coordinates on that detector (NaN for -1).
        """
        u = np.asarray(u, dtype=np.float64)
        v = np.asarray(v, dtype=np.float64)
        cols = np.unique(self.centres[:, 0])
        rows = np.unique(self.centres[:, 1])
        table = np.full((len(rows), len(cols)), -1, dtype=np.int64)
        ci = np.searchsorted(cols, self.centres[:, 0])
        ri = np.searchsorted(rows, self.centres[:, 1])
        allowed = np.ones(len(self.centres), dtype=bool)
        if detectors is not None:
            allowed[:] = False
            allowed[list(detectors)] = True
        table[ri, ci] = np.where(allowed, np.arange(len(self.centres)), -1)

        def nearest(grid, val):
            i = np.clip(np.searchsorted(grid, val), 1, len(grid) - 1)
            left = np.abs(val - grid[i - 1]) <= np.abs(val - grid[i])
            return np.where(left, i - 1, i)

        fin = np.isfinite(u) & np.isfinite(v)
        c = nearest(cols, np.where(fin, u, 0.0))
        r = nearest(rows, np.where(fin, v, 0.0))
        det = np.where(fin, table[r, c], -1)
        safe = np.maximum(det, 0)
        x = u - self.centres[safe, 0] + (self.nx - 1) / 2.0
        y = v - self.centres[safe, 1] + (self.ny - 1) / 2.0
        on = (det >= 0) & (x >= -0.5) & (x < self.nx - 0.5) & (y >= -0.5) & (y < self.ny - 0.5)
        det = np.where(on, det, -1)
        return det, np.where(on, x, np.nan), np.where(on, y, np.nan)


def cd_matrix(rot_deg: float, scale_arcsec: float) -> np.ndarray:
    """FITS CD matrix (deg/pixel) for a detector whose +y axis points ``rot_deg``
    east of north, with the usual sky parity (east to the left)."""
    t = np.deg2rad(rot_deg)
    s = scale_arcsec / 3600.0
    return s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])


def gnomonic_forward(ra, dec, ra0: float, dec0: float):
    """Sky (deg) → gnomonic standard coordinates ``(xi, eta)`` (deg) about
    ``(ra0, dec0)``, as FITS TAN does. Points on the far hemisphere give NaN."""
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    cos_c = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = np.cos(d) * np.sin(a - a0) / cos_c
        eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / cos_c
    bad = cos_c <= 0
    xi = np.where(bad, np.nan, xi)
    eta = np.where(bad, np.nan, eta)
    return np.rad2deg(xi), np.rad2deg(eta)


def gnomonic_inverse(xi, eta, ra0: float, dec0: float):
    """Gnomonic standard coordinates (deg) about ``(ra0, dec0)`` → sky (deg)."""
    x, y = np.deg2rad(xi), np.deg2rad(eta)
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    denom = np.cos(d0) - y * np.sin(d0)
    ra = a0 + np.arctan2(x, denom)
    dec = np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, denom))
    return np.mod(np.rad2deg(ra), 360.0), np.rad2deg(dec)


def wcs_header(
    ra0: float, dec0: float, crpix1: float, crpix2: float, cd: np.ndarray
) -> fits.Header:
    """A celestial TAN WCS as FITS cards (``crpix`` 1-based)."""
    h = fits.Header()
    h["WCSAXES"] = 2
    h["CTYPE1"] = "RA---TAN"
    h["CTYPE2"] = "DEC--TAN"
    h["CUNIT1"] = "deg"
    h["CUNIT2"] = "deg"
    h["CRVAL1"] = float(ra0)
    h["CRVAL2"] = float(dec0)
    h["CRPIX1"] = float(crpix1)
    h["CRPIX2"] = float(crpix2)
    h["CD1_1"] = float(cd[0, 0])
    h["CD1_2"] = float(cd[0, 1])
    h["CD2_1"] = float(cd[1, 0])
    h["CD2_2"] = float(cd[1, 1])
    h["RADESYS"] = "ICRS"
    return h


def detector_wcs_header(fp: FocalPlane, detector: int, ra0, dec0, cd) -> fits.Header:
    """The FITS WCS cards of ``detector`` for a visit with boresight (ra0, dec0)."""
    cu, cv = fp.centres[detector]
    return wcs_header(ra0, dec0, (fp.nx - 1) / 2.0 - cu + 1.0, (fp.ny - 1) / 2.0 - cv + 1.0, cd)


def make_wcs(header: fits.Header) -> WCS:
    """astropy WCS from :func:`wcs_header` cards."""
    return WCS(header)
