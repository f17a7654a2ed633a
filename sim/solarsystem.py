"""The simulated solar system: asteroids on two-body orbits, and their ephemerides.

Every ``moving`` object of the sky (:mod:`sim.sky`) is given a heliocentric
Keplerian orbit that puts it at its drawn sky position at its reference time
``refMjd`` as seen from the observatory. Two populations:

- main-belt-like: heliocentric distance 2.1–3.3 AU at ``refMjd``, speed within
  ±8 % of circular, small radial velocity (e ≲ 0.15);
- near-Earth: 1.05–1.6 AU, speed −15 … +20 % of circular, larger radial
  component and tilt (e up to ≈ 0.4).

At any time the body's position is found by solving Kepler's equation
(vectorised Newton iteration) in the J2000 ecliptic frame, rotated to ICRS
axes, and seen from Cerro Pachón: the Earth's heliocentric state comes from
astropy's built-in ephemeris (``get_body_barycentric_posvel(..., "builtin")``,
no download), the site's geocentric offset from the Earth rotation angle. The
apparent (astrometric) direction is corrected for light time.

Most bodies are *known*: :meth:`SolarSystem.ephemerides` gives, per visit,
what an upstream prediction service (Rubin: MPSky) returns for the bodies in
the field: predicted RA/Dec computed from the *published* orbit — the true
orbit with its mean anomaly perturbed (an along-track error) and its plane
tilted (inclination and node perturbed, the argument of perihelion taking back
the node's turn along the orbit: a cross-track error) by the orbit's
uncertainty, so the prediction misses the true position by a realistic
along-track (larger) and cross-track (smaller) offset — its 1σ uncertainty
(per axis, the RMS of the two: the mean-anomaly error times the along-track
arm ``v/n``, the tilt times ``r``, over the distance Δ; the offsets drawn
follow it, ``tests/sim/test_solarsystem.py``),
the apparent rates, the geometry columns of the alert schema's ``ssSource``
and the published orbit in the columns of ``mpc_orbits``. The other bodies
are *unknown*: no ephemeris, they stay ordinary transients for association.

Units follow Rubin's SDM ``SSSource`` table: positions AU, velocities km/s,
rates deg/day, angles deg. Every draw comes from the stream seeded by the
survey seed, so the same config gives the same orbits and ephemerides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

__all__ = [
    "EPHEMERIS_COLUMNS",
    "EPHEMERIS_FILE",
    "ORBIT_COLUMNS",
    "SolarSystem",
    "SolarSystemConfig",
    "observer_state",
    "orbit_state",
    "pack_designation",
]

#: Gaussian gravitational constant squared: GM_sun in AU³/day².
GM_SUN = 0.01720209895**2
#: Speed of light (AU/day).
C_AU_DAY = 173.1446326846693
AU_KM = 149_597_870.7
KM_S_PER_AU_DAY = AU_KM / 86400.0
#: Obliquity of the J2000 ecliptic (IAU 1976, as the MPC uses), radians.
OBLIQUITY = math.radians(84381.448 / 3600.0)
#: Rubin Observatory (Cerro Pachón): longitude, latitude (deg), height (m).
SITE = (-70.749417, -30.244639, 2663.0)
_EARTH_A_KM, _EARTH_F = 6378.137, 1.0 / 298.257223563

_ECL_TO_ICRS = np.array(
    [
        [1.0, 0.0, 0.0],
        [0.0, math.cos(OBLIQUITY), -math.sin(OBLIQUITY)],
        [0.0, math.sin(OBLIQUITY), math.cos(OBLIQUITY)],
    ]
)

#: The per-visit ephemeris table beside the bundle: ``{root}/{visit}/ephemerides.parquet``.
EPHEMERIS_FILE = "ephemerides.parquet"

#: ephemerides.parquet columns (besides the orbit columns :data:`ORBIT_COLUMNS`) and dtypes.
EPHEMERIS_COLUMNS = {
    "ssObjectId": "int64",
    "designation": "object",
    "ephRa": "float64",
    "ephDec": "float64",
    "ephRaErr": "float32",
    "ephDecErr": "float32",
    "ephRate": "float32",
    "ephRateRa": "float32",
    "ephRateDec": "float32",
    "ephVmag": "float32",
    "elongation": "float32",
    "phaseAngle": "float32",
    "topoRange": "float32",
    "topoRangeRate": "float32",
    "helioRange": "float32",
    "helioRangeRate": "float32",
    **{f"{f}_{c}": "float32" for f in ("helio", "topo") for c in ("x", "y", "z")},
    **{f"{f}_{c}": "float32" for f in ("helio", "topo") for c in ("vx", "vy", "vz", "vtot")},
}

#: The published orbit, in the column names of the alert schema's ``mpc_orbits``.
ORBIT_COLUMNS = {
    "packed_primary_provisional_designation": "object",
    "unpacked_primary_provisional_designation": "object",
    "orbit_type_int": "int32",
    "nopp": "int32",
    "arc_length_total": "float64",
    "nobs_total": "int32",
    "a": "float64",
    "q": "float64",
    "e": "float64",
    "i": "float64",
    "node": "float64",
    "argperi": "float64",
    "peri_time": "float64",
    "mean_anomaly": "float64",
    "period": "float64",
    "mean_motion": "float64",
    "epoch_mjd": "float64",
    "h": "float64",
    "g": "float64",
    "mean_anomaly_unc": "float64",
    "i_unc": "float64",
    "node_unc": "float64",
}

_MAIN_BELT, _NEAR_EARTH = 11, 0  # orbit_type_int: MPC "Main Belt"; 0 here marks NEOs


class SolarSystemConfig(BaseModel, frozen=True, extra="forbid"):
    """The asteroid population of a simulated survey."""

    known_fraction: float = Field(
        0.85, ge=0, le=1, description="Share of bodies with a published orbit (an ephemeris)."
    )
    near_earth_fraction: float = Field(
        0.05, ge=0, le=1, description="Share of near-Earth bodies (the rest are main-belt-like)."
    )
    sigma_along_arcsec: tuple[float, float] = Field(
        (0.05, 0.25),
        description="Median 1σ along-track prediction error (arcsec) of main-belt and "
        "near-Earth orbits at the body's reference time; each body's scale is log-normal "
        "(0.5 in ln) around it, and grows on the sky as the body nears the Earth (r/Δ).",
    )
    sigma_cross_arcsec: tuple[float, float] = Field(
        (0.02, 0.12),
        description="Median 1σ cross-track prediction error (arcsec), main-belt and near-Earth.",
    )
    write_ephemerides: bool = Field(
        True,
        description="Write {root}/{visit}/ephemerides.parquet with each visit (off: a survey "
        "without a prediction service).",
    )
    ephemeris_margin_deg: float = Field(
        0.2,
        ge=0,
        description="Bodies predicted within the field radius plus this margin are listed in a "
        "visit's ephemeris table.",
    )


# ---------------------------------------------------------------- geometry
def _earth_state(mjd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heliocentric geocentre position (AU) and velocity (AU/day) at TAI times ``mjd``."""
    from astropy.coordinates import get_body_barycentric_posvel
    from astropy.time import Time

    def exact(times):
        t = Time(times, format="mjd", scale="tai")
        epos, evel = get_body_barycentric_posvel("earth", t, ephemeris="builtin")
        spos, svel = get_body_barycentric_posvel("sun", t, ephemeris="builtin")
        return (epos - spos).xyz.to_value("AU").T, (evel - svel).xyz.to_value("AU/day").T

    times, inverse = np.unique(mjd, return_inverse=True)
    if len(times) <= _EXACT_TIMES:
        pos, vel = exact(times)
        return pos[inverse], vel[inverse]
    # many distinct times: cubic Hermite between exact states on a grid (error < 1e-11 AU)
    step = _GRID_DAYS
    t0 = math.floor(times[0] / step) * step
    grid = t0 + step * np.arange(int(math.ceil((times[-1] - t0) / step)) + 2)
    gp, gv = exact(grid)
    k = np.clip(((mjd - t0) // step).astype(np.int64), 0, len(grid) - 2)
    u = ((mjd - grid[k]) / step)[:, None]
    p0, p1, v0, v1 = gp[k], gp[k + 1], gv[k] * step, gv[k + 1] * step
    h00, h10, h01, h11 = (
        2 * u**3 - 3 * u**2 + 1,
        u**3 - 2 * u**2 + u,
        -2 * u**3 + 3 * u**2,
        u**3 - u**2,
    )
    pos = h00 * p0 + h10 * v0 + h01 * p1 + h11 * v1
    d00, d10, d01, d11 = 6 * u**2 - 6 * u, 3 * u**2 - 4 * u + 1, -6 * u**2 + 6 * u, 3 * u**2 - 2 * u
    vel = (d00 * p0 + d10 * v0 + d01 * p1 + d11 * v1) / step
    return pos, vel


_EXACT_TIMES, _GRID_DAYS = 64, 0.25


def observer_state(mjd_tai) -> tuple[np.ndarray, np.ndarray]:
    """Heliocentric position (AU) and velocity (AU/day) of the observatory, ICRS axes.

    ``mjd_tai`` may be a scalar or an array; the result has shape ``(n, 3)``.
    The Earth comes from astropy's built-in ephemeris (ERFA's ``epv00``; for
    more than 64 distinct times, interpolated between exact states 0.25 day
    apart); the site is rotated by the Earth rotation angle (UT1 ≈ TAI − 37 s;
    precession, nutation and polar motion are neglected, < 50 m at the site).
    """
    mjd = np.atleast_1d(np.asarray(mjd_tai, dtype=np.float64))
    if mjd.size == 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    pos, vel = _earth_state(mjd)
    lon, lat, h = SITE
    phi, lam = math.radians(lat), math.radians(lon)
    e2 = _EARTH_F * (2 - _EARTH_F)
    n = _EARTH_A_KM / math.sqrt(1 - e2 * math.sin(phi) ** 2)
    rxy = (n + h / 1000.0) * math.cos(phi) / AU_KM
    rz = (n * (1 - e2) + h / 1000.0) * math.sin(phi) / AU_KM
    ut1 = mjd - 37.0 / 86400.0
    era = 2 * np.pi * (0.7790572732640 + 1.00273781191135448 * (ut1 - 51544.5))
    theta = era + lam
    omega = 2 * np.pi * 1.00273781191135448  # rad/day
    site = np.stack([rxy * np.cos(theta), rxy * np.sin(theta), np.full_like(theta, rz)], 1)
    site_v = np.stack([-rxy * omega * np.sin(theta), rxy * omega * np.cos(theta), 0 * theta], 1)
    return pos + site, vel + site_v


@dataclass(frozen=True)
class Orbits:
    """Heliocentric osculating elements (J2000 ecliptic), one row per body.

    ``a`` (AU), ``e``, ``i``, ``node``, ``argperi``, ``mean_anomaly`` (rad) at
    ``epoch`` (MJD TAI).
    """

    a: np.ndarray
    e: np.ndarray
    i: np.ndarray
    node: np.ndarray
    argperi: np.ndarray
    mean_anomaly: np.ndarray
    epoch: np.ndarray


def elements_from_state(r: np.ndarray, v: np.ndarray, epoch: np.ndarray) -> Orbits:
    """Osculating elements from heliocentric ICRS state vectors (AU, AU/day), ``(n, 3)``."""
    r = r @ _ECL_TO_ICRS  # ICRS → ecliptic (the matrix is orthogonal)
    v = v @ _ECL_TO_ICRS
    rn = np.linalg.norm(r, axis=1)
    h = np.cross(r, v)
    hn = np.linalg.norm(h, axis=1)
    evec = np.cross(v, h) / GM_SUN - r / rn[:, None]
    e = np.linalg.norm(evec, axis=1)
    a = 1.0 / (2.0 / rn - np.einsum("ij,ij->i", v, v) / GM_SUN)
    inc = np.arccos(np.clip(h[:, 2] / hn, -1, 1))
    nvec = np.stack([-h[:, 1], h[:, 0], np.zeros(len(h))], 1)
    nn = np.linalg.norm(nvec, axis=1)
    node = np.mod(np.arctan2(nvec[:, 1], nvec[:, 0]), 2 * np.pi)
    argp = np.arccos(np.clip(np.einsum("ij,ij->i", nvec, evec) / (nn * e), -1, 1))
    argp = np.where(evec[:, 2] < 0, 2 * np.pi - argp, argp)
    nu = np.arccos(np.clip(np.einsum("ij,ij->i", evec, r) / (e * rn), -1, 1))
    nu = np.where(np.einsum("ij,ij->i", r, v) < 0, 2 * np.pi - nu, nu)
    ecc_anom = 2 * np.arctan2(np.sqrt(1 - e) * np.sin(nu / 2), np.sqrt(1 + e) * np.cos(nu / 2))
    mean = np.mod(ecc_anom - e * np.sin(ecc_anom), 2 * np.pi)
    return Orbits(a, e, inc, node, argp, mean, np.asarray(epoch, dtype=np.float64))


def orbit_state(orbits: Orbits, mjd) -> tuple[np.ndarray, np.ndarray]:
    """Heliocentric ICRS position (AU) and velocity (AU/day) at ``mjd`` (scalar or per body)."""
    a, e = orbits.a, orbits.e
    n = np.sqrt(GM_SUN / a**3)
    m = np.mod(
        orbits.mean_anomaly + n * (np.asarray(mjd, dtype=np.float64) - orbits.epoch), 2 * np.pi
    )
    ecc = np.where(e < 0.8, m, np.pi)
    for _ in range(30):  # Newton on E - e sin E = M; converges to 1e-15 in < 10 steps for e < 0.9
        step = (ecc - e * np.sin(ecc) - m) / (1 - e * np.cos(ecc))
        ecc = ecc - step
        if np.all(np.abs(step) < 1e-14):
            break
    cos_e, sin_e = np.cos(ecc), np.sin(ecc)
    b = np.sqrt(1 - e**2)
    x, y = a * (cos_e - e), a * b * sin_e
    edot = n / (1 - e * cos_e)
    vx, vy = -a * sin_e * edot, a * b * cos_e * edot
    co, so = np.cos(orbits.node), np.sin(orbits.node)
    cw, sw = np.cos(orbits.argperi), np.sin(orbits.argperi)
    ci, si = np.cos(orbits.i), np.sin(orbits.i)
    p = np.stack([co * cw - so * sw * ci, so * cw + co * sw * ci, sw * si], 1)
    q = np.stack([-co * sw - so * cw * ci, -so * sw + co * cw * ci, cw * si], 1)
    r = x[:, None] * p + y[:, None] * q
    v = vx[:, None] * p + vy[:, None] * q
    return r @ _ECL_TO_ICRS.T, v @ _ECL_TO_ICRS.T


def _radec(vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ra = np.degrees(np.arctan2(vec[:, 1], vec[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(vec[:, 2] / np.linalg.norm(vec, axis=1), -1, 1)))
    return ra, dec


def observe(orbits: Orbits, mjd) -> dict[str, np.ndarray]:
    """Astrometric geometry of every body seen from the observatory at ``mjd`` (TAI).

    ``mjd`` is one time for all bodies or one per body.

    Returns arrays keyed by the ``ssSource`` names (``helio_x`` …, ``topoRange`` …,
    ``phaseAngle``, ``elongation``) plus ``ra``, ``dec`` and the rates
    ``rateRa`` (with cos δ), ``rateDec``, ``rate`` (deg/day).
    """
    mjd = np.broadcast_to(np.asarray(mjd, dtype=np.float64), orbits.a.shape)
    obs_r, obs_v = observer_state(mjd)
    # light time: one iteration leaves t_emit off by ≈ Δ·ρ̇/c² (< 0.1 s, < 2 km)
    r, _ = orbit_state(orbits, mjd)
    t_emit = mjd - np.linalg.norm(r - obs_r, axis=1) / C_AU_DAY
    r, v = orbit_state(orbits, t_emit)
    rho, rho_v = r - obs_r, v - obs_v
    dist = np.linalg.norm(rho, axis=1)
    rn = np.linalg.norm(r, axis=1)
    ra, dec = _radec(rho)
    ar, dr = np.radians(ra), np.radians(dec)
    east = np.stack([-np.sin(ar), np.cos(ar), np.zeros_like(ar)], 1)
    north = np.stack([-np.sin(dr) * np.cos(ar), -np.sin(dr) * np.sin(ar), np.cos(dr)], 1)
    # the apparent direction moves with d(t_emit)/dt = (c + û·v_obs)/(c + û·v_body)
    uhat = rho / dist[:, None]
    dte = (C_AU_DAY + np.einsum("ij,ij->i", uhat, obs_v * np.ones_like(v))) / (
        C_AU_DAY + np.einsum("ij,ij->i", uhat, v)
    )
    apparent_v = v * dte[:, None] - obs_v
    rate_ra = np.degrees(np.einsum("ij,ij->i", apparent_v, east) / dist)
    rate_dec = np.degrees(np.einsum("ij,ij->i", apparent_v, north) / dist)
    sun_dir = -obs_r / np.linalg.norm(obs_r, axis=1)[:, None]
    cos_elong = np.einsum("ij,ij->i", rho / dist[:, None], sun_dir)
    cos_phase = np.einsum("ij,ij->i", r, rho) / (rn * dist)
    out = {
        "ra": ra,
        "dec": dec,
        "rateRa": rate_ra,
        "rateDec": rate_dec,
        "rate": np.hypot(rate_ra, rate_dec),
        "elongation": np.degrees(np.arccos(np.clip(cos_elong, -1, 1))),
        "phaseAngle": np.degrees(np.arccos(np.clip(cos_phase, -1, 1))),
        "topoRange": dist,
        "topoRangeRate": np.einsum("ij,ij->i", rho, rho_v) / dist * KM_S_PER_AU_DAY,
        "helioRange": rn,
        "helioRangeRate": np.einsum("ij,ij->i", r, v) / rn * KM_S_PER_AU_DAY,
    }
    for name, pos, vel in (("helio", r, v), ("topo", rho, rho_v)):
        for k, c in enumerate("xyz"):
            out[f"{name}_{c}"] = pos[:, k]
            out[f"{name}_v{c}"] = vel[:, k] * KM_S_PER_AU_DAY
        out[f"{name}_vtot"] = np.linalg.norm(vel, axis=1) * KM_S_PER_AU_DAY
    return out


def v_magnitude(h, g, helio_range, topo_range, phase_deg) -> np.ndarray:
    """Predicted V from the IAU (H, G) system (Bowell et al. 1989)."""
    alpha = np.radians(phase_deg)
    tan_half = np.tan(alpha / 2)
    phi1 = np.exp(-3.33 * tan_half**0.63)
    phi2 = np.exp(-1.87 * tan_half**1.22)
    return h + 5 * np.log10(helio_range * topo_range) - 2.5 * np.log10((1 - g) * phi1 + g * phi2)


# -------------------------------------------------------------- designations
_HALF_MONTHS = "ABCDEFGHJKLMNOPQRSTUVWXY"  # I is skipped
_SECOND = "ABCDEFGHJKLMNOPQRSTUVWXYZ"  # I is skipped
_CYCLE = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def pack_designation(unpacked: str) -> str:
    """MPC packed form of a provisional designation: ``"2004 JQ12"`` → ``"K04J12Q"``."""
    year, code = unpacked.split(" ")
    cycle = int(code[2:] or 0)
    century = {"18": "I", "19": "J", "20": "K"}[year[:2]]
    return f"{century}{year[2:]}{code[0]}{_CYCLE[cycle // 10]}{cycle % 10}{code[1]}"


def ss_object_id(packed: str) -> int:
    """Rubin's ``ssObjectId``: the packed designation's ASCII bytes as a big-endian integer."""
    return int.from_bytes(packed.encode("ascii"), "big")


def _designation(rng: np.random.Generator, serial: int) -> str:
    """A provisional designation, unique through ``serial``: half-month, second
    letter and cycle count (372,000 per year), the year counted up from a drawn
    start in 2005–2015."""
    per_year = 24 * 25 * 620
    year = 2005 + int(rng.integers(0, 11)) + serial // per_year
    if year > 2099:
        raise ValueError(f"too many bodies for provisional designations: {serial + 1}")
    k = serial % per_year
    half = _HALF_MONTHS[k % 24]
    cycle = k // 600
    return f"{year} {half}{_SECOND[(k // 24) % 25]}{cycle or ''}"


# ------------------------------------------------------------------ the population
class SolarSystem:
    """Orbits of a survey's moving objects, their positions and their ephemerides.

    Parameters
    ----------
    truth_ids : numpy.ndarray
        truthId of each moving object.
    ra, dec : numpy.ndarray
        Where each is seen (deg) at ``ref_mjd``.
    ref_mjd : numpy.ndarray
        Reference time (MJD TAI) of each.
    v_mag : numpy.ndarray
        Apparent r-band magnitude at ``ref_mjd`` (sets H).
    config : SolarSystemConfig
    rng : numpy.random.Generator
    n_rows : int, optional
        Size of the truthId → body lookup :attr:`index` (default: the largest truthId + 1).
    """

    def __init__(
        self, truth_ids, ra, dec, ref_mjd, v_mag, config: SolarSystemConfig, rng, n_rows=None
    ):
        self.config = cfg = config
        self.truth_ids = np.asarray(truth_ids, dtype=np.int64)
        n = len(self.truth_ids)
        size = int(self.truth_ids.max()) + 1 if n else 0
        #: truthId → body index (-1 for objects that are not bodies)
        self.index = np.full(max(size, n_rows or 0), -1, dtype=np.int64)
        self.index[self.truth_ids] = np.arange(n)
        ref_mjd = np.asarray(ref_mjd, dtype=np.float64)
        self.near_earth = rng.random(n) < cfg.near_earth_fraction
        self.known = rng.random(n) < cfg.known_fraction
        r_helio = np.where(self.near_earth, rng.uniform(1.05, 1.6, n), rng.uniform(2.1, 3.3, n))
        speed_f = np.where(self.near_earth, rng.uniform(0.85, 1.2, n), rng.uniform(0.92, 1.08, n))
        gamma = np.radians(rng.normal(0, 1, n) * np.where(self.near_earth, 20.0, 5.0))
        psi = np.radians(rng.normal(0, 1, n) * np.where(self.near_earth, 15.0, 8.0))
        # the position at light-emission time puts the body on the line of sight
        obs_r, _ = observer_state(ref_mjd)
        a_r, d_r = np.radians(ra), np.radians(dec)
        u = np.stack([np.cos(d_r) * np.cos(a_r), np.cos(d_r) * np.sin(a_r), np.sin(d_r)], 1)
        ou = np.einsum("ij,ij->i", obs_r, u)
        delta = -ou + np.sqrt(ou**2 - np.einsum("ij,ij->i", obs_r, obs_r) + r_helio**2)
        r = obs_r + delta[:, None] * u
        rhat = r / r_helio[:, None]
        pole = _ECL_TO_ICRS[:, 2]
        t = np.cross(pole, rhat)
        t /= np.linalg.norm(t, axis=1)[:, None]
        b = np.cross(rhat, t)
        t = np.cos(psi)[:, None] * t + np.sin(psi)[:, None] * b  # tilt → inclination
        vc = np.sqrt(GM_SUN / r_helio) * speed_f
        v = vc[:, None] * (np.cos(gamma)[:, None] * t + np.sin(gamma)[:, None] * rhat)
        self.emit_mjd = ref_mjd - delta / C_AU_DAY
        self.orbits = elements_from_state(r, v, self.emit_mjd)
        # H from the apparent magnitude at the reference epoch (G = 0.15)
        geo = observe(self.orbits, ref_mjd)
        self.g = np.full(n, 0.15)
        self.h = v_mag - (
            v_magnitude(0.0, self.g, geo["helioRange"], geo["topoRange"], geo["phaseAngle"])
        )
        # the published orbit: the true one off by the orbit's uncertainty
        k = np.where(self.near_earth, 1, 0)
        s_al = np.asarray(cfg.sigma_along_arcsec)[k] * np.exp(rng.normal(0, 0.5, n))
        s_cr = np.asarray(cfg.sigma_cross_arcsec)[k] * np.exp(rng.normal(0, 0.5, n))
        # a mean-anomaly error dM moves the body dM·|dr/dM| = dM·v/n along its orbit (r on a
        # circle, up to ~2r near an eccentric perihelion); a plane tilt moves it r·di across
        arm = _along_arm(self.orbits.a, geo["helioRange"])
        scale = np.radians(1 / 3600.0) * geo["topoRange"]
        self.sigma_along, self.sigma_cross = s_al, s_cr
        self.sigma_mean_anomaly = s_al * scale / arm
        self.sigma_plane = s_cr * scale / geo["helioRange"]
        dm = rng.normal(0, 1, n) * self.sigma_mean_anomaly
        di = rng.normal(0, 1, n) * self.sigma_plane
        dnode = rng.normal(0, 1, n) * self.sigma_plane / np.maximum(np.sin(self.orbits.i), 0.05)
        o = self.orbits
        # a node shift at fixed argument of perihelion also turns the body along its orbit by
        # dnode·cos i (at low inclination, all of dnode); taking that back from the argument
        # of perihelion leaves (di, dnode) a tilt of the plane, the cross-track error quoted
        dargperi = -np.cos(o.i) * dnode
        self.published = Orbits(
            o.a, o.e, o.i + di, o.node + dnode, o.argperi + dargperi, o.mean_anomaly + dm, o.epoch
        )
        self.designation = np.empty(n, dtype=object)
        for j in range(n):
            self.designation[j] = _designation(rng, j)
        packed = [pack_designation(d) for d in self.designation]
        self.packed = np.asarray(packed, dtype=object)
        self.ss_object_id = np.array([ss_object_id(p) for p in packed], dtype=np.int64)
        self._cache: dict[float, dict] = {}

    def __len__(self) -> int:
        return len(self.truth_ids)

    def geometry(self, mjd: float) -> dict[str, np.ndarray]:
        """True astrometric geometry of every body at ``mjd`` (see :func:`observe`)."""
        key = float(mjd)
        geo = self._cache.get(key)
        if geo is None:
            geo = observe(self.orbits, key)
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = geo
        return geo

    def truth(self) -> pd.DataFrame:
        """One row per body: truthId, ssObjectId, designation, known, nearEarth, true elements."""
        o = self.orbits
        return pd.DataFrame(
            {
                "truthId": self.truth_ids,
                "ssObjectId": self.ss_object_id,
                "designation": self.designation,
                "known": self.known,
                "nearEarth": self.near_earth,
                "a": o.a,
                "e": o.e,
                "i": np.degrees(o.i),
                "node": np.degrees(o.node) % 360,
                "argperi": np.degrees(o.argperi) % 360,
                "mean_anomaly": np.degrees(o.mean_anomaly) % 360,
                "epoch_mjd": o.epoch,
                "h": self.h,
            }
        )

    def ephemerides(self, mjd: float, ra0: float, dec0: float, radius: float) -> pd.DataFrame:
        """The prediction service's table for a visit at ``mjd`` pointed at ``(ra0, dec0)``.

        Known bodies predicted within ``radius`` + ``ephemeris_margin_deg`` of
        the boresight, with :data:`EPHEMERIS_COLUMNS` and :data:`ORBIT_COLUMNS`.
        """
        known = np.flatnonzero(self.known)
        pub = Orbits(*(getattr(self.published, f)[known] for f in Orbits.__dataclass_fields__))
        geo = observe(pub, mjd)
        sel = (
            _separation(geo["ra"], geo["dec"], ra0, dec0)
            <= radius + self.config.ephemeris_margin_deg
        )
        rows = known[sel]
        g = {k: v[sel] for k, v in geo.items()}
        # the orbit's 1σ, seen from here: the along-track arm v/n and the cross-track arm r,
        # over the distance Δ (an upper bound: the part of the motion along the line of sight
        # does not show on the sky)
        to_arcsec = 1 / g["topoRange"] / (1 / 3600.0 * np.pi / 180.0)
        err_al = self.sigma_mean_anomaly[rows] * _along_arm(pub.a[sel], g["helioRange"]) * to_arcsec
        err_cr = self.sigma_plane[rows] * g["helioRange"] * to_arcsec
        err = np.hypot(err_al, err_cr) / np.sqrt(2)
        cols = {
            "ssObjectId": self.ss_object_id[rows],
            "designation": self.designation[rows],
            "ephRa": g["ra"],
            "ephDec": g["dec"],
            "ephRaErr": err,
            "ephDecErr": err,
            "ephRate": g["rate"],
            "ephRateRa": g["rateRa"],
            "ephRateDec": g["rateDec"],
            "ephVmag": v_magnitude(
                self.h[rows], self.g[rows], g["helioRange"], g["topoRange"], g["phaseAngle"]
            ),
            **{c: g[c] for c in EPHEMERIS_COLUMNS if c in g},
            **self._orbit_columns(rows),
        }
        dts = EPHEMERIS_COLUMNS | ORBIT_COLUMNS
        return pd.DataFrame({c: np.asarray(cols[c]).astype(dt) for c, dt in dts.items()})

    def _orbit_columns(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        p = self.published
        a, e = p.a[rows], p.e[rows]
        n_deg = np.degrees(np.sqrt(GM_SUN / a**3))
        mean = np.degrees(p.mean_anomaly[rows]) % 360
        return {
            "packed_primary_provisional_designation": self.packed[rows],
            "unpacked_primary_provisional_designation": self.designation[rows],
            "orbit_type_int": np.where(self.near_earth[rows], _NEAR_EARTH, _MAIN_BELT),
            "nopp": np.where(self.near_earth[rows], 2, 8),
            "arc_length_total": np.where(self.near_earth[rows], 400.0, 4000.0),
            "nobs_total": np.where(self.near_earth[rows], 60, 400),
            "a": a,
            "q": a * (1 - e),
            "e": e,
            "i": np.degrees(p.i[rows]),
            "node": np.degrees(p.node[rows]) % 360,
            "argperi": np.degrees(p.argperi[rows]) % 360,
            "peri_time": p.epoch[rows] - np.where(mean > 180, mean - 360, mean) / n_deg,
            "mean_anomaly": mean,
            "period": 360.0 / n_deg,
            "mean_motion": n_deg,
            "epoch_mjd": p.epoch[rows],
            "h": self.h[rows],
            "g": self.g[rows],
            "mean_anomaly_unc": np.degrees(self.sigma_mean_anomaly[rows]),
            "i_unc": np.degrees(self.sigma_plane[rows]),
            "node_unc": np.degrees(self.sigma_plane[rows]),
        }


def _along_arm(a, r) -> np.ndarray:
    """``|dr/dM| = v/n`` (AU per radian of mean anomaly) at distance ``r`` on an orbit of ``a``.

    From the vis-viva speed ``v² = GM(2/r − 1/a)`` and the mean motion
    ``n² = GM/a³``: ``a^{3/2}·sqrt(2/r − 1/a)``, which is ``r`` on a circle.
    """
    a = np.asarray(a, dtype=np.float64)
    return a**1.5 * np.sqrt(np.maximum(2.0 / np.asarray(r, dtype=np.float64) - 1.0 / a, 0.0))


def _separation(ra, dec, ra0, dec0) -> np.ndarray:
    """Great-circle distance (deg), haversine."""
    ra, dec = np.radians(ra), np.radians(dec)
    ra0, dec0 = math.radians(ra0), math.radians(dec0)
    h = np.sin((dec - dec0) / 2) ** 2 + np.cos(dec) * math.cos(dec0) * np.sin((ra - ra0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))
