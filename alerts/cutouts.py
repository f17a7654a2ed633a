"""Image stamps ("cutouts") for alerts (docs/design.md §4.7).

For every new DiaSource, three square stamps of side ``clip(bboxSize,
minCutoutSize, maxCutoutSize)`` pixels centred on the source are cut from the
difference, science and template images and serialised as multi-extension FITS
bytes, laid out like the stamps in Rubin's alerts (which Rubin makes with
``astropy.nddata.CCDData.write``)::

    PRIMARY   float32 image, BUNIT = 'nJy', CUTMINX, CUTMINY, ROTPA, local WCS
    UNCERT    float32 variance (nJy²), UTYPE = 'VarianceUncertainty'
    MASK      int32 mask bit planes (header MP_<PLANE> = bit); Rubin omits it
    PSFIMAGE  float64 PSF kernel image (sums to 1)

``astropy.nddata.CCDData.read`` opens them: data in nJy, a
``VarianceUncertainty``, ``mask`` = any mask bit set, ``psf`` and ``wcs``.

The WCS is a local linear (tangent-plane) approximation of the image WCS at
the source: ``CRVAL`` = the sky position of the source, ``CRPIX`` = the
source's position in the stamp in 1-based FITS pixels, and ``CDi_j`` = the
Jacobian of the image WCS there, projected on the tangent plane at ``CRVAL``.

Origin and centre follow Rubin's ``PackageAlertsTask.createCcdDataCutout``
(ap_association): the stamp is ``Box2I.makeCenteredBox(center=(x, y),
size=side)`` of lsst.geom, whose lower-left pixel is ``x0 = round(x - side/2 +
0.5)`` (0-based; ``lsst.geom.Point2I`` rounds a ``Point2D`` to the nearest
pixel), i.e. ``floor(x - (side - 1)/2 + 0.5)``: the source lies within half a
pixel of the stamp centre. Rubin writes ``CUTMINX = x0 - 1`` ("so that the
CCDData cutout position value will be [1, 1]": FITS pixel ``p`` of the stamp
is detector pixel ``CUTMINX + p``, 0-based) and ``CRPIX1 = x - CUTMINX``; so
does diapipe, and ``CUTMINY``, ``CRPIX2`` alike. On the 7 real LSSTCam alerts in
``tests/data`` this gives Rubin's ``CUTMINX``/``CUTMINY`` exactly and ``CRPIX``
to float32 precision.

Unlike Rubin's stamps, which carry ``PCi_j``/``CDELTi`` with no ``CTYPEi`` (so
a FITS reader sees a plain linear transformation rather than sky coordinates),
diapipe writes ``CTYPE1 = 'RA---TAN'``, ``CTYPE2 = 'DEC--TAN'`` and
``RADESYS = 'ICRS'``.

Stamps that run off the image are padded with NaN (image and variance) and the
``NO_DATA`` mask bit. A source whose centre is off the image (or whose position
is NaN) gets no stamps: ``(None, None, None)``.

The hot path builds no astropy objects: the stamps of one side are gathered
into one array (a slice copy each), calibrated and byte-swapped in place, the
FITS headers are fixed 80-character card templates (one format string per
side for the primary header; the extension headers built once per side), and
the data are written as big-endian numpy buffers.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from core.bundle import IMAGE_KINDS, MASK_PLANES, DetectorBundle, Exposure
from core.errors import InputError

__all__ = [
    "CutoutConfig",
    "cutout_origin",
    "cutout_side",
    "local_wcs",
    "make_cutouts",
]

log = logging.getLogger(__name__)

_BLOCK = 2880
_NO_DATA = np.int32(1 << MASK_PLANES["NO_DATA"])
REQUIRED_COLUMNS = ("diaSourceId", "x", "y")


class CutoutConfig(BaseModel, frozen=True, extra="forbid"):
    """How alert stamps are cut."""

    min_cutout_size: int = Field(
        30, ge=1, description="Smallest stamp side in pixels (Rubin: minCutoutSize)."
    )
    max_cutout_size: int = Field(
        102, ge=1, description="Largest stamp side in pixels (Rubin: maxCutoutSize)."
    )
    use_average_psf: bool = Field(
        False,
        description=(
            "Attach one PSF image per detector instead of one per source (Rubin: "
            "useAveragePsf). The visit bundle carries one PSF kernel per image, so "
            "both settings give the same PSFIMAGE; the PSF extension is always "
            "serialised once per image and shared by its stamps."
        ),
    )


# --------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------


def cutout_side(bbox_size: np.ndarray, config: CutoutConfig) -> np.ndarray:
    """Stamp side per source: ``clip(bboxSize, min, max)`` in pixels (int64).

    A missing ``bboxSize`` (NaN / NA) gives the minimum side.
    """
    b = pd.to_numeric(pd.Series(bbox_size), errors="coerce").astype("float64").to_numpy()
    b = np.where(np.isfinite(b), b, config.min_cutout_size)
    lo, hi = config.min_cutout_size, max(config.min_cutout_size, config.max_cutout_size)
    return np.clip(np.rint(b), lo, hi).astype(np.int64)


def cutout_origin(x: np.ndarray, y: np.ndarray, side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower-left pixel (0-based) of stamps of ``side`` centred on (x, y).

    The stamp covers pixel centres ``min .. min + side - 1``; the origin is
    ``round(x - (side - 1) / 2)`` (halves round up), so that the source lies
    within half a pixel of the stamp centre: lsst.geom's
    ``Box2I.makeCenteredBox``, as Rubin cuts its stamps. The header's
    ``CUTMINX``/``CUTMINY`` are this origin minus 1 (Rubin's convention).
    """
    half = (np.asarray(side, dtype=np.float64) - 1.0) / 2.0
    return (
        np.floor(np.asarray(x, dtype=np.float64) - half + 0.5).astype(np.int64),
        np.floor(np.asarray(y, dtype=np.float64) - half + 0.5).astype(np.int64),
    )


