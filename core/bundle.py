"""The visit bundle (docs/design.md §2): its on-disk layout and in-memory model.

Layout under one root URL (a local path or ``s3://bucket/prefix``, always
through fsspec)::

    {root}/{visit}/visit.json
    {root}/{visit}/{detector}/diaSources.parquet
    {root}/{visit}/{detector}/difference.fits
    {root}/{visit}/{detector}/science.fits
    {root}/{visit}/{detector}/template.fits

Beside it an upstream system may put the next-visit message
``{root}/{visit}/next-visit.json`` (:mod:`core.nextvisit`) before the bundle
and the completion marker ``{root}/{visit}/complete.json``
(:mod:`core.completion`) after it; reading a bundle needs neither.

Each FITS file is a multi-extension file: an empty primary HDU, then image
HDUs named ``IMAGE`` (float32 counts), ``MASK`` (int32 bit planes, header keys
``MP_<PLANE> = bit``), ``VARIANCE`` (float32 counts²) and ``PSF`` (a kernel
that sums to 1, odd square side, centred on its middle pixel). The ``IMAGE``
header carries a celestial FITS WCS and ``PHOTCALIB`` (nJy per count,
``PHOTCERR`` optional).
"""

from __future__ import annotations

import functools
import io
import json
import math
import warnings
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning
from pydantic import BaseModel, Field

from core.errors import InputError, TransientError

