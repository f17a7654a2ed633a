"""Point-spread functions: analytic profiles, kernels, sub-pixel stamps, and
the PSF-fit measurements the simulator makes on its own pixels.

A PSF is sampled at pixel centres (not integrated over pixels) and
normalised by the sum ``Z`` of its samples on the centred kernel grid, so the
``PSF`` kernel written to the files sums to exactly 1 and a source of flux
``F`` (counts) centred at sub-pixel offset ``(fx, fy)`` contributes
``F · profile(X - x, Y - y) / Z`` to pixel ``(X, Y)``. The kernels are well
sampled (FWHM ≥ 3 px at 0.2″/px) and truncated at 2.5 FWHM, so shifted
stamps also sum to 1 within 1e-4 (the Moffat wing crossing the stamp edge).

Measurements follow docs/design.md §4.5: ``F = Σ P·I / Σ P²`` and
``σF = sqrt(Σ P²·V) / Σ P²`` with ``P`` the PSF shifted to the position.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Psf", "gather", "psf_photometry", "refine_centroid", "render"]

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class Psf:
    """A circular PSF of one visit.

    Parameters
    ----------
    fwhm : float
        Full width at half maximum (pixels).
    model : {"gaussian", "moffat"}
    beta : float
        Moffat β (ignored for Gaussian).
    """

    fwhm: float
    model: str = "moffat"
    beta: float = 4.765

    @property
    def half(self) -> int:
        """Kernel half-width (pixels): the kernel side is ``2*half + 1``."""
        return int(math.ceil(2.5 * self.fwhm))

    @property
    def side(self) -> int:
        """Kernel side (odd, pixels)."""
        return 2 * self.half + 1

    @property
    def alpha(self) -> float:
        """Moffat core width α (pixels), or Gaussian σ (pixels)."""
        if self.model == "gaussian":
            return self.fwhm / FWHM_PER_SIGMA
        return self.fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0))

    @property
    def sigma(self) -> float:
        """Gaussian-equivalent σ (pixels): FWHM / 2.3548."""
        return self.fwhm / FWHM_PER_SIGMA

    def profile(self, dx: np.ndarray, dy: np.ndarray, grad: bool = False):
        """Un-normalised profile at offsets ``(dx, dy)`` from the centre.

        With ``grad``, also the derivatives with respect to the centre
        position ``(x_c, y_c)`` (i.e. ``-∂/∂dx``, ``-∂/∂dy``).
        """
        r2 = dx * dx + dy * dy
        a = self.alpha
        if self.model == "gaussian":
            p = np.exp(-0.5 * r2 / (a * a))
            if not grad:
                return p
            return p, p * dx / (a * a), p * dy / (a * a)
        base = 1.0 + r2 / (a * a)
        p = base ** (-self.beta)
        if not grad:
            return p
        g = 2.0 * self.beta / (a * a) * p / base
        return p, g * dx, g * dy

    @functools.cached_property
    def norm(self) -> float:
        """``Z``: sum of the profile over the centred kernel grid."""
        g = np.arange(-self.half, self.half + 1, dtype=np.float64)
        return float(self.profile(g[None, :], g[:, None]).sum())

    def kernel(self) -> np.ndarray:
        """The centred kernel image (float64, odd square side, sums to 1)."""
        return self._kernel.copy()

    @functools.cached_property
    def _kernel(self) -> np.ndarray:
        g = np.arange(-self.half, self.half + 1, dtype=np.float64)
        k = self.profile(g[None, :], g[:, None])
        return k / k.sum()

    def stamps(self, x: np.ndarray, y: np.ndarray, grad: bool = False):
        """PSF stamps for sources at 0-based positions ``(x, y)``.

        Returns
        -------
        ix, iy : numpy.ndarray
            int64 nearest pixel of each source (stamp centre).
        p : numpy.ndarray
            float64 (n, side, side): ``P`` at the source's sub-pixel position,
            normalised by :attr:`norm`; with ``grad`` also ``∂P/∂x_c`` and
            ``∂P/∂y_c``.
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        ix = np.floor(x + 0.5).astype(np.int64)
        iy = np.floor(y + 0.5).astype(np.int64)
        g = np.arange(-self.half, self.half + 1, dtype=np.float64)
        dx = g[None, None, :] - (x - ix)[:, None, None]
        dy = g[None, :, None] - (y - iy)[:, None, None]
        z = self.norm
        if grad:
            p, gx, gy = self.profile(dx, dy, grad=True)
            return ix, iy, p / z, gx / z, gy / z
        return ix, iy, self.profile(dx, dy) / z

    def sum_p2(self) -> float:
        """Σ P² of the centred kernel (1/pixels): noise-equivalent area is its inverse."""
        return float(np.sum(self._kernel**2))

    def sum_p3(self) -> float:
        """Σ P³ of the centred kernel (for source Poisson noise in PSF fluxes)."""
        return float(np.sum(self._kernel**3))

    def encircled(self, radius: float) -> float:
        """Fraction of the light within ``radius`` pixels (analytic, untruncated)."""
        if self.model == "gaussian":
            return 1.0 - math.exp(-0.5 * radius**2 / self.alpha**2)
        return 1.0 - (1.0 + radius**2 / self.alpha**2) ** (1.0 - self.beta)


def _window_index(shape, ix, iy, half):
    """Flat indices and in-bounds mask of (n, 2h+1, 2h+1) windows centred at (ix, iy)."""
    ny, nx = shape
    g = np.arange(-half, half + 1)
    xs = ix[:, None, None] + g[None, None, :]
    ys = iy[:, None, None] + g[None, :, None]
    inb = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
    flat = np.clip(ys, 0, ny - 1) * nx + np.clip(xs, 0, nx - 1)
    return flat, inb