def _gnomonic(ra0, dec0, ra, dec):
    """Tangent-plane coordinates (deg) of (ra, dec) about (ra0, dec0); all in deg."""
    a0, d0, a, d = (np.deg2rad(v) for v in (ra0, dec0, ra, dec))
    da = a - a0
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(da)
    xi = np.cos(d) * np.sin(da) / cosc
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(da)) / cosc
    return np.rad2deg(xi), np.rad2deg(eta)


def local_wcs(exposure: Exposure, x: np.ndarray, y: np.ndarray, step: float = 0.5):
    """Sky position and tangent-plane Jacobian of ``exposure.wcs`` at 0-based (x, y).

    Parameters
    ----------
    exposure : Exposure
        Its ``wcs`` is evaluated with origin 0.
    x, y : numpy.ndarray
        Pixel positions (0-based).
    step : float
        Half-width of the central difference, pixels.

    Returns
    -------
    ra, dec : numpy.ndarray
        Degrees.
    cd : numpy.ndarray
        Shape (n, 2, 2), degrees per pixel: ``cd[:, i, j] = d(xi_i)/d(p_j)``
        with ``xi = (ξ, η)`` the gnomonic coordinates about (ra, dec) and
        ``p = (x, y)``, i.e. the FITS ``CDi_j`` matrix.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    px = np.concatenate([x, x + step, x - step, x, x])
    py = np.concatenate([y, y, y, y + step, y - step])
    try:
        world = exposure.wcs.all_pix2world(np.column_stack([px, py]), 0)
    except Exception as exc:  # astropy raises several types for a bad WCS
        raise InputError(f"{exposure.path or 'image'}: WCS cannot be evaluated: {exc}") from exc
    ra, dec = world[:, 0].reshape(5, n), world[:, 1].reshape(5, n)
    xi, eta = _gnomonic(ra[0], dec[0], ra[1:], dec[1:])
    cd = np.empty((n, 2, 2))
    cd[:, 0, 0] = (xi[0] - xi[1]) / (2 * step)
    cd[:, 0, 1] = (xi[2] - xi[3]) / (2 * step)
    cd[:, 1, 0] = (eta[0] - eta[1]) / (2 * step)
    cd[:, 1, 1] = (eta[2] - eta[3]) / (2 * step)
    return ra[0], dec[0], cd


# --------------------------------------------------------------------------
# FITS byte layout
# --------------------------------------------------------------------------


def _card(key: str, value: str, comment: str = "") -> str:
    """One 80-character header card; ``value`` is already FITS-formatted."""
    # Fixed format: strings start in column 11, numbers end in column 30.
    text = f"{key:<8}= {value:<20}" if value.startswith("'") else f"{key:<8}= {value:>20}"
    if comment:
        text += f" / {comment}"
    if len(text) > 80:
        raise ValueError(f"FITS card too long: {text!r}")
    return f"{text:<80}"


def _str(s: str) -> str:
    """A FITS character-string value (at least 8 characters inside quotes)."""
    return "'" + f"{s:<8}".replace("'", "''") + "'"


def _float(v: float) -> str:
    """A FITS real value: shortest round-trip repr, upper-case exponent, ≤ 20 chars."""
    r = repr(float(v)).upper()
    if "." not in r and "E" not in r and "N" not in r:
        r += ".0"
    if len(r) > 20:
        r = f"{float(v):.13E}"
        if len(r) > 20:  # a three-digit exponent
            r = f"{float(v):.12E}"
    return r


def _int(v: int) -> str:
    return str(int(v))


def _end_text(cards: list[str]) -> str:
    text = "".join(cards) + f"{'END':<80}"
    return text + " " * (-len(text) % _BLOCK)


def _end(cards: list[str]) -> bytes:
    return _end_text(cards).encode("ascii")


def _pad(nbytes: int) -> bytes:
    return b"\0" * (-nbytes % _BLOCK)


def _image_cards(bitpix: int, nx: int, ny: int, primary: bool) -> list[str]:
    if primary:
        head = [_card("SIMPLE", "T", "conforms to FITS standard")]
    else:
        head = [_card("XTENSION", _str("IMAGE"), "Image extension")]
    head += [
        _card("BITPIX", _int(bitpix), "array data type"),
        _card("NAXIS", "2", "number of array dimensions"),
        _card("NAXIS1", _int(nx)),
        _card("NAXIS2", _int(ny)),
    ]
    if primary:
        head.append(_card("EXTEND", "T"))
    else:
        head += [
            _card("PCOUNT", "0", "number of parameters"),
            _card("GCOUNT", "1", "number of groups"),
        ]
    return head


#: The primary header's cards after the image cards: (key, value, comment); the
#: value None is filled per stamp (see :meth:`_SideTemplates.primary_header`).
_PRIMARY_CARDS = (
    ("CUTMINX", None, "detector x (0-based) of stamp FITS pixel 0"),
    ("CUTMINY", None, "detector y (0-based) of stamp FITS pixel 0"),
    ("ROTPA", None, "Pos angle in deg of focal plane +Y wrt North"),
    ("BUNIT", _str("nJy"), ""),
    ("WCSAXES", "2", "Number of coordinate axes"),
    ("CTYPE1", _str("RA---TAN"), "Right ascension, gnomonic projection"),
    ("CTYPE2", _str("DEC--TAN"), "Declination, gnomonic projection"),
    ("CUNIT1", _str("deg"), "Units of coordinate increment and value"),
    ("CUNIT2", _str("deg"), "Units of coordinate increment and value"),
    ("CRPIX1", None, "Pixel coordinate of reference point"),
    ("CRPIX2", None, "Pixel coordinate of reference point"),
    ("CD1_1", None, "Coordinate transformation matrix element"),
    ("CD1_2", None, "Coordinate transformation matrix element"),
    ("CD2_1", None, "Coordinate transformation matrix element"),
    ("CD2_2", None, "Coordinate transformation matrix element"),
    ("CRVAL1", None, "[deg] Coordinate value at reference point"),
    ("CRVAL2", None, "[deg] Coordinate value at reference point"),
    ("RADESYS", _str("ICRS"), "Equatorial coordinate system"),
)


class _SideTemplates:
    """Header bytes that depend only on the stamp side (built once per side)."""

    def __init__(self, side: int):
        # The primary header as one format string: every per-stamp value is a
        # right-aligned 20-character slot of a fixed-format card (numbers end in
        # column 30), so filling it never moves a card boundary.
        slot = "\x01" * 20
        cards = _image_cards(-32, side, side, primary=True) + [
            _card(key, slot if value is None else value, comment)
            for key, value, comment in _PRIMARY_CARDS
        ]
        text = _end_text(cards).replace("{", "{{").replace("}", "}}")
        self.primary = text.replace(slot, "{:>20}")
        self.uncert = _end(
            _image_cards(-32, side, side, primary=False)
            + [
                _card("UTYPE", _str("VarianceUncertainty")),
                _card("EXTNAME", _str("UNCERT"), "extension name"),
            ]
        )
        self.mask = _end(
            _image_cards(32, side, side, primary=False)
            + [_card("EXTNAME", _str("MASK"), "extension name")]
            + [f"{'HIERARCH MP_' + p + ' = ' + str(b):<80}" for p, b in MASK_PLANES.items()]
        )
        self.data_pad = _pad(4 * side * side)

    def primary_header(self, cutmin_x, cutmin_y, rotpa: str, crpix, crval, cd) -> bytes:
        """The primary header of one stamp (``rotpa`` already formatted)."""
        return self.primary.format(
            _int(cutmin_x),
            _int(cutmin_y),
            rotpa,
            _float(crpix[0]),
            _float(crpix[1]),
            _float(cd[0, 0]),
            _float(cd[0, 1]),
            _float(cd[1, 0]),
            _float(cd[1, 1]),
            _float(crval[0]),
            _float(crval[1]),
        ).encode("ascii")


@functools.lru_cache(maxsize=512)
def _side_templates(side: int) -> _SideTemplates:
    """The (immutable) header templates of a stamp side, built once per process."""
    return _SideTemplates(side)


def _psf_hdu(psf: np.ndarray) -> bytes:
    """The PSFIMAGE extension (header + float64 data) of one image."""
    psf = np.asarray(psf, dtype=np.float64)
    ny, nx = psf.shape
    data = psf.astype(">f8").tobytes()
    head = _end(
        _image_cards(-64, nx, ny, primary=False)
        + [_card("EXTNAME", _str("PSFIMAGE"), "extension name")]
    )
    return head + data + _pad(len(data))


def _gather(plane: np.ndarray, x0: np.ndarray, y0: np.ndarray, side: int, fill) -> np.ndarray:
    """Stamps (n, side, side) of ``plane`` with lower-left corners (x0, y0); ``fill`` off-image.

    One slice copy per stamp: stamp sides vary with ``bboxSize``, so a side
    rarely has more than a few stamps and a per-side fancy index (or a
    sliding-window view) costs more in set-up than these copies. Stamps that
    cross an edge are filled first. The result is a new array.
    """
    ny, nx = plane.shape
    out = np.empty((len(x0), side, side), dtype=plane.dtype)
    for k, (xa, ya) in enumerate(zip(x0.tolist(), y0.tolist(), strict=True)):
        if xa >= 0 and ya >= 0 and xa + side <= nx and ya + side <= ny:
            out[k] = plane[ya : ya + side, xa : xa + side]
            continue
        out[k] = fill
        x1, x2 = max(xa, 0), min(xa + side, nx)
        y1, y2 = max(ya, 0), min(ya + side, ny)
        if x1 < x2 and y1 < y2:
            out[k, y1 - ya : y2 - ya, x1 - xa : x2 - xa] = plane[y1:y2, x1:x2]
    return out


def _big_endian(stamps: np.ndarray, dtype, scale=None) -> np.ndarray:
    """``stamps`` as ``dtype`` (times ``scale``), its memory in FITS (big-endian) byte order.

    Works in place on the gathered copy; the returned array's dtype still says
    native order, so only its raw bytes are meant to be used.
    """
    out = stamps.astype(dtype, copy=False)
    if scale is not None:
        np.multiply(out, scale, out=out)
    if out.dtype.byteorder in ("=", "<") and np.little_endian:
        out.byteswap(inplace=True)
    return out


def _primary_headers(
    tpls: list[_SideTemplates], x0, y0, rotpa: float, crpix1, crpix2, ra, dec, cd
) -> list[bytes]:
    """The primary header of every stamp (``tpls[i]`` the templates of its side).

    ``x0``, ``y0`` are the stamps' lower-left pixels; ``CUTMINX/Y`` = them - 1.
    """
    rot = _float(rotpa)
    return [
        tpl.primary_header(
            x0[i] - 1, y0[i] - 1, rot, (crpix1[i], crpix2[i]), (ra[i], dec[i]), cd[i]
        )
        for i, tpl in enumerate(tpls)
    ]


def _exposure_stamps(
    exposure: Exposure,
    x0: np.ndarray,
    y0: np.ndarray,
    side: np.ndarray,
    headers: list[bytes],
    templates: dict[int, _SideTemplates],
) -> list[bytes]:
    """FITS bytes of the stamps of one image, in the order of ``x0``."""
    n = x0.size
    out: list[bytes] = [b""] * n
    if n == 0:
        return out
    calib = np.float32(exposure.photo_calib)
    psf = _psf_hdu(exposure.psf)
    for s in np.unique(side).tolist():
        tpl = templates[s]
        idx = np.flatnonzero(side == s)
        img = _big_endian(_gather(exposure.image, x0[idx], y0[idx], s, np.nan), np.float32, calib)
        var = _gather(exposure.variance, x0[idx], y0[idx], s, np.nan)
        var = _big_endian(var, np.float32, calib * calib)
        msk = _big_endian(_gather(exposure.mask, x0[idx], y0[idx], s, _NO_DATA), np.int32)
        pad, uncert, mask = tpl.data_pad, tpl.uncert, tpl.mask
        for k, i in enumerate(idx.tolist()):
            # bytes.join takes the stamp arrays' buffers directly (no tobytes copy)
            out[i] = b"".join(
                (headers[i], img[k], pad, uncert, var[k], pad, mask, msk[k], pad, psf)
            )
    return out


def make_cutouts(
    sources: pd.DataFrame, bundle: DetectorBundle, config: CutoutConfig | None = None
) -> dict[int, tuple[bytes | None, bytes | None, bytes | None]]:
    """Cut difference, science and template stamps for each source.

    Parameters
    ----------
    sources : pandas.DataFrame
        Calibrated DiaSource rows; needs ``diaSourceId`` and ``x``, ``y``
        (0-based pixels on the detector); ``bboxSize`` (pixels) sets the side
        and defaults to the minimum when absent. Not modified.
    bundle : DetectorBundle
        The detector's difference, science and template exposures. Pixels are
        multiplied by each image's ``photo_calib`` (nJy per count), variances
        by its square.
    config : CutoutConfig, optional
        Side limits.

    Returns
    -------
    dict
        ``diaSourceId -> (difference, science, template)`` FITS bytes, each
        ``None`` when the source centre is off the image or its position is
        NaN. Empty input gives an empty dict.

    Raises
    ------
    InputError
        If a required column is missing or an image WCS cannot be evaluated.
    """
    config = config or CutoutConfig()
    missing = [c for c in REQUIRED_COLUMNS if c not in sources.columns]
    if missing:
        raise InputError(f"DiaSource: column(s) {missing} required for cutouts are missing")
    if len(sources) == 0:
        return {}
    ids = sources["diaSourceId"].to_numpy(dtype=np.int64)
    x = pd.to_numeric(sources["x"]).to_numpy(dtype=np.float64, na_value=np.nan)
    y = pd.to_numeric(sources["y"]).to_numpy(dtype=np.float64, na_value=np.nan)
    bbox = sources["bboxSize"] if "bboxSize" in sources.columns else np.full(len(x), np.nan)
    side = cutout_side(bbox, config)
    ny, nx = bundle.difference.shape
    on = np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x < nx - 0.5)
    on &= (y >= -0.5) & (y < ny - 0.5)
    result: dict[int, tuple[bytes | None, bytes | None, bytes | None]] = {
        int(i): (None, None, None) for i in ids[~on]
    }
    if on.any():
        xs, ys, sides = x[on], y[on], side[on]
        x0, y0 = cutout_origin(xs, ys, sides)
        templates = {s: _side_templates(s) for s in np.unique(sides).tolist()}
        tpls = [templates[s] for s in sides.tolist()]
        crpix1, crpix2 = xs - x0 + 1.0, ys - y0 + 1.0
        per_kind = []
        made: tuple | None = None  # (wcs, rotpa, headers) of the previous image
        for kind in IMAGE_KINDS:
            exposure = bundle.image(kind)
            rotpa = float(exposure.header.get("ROTPA", bundle.visit.rotAngle))
            # The three images usually share one WCS object (the bundle reader
            # caches it by header text): then their stamp headers are the same.
            if made is None or made[0] is not exposure.wcs or made[1] != rotpa:
                ra, dec, cd = local_wcs(exposure, xs, ys)
                heads = _primary_headers(tpls, x0, y0, rotpa, crpix1, crpix2, ra, dec, cd)
                made = (exposure.wcs, rotpa, heads)
            per_kind.append(_exposure_stamps(exposure, x0, y0, sides, made[2], templates))
        for i, d, s, t in zip(ids[on].tolist(), *per_kind, strict=True):
            result[i] = (d, s, t)
    n_off = int((~on).sum())
    if n_off:
        log.info("cutouts: %d of %d sources are off the image; no stamps", n_off, len(ids))
    return result
