"""Deterministic writers for the visit bundle, through fsspec.

Every file is built in memory and written with one ``fs.open(path, "wb")``,
so local paths and ``s3://`` URLs behave the same. Nothing time-dependent is
written: the FITS files carry no DATE or CHECKSUM cards and the parquet files
use fixed writer options, so the same inputs give the same bytes.
"""

from __future__ import annotations

import functools
import io
import json

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

from core.bundle import MASK_PLANES

__all__ = ["FitsWriter", "fits_bytes", "parquet_bytes", "write_bytes"]


_FITS_DTYPES = {np.dtype("float32"): -32, np.dtype("float64"): -64, np.dtype("int32"): 32}


def _header_block(header: fits.Header) -> bytes:
    return header.tostring(endcard=True, padding=True).encode("ascii")


def _data_block(data: np.ndarray) -> bytes:
    """Big-endian data, zero-padded to a multiple of 2880 bytes."""
    raw = np.ascontiguousarray(data).astype(data.dtype.newbyteorder(">"), copy=False).tobytes()
    return raw + b"\0" * (-len(raw) % 2880)


def _image_header(shape, dtype, extname: str, cards: fits.Header | None) -> fits.Header:
    """Mandatory image-extension cards for an array, then ``cards``."""
    h = fits.Header()
    h["XTENSION"] = ("IMAGE", "Image extension")
    h["BITPIX"] = _FITS_DTYPES[np.dtype(dtype)]
    h["NAXIS"] = len(shape)
    for i, n in enumerate(shape[::-1], start=1):
        h[f"NAXIS{i}"] = int(n)
    h["PCOUNT"] = 0
    h["GCOUNT"] = 1
    h["EXTNAME"] = extname
    if cards is not None:
        h.extend(cards)
    return h


@functools.lru_cache(maxsize=8)
def _fixed_blocks(shape: tuple[int, int]) -> tuple[bytes, bytes, bytes]:
    """Primary, MASK and VARIANCE header blocks (they depend only on the shape)."""
    mh = fits.Header()
    for plane, bit in MASK_PLANES.items():
        key = f"MP_{plane}"
        # keys longer than 8 characters are HIERARCH cards, as Rubin writes them
        mh[key if len(key) <= 8 else f"HIERARCH {key}"] = bit
    vh = fits.Header()
    vh["BUNIT"] = "count2"
    return (
        _header_block(fits.PrimaryHDU().header),
        _header_block(_image_header(shape, "int32", "MASK", mh)),
        _header_block(_image_header(shape, "float32", "VARIANCE", vh)),
    )


class FitsWriter:
    """Serialises docs/design.md §2 multi-extension FITS files that share their headers.

    The three images of one (visit, detector) have the same WCS, calibration
    and PSF, so the header blocks are built once with astropy and the data
    blocks are serialised directly (big-endian, zero-padded to 2880 bytes,
    as the FITS standard prescribes).

    Parameters
    ----------
    shape : tuple of int
        Image shape (ny, nx).
    image_header : astropy.io.fits.Header
        Cards for the ``IMAGE`` HDU (WCS, PHOTCALIB, ...).
    psf : numpy.ndarray
        The PSF kernel (float64, odd square side).
    psf_header : astropy.io.fits.Header, optional
        Cards for the ``PSF`` HDU.
    """

    def __init__(self, shape, image_header: fits.Header, psf: np.ndarray, psf_header=None):
        self.shape = tuple(int(n) for n in shape)
        self.primary, self.mask_head, self.var_head = _fixed_blocks(self.shape)
        self.image_head = _header_block(_image_header(self.shape, "float32", "IMAGE", image_header))
        psf = np.asarray(psf, dtype=np.float64)
        self.psf_block = _header_block(
            _image_header(psf.shape, "float64", "PSF", psf_header)
        ) + _data_block(psf)

    def to_bytes(self, image: np.ndarray, mask: np.ndarray, variance: np.ndarray) -> bytes:
        """The file: empty primary, IMAGE (float32), MASK (int32), VARIANCE (float32), PSF."""
        for name, arr in (("image", image), ("mask", mask), ("variance", variance)):
            if arr.shape != self.shape:
                raise ValueError(f"{name} has shape {arr.shape}, expected {self.shape}")
        return b"".join(
            [
                self.primary,
                self.image_head,
                _data_block(np.asarray(image, dtype=np.float32)),
                self.mask_head,
                _data_block(np.asarray(mask, dtype=np.int32)),
                self.var_head,
                _data_block(np.asarray(variance, dtype=np.float32)),
                self.psf_block,
            ]
        )


def fits_bytes(image, mask, variance, psf, image_header, psf_header=None) -> bytes:
    """One docs/design.md §2 FITS file as bytes (see :class:`FitsWriter`)."""
    return FitsWriter(np.shape(image), image_header, psf, psf_header).to_bytes(
        image, mask, variance
    )


def parquet_bytes(table: pd.DataFrame | dict) -> bytes:
    """A parquet file (no index, zstd, fixed options) as bytes.

    ``table`` is a data frame or a dict of equal-length numpy arrays; column
    types are taken from the arrays (strings from object arrays of ``str``).
    """
    if isinstance(table, pd.DataFrame):
        table = {c: table[c].to_numpy() for c in table.columns}
    arrays = {
        c: pa.array(
            a.tolist() if a.dtype == object else a, type=pa.string() if a.dtype == object else None
        )
        for c, a in ((c, np.asarray(a)) for c, a in table.items())
    }
    buf = io.BytesIO()
    pq.write_table(
        pa.table(arrays),
        buf,
        compression="zstd",
        use_dictionary=False,
        write_statistics=True,
        version="2.6",
        store_schema=False,
    )
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    """Indented JSON, keys in insertion order, trailing newline."""
    return (json.dumps(obj, indent=2) + "\n").encode()


def write_bytes(url: str, data: bytes) -> str:
    """Write ``data`` to ``url`` (local path or any fsspec URL), making parents."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)
    return url
