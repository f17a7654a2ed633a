"""The next-visit message of a simulated visit (:mod:`core.nextvisit`), with a pointing error.

The scheduler predicts where the telescope will point; the telescope then
lands a little off. The message carries the *predicted* boresight: the true
(simulated) boresight moved by a pointing error drawn from a circular 2-d
Gaussian whose radial RMS is ``pointing_error_arcsec`` (per-axis σ =
RMS/√2), in a direction uniform in angle, from a stream seeded by the
survey seed and the visit, so the same survey gives the same messages.
The rotation is the true one (the rotator angle is commanded, not pointed).

Each detector's predicted corners are the sim's own focal-plane geometry
(:mod:`sim.focalplane`) evaluated with the predicted boresight: the same
TAN projection, CD matrix and CRPIX as the bundle's WCS, about another
tangent point. The pixel-edge corners ``(-0.5, -0.5)``, ``(nx-0.5, -0.5)``,
``(nx-0.5, ny-0.5)``, ``(-0.5, ny-0.5)`` are the ones the pipeline takes
from the real WCS for the real footprint.

Times: the expected shutter close is the visit's ``midpointMjdTai`` plus half
the exposure time, in UTC; the message is issued at the start of the
exposure. Either can be set instead (a wall-clock replay of a night).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
from astropy.time import Time
from astropy.wcs import WCS

from core.bundle import visit_path
from core.nextvisit import NEXT_VISIT_FILE, NextVisit
from sim import io as simio
from sim.focalplane import detector_wcs_header, gnomonic_inverse
from sim.survey import Survey

__all__ = ["DEFAULT_POINTING_ERROR_ARCSEC", "next_visit_message", "write_next_visit"]

#: Radial RMS of the difference between predicted and actual boresight (arcsec).
DEFAULT_POINTING_ERROR_ARCSEC = 2.0

_POINTING = 101  # seed-stream purpose, apart from sim.survey's


def _shutter_close(survey: Survey, visit: int) -> datetime:
    info = survey.visit_info(visit)
    mid = Time(info.midpointMjdTai, format="mjd", scale="tai").utc.to_datetime(timezone=UTC)
    return mid + timedelta(seconds=info.exposureTime / 2.0)


def next_visit_message(
    survey: Survey,
    visit: int,
    pointing_error_arcsec: float = DEFAULT_POINTING_ERROR_ARCSEC,
    *,
    shutter_close: datetime | None = None,
    issued: datetime | None = None,
) -> NextVisit:
    """The message announcing ``visit`` of ``survey`` (see the module docstring).

    Parameters
    ----------
    survey : Survey
        The simulated survey.
    visit : int
        Index of the visit to announce (as for :meth:`sim.survey.Survey.write_visit`);
        the message carries its LSSTCam visit number, the one its bundle is written under.
    pointing_error_arcsec : float
        Radial RMS of the pointing error (arcsec), >= 0; 0 predicts the true boresight.
    shutter_close, issued : datetime, optional
        Aware UTC datetimes that replace the simulated ones.
    """
    if not (pointing_error_arcsec >= 0 and math.isfinite(pointing_error_arcsec)):
        raise ValueError(
            f"pointing error must be a finite number >= 0, got {pointing_error_arcsec}"
        )
    vp = survey.visit_params(visit)
    info = survey.visit_info(visit)
    rng = np.random.default_rng(np.random.SeedSequence([survey.config.seed, _POINTING, visit]))
    sigma = pointing_error_arcsec / math.sqrt(2.0) / 3600.0
    dxi, deta = rng.normal(0.0, sigma, 2) if sigma > 0 else (0.0, 0.0)
    # the offset in the tangent plane of the true boresight
    ra, dec = gnomonic_inverse(np.array(dxi), np.array(deta), vp.ra, vp.dec)
    ra, dec = float(ra) % 360.0, float(dec)
    fp = survey.focal_plane
    edges = np.array(
        [[-0.5, -0.5], [fp.nx - 0.5, -0.5], [fp.nx - 0.5, fp.ny - 0.5], [-0.5, fp.ny - 0.5]]
    )
    corners = {}
    for det in info.detectors:
        wcs = WCS(detector_wcs_header(fp, det, ra, dec, vp.cd))
        sky = wcs.all_pix2world(edges, 0)
        corners[int(det)] = tuple((float(r) % 360.0, float(d)) for r, d in sky)
    close = shutter_close or _shutter_close(survey, visit)
    return NextVisit(
        visit=info.visit,
        band=info.band,
        boresightRa=ra,
        boresightDec=dec,
        rotAngle=float(vp.rot),
        detectors=tuple(info.detectors),
        shutter_close=close,
        issued=issued or close - timedelta(seconds=info.exposureTime),
        detector_corners=corners,
    )


def write_next_visit(root: str, message: NextVisit) -> str:
    """Write ``message`` to ``{root}/{visit}/next-visit.json``; returns the URL."""
    return simio.write_bytes(
        f"{visit_path(root, message.visit)}/{NEXT_VISIT_FILE}", message.to_json_bytes()
    )
