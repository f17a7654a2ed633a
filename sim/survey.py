"""The synthetic survey: visits, detector scenes, images, catalogs and truth.

:class:`Survey` turns one :class:`~sim.config.SurveyConfig` into a persistent
sky observed visit after visit. Every random quantity is drawn from a stream
seeded by ``(seed, purpose, visit, detector)``, so any visit — and any
detector of it — can be simulated alone and always comes out the same.

Methods take the visit's index ``k`` (0, 1, ... in time order; the seed of its
draws). What they write and return carries its LSSTCam visit number
``day_obs·10⁵ + seq_num`` (:meth:`~sim.config.SurveyConfig.visit_number`):
``write_visit(root, 0)`` of the default survey writes ``{root}/2025112000001/``.

Two ways to observe a visit:

- :meth:`Survey.write_visit` renders the science, template and difference
  images, measures DiaSources on the difference pixels (Gauss–Newton PSF
  centroid, then docs/design.md §4.5 PSF flux, aperture flux, forced science and
  template fluxes, pixel flags from the mask), and writes the docs/design.md §2 bundle
  plus ground truth.
- :meth:`Survey.visit_catalog` is the fast path: the same sources, the same
  bogus injections and the same detection rule, with measurement noise drawn
  from the analytic PSF-photometry errors instead of rendered pixels. It is
  statistically equivalent to (not identical with) the measured catalog.
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import fsspec
import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS
from scipy.spatial import cKDTree
from scipy.special import ndtr

from core.bundle import MASK_PLANES, VisitInfo, detector_path, visit_path
from sim import io as simio
from sim.config import DEFAULT_PHOTCALIB, DEFAULT_SKY, SurveyConfig
from sim.focalplane import (
    N_DETECTORS,
    FocalPlane,
    cd_matrix,
    detector_wcs_header,
    gnomonic_forward,
    gnomonic_inverse,
)
from sim.psf import Psf, gather, psf_photometry, refine_centroid, render
from sim.sky import KINDS, Sky
from sim.solarsystem import EPHEMERIS_FILE, SolarSystem

__all__ = ["CATALOG_COLUMNS", "TRUTH_COLUMNS", "Survey", "VisitParams"]

# Seed-stream purposes.
_VISIT, _BOGUS, _SCI_NOISE, _TMPL_NOISE, _BADCOL, _CALIB, _RELIAB, _FAST, _SKY, _TRIAL = range(
    1, 11
)
_SOLAR = 11
_COLOUR, _DCR, _ASTROM = range(12, 15)
BOGUS_KINDS = ("bogus_noise", "bogus_dipole", "bogus_cr")
_BIT = {k: np.int32(1 << v) for k, v in MASK_PLANES.items()}

#: diaSources.parquet columns and dtypes.
CATALOG_COLUMNS = {
    "x": "float64",
    "y": "float64",
    "xErr": "float32",
    "yErr": "float32",
    "psfInstFlux": "float32",
    "psfInstFluxErr": "float32",
    "apInstFlux": "float32",
    "apInstFluxErr": "float32",
    "scienceInstFlux": "float32",
    "scienceInstFluxErr": "float32",
    "templateInstFlux": "float32",
    "templateInstFluxErr": "float32",
    "snr": "float32",
    "bboxSize": "int32",
    "reliability": "float32",
    "isDipole": "bool",
    "isNegative": "bool",
    "trailLength": "float32",
    "centroid_flag": "bool",
    "psfFlux_flag": "bool",
    "psfFlux_flag_edge": "bool",
    "forced_PsfFlux_flag_edge": "bool",
    "pixelFlags": "bool",
    "pixelFlags_bad": "bool",
    "pixelFlags_cr": "bool",
    "pixelFlags_crCenter": "bool",
    "pixelFlags_edge": "bool",
    "pixelFlags_interpolated": "bool",
    "pixelFlags_interpolatedCenter": "bool",
    "pixelFlags_saturated": "bool",
    "pixelFlags_saturatedCenter": "bool",
    "pixelFlags_suspect": "bool",
    "pixelFlags_suspectCenter": "bool",
    "pixelFlags_offimage": "bool",
    "pixelFlags_streak": "bool",
    "pixelFlags_streakCenter": "bool",
    "glint_trail": "bool",
}

#: truth.parquet columns and dtypes (one row per diaSources.parquet row).
TRUTH_COLUMNS = {
    "row": "int64",
    "truthId": "int64",
    "kind": "object",
    "trueX": "float64",
    "trueY": "float64",
    "trueRa": "float64",
    "trueDec": "float64",
    "trueDiffFlux": "float64",
    "trueScienceFlux": "float64",
}

#: truth_objects.parquet columns and dtypes.
TRUTH_OBJECT_COLUMNS = {
    "truthId": "int64",
    "kind": "object",
    "ra": "float64",
    "dec": "float64",
    "x": "float64",
    "y": "float64",
    "diffFlux": "float64",
    "scienceFlux": "float64",
    "templateFlux": "float64",
    "detected": "bool",
}

#: Mask planes → (footprint flag, centre flag) columns.
_FLAG_PLANES = {
    "BAD": ("pixelFlags_bad", None),
    "CR": ("pixelFlags_cr", "pixelFlags_crCenter"),
    "EDGE": ("pixelFlags_edge", None),
    "INTRP": ("pixelFlags_interpolated", "pixelFlags_interpolatedCenter"),
    "SAT": ("pixelFlags_saturated", "pixelFlags_saturatedCenter"),
    "SUSPECT": ("pixelFlags_suspect", "pixelFlags_suspectCenter"),
    "STREAK": ("pixelFlags_streak", "pixelFlags_streakCenter"),
}


@dataclass(frozen=True)
class VisitParams:
    """Everything drawn once per visit."""

    visit: int  # the index k: seeds the draws
    number: int  # the LSSTCam visit number day_obs·10⁵ + seq_num it is written under
    band: str
    mjd: float
    ra: float
    dec: float
    rot: float
    seeing: float
    sky: float
    transparency: float
    psf: Psf
    cd: np.ndarray


@dataclass
class Scene:
    """What lands on one detector in one visit (counts unless noted)."""

    visit: VisitParams
    detector: int
    photcalib: float
    sky: float
    # true objects on (or within a PSF half-width of) the detector
    idx: np.ndarray
    x: np.ndarray
    y: np.ndarray
    sci: np.ndarray
    tmpl: np.ndarray
    on: np.ndarray
    # bogus injections
    b_kind: np.ndarray
    b_x: np.ndarray
    b_y: np.ndarray
    b_flux: np.ndarray
    b_dx: np.ndarray
    b_dy: np.ndarray
    cr_pix: np.ndarray  # (n_cr, 6) flat indices, -1 unused
    cr_val: np.ndarray  # (n_cr, 6) counts
    bad_column: tuple[int, int, int] | None  # (x, y0, y1)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


class Survey:
    """A seeded synthetic survey.

    Parameters
    ----------
    config : SurveyConfig
        Everything that defines the sky, the camera and the visits.

    Notes
    -----
    The densities of variable stars, transients and moving objects are set so
    that the expected number of DiaSources per detector per visit is
    ``config.sources_per_detector``: at construction a trial population of each
    kind is observed at a dozen survey visits (expected SNR per object and
    visit, probability of passing the detection threshold), which gives the
    mean number of detections per object; the population size follows.
    """

    def __init__(self, config: SurveyConfig | None = None) -> None:
        self.config = cfg = config or SurveyConfig()
        nx, ny = cfg.detector_size
        self.focal_plane = FocalPlane.lsstcam_like(
            nx, ny, cfg.detector_gap_fraction, cfg.raft_gap_fraction
        )
        self.detectors = self.focal_plane.central(cfg.n_detectors)
        max_fwhm_px = cfg.seeing_max_arcsec / cfg.pixel_scale_arcsec
        margin_px = 2.5 * max_fwhm_px + 4
        self.field_radius = (
            (self.focal_plane.radius + margin_px) * cfg.pixel_scale_arcsec + cfg.dither_arcsec
        ) / 3600.0
        det_area = nx * ny * (cfg.pixel_scale_arcsec / 3600.0) ** 2
        self._area_ratio = math.pi * self.field_radius**2 / det_area
        counts = {"static": round(cfg.static_per_detector * self._area_ratio)}
        real = cfg.sources_per_detector * (1.0 - cfg.bogus_fraction)
        mix = np.asarray(cfg.real_mix, float) / sum(cfg.real_mix)
        self.detection_rate = {}
        for kind, share in zip(KINDS[1:], mix, strict=True):
            rate = self._detections_per_object(kind)
            self.detection_rate[kind] = rate
            counts[kind] = round(real * share / rate) if rate > 0 and share > 0 else 0
        self.counts = counts
        self.sky = Sky(counts, self.field_radius, cfg, _rng(cfg.seed, _SKY))
        self.solar_system = self._solar_system(self.sky, _rng(cfg.seed, _SOLAR))
        #: per-object colour difference from the reference SED (mag): scales the chromatic offset
        self.colour = _rng(cfg.seed, _COLOUR).normal(0.0, cfg.colour_sigma_mag, len(self.sky))

    # ------------------------------------------------------------------ visits
    @lru_cache(maxsize=64)  # noqa: B019 - a survey lives as long as its visits are used
    def visit_params(self, visit: int) -> VisitParams:
        """The per-visit draws: band, time, pointing, rotation, seeing, sky, transparency."""
        if int(visit) != visit or visit < 0:
            raise ValueError(f"visit must be a non-negative integer, got {visit!r}")
        cfg = self.config
        rng = _rng(cfg.seed, _VISIT, visit)
        band = cfg.bands[int(rng.integers(len(cfg.bands)))]
        r = cfg.dither_arcsec / 3600.0 * math.sqrt(rng.random())
        phi = 2.0 * math.pi * rng.random()
        xi, eta = r * math.cos(phi), r * math.sin(phi)
        ra, dec = gnomonic_inverse(np.array(xi), np.array(eta), cfg.field_ra, cfg.field_dec)
        rot = float(rng.uniform(0.0, 360.0))
        seeing = float(rng.uniform(cfg.seeing_min_arcsec, cfg.seeing_max_arcsec))
        sky = DEFAULT_SKY[band] * float(rng.uniform(*cfg.sky_scale_range))
        transparency = 1.0 - abs(float(rng.normal(0.0, cfg.transparency_scatter)))
        psf = Psf(seeing / cfg.pixel_scale_arcsec, cfg.psf_model, cfg.moffat_beta)
        return VisitParams(
            visit=int(visit),
            number=cfg.visit_number(visit),
            band=band,
            mjd=cfg.visit_mjd(visit),
            ra=float(ra),
            dec=float(dec),
            rot=rot,
            seeing=seeing,
            sky=sky,
            transparency=transparency,
            psf=psf,
            cd=cd_matrix(rot, cfg.pixel_scale_arcsec),
        )

    def chromatic_offset(self, visit: int) -> tuple[np.ndarray, np.ndarray]:
        """Every object's chromatic centroid offset in ``visit`` (focal-plane pixels u, v).

        A differential-refraction-like shift: ``κ_band · colour · tan z`` along
        the visit's parallactic direction (both drawn per visit; airmass
        uniform in ``airmass_range``), with ``κ`` from ``dcr_arcsec_per_mag``.
        The same object moves by different amounts in different bands and
        visits, so detections of one object scatter about its mean position by
        more than their quoted errors, as real difference-image centroids do.
        """
        cfg = self.config
        vp = self.visit_params(visit)
        rng = _rng(cfg.seed, _DCR, visit)
        airmass = float(rng.uniform(*cfg.airmass_range))
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
        kappa = cfg.dcr_arcsec_per_mag["ugrizy".index(vp.band)]
        amp = kappa * math.sqrt(airmass * airmass - 1.0) / cfg.pixel_scale_arcsec * self.colour
        return amp * math.cos(angle), amp * math.sin(angle)

    def visit_info(self, visit: int) -> VisitInfo:
        """The ``visit.json`` contents of visit ``visit`` (its LSSTCam number in ``visit``)."""
        vp = self.visit_params(visit)
        return VisitInfo(
            visit=vp.number,
            band=vp.band,
            midpointMjdTai=float(vp.mjd),
            exposureTime=float(self.config.exposure_time),
            boresightRa=vp.ra,
            boresightDec=vp.dec,
            rotAngle=vp.rot,
            observation_reason=self.config.observation_reason,
            target_name=self.config.target_name,
            detectors=tuple(self.detectors),
        )

    def detector_wcs_header(self, visit: int, detector: int) -> fits.Header:
        """The FITS WCS cards of ``detector`` in ``visit`` (1-based CRPIX)."""
        vp = self.visit_params(visit)
        return detector_wcs_header(self.focal_plane, detector, vp.ra, vp.dec, vp.cd)

    def detector_wcs(self, visit: int, detector: int) -> WCS:
        """astropy WCS of ``detector`` in ``visit`` (evaluate with origin 0)."""
        return WCS(self.detector_wcs_header(visit, detector))

    def photcalib(self, visit: int, detector: int) -> float:
        """PHOTCALIB (nJy per count) of ``detector`` in ``visit``."""
        vp = self.visit_params(visit)
        rng = _rng(self.config.seed, _CALIB, visit, detector)
        scatter = 1.0 + self.config.photcalib_scatter * float(rng.normal())
        return DEFAULT_PHOTCALIB[vp.band] / vp.transparency * scatter

    def truth_catalog(self) -> pd.DataFrame:
        """The survey catalogue: truthId, kind, ra, dec (at refMjd for moving
        objects, else fixed), per-band mean (peak for transients) flux in nJy,
        per-band fractional amplitude, period, phase, peakMjd, riseTime,
        fallTime, refMjd, xiRate, etaRate (deg/day)."""
        cat = self.sky.catalog
        ra, dec = gnomonic_inverse(
            cat["xi"].to_numpy(), cat["eta"].to_numpy(), self.config.field_ra, self.config.field_dec
        )
        out = cat.drop(columns=["xi", "eta"])
        out.insert(2, "ra", ra)
        out.insert(3, "dec", dec)
        return out

    # ---------------------------------------------------------- solar system
    def _solar_system(self, sky: Sky, rng: np.random.Generator) -> SolarSystem:
        """Keplerian orbits for ``sky``'s moving objects, through their refMjd positions."""
        cfg = self.config
        rows = np.flatnonzero(sky._kind == "moving")
        a = sky._arrays
        ra, dec = gnomonic_inverse(a["xi"][rows], a["eta"][rows], cfg.field_ra, cfg.field_dec)
        v_mag = 31.4 - 2.5 * np.log10(a["r_flux"][rows])
        return SolarSystem(
            rows, ra, dec, a["refMjd"][rows], v_mag, cfg.solar_system, rng, n_rows=len(sky)
        )

    def _sky_positions(self, sky: Sky, solar: SolarSystem, mjd: float):
        """Field tangent-plane ``(xi, eta)`` of every object of ``sky`` at ``mjd``."""
        xi, eta = sky.positions(mjd)
        if len(solar):
            geo = solar.geometry(mjd)
            cfg = self.config
            xi[solar.truth_ids], eta[solar.truth_ids] = gnomonic_forward(
                geo["ra"], geo["dec"], cfg.field_ra, cfg.field_dec
            )
        return xi, eta

    def ephemerides(self, visit: int) -> pd.DataFrame:
        """The known asteroids' ephemeris table of ``visit`` (``{visit}/ephemerides.parquet``)."""
        vp = self.visit_params(visit)
        return self.solar_system.ephemerides(vp.mjd, vp.ra, vp.dec, self.field_radius)

    # ---------------------------------------------------------- focal plane
    def _focal_positions(self, vp: VisitParams, xi: np.ndarray, eta: np.ndarray):
        """Field tangent-plane coordinates → focal-plane pixels (u, v) of a visit."""
        cfg = self.config
        ra, dec = gnomonic_inverse(xi, eta, cfg.field_ra, cfg.field_dec)
        xi2, eta2 = gnomonic_forward(ra, dec, vp.ra, vp.dec)
        inv = np.linalg.inv(vp.cd)
        u = inv[0, 0] * xi2 + inv[0, 1] * eta2
        v = inv[1, 0] * xi2 + inv[1, 1] * eta2
        return u, v, ra, dec

    @lru_cache(maxsize=4)  # noqa: B019
    def _visit_objects(self, visit: int):
        vp = self.visit_params(visit)
        xi, eta = self._sky_positions(self.sky, self.solar_system, vp.mjd)
        u, v, ra, dec = self._focal_positions(vp, xi, eta)
        du, dv = self.chromatic_offset(visit)
        u, v = u + du, v + dv  # where the light lands in this visit's band (ra, dec: catalogue)
        sci, tmpl = self.sky.fluxes(vp.mjd, vp.band)
        order = np.argsort(u, kind="stable")
        return u, v, ra, dec, sci, tmpl, order, u[order]

    def pixel_to_sky(self, visit: int, detector: int, x, y) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel ``(x, y)`` on ``detector`` → (ra, dec) in degrees.

        The same TAN projection as :meth:`detector_wcs` (agrees to < 1e-9″),
        without building an astropy WCS.
        """
        vp = self.visit_params(visit)
        u, v = self.focal_plane.from_detector(
            detector, np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        )
        xi = vp.cd[0, 0] * u + vp.cd[0, 1] * v
        eta = vp.cd[1, 0] * u + vp.cd[1, 1] * v
        return gnomonic_inverse(xi, eta, vp.ra, vp.dec)

    def _sigma_diff(self, vp: VisitParams, sky: float) -> float:
        """Expected PSF-flux error (counts) of a faint source on the difference image."""
        var = sky * (1.0 + 1.0 / self.config.template_depth)
        return math.sqrt(var / vp.psf.sum_p2())

    def _expected_sigma(self, vp, sky, sci_counts, tmpl_counts):
        """Expected PSF-flux error (counts) on the difference image, source noise included."""
        p2, p3 = vp.psf.sum_p2(), vp.psf.sum_p3()
        depth = self.config.template_depth
        var = (
            sky * (1 + 1 / depth) * p2
            + (np.maximum(sci_counts, 0) + np.maximum(tmpl_counts, 0) / depth) * p3
        )
        return np.sqrt(var) / p2

    def _detections_per_object(self, kind: str, n_trial: int = 4000) -> float:
        """Mean DiaSources per detector per visit contributed by one object of ``kind``."""
        cfg = self.config
        trial = Sky({kind: n_trial}, self.field_radius, cfg, _rng(cfg.seed, _TRIAL, len(kind)))
        solar = self._solar_system(trial, _rng(cfg.seed, _TRIAL, _SOLAR))
        visits = np.unique(np.linspace(0, cfg.n_visits - 1, 12).round().astype(int))
        total = 0.0
        for visit in visits:
            vp = self.visit_params(int(visit))
            xi, eta = self._sky_positions(trial, solar, vp.mjd)
            u, v, _, _ = self._focal_positions(vp, xi, eta)
            det, _, _ = self.focal_plane.locate(u, v)
            sci, tmpl = trial.fluxes(vp.mjd, vp.band)
            on = det >= 0
            calib = DEFAULT_PHOTCALIB[vp.band] / vp.transparency
            sigma = self._expected_sigma(vp, vp.sky, sci[on] / calib, tmpl[on] / calib)
            snr = np.abs(sci[on] - tmpl[on]) / calib / sigma
            thr = cfg.detection_threshold
            total += float(np.sum(ndtr(snr - thr) + ndtr(-snr - thr)))
        return total / (n_trial * len(visits) * N_DETECTORS)

    # -------------------------------------------------------------- scenes
    def scene(self, visit: int, detector: int) -> Scene:
        """True objects and bogus injections on ``detector`` in ``visit``."""
        if detector not in self.detectors:
            raise ValueError(f"detector {detector} is not among this survey's {self.detectors}")
        cfg = self.config
        vp = self.visit_params(visit)
        nx, ny = cfg.detector_size
        u, v, _, _, sci, tmpl, order, u_sorted = self._visit_objects(visit)
        m = vp.psf.half + 2
        cu = self.focal_plane.centres[detector, 0]
        lo, hi = np.searchsorted(u_sorted, [cu - nx / 2.0 - m, cu + nx / 2.0 + m])
        idx = np.sort(order[lo:hi])
        x, y = self.focal_plane.to_detector(detector, u[idx], v[idx])
        near = (x > -m) & (x < nx - 1 + m) & (y > -m) & (y < ny - 1 + m)
        idx = idx[near]
        calib = self.photcalib(visit, detector)
        xs, ys = x[near], y[near]
        on = (xs >= -0.5) & (xs < nx - 0.5) & (ys >= -0.5) & (ys < ny - 0.5)

        rng = _rng(cfg.seed, _BOGUS, visit, detector)
        n_bogus = int(rng.poisson(cfg.sources_per_detector * cfg.bogus_fraction))
        mix = np.asarray(cfg.bogus_mix, float) / sum(cfg.bogus_mix)
        kinds = np.asarray(BOGUS_KINDS, dtype=object)[rng.choice(3, size=n_bogus, p=mix)]
        bx = rng.uniform(0, nx - 1, n_bogus)
        by = rng.uniform(0, ny - 1, n_bogus)
        sigma = self._sigma_diff(vp, vp.sky)
        snr = cfg.detection_threshold + 0.3 + rng.exponential(1.5, n_bogus)
        sign = np.where(rng.random(n_bogus) < 0.5, -1.0, 1.0)
        flux = np.where(kinds == "bogus_noise", sign * snr * sigma, 0.0)
        # dipoles: a star misregistered by 0.4–1.2 px between science and template
        star = sigma * np.exp(rng.uniform(np.log(20.0), np.log(300.0), n_bogus))
        sep = rng.uniform(0.4, 1.2, n_bogus)
        ang = rng.uniform(0, 2 * np.pi, n_bogus)
        dip = kinds == "bogus_dipole"
        flux = np.where(dip, star, flux)
        bdx = np.where(dip, sep * np.cos(ang), 0.0)
        bdy = np.where(dip, sep * np.sin(ang), 0.0)
        # cosmic rays: 2–6 connected pixels, 15–150 σ_pix each, science only
        cr_steps = rng.integers(-1, 2, size=(n_bogus, 5, 2))
        cr_len = rng.integers(2, 7, n_bogus)
        cr_amp = rng.uniform(15.0, 150.0, (n_bogus, 6)) * math.sqrt(vp.sky)
        is_cr = kinds == "bogus_cr"
        start = np.stack([np.round(bx), np.round(by)], axis=-1).astype(np.int64)
        path = np.concatenate([start[:, None, :], start[:, None, :] + np.cumsum(cr_steps, 1)], 1)
        path[..., 0] = np.clip(path[..., 0], 0, nx - 1)
        path[..., 1] = np.clip(path[..., 1], 0, ny - 1)
        use = (np.arange(6)[None, :] < cr_len[:, None]) & is_cr[:, None]
        flat = np.where(use, path[..., 1] * nx + path[..., 0], -1)
        # a pixel visited twice counts once
        srt = np.sort(np.where(flat < 0, np.iinfo(np.int64).max, flat), axis=1)
        dup = np.zeros_like(flat, dtype=bool)
        dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
        flat = np.where(dup | (srt == np.iinfo(np.int64).max), -1, srt)
        cr_val = np.where(flat >= 0, cr_amp, 0.0)
        # the detection starts at the flux-weighted centre of the cosmic ray
        tot = cr_val.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cx = np.sum(cr_val * (flat % nx), 1) / tot
            cy = np.sum(cr_val * (flat // nx), 1) / tot
        bx = np.where(is_cr, cx, bx)
        by = np.where(is_cr, cy, by)
        flux = np.where(is_cr, tot, flux)

        brng = _rng(cfg.seed, _BADCOL, visit, detector)
        bad = None
        if brng.random() < cfg.bad_column_probability:
            col = int(brng.integers(0, nx))
            length = int(brng.integers(ny // 5, ny + 1))
            y0 = int(brng.integers(0, ny - length + 1))
            bad = (col, y0, y0 + length)
        return Scene(
            visit=vp,
            detector=int(detector),
            photcalib=calib,
            sky=vp.sky,
            idx=idx,
            x=xs,
            y=ys,
            sci=sci[idx] / calib,
            tmpl=tmpl[idx] / calib,
            on=on,
            b_kind=kinds,
            b_x=bx,
            b_y=by,
            b_flux=flux,
            b_dx=bdx,
            b_dy=bdy,
            cr_pix=flat[is_cr],
            cr_val=cr_val[is_cr],
            bad_column=bad,
        )

    # -------------------------------------------------------------- images
    def render(self, sc: Scene) -> dict[str, dict[str, np.ndarray]]:
        """Science, template and difference pixels of a scene.

        Returns ``{"science"|"template"|"difference": {"image", "mask", "variance"}}``
        with float32 images/variances and int32 masks.
        """
        cfg = self.config
        nx, ny = cfg.detector_size
        shape = (ny, nx)
        psf = sc.visit.psf
        dip = sc.b_kind == "bogus_dipole"
        noise = sc.b_kind == "bogus_noise"
        # physical light (sets the Poisson variance)
        sci_model = render(
            shape,
            psf,
            np.concatenate([sc.x, sc.b_x[dip] + sc.b_dx[dip] / 2]),
            np.concatenate([sc.y, sc.b_y[dip] + sc.b_dy[dip] / 2]),
            np.concatenate([sc.sci, sc.b_flux[dip]]),
        )
        tmpl_model = render(
            shape,
            psf,
            np.concatenate([sc.x, sc.b_x[dip] - sc.b_dx[dip] / 2]),
            np.concatenate([sc.y, sc.b_y[dip] - sc.b_dy[dip] / 2]),
            np.concatenate([sc.tmpl, sc.b_flux[dip]]),
        )
        f32 = np.float32
        sci_model = sci_model.astype(f32)
        tmpl_model = tmpl_model.astype(f32)
        sci_var = np.maximum(sci_model, f32(0.0))
        sci_var += f32(sc.sky)
        tmpl_var = np.maximum(tmpl_model, f32(0.0))
        tmpl_var += f32(sc.sky)
        tmpl_var /= f32(cfg.template_depth)
        r1 = _rng(cfg.seed, _SCI_NOISE, sc.visit.visit, sc.detector)
        r2 = _rng(cfg.seed, _TMPL_NOISE, sc.visit.visit, sc.detector)
        sci = r1.standard_normal(shape, dtype=f32)
        sci *= np.sqrt(sci_var)
        sci += sci_model
        tmpl = r2.standard_normal(shape, dtype=f32)
        tmpl *= np.sqrt(tmpl_var)
        tmpl += tmpl_model
        # noise peaks: upward/downward fluctuations of the science noise
        if noise.any():
            sci += render(shape, psf, sc.b_x[noise], sc.b_y[noise], sc.b_flux[noise]).astype(f32)
        sci_mask = np.zeros(shape, dtype=np.int32)
        tmpl_mask = np.zeros(shape, dtype=np.int32)
        if sc.cr_pix.size:
            sel = sc.cr_pix >= 0
            flat = sci.reshape(-1)
            np.add.at(flat, sc.cr_pix[sel], sc.cr_val[sel].astype(np.float32))
            sci_mask.reshape(-1)[sc.cr_pix[sel]] |= _BIT["CR"]
        sat = cfg.saturation_counts
        for img, msk in ((sci, sci_mask), (tmpl, tmpl_mask)):
            msk[img > cfg.suspect_fraction * sat] |= _BIT["SUSPECT"]
            over = img > sat
            msk[over] |= _BIT["SAT"]
            img[over] = sat
        if sc.bad_column is not None:
            col, y0, y1 = sc.bad_column
            sci_mask[y0:y1, col] |= _BIT["BAD"] | _BIT["INTRP"]
        e = cfg.edge_width_px
        if e:
            for msk in (sci_mask, tmpl_mask):
                msk[:e, :] |= _BIT["EDGE"]
                msk[-e:, :] |= _BIT["EDGE"]
                msk[:, :e] |= _BIT["EDGE"]
                msk[:, -e:] |= _BIT["EDGE"]
        return {
            "science": {"image": sci, "mask": sci_mask, "variance": sci_var},
            "template": {"image": tmpl, "mask": tmpl_mask, "variance": tmpl_var},
            "difference": {
                "image": sci - tmpl,
                "mask": sci_mask | tmpl_mask,
                "variance": sci_var + tmpl_var,
            },
        }

    # ------------------------------------------------------------ catalogs
    def _candidates(self, sc: Scene):
        """Start positions, truth ids, kinds and true fluxes of everything that may be detected."""
        real = sc.on & (self.sky._kind[sc.idx] != "static")
        diff = sc.sci - sc.tmpl
        sig = self._expected_sigma(sc.visit, sc.sky, sc.sci, sc.tmpl)
        real &= np.abs(diff) / sig > 0.5 * self.config.detection_threshold
        n_b = sc.b_kind.size
        dip = sc.b_kind == "bogus_dipole"
        # a dipole's detection starts on its positive lobe, one separation from its centre
        bx = sc.b_x + np.where(dip, sc.b_dx, 0.0)
        by = sc.b_y + np.where(dip, sc.b_dy, 0.0)
        b_diff = np.where(dip, 0.0, sc.b_flux)
        b_sci = np.where(sc.b_kind == "bogus_noise", 0.0, sc.b_flux)
        b_tmpl = np.where(dip, sc.b_flux, 0.0)
        return {
            "x": np.concatenate([sc.x[real], bx]),
            "y": np.concatenate([sc.y[real], by]),
            "trueX": np.concatenate([sc.x[real], sc.b_x]),
            "trueY": np.concatenate([sc.y[real], sc.b_y]),
            "truthId": np.concatenate(
                [self.sky.catalog["truthId"].to_numpy()[sc.idx[real]], np.full(n_b, -1)]
            ).astype(np.int64),
            "kind": np.concatenate([self.sky._kind[sc.idx[real]], sc.b_kind]).astype(object),
            "diff": np.concatenate([diff[real], b_diff]),
            "sci": np.concatenate([sc.sci[real], b_sci]),
            "tmpl": np.concatenate([sc.tmpl[real], b_tmpl]),
        }

    def _finish(
        self, sc: Scene, cand: dict, meas: dict, keep: np.ndarray, objects=True, frames=True
    ):
        """Assemble diaSources, truth and truth_objects tables for the kept candidates.

        Tables are data frames with ``frames``, else dicts of numpy arrays.
        """
        cfg = self.config
        vp = sc.visit
        n = int(keep.sum())
        out = {}
        for col, dt in CATALOG_COLUMNS.items():
            out[col] = (
                np.asarray(meas[col])[keep].astype(dt) if col in meas else np.zeros(n, dtype=dt)
            )
        kind = cand["kind"][keep]
        bogus = np.isin(kind, BOGUS_KINDS)
        rr = _rng(cfg.seed, _RELIAB, vp.visit, sc.detector)
        rel_real = rr.beta(8.0, 1.5, kind.size)
        # bogus: most near 0; one in ten looks real to the classifier (Beta(4, 3)), so the
        # production cut (0.5) removes ~93 % of them and the 0.1 new-object cut ~40 %
        fooled = rr.random(kind.size) < 0.1
        rel_bogus = np.where(fooled, rr.beta(4.0, 3.0, kind.size), rr.beta(1.0, 9.0, kind.size))
        out["reliability"] = np.where(bogus, rel_bogus, rel_real).astype(np.float32)
        out["isDipole"] = kind == "bogus_dipole"
        speed = np.zeros(kind.size)
        tid = cand["truthId"][keep]
        mov = kind == "moving"
        if mov.any():
            solar = self.solar_system
            speed[mov] = solar.geometry(vp.mjd)["rate"][solar.index[tid[mov]]]
        out["trailLength"] = (
            speed * cfg.exposure_time / 86400.0 * 3600.0 / cfg.pixel_scale_arcsec
        ).astype(np.float32)
        snr = np.asarray(out["snr"], dtype=np.float64)
        fwhm = vp.psf.fwhm
        bbox = 2 * np.ceil(1.5 * fwhm * (1 + np.log10(np.maximum(snr, 5.0) / 5.0))) + 1
        out["bboxSize"] = bbox.astype(np.int32)
        out["isNegative"] = out["psfInstFlux"] < 0
        out["pixelFlags"] = (
            np.any([out[c] for c in CATALOG_COLUMNS if c.startswith("pixelFlags_")], axis=0)
            if n
            else np.zeros(0, bool)
        )
        order = np.lexsort((out["x"], out["y"]))
        cat = {c: a[order] for c, a in out.items()}
        tx, ty = cand["trueX"][keep][order], cand["trueY"][keep][order]
        tra, tdec = self.pixel_to_sky(vp.visit, sc.detector, tx, ty)
        truth = {
            "row": np.arange(n, dtype=np.int64),
            "truthId": tid[order].astype(np.int64),
            "kind": kind[order].astype(object),
            "trueX": tx.astype(np.float64),
            "trueY": ty.astype(np.float64),
            "trueRa": np.asarray(tra, dtype=np.float64),
            "trueDec": np.asarray(tdec, dtype=np.float64),
            "trueDiffFlux": cand["diff"][keep][order] * sc.photcalib,
            "trueScienceFlux": cand["sci"][keep][order] * sc.photcalib,
        }
        if not objects:
            return cat, truth, None
        on = sc.on
        oid = self.sky.catalog["truthId"].to_numpy()[sc.idx[on]]
        ox, oy = sc.x[on], sc.y[on]
        ora, odec = self.pixel_to_sky(vp.visit, sc.detector, ox, oy)
        objects = {
            "truthId": oid.astype(np.int64),
            "kind": self.sky._kind[sc.idx[on]].astype(object),
            "ra": np.asarray(ora, dtype=np.float64),
            "dec": np.asarray(odec, dtype=np.float64),
            "x": ox,
            "y": oy,
            "diffFlux": (sc.sci[on] - sc.tmpl[on]) * sc.photcalib,
            "scienceFlux": sc.sci[on] * sc.photcalib,
            "templateFlux": sc.tmpl[on] * sc.photcalib,
            "detected": np.isin(oid, tid[tid >= 0]),
        }
        if frames:
            return pd.DataFrame(cat), pd.DataFrame(truth), pd.DataFrame(objects)
        return cat, truth, objects

    def _flags(self, mask: np.ndarray, x, y, fwhm: float) -> dict[str, np.ndarray]:
        """Pixel flags from the OR of mask bits in the footprint and the 3×3 centre."""
        ix = np.floor(np.asarray(x) + 0.5).astype(np.int64)
        iy = np.floor(np.asarray(y) + 0.5).astype(np.int64)
        half = max(2, int(math.ceil(fwhm)))
        fp, _ = gather(mask, ix, iy, half, fill=0)
        ctr, _ = gather(mask, ix, iy, 1, fill=0)
        fp_or = np.bitwise_or.reduce(fp.reshape(len(ix), -1), axis=1) if len(ix) else fp
        c_or = np.bitwise_or.reduce(ctr.reshape(len(ix), -1), axis=1) if len(ix) else ctr
        out = {}
        for plane, (col, ccol) in _FLAG_PLANES.items():
            bit = _BIT[plane]
            out[col] = (fp_or & bit) != 0 if len(ix) else np.zeros(0, bool)
            if ccol:
                out[ccol] = (c_or & bit) != 0 if len(ix) else np.zeros(0, bool)
        return out

    def measure(self, sc: Scene, images: dict, frames: bool = True):
        """Detect and measure DiaSources on the rendered difference image.

        Returns ``(diaSources, truth, truth_objects)`` data frames (dicts of
        numpy arrays without ``frames``).
        """
        cfg = self.config
        nx, ny = cfg.detector_size
        psf = sc.visit.psf
        cand = self._candidates(sc)
        d = images["difference"]
        x, y, xerr, yerr, failed = refine_centroid(
            d["image"], d["variance"], psf, cand["x"], cand["y"]
        )
        # a failed centroid falls back to the peak pixel of the start position
        x = np.where(failed, np.round(cand["x"]), x)
        y = np.where(failed, np.round(cand["y"]), y)
        xerr = np.where(failed, 0.5, xerr)
        yerr = np.where(failed, 0.5, yerr)
        fit_x, fit_y = x, y
        x, y, xerr, yerr = self._astrometric_floor(sc, x, y, xerr, yerr)
        f, fe, edge = psf_photometry(d["image"], d["variance"], psf, x, y)
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = np.abs(f) / fe
        keep = np.isfinite(snr) & (snr >= cfg.detection_threshold)
        keep &= ~self._blended(cand, fit_x, fit_y, keep, psf.sigma)
        s = images["science"]
        t = images["template"]
        sf, sfe, sedge = psf_photometry(s["image"], s["variance"], psf, x, y)
        tf, tfe, _ = psf_photometry(t["image"], t["variance"], psf, x, y)
        af, afe = self._aperture(d["image"], d["variance"], x, y)
        meas = {
            "x": x,
            "y": y,
            "xErr": xerr,
            "yErr": yerr,
            "psfInstFlux": f,
            "psfInstFluxErr": fe,
            "apInstFlux": af,
            "apInstFluxErr": afe,
            "scienceInstFlux": sf,
            "scienceInstFluxErr": sfe,
            "templateInstFlux": tf,
            "templateInstFluxErr": tfe,
            "snr": snr,
            "centroid_flag": failed,
            "psfFlux_flag_edge": edge,
            "psfFlux_flag": ~np.isfinite(f),
            "forced_PsfFlux_flag_edge": sedge,
            "pixelFlags_offimage": (x < -0.5) | (x >= nx - 0.5) | (y < -0.5) | (y >= ny - 0.5),
            **self._flags(d["mask"], x, y, psf.fwhm),
        }
        return self._finish(sc, cand, meas, keep, frames=frames)

    def _blended(self, cand: dict, x, y, detected, psf_sigma: float) -> np.ndarray:
        """Detections that share a brighter detection's peak (``peak_merge_sigma``).

        One peak makes one DiaSource, as a detection step that finds peaks
        does: of the detections whose fitted centroids lie within
        ``peak_merge_sigma`` PSF σ of each other, the one whose true source contributes
        most flux is kept (its measurement already holds the others' flux,
        rendered in the same pixels) and the rest are marked, so they leave
        the catalogue and their objects count as undetected in that visit.
        Returns a boolean mask over the candidates.
        """
        out = np.zeros(np.size(x), dtype=bool)
        r = self.config.peak_merge_sigma * psf_sigma
        idx = np.flatnonzero(detected)
        if r == 0 or idx.size < 2:
            return out
        pairs = cKDTree(np.column_stack([x[idx], y[idx]])).query_pairs(r, output_type="ndarray")
        if not len(pairs):
            return out
        dip = cand["kind"] == "bogus_dipole"
        # a dipole's detected lobe carries the misregistered star's flux, not a difference
        weight = np.abs(np.where(dip, cand["sci"], cand["diff"]))[idx]
        # strongest first: each detection absorbs the weaker ones on its peak
        rank = np.empty(idx.size, dtype=np.int64)
        rank[np.argsort(-weight, kind="stable")] = np.arange(idx.size)
        lo, hi = np.sort(rank[pairs], axis=1).T
        order = np.argsort(lo, kind="stable")
        by_rank = np.argsort(rank)
        gone = np.zeros(idx.size, dtype=bool)
        for a, b in zip(lo[order], hi[order], strict=True):
            if not gone[by_rank[a]]:
                gone[by_rank[b]] = True
        out[idx[gone]] = True
        return out

    def _astrometric_floor(self, sc: Scene, x, y, xerr, yerr):
        """Add the systematic centroid scatter (``astrometric_floor_arcsec``) and quote it.

        Each detection moves by an independent Gaussian draw of that σ per
        axis, and its quoted error becomes ``hypot(σ_fit, σ_floor)``, so the
        quoted errors keep describing the scatter actually drawn.
        """
        cfg = self.config
        s = cfg.astrometric_floor_arcsec / cfg.pixel_scale_arcsec
        if s == 0 or np.size(x) == 0:
            return x, y, xerr, yerr
        rng = _rng(cfg.seed, _ASTROM, sc.visit.visit, sc.detector)
        jitter = rng.standard_normal((2, np.size(x))) * s
        return x + jitter[0], y + jitter[1], np.hypot(xerr, s), np.hypot(yerr, s)

    def _aperture(self, image, variance, x, y):
        """Circular-aperture sum (pixel centres within ``ap_radius_px``) and its error."""
        r = self.config.ap_radius_px
        half = int(math.ceil(r))
        ix = np.floor(np.asarray(x) + 0.5).astype(np.int64)
        iy = np.floor(np.asarray(y) + 0.5).astype(np.int64)
        img, inb = gather(image, ix, iy, half)
        var, _ = gather(variance, ix, iy, half)
        g = np.arange(-half, half + 1)
        dx = g[None, None, :] + (ix - np.asarray(x))[:, None, None]
        dy = g[None, :, None] + (iy - np.asarray(y))[:, None, None]
        w = ((dx * dx + dy * dy) <= r * r) & inb
        return np.sum(img * w, axis=(1, 2)), np.sqrt(np.sum(var * w, axis=(1, 2)))

    @staticmethod
    def _psf_overlap(psf: Psf, shift: np.ndarray) -> np.ndarray:
        """``Σ P(0)·P(shift) / Σ P²``: what a PSF fit sees of a source ``shift`` px away."""
        g = np.arange(-psf.half - 2, psf.half + 3, dtype=np.float64)
        gx, gy = g[None, None, :], g[None, :, None]
        p0 = psf.profile(gx, gy)[0]
        ps = psf.profile(gx - np.asarray(shift, float)[:, None, None], gy)
        return np.einsum("ij,nij->n", p0, ps) / np.sum(p0**2)

    def measure_fast(self, sc: Scene):
        """The catalog of a scene without pixels: analytic errors, drawn noise."""
        cfg = self.config
        nx, ny = cfg.detector_size
        vp = sc.visit
        psf = vp.psf
        cand = self._candidates(sc)
        rng = _rng(cfg.seed, _FAST, vp.visit, sc.detector)
        n = cand["x"].size
        kind = cand["kind"]
        p2 = psf.sum_p2()
        var_sky = sc.sky * (1 + 1 / cfg.template_depth)
        sig = self._expected_sigma(vp, sc.sky, cand["sci"], cand["tmpl"])
        truth_f = cand["diff"].copy()
        # a dipole's PSF fit on its positive lobe sees the lobe minus the overlap
        dip = kind == "bogus_dipole"
        if dip.any():
            sep = np.hypot(sc.b_dx, sc.b_dy)[sc.b_kind == "bogus_dipole"]
            truth_f[dip] = sc.b_flux[sc.b_kind == "bogus_dipole"] * (
                self._psf_overlap(psf, 0.5 * sep) - self._psf_overlap(psf, 1.5 * sep)
            )
        cr = kind == "bogus_cr"
        if cr.any():
            flat = sc.cr_pix
            px, py = flat % nx, flat // nx
            cx, cy = cand["x"][cr], cand["y"][cr]
            pk = psf.profile(px - cx[:, None], py - cy[:, None]) / psf.norm
            truth_f[cr] = np.sum(np.where(flat >= 0, pk * sc.cr_val, 0), 1) / p2
        f = truth_f + sig * rng.standard_normal(n)
        snr = np.abs(f) / sig
        pos_err = np.sqrt(2.0) * psf.sigma / np.maximum(snr, 1.0)
        x = cand["x"] + pos_err * rng.standard_normal(n)
        y = cand["y"] + pos_err * rng.standard_normal(n)
        x, y, x_err, y_err = self._astrometric_floor(sc, x, y, pos_err, pos_err)
        sci_sig = np.sqrt(sc.sky * p2 + np.maximum(cand["sci"], 0) * psf.sum_p3()) / p2
        tmpl_sig = (
            np.sqrt((sc.sky * p2 + np.maximum(cand["tmpl"], 0) * psf.sum_p3()) / cfg.template_depth)
            / p2
        )
        sf = cand["sci"] + sci_sig * rng.standard_normal(n)
        tf = cand["tmpl"] + tmpl_sig * rng.standard_normal(n)
        r = cfg.ap_radius_px
        ap_sig = np.sqrt(var_sky * math.pi * r * r + np.abs(truth_f))
        af = truth_f * psf.encircled(r) + ap_sig * rng.standard_normal(n)
        keep = snr >= cfg.detection_threshold
        e = cfg.edge_width_px
        near_edge = (x < e + 1) | (x > nx - e - 2) | (y < e + 1) | (y > ny - e - 2)
        half = psf.half
        stamp_edge = (x < half) | (x > nx - 1 - half) | (y < half) | (y > ny - 1 - half)
        bad = np.zeros(n, bool)
        if sc.bad_column is not None:
            col, y0, y1 = sc.bad_column
            w = max(2, math.ceil(psf.fwhm))
            bad = (np.abs(np.round(x) - col) <= w) & (y >= y0 - w) & (y < y1 + w)
        meas = {
            "x": x,
            "y": y,
            "xErr": x_err,
            "yErr": y_err,
            "psfInstFlux": f,
            "psfInstFluxErr": sig,
            "apInstFlux": af,
            "apInstFluxErr": ap_sig,
            "scienceInstFlux": sf,
            "scienceInstFluxErr": sci_sig,
            "templateInstFlux": tf,
            "templateInstFluxErr": tmpl_sig,
            "snr": snr,
            "psfFlux_flag_edge": stamp_edge,
            "forced_PsfFlux_flag_edge": stamp_edge,
            "pixelFlags_edge": near_edge,
            "pixelFlags_cr": cr,
            "pixelFlags_crCenter": cr,
            "pixelFlags_bad": bad,
            "pixelFlags_interpolated": bad,
            "pixelFlags_offimage": (x < -0.5) | (x >= nx - 0.5) | (y < -0.5) | (y >= ny - 0.5),
        }
        return self._finish(sc, cand, meas, keep, objects=False)

    # ------------------------------------------------------------- writing
    def detector_files(self, visit: int, detector: int) -> dict[str, bytes]:
        """All files of one detector of one visit, as bytes keyed by file name."""
        sc = self.scene(visit, detector)
        images = self.render(sc)
        cat, truth, objects = self.measure(sc, images, frames=False)
        vp = sc.visit
        wcs_cards = self.detector_wcs_header(visit, detector)
        files = {}
        psf_header = fits.Header()
        psf_header["PSFMODEL"] = (vp.psf.model, "PSF profile")
        psf_header["FWHM"] = (vp.psf.fwhm, "PSF FWHM (pixels)")
        if vp.psf.model == "moffat":
            psf_header["BETA"] = (vp.psf.beta, "Moffat beta")
        kernel = vp.psf.kernel()
        h = fits.Header()
        h["BUNIT"] = "count"
        h.extend(wcs_cards)
        h["HIERARCH PHOTCALIB"] = (sc.photcalib, "nJy per count")
        h["PHOTCERR"] = (0.005 * sc.photcalib, "PHOTCALIB 1-sigma error (nJy per count)")
        h["ROTPA"] = (vp.rot, "rotation angle (deg)")
        h["VISIT"] = vp.number
        h["DETECTOR"] = int(detector)
        h["DETNAME"] = self.focal_plane.names[detector]
        h["FILTER"] = vp.band
        h["BAND"] = vp.band
        h["EXPTIME"] = (float(self.config.exposure_time), "s")
        h["SEEING"] = (vp.seeing, "PSF FWHM (arcsec)")
        h["SKYLEVEL"] = (sc.sky, "subtracted sky background (counts/pixel)")
        writer = simio.FitsWriter(images["science"]["image"].shape, h, kernel, psf_header)
        for kind in ("difference", "science", "template"):
            im = images[kind]
            files[f"{kind}.fits"] = writer.to_bytes(im["image"], im["mask"], im["variance"])
        files["diaSources.parquet"] = simio.parquet_bytes(cat)
        files["truth.parquet"] = simio.parquet_bytes(truth)
        files["truth_objects.parquet"] = simio.parquet_bytes(objects)
        return files

    def _check_detectors(self, detectors) -> tuple[int, ...]:
        if detectors is None:
            return tuple(self.detectors)
        dets = tuple(int(d) for d in detectors)
        unknown = sorted(set(dets) - set(self.detectors))
        if unknown:
            raise ValueError(f"detectors {unknown} are not among this survey's detectors")
        return dets

    def write_visit(
        self, root: str, visit: int, detectors=None, truth_catalog: bool = True
    ) -> list[str]:
        """Write the docs/design.md §2 bundle of ``visit`` and its truth under ``root``.

        The bundle goes to ``{root}/{number}/`` with ``number =
        config.visit_number(visit)``, the LSSTCam visit number.

        Parameters
        ----------
        root : str
            Local path or fsspec URL (``s3://bucket/prefix``).
        visit : int
            Index of the survey visit (≥ 0; 0 is the first).
        detectors : iterable of int, optional
            Which detectors to write (default: all of the survey's). visit.json
            always lists the survey's detectors.
        truth_catalog : bool
            Also write ``{root}/truth/objects.parquet`` (:meth:`write_truth`)
            when it does not exist yet.

        Returns
        -------
        list of str
            The URLs written, visit.json first.
        """
        dets = self._check_detectors(detectors)
        number = self.visit_params(visit).number
        written = [
            simio.write_bytes(
                f"{visit_path(root, number)}/visit.json",
                simio.json_bytes(self.visit_info(visit).to_json_dict()),
            )
        ]
        if self.config.solar_system.write_ephemerides:
            written.append(
                simio.write_bytes(
                    f"{visit_path(root, number)}/{EPHEMERIS_FILE}",
                    simio.parquet_bytes(self.ephemerides(visit)),
                )
            )
        if truth_catalog:
            fs, path = fsspec.core.url_to_fs(self.truth_catalog_path(root))
            if not fs.exists(path):
                written.append(self.write_truth(root))
        workers = min(self.config.workers, len(dets)) or 1
        if workers > 1 and self.config.parallel == "process":
            pool = self._process_pool()
            jobs = [pool.submit(_write_detector_in_worker, root, visit, d) for d in dets]
            for job in jobs:
                written += job.result()
            return written
        self._visit_objects(visit)  # warm the per-visit cache before threads start
        if workers == 1:
            for d in dets:
                written += self.write_detector(root, visit, d)
        else:
            with ThreadPoolExecutor(workers) as pool:
                for paths in pool.map(lambda d: self.write_detector(root, visit, d), dets):
                    written += paths
        return written

    def write_detector(self, root: str, visit: int, detector: int) -> list[str]:
        """Write one detector's files of ``visit`` (not visit.json); returns the URLs."""
        base = detector_path(root, self.visit_params(visit).number, detector)
        return [
            simio.write_bytes(f"{base}/{name}", data)
            for name, data in self.detector_files(visit, detector).items()
        ]

    def _process_pool(self) -> ProcessPoolExecutor:
        """Worker processes (spawned, each sent a pickled copy of this survey), kept for reuse."""
        if getattr(self, "_pool", None) is None:
            self._pool = ProcessPoolExecutor(
                self.config.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self,),
            )
        return self._pool

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_pool", None)  # a pool does not travel to its own workers
        return state

    def close(self) -> None:
        """Stop the worker processes of ``parallel="process"`` (if any were started)."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown()
            self._pool = None

    def __enter__(self) -> Survey:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def truth_catalog_path(root: str) -> str:
        """``{root}/truth/objects.parquet``."""
        return f"{root.rstrip('/')}/truth/objects.parquet"

    def write_truth(self, root: str) -> str:
        """Write the survey catalogue (:meth:`truth_catalog`) to ``{root}/truth/objects.parquet``.

        Beside it, ``solarsystem.parquet`` maps each moving object's truthId to its
        ``ssObjectId``, designation, whether it is known (has ephemerides) and its
        true orbit (:meth:`sim.solarsystem.SolarSystem.truth`). Returns the
        objects.parquet URL.
        """
        path = self.truth_catalog_path(root)
        simio.write_bytes(
            path.rsplit("/", 1)[0] + "/solarsystem.parquet",
            simio.parquet_bytes(self.solar_system.truth()),
        )
        return simio.write_bytes(path, simio.parquet_bytes(self.truth_catalog()))

    def visit_catalog(self, visit: int, detectors=None) -> pd.DataFrame:
        """Measured DiaSources of a visit without rendering images (fast path).

        Returns the diaSources.parquet columns plus ``visit`` (the LSSTCam visit
        number), ``detector``,
        ``ra``, ``dec`` (deg, from the detector WCS at the measured position),
        ``truthId``, ``kind``, ``trueDiffFlux`` and ``trueScienceFlux`` (nJy),
        ``photoCalib`` (nJy/count), ``band`` and ``midpointMjdTai``.
        """
        dets = self._check_detectors(detectors)
        vp = self.visit_params(visit)
        parts = []
        for det in dets:
            sc = self.scene(visit, det)
            cat, truth, _ = self.measure_fast(sc)
            ra, dec = self.pixel_to_sky(visit, det, cat["x"], cat["y"])
            n = len(ra)
            parts.append(
                {
                    "visit": np.full(n, vp.number, dtype=np.int64),
                    "detector": np.full(n, det, dtype=np.int64),
                    "ra": ra,
                    "dec": dec,
                    **cat,
                    "truthId": truth["truthId"],
                    "kind": truth["kind"],
                    "trueDiffFlux": truth["trueDiffFlux"],
                    "trueScienceFlux": truth["trueScienceFlux"],
                    "photoCalib": np.full(n, sc.photcalib),
                }
            )
        out = pd.DataFrame({c: np.concatenate([p[c] for p in parts]) for c in parts[0]})
        out["band"] = vp.band
        out["midpointMjdTai"] = np.float64(vp.mjd)
        return out


_WORKER_SURVEY: Survey | None = None


def _init_worker(survey: Survey) -> None:
    """Process-pool initializer: keep the survey (pickled once per worker)."""
    global _WORKER_SURVEY
    _WORKER_SURVEY = survey


def _write_detector_in_worker(root: str, visit: int, detector: int) -> list[str]:
    assert _WORKER_SURVEY is not None, "worker not initialised"
    return _WORKER_SURVEY.write_detector(root, visit, detector)
