"""Configuration of the synthetic survey (:class:`SurveyConfig`).

Everything that shapes the simulated sky, camera and observing sequence lives
here, so that one frozen config plus its ``seed`` fully determines every byte
the simulator writes.

Units: angles in degrees unless a field name says ``arcsec``; fluxes in nJy;
pixel counts in instrumental counts (gain 1 e-/count); times in MJD (TAI) and
days.

Visit numbers are LSSTCam's (:meth:`SurveyConfig.visit_number`): the ``k``-th
simulated visit (``k`` = 0, 1, ..., the index every random stream is seeded
with) is numbered ``day_obs·10⁵ + seq_num`` from its time, as the camera numbers
its exposures, so the bundles, truth and alerts carry the ids real data does.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from core.bundle import BANDS
from core.ids import DAY_OBS_ROLLOVER_DAYS, SEQ_NUM_RADIX, day_obs_date, day_obs_of
from sim.solarsystem import SolarSystemConfig

__all__ = ["DAY_OBS_ROLLOVER_DAYS", "LSSTCAM_DETECTOR_SIZE", "SurveyConfig"]

#: LSSTCam science CCD size in pixels, (nx, ny).
LSSTCAM_DETECTOR_SIZE = (4072, 4000)

#: The Modified Julian Date's day 0.
_MJD_EPOCH = dt.date(1858, 11, 17)

#: Photometric calibration per band at unit transparency (nJy per count, 30 s
#: exposure, gain 1): roughly LSST's zero points (r: 1 count ≈ 0.5 nJy).
DEFAULT_PHOTCALIB = {"u": 1.6, "g": 0.45, "r": 0.5, "i": 0.62, "z": 0.85, "y": 1.7}

#: Dark-sky background per band (counts per 0.2″ pixel in 30 s), roughly LSST's.
DEFAULT_SKY = {"u": 90.0, "g": 420.0, "r": 1000.0, "i": 1500.0, "z": 2300.0, "y": 2800.0}


class SurveyConfig(BaseModel, frozen=True, extra="forbid"):
    """A persistent synthetic sky observed by an LSSTCam-like focal plane.

    The number of DiaSources per detector per visit is controlled by
    ``sources_per_detector``: the object densities of the variable, transient
    and moving populations are derived from it (see :class:`sim.survey.Survey`),
    so the user sets the count and the mix, not raw densities.
    """

    seed: int = Field(1, ge=0, description="Master random seed: same seed, same sky, same bytes.")

    # --- camera -----------------------------------------------------------------
    n_detectors: int = Field(
        189,
        ge=1,
        le=189,
        description="How many detectors each visit writes: the n_detectors detectors closest "
        "to the boresight of the 189-detector LSSTCam-like grid (ids 0..188).",
    )
    detector_size: tuple[int, int] = Field(
        (512, 512),
        description="Detector size in pixels (nx, ny). LSSTCam science CCDs are 4072×4000; "
        "small sizes keep tests and benchmarks fast.",
    )
    pixel_scale_arcsec: float = Field(0.2, gt=0, description="Pixel scale (arcsec/pixel).")
    detector_gap_fraction: float = Field(
        0.04,
        ge=0,
        description="Gap between neighbouring detectors of one raft, as a fraction of the "
        "detector size (LSSTCam: ~1.5 mm of 40 mm).",
    )
    raft_gap_fraction: float = Field(
        0.02,
        ge=0,
        description="Extra gap between rafts, as a fraction of the detector size.",
    )
    edge_width_px: int = Field(
        8, ge=0, description="Width of the EDGE mask border on every detector (pixels)."
    )
    saturation_counts: float = Field(
        1.0e5, gt=0, description="Saturation level (counts); pixels above it are SAT."
    )
    suspect_fraction: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Pixels above this fraction of the saturation level are SUSPECT.",
    )
    bad_column_probability: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Probability that a detector has one bad (BAD|INTRP) column segment in a "
        "visit.",
    )

    # --- pointing and observing sequence ----------------------------------------
    field_ra: float = Field(53.1, ge=0, lt=360, description="Field centre right ascension (deg).")
    field_dec: float = Field(-28.1, ge=-90, le=90, description="Field centre declination (deg).")
    target_name: str = Field("ECDFS", description="visit.json target_name.")
    observation_reason: str = Field("science", description="visit.json observation_reason.")
    dither_arcsec: float = Field(
        60.0, ge=0, description="Maximum per-visit boresight offset from the field centre (arcsec)."
    )
    n_visits: int = Field(
        120,
        ge=1,
        description="Survey length in visits; transients peak and moving objects pass within "
        "it. Visits beyond it can still be simulated.",
    )
    start_mjd: float = Field(
        61000.0,
        description="midpointMjdTai of the first visit (MJD, TAI; 61000.0 is 2025-11-20, "
        "visit 2025112000001).",
    )
    cadence_days: float = Field(3.0, gt=0, description="Time between consecutive visits (days).")
    exposure_time: float = Field(30.0, gt=0, description="Exposure time (s).")
    bands: tuple[str, ...] = Field(
        BANDS, min_length=1, description="Bands a visit is taken in (drawn per visit)."
    )

    # --- seeing, PSF, noise, calibration ------------------------------------------
    psf_model: Literal["gaussian", "moffat"] = Field(
        "moffat", description="PSF profile of every image."
    )
    moffat_beta: float = Field(
        4.765, gt=1, description="Moffat β (4.765: atmospheric turbulence, Trujillo et al. 2001)."
    )
    seeing_min_arcsec: float = Field(0.6, gt=0, description="Smallest per-visit PSF FWHM (arcsec).")
    seeing_max_arcsec: float = Field(1.2, gt=0, description="Largest per-visit PSF FWHM (arcsec).")
    sky_scale_range: tuple[float, float] = Field(
        (0.8, 1.4), description="Per-visit sky brightness factor range on top of the dark sky."
    )
    template_depth: float = Field(
        20.0,
        ge=1,
        description="Template noise variance is the science variance divided by this (the "
        "number of coadded epochs).",
    )
    photcalib_scatter: float = Field(
        0.01, ge=0, description="Fractional per-detector scatter of PHOTCALIB within a visit."
    )
    transparency_scatter: float = Field(
        0.03, ge=0, description="Per-visit fractional loss of transparency (half-normal σ)."
    )

    # --- astrometry: what quoted centroid errors leave out -----------------------
    astrometric_floor_arcsec: float = Field(
        0.02,
        ge=0,
        description="Per-axis systematic centroid scatter of every detection (arcsec): "
        "astrometric calibration, template registration and PSF-model residuals. Drawn "
        "independently per detection and included in the quoted xErr/yErr.",
    )
    peak_merge_sigma: float = Field(
        2.0,
        ge=0,
        description="Detections whose fitted centroids end closer than this many PSF σ are one "
        "peak and make one DiaSource, attributed to the true source contributing most flux (a "
        "blend): the sum of two equal Gaussian profiles has a single maximum below a "
        "separation of 2σ, and an unequal pair below a larger one. 0 keeps every fit.",
    )
    dcr_arcsec_per_mag: tuple[float, float, float, float, float, float] = Field(
        (0.30, 0.15, 0.05, 0.02, 0.01, 0.01),
        description="Chromatic (differential-refraction-like) centroid offset per band u g r i "
        "z y, in arcsec per magnitude of colour difference from the reference SED and per "
        "unit tan(zenith distance). An object's offset in a visit is this × its colour × "
        "tan z of the visit, along the visit's parallactic direction; it is not in the quoted "
        "errors (a real pipeline cannot know it).",
    )
    colour_sigma_mag: float = Field(
        0.4,
        ge=0,
        description="Spread (Gaussian σ, mag) of the objects' colour differences from the "
        "reference SED that the chromatic offset scales with.",
    )
    airmass_range: tuple[float, float] = Field(
        (1.0, 1.5),
        description="Per-visit airmass range (uniform); sets tan z of the chromatic offset.",
    )

    # --- populations ------------------------------------------------------------
    sources_per_detector: float = Field(
        53.0,
        ge=0,
        description="Target mean number of DiaSources per detector per visit, bogus included "
        "(Rubin design average: 10,000 per visit over 189 detectors ≈ 53).",
    )
    bogus_fraction: float = Field(
        0.2, ge=0, le=1, description="Fraction of DiaSources that are bogus detections."
    )
    bogus_mix: tuple[float, float, float] = Field(
        (0.4, 0.3, 0.3),
        description="Relative rates of bogus noise peaks, dipoles and cosmic rays.",
    )
    real_mix: tuple[float, float, float] = Field(
        (0.55, 0.4, 0.05),
        description="Relative shares of real DiaSources from variable stars, transients and "
        "moving objects.",
    )
    static_per_detector: float = Field(
        150.0, ge=0, description="Mean number of static stars per detector area."
    )
    static_mag_range: tuple[float, float] = Field(
        (15.0, 24.5), description="AB magnitude range of static stars (r band)."
    )
    variable_mag_range: tuple[float, float] = Field(
        (17.0, 23.0), description="AB magnitude range of variable stars' mean (r band)."
    )
    transient_mag_range: tuple[float, float] = Field(
        (18.0, 23.5), description="AB magnitude range of transients at peak (r band)."
    )
    moving_mag_range: tuple[float, float] = Field(
        (18.0, 23.0), description="AB magnitude range of moving objects (r band)."
    )
    moving_speed_range: tuple[float, float] = Field(
        (0.02, 0.5),
        description="Sky speed range (deg/day, log-uniform) of the sky's linear-motion draw "
        "(sim.sky.Sky.positions); the survey moves its moving objects on Keplerian orbits "
        "(solar_system) instead.",
    )
    solar_system: SolarSystemConfig = Field(
        SolarSystemConfig(),
        description="Orbits, known share and prediction errors of the moving objects "
        "(sim.solarsystem).",
    )
    ap_radius_px: float = Field(
        12.0,
        gt=0,
        description="Aperture radius for apInstFlux (pixels; Rubin slot_ApFlux is "
        "base_CircularApertureFlux_12_0).",
    )
    detection_threshold: float = Field(
        5.0, gt=0, description="|psfInstFlux|/psfInstFluxErr needed for a DiaSource."
    )
    workers: int = Field(
        2, ge=1, description="Threads or processes writing the detectors of a visit in parallel."
    )
    parallel: Literal["thread", "process"] = Field(
        "thread",
        description="How write_visit runs its workers: threads (no start-up cost; numpy "
        "releases the GIL for part of the work) or spawned processes (all cores, a few "
        "seconds of start-up per worker, kept for later visits until Survey.close()).",
    )

    @field_validator("detector_size", mode="before")
    @classmethod
    def _size(cls, value):
        if isinstance(value, int):
            return (value, value)
        if isinstance(value, str):
            parts = value.lower().replace("×", "x").split("x")
            return tuple(int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
        return value

    @field_validator("bands")
    @classmethod
    def _bands(cls, value):
        bad = [b for b in value if b not in BANDS]
        if bad:
            raise ValueError(f"bands must be among {''.join(BANDS)}, got {bad}")
        return tuple(value)

    @model_validator(mode="after")
    def _check(self):
        nx, ny = self.detector_size
        if nx < 32 or ny < 32:
            raise ValueError(f"detector_size must be at least 32×32 pixels, got {nx}×{ny}")
        if self.seeing_max_arcsec < self.seeing_min_arcsec:
            raise ValueError("seeing_max_arcsec must be >= seeing_min_arcsec")
        for name in ("bogus_mix", "real_mix"):
            mix = getattr(self, name)
            if min(mix) < 0 or sum(mix) <= 0:
                raise ValueError(f"{name} needs non-negative weights with a positive sum")
        for name in (
            "static_mag_range",
            "variable_mag_range",
            "transient_mag_range",
            "moving_mag_range",
            "moving_speed_range",
            "sky_scale_range",
            "airmass_range",
        ):
            lo, hi = getattr(self, name)
            if not hi >= lo:
                raise ValueError(f"{name} must be (low, high), got {(lo, hi)}")
        if self.airmass_range[0] < 1:
            raise ValueError(f"airmass_range must be >= 1, got {self.airmass_range}")
        if min(self.dcr_arcsec_per_mag) < 0:
            raise ValueError("dcr_arcsec_per_mag must be >= 0")
        if self.moving_speed_range[0] <= 0:
            raise ValueError("moving_speed_range must be > 0")
        return self

    # --- visit times and numbers ------------------------------------------------
    def visit_mjd(self, k: int) -> float:
        """midpointMjdTai of the ``k``-th simulated visit (``k`` = 0 is the first)."""
        return self.start_mjd + _index(k) * self.cadence_days

    def _night(self, k: int) -> int:
        """The MJD of the ``k``-th visit's ``day_obs`` (:func:`core.ids.day_obs_date`)."""
        return (day_obs_date(self.visit_mjd(k), self.exposure_time) - _MJD_EPOCH).days

    def day_obs(self, k: int) -> int:
        """The ``k``-th visit's observing night as YYYYMMDD (Rubin's ``day_obs``, TAI − 12 h)."""
        return day_obs_of(self.visit_mjd(k), self.exposure_time)

    def _first_from(self, night: int) -> int:
        """Index of the first visit whose ``day_obs`` night (MJD) is ``night`` or later."""
        # visits are evenly spaced: solve for the first start past that night's rollover,
        # then step over the rounding of the estimate
        start0 = self.start_mjd - self.exposure_time / 2 / 86400.0
        k = max(0, math.ceil((night + DAY_OBS_ROLLOVER_DAYS - start0) / self.cadence_days))
        while k > 0 and self._night(k - 1) >= night:
            k -= 1
        while self._night(k) < night:
            k += 1
        return k

    def seq_num(self, k: int) -> int:
        """The ``k``-th visit's exposure number within its night (Rubin's ``seq_num``, from 1)."""
        return _index(k) - self._first_from(self._night(k)) + 1

    def visit_number(self, k: int) -> int:
        """The LSSTCam visit number of the ``k``-th simulated visit: ``day_obs·10⁵ + seq_num``.

        This is the number every visit leaves the simulator with (``{root}/{visit}/``,
        ``visit.json``, the FITS ``VISIT`` card, :meth:`sim.survey.Survey.visit_catalog`);
        ``k`` only seeds the random draws. E.g. ``k = 0`` of the default survey is
        2025112000001.

        Raises
        ------
        ValueError
            If ``k`` is negative or the night holds more than 99,999 visits (the
            cadence is too short for ``seq_num < 10⁵``).
        """
        seq = self.seq_num(k)
        if seq >= SEQ_NUM_RADIX:
            raise ValueError(
                f"visit {k} is exposure {seq} of night {self.day_obs(k)}: seq_num must be < "
                f"{SEQ_NUM_RADIX} (cadence_days={self.cadence_days} is too short)"
            )
        return self.day_obs(k) * SEQ_NUM_RADIX + seq

    def visit_index(self, visit: int) -> int:
        """Inverse of :meth:`visit_number`: the index ``k`` of LSSTCam visit number ``visit``.

        Raises
        ------
        ValueError
            If no simulated visit has that number (not of the form day_obs·10⁵ +
            seq_num, or a night or seq_num this survey's cadence does not reach).
        """
        day_obs, seq = divmod(int(visit), SEQ_NUM_RADIX)
        try:
            date = dt.date(day_obs // 10_000, day_obs // 100 % 100, day_obs % 100)
        except ValueError:
            raise ValueError(
                f"visit {visit} is not an LSSTCam visit number day_obs·10⁵ + seq_num "
                f"(day_obs {day_obs} is not a date YYYYMMDD)"
            ) from None
        night = (date - _MJD_EPOCH).days
        k = self._first_from(night) + seq - 1 if seq >= 1 else -1
        if k < 0 or self._night(k) != night:
            raise ValueError(
                f"visit {visit}: this survey (start_mjd={self.start_mjd}, cadence_days="
                f"{self.cadence_days}) has no exposure {seq} on night {day_obs}"
            )
        return k


def _index(k: int) -> int:
    """``k`` as a non-negative int, or ValueError."""
    if int(k) != k or k < 0:
        raise ValueError(f"visit index must be a non-negative integer, got {k!r}")
    return int(k)