__all__ = [
    "BANDS",
    "DIA_SOURCE_REQUIRED",
    "IMAGE_KINDS",
    "MASK_PLANES",
    "DetectorBundle",
    "Exposure",
    "ReaderConfig",
    "VisitInfo",
    "detector_path",
    "read_detector_bundle",
    "read_exposure",
    "read_sources",
    "read_visit_info",
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
        return self.image.shape


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


# --------------------------------------------------------------------------- reading

_VISIT_FIELDS: dict[str, tuple[type, ...]] = {
    "visit": (int,),
    "band": (str,),
    "midpointMjdTai": (int, float),
    "exposureTime": (int, float),
    "boresightRa": (int, float),
    "boresightDec": (int, float),
    "rotAngle": (int, float),
    "observation_reason": (str,),
    "target_name": (str,),
    "detectors": (list,),
}
_HDUS = ("IMAGE", "MASK", "VARIANCE", "PSF")
_OPTIONAL_FLOAT = (
    "xErr",
    "yErr",
    "apInstFlux",
    "apInstFluxErr",
    "scienceInstFlux",
    "scienceInstFluxErr",
    "templateInstFlux",
    "templateInstFluxErr",
    "snr",
    "reliability",
    "trailLength",
)
_ERROR_COLUMNS = (
    "psfInstFluxErr",
    "xErr",
    "yErr",
    "apInstFluxErr",
    "scienceInstFluxErr",
    "templateInstFluxErr",
)


class ReaderConfig(BaseModel, frozen=True, extra="forbid"):
    """Checks applied when a detector bundle is read."""

    psf_sum_tolerance: float = Field(
        1e-3, gt=0, description="The PSF kernel must sum to 1 within this absolute tolerance."
    )
    max_pointing_offset_deg: float = Field(
        5.0,
        gt=0,
        description="A detector centre further than this from the visit boresight means a "
        "WCS that does not belong to the visit (LSSTCam's field radius is ~1.75 deg).",
    )
    max_wcs_mismatch_px: float = Field(
        0.1,
        gt=0,
        description="The science and template WCSs must map the difference image's corners "
        "and centre to the same pixels within this many pixels: the images are on one pixel "
        "grid (the template warped to the science image), and stamps are cut at the "
        "difference image's pixels from all three.",
    )
    max_sources: int = Field(
        100_000,
        gt=0,
        description="Refuse catalogs longer than this (a runaway detection run) before any "
        "science is done on them. LSSTCam's design average is ~53 DiaSources per detector; "
        "100,000 is far past any real detector and far past maxNewDiaObjects (1000).",
    )


#: Plausible ``midpointMjdTai`` (MJD 40000 = 1968-05-24, 100000 = 2132-09-01).
MJD_RANGE = (40_000.0, 100_000.0)


def _fs(root: str):
    fs, _, _ = fsspec.get_fs_token_paths(root)
    return fs


def _ukey(fs, path: str) -> str:
    try:
        return str(fs.ukey(path))
    except Exception:
        return ""


def missing_credentials(exc: Exception) -> str:
    """What to do when the object store found no credentials (botocore's error)."""
    return (
        f"no object-store credentials ({exc}): set AWS_ACCESS_KEY_ID and "
        f"AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones), or "
        f"AWS_PROFILE / AWS_SHARED_CREDENTIALS_FILE"
    )


def _read_bytes(fs, path: str, what: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: {what} is missing") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{path}: {what} is a directory, not a file") from exc
    except Exception as exc:
        if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise InputError(f"{path}: {what}: {missing_credentials(exc)}") from exc
        if not isinstance(exc, OSError):
            raise
        raise TransientError(f"{path}: could not read {what}: {exc}") from exc


def read_visit_info(root: str, visit: int) -> VisitInfo:
    """Read and validate ``{root}/{visit}/visit.json``.

    Raises
    ------
    InputError
        If the file is missing, not JSON, lacks a field, has a field of the wrong
        type, a band outside ``ugrizy``, or a ``visit`` that disagrees with its folder.
    """
    path = f"{visit_path(root, visit)}/visit.json"
    raw = _read_bytes(_fs(root), path, "visit.json")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in _VISIT_FIELDS if k not in data]
    if missing:
        raise InputError(f"{path}: missing field(s) {', '.join(missing)}")
    for key, types in _VISIT_FIELDS.items():
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise InputError(
                f"{path}: field {key!r} must be {'/'.join(t.__name__ for t in types)}, "
                f"got {value!r}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{path}: field {key!r} must be finite, got {value!r}")
    if data["band"] not in BANDS:
        raise InputError(f"{path}: band must be one of {''.join(BANDS)}, got {data['band']!r}")
    if data["visit"] != int(visit):
        raise InputError(f"{path}: visit is {data['visit']} but the folder says {visit}")
    if data["exposureTime"] <= 0:
        raise InputError(f"{path}: exposureTime must be > 0, got {data['exposureTime']}")
    if not -90 <= data["boresightDec"] <= 90:
        raise InputError(f"{path}: boresightDec must be in [-90, 90], got {data['boresightDec']}")
    mjd = data["midpointMjdTai"]
    if not MJD_RANGE[0] <= mjd <= MJD_RANGE[1]:
        raise InputError(
            f"{path}: midpointMjdTai {mjd!r} is outside the plausible range "
            f"{MJD_RANGE[0]:g}..{MJD_RANGE[1]:g} (years 1968-2132): not an MJD"
        )
    dets = data["detectors"]
    if not dets:
        raise InputError(f"{path}: detectors is empty: the visit has nothing to process")
    if any(isinstance(d, bool) or not isinstance(d, int) for d in dets):
        raise InputError(f"{path}: detectors must be a list of integers, got {dets!r}")
    if len(set(dets)) != len(dets):
        raise InputError(f"{path}: detectors has duplicates")
    return VisitInfo(
        visit=int(data["visit"]),
        band=data["band"],
        midpointMjdTai=float(data["midpointMjdTai"]),
        exposureTime=float(data["exposureTime"]),
        boresightRa=float(data["boresightRa"]),
        boresightDec=float(data["boresightDec"]),
        rotAngle=float(data["rotAngle"]),
        observation_reason=data["observation_reason"],
        target_name=data["target_name"],
        detectors=tuple(int(d) for d in dets),
    )


@functools.lru_cache(maxsize=64)
def _wcs_from_cards(text: str) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(fits.Header.fromstring(text), naxis=2)


def _check_wcs(wcs_text: str, path: str, shape: tuple[int, int]) -> WCS:
    try:
        wcs = _wcs_from_cards(wcs_text)
    except Exception as exc:
        raise InputError(f"{path}: IMAGE header has no usable WCS: {exc}") from exc
    if not wcs.has_celestial or not wcs.is_celestial:
        raise InputError(f"{path}: IMAGE header has no celestial WCS (CTYPE1/2 missing)")
    ny, nx = shape
    px = np.array([[(nx - 1) / 2.0, (ny - 1) / 2.0], [0.0, 0.0], [nx - 1.0, ny - 1.0]])
    try:
        with np.errstate(all="ignore"):
            sky = wcs.all_pix2world(px, 0)
    except Exception as exc:
        raise InputError(f"{path}: WCS cannot be evaluated: {exc}") from exc
    if not np.all(np.isfinite(sky)):
        raise InputError(f"{path}: WCS gives non-finite sky coordinates on the image")
    try:
        cd = wcs.pixel_scale_matrix
    except Exception as exc:
        raise InputError(f"{path}: WCS has no pixel scale matrix: {exc}") from exc
    det = float(np.linalg.det(cd)) if np.all(np.isfinite(cd)) else float("nan")
    if not math.isfinite(det) or abs(det) < 1e-20:
        raise InputError(f"{path}: WCS pixel matrix is singular (determinant {det:g})")
    return wcs


