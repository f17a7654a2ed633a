"""The hand-parsed FITS fast path of core/bundle.py agrees with astropy.

Over a corpus (a file as the simulator writes it, the real DECam headers and
pixels in tests/data/real-fits, scaled and tile-compressed files) the fast path
gives astropy's pixels, WCS and calibration; what it does not handle goes to
astropy, and a legal card it cannot parse is no error.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from astropy.io import fits

from core import bundle
from core.errors import InputError
from tests.core.test_bundle import SHAPE, _header, _write_fits
from tests.data import REAL_FITS, data_path

REAL = ["DEC-OBS04a.mini.fits", "DEC-OBS18a.mini.fits", "FinalDifference.fits"]


def _sim_file(tmp_path, **kw) -> bytes:
    path = tmp_path / "difference.fits"
    _write_fits(path, np.random.default_rng(3), **kw)
    return path.read_bytes()


def _corpus(tmp_path) -> dict[str, bytes]:
    out = {"simulator": _sim_file(tmp_path)}
    out.update({name: data_path("real-fits", name).read_bytes() for name in REAL})
    return out


def _sky(wcs_text: str, shape) -> np.ndarray:
    """The WCS evaluated at the corners and the centre of an image of ``shape``."""
    ny, nx = shape
    x = np.array([0, nx - 1, 0, nx - 1, nx / 2])
    y = np.array([0, 0, ny - 1, ny - 1, ny / 2])
    return np.array(bundle._wcs_from_cards(wcs_text).all_pix2world(x, y, 0))


def test_fast_path_equals_astropy_on_the_corpus(tmp_path):
    assert REAL_FITS.is_dir()
    for name, raw in _corpus(tmp_path).items():
        fast = bundle._parse_mef(raw)
        slow = bundle._parse_with_astropy(raw, name)
        assert list(fast) == list(slow), name
        for hdu, (cards, data, wcs_text) in fast.items():
            s_cards, s_data, s_wcs = slow[hdu]
            if data is None:
                assert s_data is None, (name, hdu)
                continue
            np.testing.assert_array_equal(data, s_data, err_msg=f"{name} {hdu}")
            assert data.dtype.newbyteorder("=") == s_data.dtype.newbyteorder("="), (name, hdu)
            for key in ("PHOTCALIB", "PHOTCERR", "EXPTIME", "GAIN", "MAGZERO", "BAND"):
                assert cards.get(key) == s_cards.get(key), (name, hdu, key)
            if "CTYPE1" in cards:
                np.testing.assert_allclose(
                    _sky(wcs_text, data.shape), _sky(s_wcs, data.shape), rtol=0, atol=1e-10
                )
    # the simulator's calibration card is there to compare
    assert fast_calib(_corpus(tmp_path)["simulator"]) == 57.5


def fast_calib(raw: bytes) -> float:
    return bundle._parse_mef(raw)["IMAGE"][0]["PHOTCALIB"]


def _rewritten(raw: bytes, **image_kw) -> bytes:
    """``raw`` with its IMAGE HDU replaced by ``fits.ImageHDU(**image_kw)`` or a compressed one."""
    with fits.open(io.BytesIO(raw)) as hdus:
        out = fits.HDUList([h.copy() for h in hdus])
    out["IMAGE"] = image_kw.pop("hdu")(**image_kw) if "hdu" in image_kw else out["IMAGE"]
    buf = io.BytesIO()
    out.writeto(buf)
    return buf.getvalue()


def _read(tmp_path, raw: bytes) -> bundle.Exposure:
    path = tmp_path / "file.fits"
    path.write_bytes(raw)
    import fsspec

    return bundle.read_exposure(fsspec.filesystem("file"), str(path))


@pytest.mark.parametrize("case", ["scaled", "compressed", "unparsed-card"])
def test_what_the_fast_path_does_not_handle_is_read_by_astropy(tmp_path, case):
    raw = _sim_file(tmp_path)
    pixels = np.round(np.random.default_rng(5).normal(0, 50, SHAPE)).astype(np.float32)
    header = _header()
    if case == "scaled":  # int16 on disk, BSCALE/BZERO to floats
        hdu = fits.ImageHDU(pixels, header, name="IMAGE")
        hdu.scale("int16", bscale=0.5, bzero=10.0)
        raw = _rewritten(raw, hdu=lambda: hdu)
    elif case == "compressed":
        raw = _rewritten(
            raw,
            hdu=fits.CompImageHDU,
            data=pixels,
            header=header,
            name="IMAGE",
            compression_type="GZIP_1",
        )
    else:  # a legal complex-valued card the fast path does not parse
        header["CPLXVAL"] = complex(1.0, 2.0)
        raw = _rewritten(raw, hdu=fits.ImageHDU, data=pixels, header=header, name="IMAGE")
    with pytest.raises((bundle._NotSimple, ValueError)):
        bundle._parse_mef(raw)
    exp = _read(tmp_path, raw)
    with fits.open(io.BytesIO(raw)) as hdus:
        want = hdus["IMAGE"].data
    np.testing.assert_allclose(exp.image, want, rtol=0, atol=0)
    if case == "unparsed-card":  # lossless: the pixels written are the pixels read
        np.testing.assert_array_equal(exp.image, pixels)
    else:  # scaled / quantised on disk: astropy's reading is the reference
        assert exp.image.dtype.kind == "f" and np.isfinite(exp.image).all()
    assert exp.photo_calib == 57.5
    assert exp.wcs.wcs.ctype[0] == "RA---TAN"


def test_a_file_astropy_cannot_read_is_an_input_error(tmp_path):
    raw = _sim_file(tmp_path)
    with pytest.raises(InputError, match="file.fits: not a readable FITS file"):
        _read(tmp_path, raw[: len(raw) // 2 + 7])
