"""The visit bundle (SPEC §2): its on-disk layout and in-memory model.

Layout under one root URL (a local path or ``s3://bucket/prefix``, always
through fsspec)::

    {root}/{visit}/visit.json
    {root}/{visit}/{detector}/diaSources.parquet
    {root}/{visit}/{detector}/difference.fits
    {root}/{visit}/{detector}/science.fits
    {root}/{visit}/{detector}/template.fits

Each FITS file is a multi-extension file: an empty primary HDU, then image
HDUs named ``IMAGE`` (float32 counts), ``MASK`` (int32 bit planes, header keys
``MP_<PLANE> = bit``), ``VARIANCE`` (float32 counts²) and ``PSF`` (a kernel
that sums to 1, odd square side, centred on its middle pixel). The ``IMAGE``
header carries a celestial FITS WCS and ``PHOTCALIB`` (nJy per count,
``PHOTCERR`` optional).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from astropy.wcs import WCS

__all__ = [
    "BANDS",
    "DIA_SOURCE_REQUIRED",
    "IMAGE_KINDS",
    "MASK_PLANES",
    "DetectorBundle",
    "Exposure",
    "VisitInfo",
    "detector_path",
    "visit_path",
]

BANDS = ("u", "g", "r", "i", "z", "y")
IMAGE_KINDS = ("difference", "science", "template")
DIA_SOURCE_REQUIRED = ("x", "y", "psfInstFlux", "psfInstFluxErr")

#: Mask bit planes, numbered as in LSST's afw ``Mask`` defaults.
MASK_PLANES = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
    "STREAK": 9,
    "INJECTED": 10,
}


def visit_path(root: str, visit: int) -> str:
    """``{root}/{visit}`` without a doubled slash."""
    return f"{root.rstrip('/')}/{int(visit)}"


def detector_path(root: str, visit: int, detector: int) -> str:
    """``{root}/{visit}/{detector}``."""
    return f"{visit_path(root, visit)}/{int(detector)}"


@dataclass(frozen=True)
class VisitInfo:
    """The contents of ``visit.json``."""

    visit: int
    band: str
    midpointMjdTai: float
    exposureTime: float
    boresightRa: float
    boresightDec: float
    rotAngle: float
    observation_reason: str
    target_name: str
    detectors: tuple[int, ...]

    def to_json_dict(self) -> dict:
        """The dict written to ``visit.json``."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["detectors"] = list(self.detectors)
        return d


@dataclass(frozen=True, eq=False)
class Exposure:
    """One image of a detector: pixels, mask, variance, PSF, WCS, calibration.

    Attributes
    ----------
    image : numpy.ndarray
        float32 counts, shape (ny, nx); index as ``image[y, x]``.
    mask : numpy.ndarray
        int32 bit planes (see :data:`MASK_PLANES`).
    variance : numpy.ndarray
        float32 counts².
    psf : numpy.ndarray
        float64 kernel, odd square side, sums to 1, centred.
    wcs : astropy.wcs.WCS
        Celestial WCS, 0-based pixel origin when evaluated with ``origin=0``.
    photo_calib : float
        nJy per count (``PHOTCALIB``), > 0.
    photo_calib_err : float
        Its 1σ error (``PHOTCERR``), 0 when absent.
    path : str
        Where it was read from, for error messages.
    header : dict
        The ``IMAGE`` header cards that the alert stamps copy (e.g. ``ROTPA``).
    """

    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray
    psf: np.ndarray
    wcs: WCS
    photo_calib: float
    photo_calib_err: float = 0.0
    path: str = ""
    header: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx)."""
        return self.image.shape  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class DetectorBundle:
    """Everything the stages need for one detector of one visit.

    ``sources`` is the raw ``diaSources.parquet`` table (instrumental units,
    validated); ``checksums`` maps each file name to a content checksum used in
    Prefect cache keys.
    """

    visit: VisitInfo
    detector: int
    sources: pd.DataFrame
    difference: Exposure
    science: Exposure
    template: Exposure
    root: str = ""
    checksums: dict[str, str] = field(default_factory=dict)

    def image(self, kind: str) -> Exposure:
        """The exposure named ``kind`` (one of :data:`IMAGE_KINDS`)."""
        return getattr(self, kind)