# ------------------------------------------------------------------ FITS parsing
#
# The bundle images are plain multi-extension FITS. astropy.io.fits spends ~40 ms
# parsing the cards of one 5-HDU file; this reader takes the few cards it needs
# straight from the 80-byte records and maps the data with numpy, ~1 ms. Anything
# it does not handle (tile compression, BSCALE/BZERO, random groups, long-string
# CONTINUE cards, a card value it cannot parse) goes to astropy unchanged, which
# alone decides whether the file is readable (tests/core/test_fits_parity.py).

_BITPIX = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
_WCS_KEYS = (
    "WCSAXES",
    "CTYPE",
    "CRVAL",
    "CRPIX",
    "CDELT",
    "CUNIT",
    "CD1_",
    "CD2_",
    "PC1_",
    "PC2_",
    "CROTA",
    "RADESYS",
    "RADECSYS",
    "EQUINOX",
    "LONPOLE",
    "LATPOLE",
    "PV1_",
    "PV2_",
    "A_",
    "B_",
    "AP_",
    "BP_",
    "MJD-OBS",
    "DATE-OBS",
)


class _NotSimple(Exception):
    """The file needs the full astropy reader."""


def _card_value(text: str):
    v = text.strip()
    if v.startswith("'"):
        out, i = [], 1
        while True:
            j = v.find("'", i)
            if j < 0:
                raise ValueError(f"unterminated string in card value {text!r}")
            if v[j + 1 : j + 2] == "'":
                out.append(v[i : j + 1])
                i = j + 2
                continue
            out.append(v[i:j])
            return "".join(out).rstrip()
    v = v.split("/", 1)[0].strip()
    if v in ("T", "F"):
        return v == "T"
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        return float(v.replace("D", "E"))


