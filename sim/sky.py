"""The persistent synthetic sky: populations, light curves and motion.

Four populations, each drawn once from the survey seed:

- ``static``: constant stars (they vanish in the difference image).
- ``variable``: periodic stars, ``F(t) = F̄_b · (1 + a_b · sin(2π(t - t₀)/P + φ))``
  with per-band fractional amplitudes ``a_b`` (larger in bluer bands).
- ``transient``: appear during the survey (no flux in the template), Gaussian
  rise of width ``τ_r`` to the peak at ``t_p``, then exponential decline with
  e-folding time ``τ_f``.
- ``moving``: constant flux, linear motion in the tangent plane of the field
  centre, ``(ξ, η)(t) = (ξ₀, η₀) + (ξ̇, η̇)·(t - t_ref)``; absent from the template.

Colours follow a power law in wavelength, ``F_b = F_r · (λ_b/λ_r)^γ``.
Fluxes are in nJy (AB: ``F = 10^(-0.4 (m - 31.4))``), positions in degrees.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.bundle import BANDS

__all__ = ["KINDS", "Sky", "mag_to_njy"]

KINDS = ("static", "variable", "transient", "moving")
#: Effective wavelengths of the LSST bands (nm).
WAVELENGTH = {"u": 367.0, "g": 482.0, "r": 622.0, "i": 754.0, "z": 869.0, "y": 971.0}
#: Variable-star amplitude relative to r.
AMPLITUDE_SCALE = {"u": 1.5, "g": 1.25, "r": 1.0, "i": 0.85, "z": 0.75, "y": 0.7}


def mag_to_njy(mag):
    """AB magnitude → flux density (nJy)."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=np.float64) - 31.4))


def _power_law_mags(rng, n, lo, hi, slope=0.3):
    """Magnitudes with ``dN/dm ∝ 10^(slope·m)`` between ``lo`` and ``hi``."""
    if hi <= lo:
        return np.full(n, lo)
    a, b = 10.0 ** (slope * lo), 10.0 ** (slope * hi)
    return np.log10(a + rng.random(n) * (b - a)) / slope


class Sky:
    """The truth catalogue of a survey field, evaluated at any epoch.

    Parameters
    ----------
    counts : dict
        Number of objects per kind (:data:`KINDS`).
    radius : float
        Radius (deg, tangent plane) of the disc the objects fill.
    config : sim.config.SurveyConfig
    rng : numpy.random.Generator
    first_id : int
        truthId of the first object.
    """

    def __init__(self, counts: dict, radius: float, config, rng: np.random.Generator):
        cfg = config
        self.epoch0 = cfg.start_mjd
        t0 = cfg.start_mjd
        t1 = cfg.start_mjd + (cfg.n_visits - 1) * cfg.cadence_days
        parts = []
        for kind in KINDS:
            n = int(counts.get(kind, 0))
            r = radius * np.sqrt(rng.random(n))
            phi = 2.0 * np.pi * rng.random(n)
            xi, eta = r * np.cos(phi), r * np.sin(phi)
            lo, hi = {
                "static": cfg.static_mag_range,
                "variable": cfg.variable_mag_range,
                "transient": cfg.transient_mag_range,
                "moving": cfg.moving_mag_range,
            }[kind]
            mag = _power_law_mags(rng, n, lo, hi) if kind == "static" else rng.uniform(lo, hi, n)
            gamma = rng.normal(0.0, 1.0, n)
            df = {"kind": np.full(n, kind, dtype=object), "xi": xi, "eta": eta}
            fr = mag_to_njy(mag)
            for b in BANDS:
                df[f"{b}_flux"] = fr * (WAVELENGTH[b] / WAVELENGTH["r"]) ** gamma
            amp = np.zeros(n)
            if kind == "variable":
                amp = np.exp(rng.uniform(np.log(0.05), np.log(0.6), n))
            for b in BANDS:
                df[f"{b}_amplitude"] = amp * AMPLITUDE_SCALE[b]
            per = np.zeros(n)
            phase = np.zeros(n)
            if kind == "variable":
                per = np.exp(rng.uniform(np.log(0.1), np.log(100.0), n))
                phase = rng.uniform(0.0, 2.0 * np.pi, n)
            df["period"], df["phase"] = per, phase
            tp = np.full(n, np.nan)
            tr = np.full(n, np.nan)
            tf = np.full(n, np.nan)
            if kind == "transient":
                tr = rng.uniform(2.0, 10.0, n)
                tf = rng.uniform(10.0, 60.0, n)
                # peaks from well before the survey, so early visits see as many
                # fading transients as later ones
                tp = rng.uniform(t0 - 200.0, t1 + 10.0, n)
            df["peakMjd"], df["riseTime"], df["fallTime"] = tp, tr, tf
            vxi = np.zeros(n)
            veta = np.zeros(n)
            tref = np.full(n, np.nan)
            if kind == "moving":
                lo_v, hi_v = cfg.moving_speed_range
                speed = np.exp(rng.uniform(np.log(lo_v), np.log(hi_v), n))
                ang = rng.uniform(0.0, 2.0 * np.pi, n)
                vxi, veta = speed * np.cos(ang), speed * np.sin(ang)
                tref = rng.uniform(t0, t1, n)
            df["xiRate"], df["etaRate"], df["refMjd"] = vxi, veta, tref
            parts.append(pd.DataFrame(df))
        cat = pd.concat(parts, ignore_index=True)
        cat.insert(0, "truthId", np.arange(len(cat), dtype=np.int64))
        self.catalog = cat
        self._arrays = {c: cat[c].to_numpy() for c in cat.columns}
        self._kind = cat["kind"].to_numpy()

    def __len__(self) -> int:
        return len(self.catalog)

    def positions(self, mjd: float) -> tuple[np.ndarray, np.ndarray]:
        """Tangent-plane ``(xi, eta)`` (deg) of every object at ``mjd``."""
        a = self._arrays
        moving = self._kind == "moving"
        dt = np.where(moving, mjd - np.nan_to_num(a["refMjd"]), 0.0)
        return a["xi"] + a["xiRate"] * dt, a["eta"] + a["etaRate"] * dt

    def fluxes(self, mjd: float, band: str) -> tuple[np.ndarray, np.ndarray]:
        """True ``(science, template)`` flux (nJy) of every object in ``band`` at ``mjd``.

        The template holds the static sky: mean fluxes of static and variable
        stars, nothing of transients and moving objects.
        """
        a = self._arrays
        kind = self._kind
        mean = a[f"{band}_flux"]
        sci = mean.copy()
        tmpl = mean.copy()
        var = kind == "variable"
        per = np.where(var, a["period"], 1.0)
        sci[var] = (
            mean[var]
            * (
                1.0
                + a[f"{band}_amplitude"]
                * np.sin(2.0 * np.pi * (mjd - self.epoch0) / per + a["phase"])
            )[var]
        )
        tr = kind == "transient"
        dt = mjd - np.nan_to_num(a["peakMjd"])
        with np.errstate(over="ignore", invalid="ignore"):
            shape = np.where(
                dt < 0,
                np.exp(-0.5 * (dt / np.nan_to_num(a["riseTime"], nan=1.0)) ** 2),
                np.exp(-dt / np.nan_to_num(a["fallTime"], nan=1.0)),
            )
        sci[tr] = mean[tr] * shape[tr]
        tmpl[tr | (kind == "moving")] = 0.0
        return sci, tmpl