def gather(image: np.ndarray, ix, iy, half: int, fill=0.0):
    """Windows of side ``2*half+1`` of ``image`` around ``(ix, iy)``.

    Returns ``(values, inb)``; off-image pixels hold ``fill`` and ``inb`` is False.
    """
    flat, inb = _window_index(image.shape, np.asarray(ix), np.asarray(iy), half)
    vals = image.reshape(-1)[flat]
    return np.where(inb, vals, fill), inb


def render(shape, psf: Psf, x, y, flux) -> np.ndarray:
    """Image (float64, ``shape``) of point sources of ``flux`` counts at ``(x, y)``.

    Each source is stamped into a window of the kernel's size around it;
    light falling off the image is lost, as on a real detector.
    """
    out = np.zeros(shape[0] * shape[1], dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return out.reshape(shape)
    ix, iy, p = psf.stamps(x, y)
    flat, inb = _window_index(shape, ix, iy, psf.half)
    w = p * np.asarray(flux, dtype=np.float64)[:, None, None]
    out += np.bincount(flat[inb], weights=w[inb], minlength=out.size)
    return out.reshape(shape)


def psf_photometry(image, variance, psf: Psf, x, y):
    """PSF-weighted flux at fixed positions (docs/design.md §4.5).

    Parameters
    ----------
    image, variance : numpy.ndarray
        Pixels (counts) and their variance (counts²).
    psf : Psf
    x, y : numpy.ndarray
        0-based positions (pixels).

    Returns
    -------
    flux, flux_err : numpy.ndarray
        float64 counts; NaN where the PSF has no pixel on the image.
    edge : numpy.ndarray
        bool, True where part of the PSF stamp is off the image.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        e = np.empty(0)
        return e, e.copy(), np.empty(0, dtype=bool)
    ix, iy, p = psf.stamps(x, y)
    img, inb = gather(image, ix, iy, psf.half)
    var, _ = gather(variance, ix, iy, psf.half)
    p = np.where(inb, p, 0.0)
    s2 = np.einsum("nij,nij->n", p, p)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.einsum("nij,nij->n", p, img) / s2
        err = np.sqrt(np.einsum("nij,nij->n", p * p, var)) / s2
    edge = ~inb.all(axis=(1, 2))
    return np.where(s2 > 0, f, np.nan), np.where(s2 > 0, err, np.nan), edge


def refine_centroid(image, variance, psf: Psf, x, y, iterations: int = 3, max_step: float = 1.0):
    """Fit positions by Gauss–Newton on a linearised PSF model.

    Models each window as ``F·P + G·∂P/∂x + H·∂P/∂y`` (uniform weights), steps
    the position by ``(G/F, H/F)`` (at most ``max_step`` px per iteration) and
    repeats. Position errors come from the sandwich covariance of (F, G, H)
    under the per-pixel ``variance``.

    Returns
    -------
    x, y, x_err, y_err : numpy.ndarray
        float64 pixels.
    failed : numpy.ndarray
        bool: a step had to be clipped on the last iteration, the fit was
        singular, or the position left the image.
    """
    x = np.array(x, dtype=np.float64)
    y = np.array(y, dtype=np.float64)
    n = x.size
    failed = np.zeros(n, dtype=bool)
    xerr = np.full(n, np.nan)
    yerr = np.full(n, np.nan)
    if n == 0:
        return x, y, xerr, yerr, failed
    ny, nx = image.shape
    for it in range(iterations):
        ix, iy, p, gx, gy = psf.stamps(x, y, grad=True)
        img, inb = gather(image, ix, iy, psf.half)
        a = np.stack([p, gx, gy], axis=-1) * inb[..., None]  # (n, s, s, 3)
        a = a.reshape(n, -1, 3)
        m = np.einsum("npi,npj->nij", a, a)
        rhs = np.einsum("npi,np->ni", a, img.reshape(n, -1))
        det = np.linalg.det(m)
        ok = np.abs(det) > 1e-300
        sol = np.zeros((n, 3))
        sol[ok] = np.linalg.solve(m[ok], rhs[ok][..., None])[..., 0]
        f = sol[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            dx = np.where(f != 0, sol[:, 1] / f, 0.0)
            dy = np.where(f != 0, sol[:, 2] / f, 0.0)
        dx = np.nan_to_num(dx)
        dy = np.nan_to_num(dy)
        clipped = (np.abs(dx) > max_step) | (np.abs(dy) > max_step) | ~ok
        x = x + np.clip(dx, -max_step, max_step)
        y = y + np.clip(dy, -max_step, max_step)
        if it == iterations - 1:
            failed = clipped
            var, _ = gather(variance, ix, iy, psf.half)
            mv = np.einsum("npi,np,npj->nij", a, var.reshape(n, -1), a)
            minv = np.zeros_like(m)
            minv[ok] = np.linalg.inv(m[ok])
            cov = minv @ mv @ minv
            with np.errstate(divide="ignore", invalid="ignore"):
                xerr = np.sqrt(cov[:, 1, 1]) / np.abs(f)
                yerr = np.sqrt(cov[:, 2, 2]) / np.abs(f)
    off = (x < -0.5) | (x >= nx - 0.5) | (y < -0.5) | (y >= ny - 0.5)
    failed |= off | ~np.isfinite(xerr) | ~np.isfinite(yerr)
    return x, y, xerr, yerr, failed