def _parse_mef(raw: bytes) -> dict[str, tuple[dict, np.ndarray | None, str]]:
    """HDU name → (cards, data, WCS card text) for every HDU of a plain image MEF."""
    if not raw.startswith(b"SIMPLE  ="):
        raise ValueError("no SIMPLE card at the start")
    out: dict[str, tuple[dict, np.ndarray | None, str]] = {}
    pos, first = 0, True
    while pos < len(raw):
        cards: dict[str, str | int | float | bool] = {}
        wcs_cards: list[str] = []
        ended = False
        while not ended:
            if pos + 2880 > len(raw):
                raise ValueError(f"truncated header at byte {pos}")
            block = raw[pos : pos + 2880].decode("ascii", errors="replace")
            pos += 2880
            for i in range(0, 2880, 80):
                card = block[i : i + 80]
                key = card[:8].rstrip()
                if key == "END":
                    ended = True
                    break
                if key == "CONTINUE":  # a long string spread over several cards
                    raise _NotSimple
                if key == "HIERARCH":
                    name, eq, rest = card[9:].partition("=")
                    if eq:
                        cards[name.strip()] = _card_value(rest)
                elif card[8:10] == "= ":
                    cards[key] = _card_value(card[10:])
                    if key.startswith(_WCS_KEYS):
                        wcs_cards.append(card)
        if cards.get("ZIMAGE") or cards.get("GROUPS") or cards.get("PCOUNT", 0):
            raise _NotSimple
        if cards.get("BSCALE", 1) != 1 or cards.get("BZERO", 0) != 0:
            raise _NotSimple
        if not first and cards.get("XTENSION") != "IMAGE":
            raise _NotSimple
        naxis = int(cards.get("NAXIS", 0))
        bitpix = cards.get("BITPIX")
        if not isinstance(bitpix, int | float) or bitpix not in _BITPIX:
            raise ValueError(f"BITPIX {bitpix!r} is not a FITS image type")
        bits = int(bitpix)
        shape = tuple(int(cards[f"NAXIS{i}"]) for i in range(naxis, 0, -1))
        count = int(np.prod(shape)) if naxis else 0
        nbytes = count * abs(bits) // 8
        if pos + nbytes > len(raw):
            raise ValueError(f"truncated data: {nbytes} bytes expected at byte {pos}")
        data = (
            np.frombuffer(raw, _BITPIX[bits], count, offset=pos).reshape(shape) if count else None
        )
        pos += -(-nbytes // 2880) * 2880
        name = str(cards.get("EXTNAME", "PRIMARY" if first else f"HDU{len(out)}")).strip().upper()
        out.setdefault(name, (cards, data, "".join(wcs_cards)))
        first = False
    return out


def _shaped_like(image: np.ndarray, arr: np.ndarray | None, name: str, path: str) -> np.ndarray:
    """``arr``, an HDU that must have ``image``'s shape."""
    if arr is None or arr.shape != image.shape:
        raise InputError(
            f"{path}: {name} shape {None if arr is None else arr.shape} "
            f"differs from IMAGE {image.shape}"
        )
    return arr


def _parse_with_astropy(raw: bytes, path: str) -> dict[str, tuple[dict, np.ndarray | None, str]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            hdus = fits.open(io.BytesIO(raw), memmap=False, lazy_load_hdus=False)
            out: dict[str, tuple[dict, np.ndarray | None, str]] = {}
            for h in hdus:
                cards = {k: v for k, v in h.header.items() if k}
                text = "".join(str(c) for c in h.header.cards if c.keyword.startswith(_WCS_KEYS))
                out.setdefault(h.name, (cards, h.data, text))
            return out
    except Exception as exc:
        raise InputError(f"{path}: not a readable FITS file: {exc}") from exc


def read_exposure(
    fs, path: str, config: ReaderConfig | None = None, band: str | None = None
) -> Exposure:
    """Read and validate one multi-extension FITS image of the bundle.

    Raises
    ------
    InputError
        Missing file, not FITS, missing HDU, wrong dimensions or dtypes, negative
        variance, bad PSF (not finite, even or non-square, not normalised), missing or
        non-positive ``PHOTCALIB``, a WCS that cannot be evaluated, a band that
        disagrees with the visit.
    """
    config = config or ReaderConfig()
    raw = _read_bytes(fs, path, "image file")
    try:
        hdus = _parse_mef(raw)
    except (_NotSimple, ValueError, KeyError):
        # compressed, scaled, a card the fast path cannot parse, or not FITS at all:
        # astropy reads it or names what is wrong (InputError)
        hdus = None
    if hdus is None:
        hdus = _parse_with_astropy(raw, path)
    names = list(hdus)
    for name in _HDUS:
        if name not in hdus:
            raise InputError(f"{path}: HDU {name} is missing (have {names})")
    data = {name: hdus[name][1] for name in _HDUS}
    header, wcs_text = hdus["IMAGE"][0], hdus["IMAGE"][2]

    image, mask, variance, psf = (data[n] for n in _HDUS)
    if image is None or image.ndim != 2:
        raise InputError(
            f"{path}: IMAGE must be a 2-d array, got {None if image is None else image.shape}"
        )
    mask = _shaped_like(image, mask, "MASK", path)
    variance = _shaped_like(image, variance, "VARIANCE", path)
    if image.dtype.kind != "f":
        raise InputError(f"{path}: IMAGE must be floating point, got {image.dtype}")
    if variance.dtype.kind != "f":
        raise InputError(f"{path}: VARIANCE must be floating point, got {variance.dtype}")
    if mask.dtype.kind not in "iu":
        raise InputError(f"{path}: MASK must be integer bit planes, got {mask.dtype}")
    image = image.astype(np.float32, copy=False)
    variance = variance.astype(np.float32, copy=False)
    mask = mask.astype(np.int32, copy=False)
    neg = np.count_nonzero(variance < 0)
    if neg:
        raise InputError(f"{path}: VARIANCE has {neg} negative pixel(s)")

    if psf is None or psf.ndim != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0:
        raise InputError(
            f"{path}: PSF must be an odd-sized square kernel, got shape "
            f"{None if psf is None else psf.shape}"
        )
    psf = psf.astype(np.float64)
    if not np.all(np.isfinite(psf)):
        raise InputError(f"{path}: PSF has non-finite values")
    total = float(psf.sum())
    if abs(total - 1.0) > config.psf_sum_tolerance:
        raise InputError(f"{path}: PSF must sum to 1 (normalised), sums to {total:.6g}")

    if "PHOTCALIB" not in header:
        raise InputError(f"{path}: IMAGE header has no PHOTCALIB")
    calib = header["PHOTCALIB"]
    if (
        isinstance(calib, bool)
        or not isinstance(calib, (int, float))
        or not math.isfinite(calib)
        or calib <= 0
    ):
        kind = (
            "" if isinstance(calib, (int, float)) else f" (a {type(calib).__name__}, not a number)"
        )
        raise InputError(f"{path}: PHOTCALIB must be > 0, got {calib!r}{kind}")
    calib_err = header.get("PHOTCERR", 0.0)
    if (
        isinstance(calib_err, bool)
        or not isinstance(calib_err, (int, float))
        or not math.isfinite(calib_err)
        or calib_err < 0
    ):
        raise InputError(f"{path}: PHOTCERR must be >= 0, got {calib_err!r}")
    file_band = header.get("BAND", header.get("FILTER"))
    if band is not None and file_band is not None and str(file_band).strip()[:1] != band:
        raise InputError(
            f"{path}: band {file_band!r} in the header disagrees with visit band {band!r}"
        )

    wcs = _check_wcs(wcs_text, path, image.shape)
    keep = {k: header[k] for k in ("ROTPA", "BUNIT", "VISIT", "DETECTOR") if k in header}
    return Exposure(
        image=image,
        mask=mask,
        variance=variance,
        psf=psf,
        wcs=wcs,
        photo_calib=float(calib),
        photo_calib_err=float(calib_err),
        path=path,
        header=keep,
    )


def read_sources(fs, path: str, config: ReaderConfig | None = None) -> pd.DataFrame:
    """Read and validate ``diaSources.parquet``.

    An empty catalog is valid and gives an empty frame.

    Raises
    ------
    InputError
        Missing file, not Parquet, a required column missing, a column of the
        wrong type, NaN/inf in a required column, a negative error, duplicate or
        null ``diaSourceId``, or more rows than ``max_sources``.
    """
    config = config or ReaderConfig()
    raw = _read_bytes(fs, path, "DiaSource catalog")
    try:
        df = pq.read_table(pa.BufferReader(raw)).to_pandas()
    except Exception as exc:
        raise InputError(f"{path}: not a readable Parquet file: {exc}") from exc
    if len(df) > config.max_sources:
        raise InputError(f"{path}: {len(df)} rows is more than max_sources={config.max_sources}")
    missing = [c for c in DIA_SOURCE_REQUIRED if c not in df.columns]
    if missing:
        raise InputError(f"{path}: required column(s) missing: {', '.join(missing)}")
    for col in DIA_SOURCE_REQUIRED + tuple(c for c in _OPTIONAL_FLOAT if c in df.columns):
        if not (
            pd.api.types.is_float_dtype(df[col]) or pd.api.types.is_integer_dtype(df[col])
        ) or pd.api.types.is_bool_dtype(df[col]):
            raise InputError(f"{path}: column {col!r} must be numeric, got {df[col].dtype}")
    for col in DIA_SOURCE_REQUIRED:
        values = df[col].to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            raise InputError(
                f"{path}: column {col!r} has {int(bad.sum())} NaN/inf value(s) "
                f"(first at row {int(np.flatnonzero(bad)[0])})"
            )
    for col in _ERROR_COLUMNS:
        if col in df.columns:
            values = df[col].to_numpy(dtype=np.float64, na_value=np.nan)
            if np.any(values < 0):
                raise InputError(f"{path}: column {col!r} has negative error(s)")
    if "bboxSize" in df.columns and not pd.api.types.is_integer_dtype(df["bboxSize"]):
        if not pd.api.types.is_float_dtype(df["bboxSize"]):
            raise InputError(
                f"{path}: column 'bboxSize' must be numeric, got {df['bboxSize'].dtype}"
            )
    for col in df.columns:
        if (
            col.startswith("pixelFlags")
            or col.endswith("_flag")
            or col in ("isDipole", "glint_trail")
        ) and not pd.api.types.is_bool_dtype(df[col]):
            raise InputError(f"{path}: flag column {col!r} must be boolean, got {df[col].dtype}")
    if "diaSourceId" in df.columns:
        ids = df["diaSourceId"]
        if not pd.api.types.is_integer_dtype(ids) or ids.isna().any():
            raise InputError(f"{path}: diaSourceId must be non-null integers, got {ids.dtype}")
        dup = ids.duplicated()
        if dup.any():
            raise InputError(
                f"{path}: diaSourceId has {int(dup.sum())} duplicate(s), e.g. {int(ids[dup].iloc[0])}"
            )
    return df.reset_index(drop=True)


def read_detector_bundle(
    root: str,
    visit: int,
    detector: int,
    *,
    visit_info: VisitInfo | None = None,
    config: ReaderConfig | None = None,
) -> DetectorBundle:
    """Read and validate everything one detector of one visit needs.

    Parameters
    ----------
    root : str
        Bundle root: a local path or an fsspec URL such as ``s3://bucket/prefix``.
    visit, detector : int
        Which detector of which visit.
    visit_info : VisitInfo, optional
        Already-read ``visit.json`` (read here when not given).
    config : ReaderConfig, optional
        Validation tolerances.

    Raises
    ------
    InputError
        Anything wrong with the inputs, naming the file and the problem.
    TransientError
        The storage could not be read (e.g. the object store is down).
    """
    config = config or ReaderConfig()
    info = visit_info or read_visit_info(root, visit)
    if int(detector) not in info.detectors:
        raise InputError(
            f"{visit_path(root, visit)}/visit.json: detector {detector} is not in the visit's "
            f"detectors list"
        )
    fs = _fs(root)
    base = detector_path(root, visit, detector)
    images = {
        kind: read_exposure(fs, f"{base}/{kind}.fits", config, band=info.band)
        for kind in IMAGE_KINDS
    }
    shape = images["difference"].shape
    for kind in ("science", "template"):
        if images[kind].shape != shape:
            raise InputError(
                f"{base}/{kind}.fits: image shape {images[kind].shape} differs from "
                f"difference.fits {shape}"
            )
    ny, nx = shape
    centre = images["difference"].wcs.all_pix2world([[(nx - 1) / 2, (ny - 1) / 2]], 0)[0]
    offset = _separation_deg(centre[0], centre[1], info.boresightRa, info.boresightDec)
    if offset > config.max_pointing_offset_deg:
        raise InputError(
            f"{base}/difference.fits: WCS puts the detector {offset:.2f} deg from the visit "
            f"boresight (limit {config.max_pointing_offset_deg} deg)"
        )
    for kind in ("science", "template"):
        _check_same_grid(images["difference"], images[kind], base, kind, config)
    sources = read_sources(fs, f"{base}/diaSources.parquet", config)
    checksums = {
        name: _ukey(fs, f"{base}/{name}")
        for name in ("diaSources.parquet", *(f"{k}.fits" for k in IMAGE_KINDS))
    }
    return DetectorBundle(
        visit=info,
        detector=int(detector),
        sources=sources,
        difference=images["difference"],
        science=images["science"],
        template=images["template"],
        root=root,
        checksums=checksums,
    )


def _check_same_grid(difference, other, base: str, kind: str, config: ReaderConfig) -> None:
    """Refuse an image whose WCS disagrees with the difference image's on its corners.

    The difference image's corners and centre go to the sky with its WCS and
    back to pixels with the other image's WCS; every point must land within
    ``max_wcs_mismatch_px`` of where it started.
    """
    ny, nx = difference.shape
    pix = np.array(
        [[-0.5, -0.5], [nx - 0.5, -0.5], [nx - 0.5, ny - 0.5], [-0.5, ny - 0.5]]
        + [[(nx - 1) / 2, (ny - 1) / 2]]
    )
    where = f"{base}/{kind}.fits and {base}/difference.fits"
    try:
        sky = difference.wcs.all_pix2world(pix, 0)
        back = other.wcs.all_world2pix(sky, 0)
    except Exception as exc:  # astropy raises several kinds here
        raise InputError(f"{where}: the WCSs cannot be compared: {exc}") from exc
    off = np.hypot(*(back - pix).T)
    worst = float(np.nanmax(off)) if np.isfinite(off).any() else float("inf")
    if not np.isfinite(off).all() or worst > config.max_wcs_mismatch_px:
        i = int(np.nanargmax(np.where(np.isfinite(off), off, np.inf)))
        arcsec = worst * _pixel_scale_arcsec(difference.wcs, pix[i])
        raise InputError(
            f"{where}: the WCSs disagree by {worst:.3g} px ({arcsec:.3g} arcsec) at pixel "
            f"({pix[i][0]:g}, {pix[i][1]:g}) of the difference image (limit "
            f"{config.max_wcs_mismatch_px} px): the images are not on one pixel grid"
        )


def _pixel_scale_arcsec(wcs, xy) -> float:
    x, y = float(xy[0]), float(xy[1])
    (r0, d0), (r1, d1) = wcs.all_pix2world([[x, y], [x + 1.0, y]], 0)
    return _separation_deg(r0, d0, r1, d1) * 3600.0


def _separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    s = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(s))))
