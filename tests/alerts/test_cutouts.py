"""Alert stamps: layout like Rubin's, values in nJy, a WCS that maps pixels to the sky."""

from __future__ import annotations

import io

import fastavro
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, VarianceUncertainty

from alerts.cutouts import CutoutConfig, cutout_side, make_cutouts
from core.bundle import MASK_PLANES
from core.errors import InputError
from tests.data import RUBIN_ALERTS

from .conftest import NX, NY, make_bundle

REAL = str(RUBIN_ALERTS)


def _sources(bundle, x, y, bbox=None):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    sky = np.full((len(x), 2), np.nan)
    sky[ok] = bundle.difference.wcs.all_pix2world(np.column_stack([x[ok], y[ok]]), 0)
    return pd.DataFrame(
        {
            "diaSourceId": np.arange(1, len(x) + 1, dtype=np.int64),
            "x": x.astype(np.float32),
            "y": y.astype(np.float32),
            "ra": sky[:, 0],
            "dec": sky[:, 1],
            "bboxSize": np.full(len(x), 40) if bbox is None else np.asarray(bbox),
        }
    )


def _read(b: bytes) -> CCDData:
    return CCDData.read(io.BytesIO(b), format="fits")


def test_layout_matches_real_rubin_stamps(bundle):
    with open(REAL, "rb") as f:
        real = next(iter(fastavro.reader(f)))
    ours = make_cutouts(_sources(bundle, [200.3], [150.7], [20]), bundle)[1]
    for key, mine in zip(
        ("cutoutDifference", "cutoutScience", "cutoutTemplate"), ours, strict=True
    ):
        r = fits.open(io.BytesIO(real[key]))
        m = fits.open(io.BytesIO(mine))
        # Rubin's order with our extra MASK extension where CCDData.write puts it.
        assert [h.name for h in r] == ["PRIMARY", "UNCERT", "PSFIMAGE"]
        assert [h.name for h in m] == ["PRIMARY", "UNCERT", "MASK", "PSFIMAGE"]
        for name in ("PRIMARY", "UNCERT", "PSFIMAGE"):
            assert m[name].data.dtype == r[name].data.dtype
            assert m[name].data.shape[0] == m[name].data.shape[1]
        assert m["PRIMARY"].data.shape == r["PRIMARY"].data.shape == (30, 30)
        for k in ("CUTMINX", "CUTMINY", "ROTPA", "BUNIT", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2"):
            assert k in r[0].header and k in m[0].header, k
        assert m[0].header["BUNIT"] == r[0].header["BUNIT"] == "nJy"
        assert m["UNCERT"].header["UTYPE"] == r["UNCERT"].header["UTYPE"]
        # Rubin has no CTYPE; ours says what the coordinates are.
        assert "CTYPE1" not in r[0].header
        assert (m[0].header["CTYPE1"], m[0].header["CTYPE2"]) == ("RA---TAN", "DEC--TAN")
        m.verify("exception")


def test_ccddata_reads_values_in_njy(bundle):
    src = _sources(bundle, [123.4], [87.6], [30])
    diff, sci, tmpl = make_cutouts(src, bundle)[1]
    for blob, exp in ((diff, bundle.difference), (sci, bundle.science), (tmpl, bundle.template)):
        c = _read(blob)
        x0, y0 = c.meta["CUTMINX"] + 1, c.meta["CUTMINY"] + 1  # the stamp's first pixel
        assert c.unit == "nJy"
        assert c.meta["ROTPA"] == 30.0
        want = exp.image[y0 : y0 + 30, x0 : x0 + 30] * np.float32(exp.photo_calib)
        np.testing.assert_array_equal(c.data, want)
        assert isinstance(c.uncertainty, VarianceUncertainty)
        np.testing.assert_allclose(
            c.uncertainty.array,
            exp.variance[y0 : y0 + 30, x0 : x0 + 30] * exp.photo_calib**2,
            rtol=1e-6,
        )
        np.testing.assert_array_equal(c.mask, exp.mask[y0 : y0 + 30, x0 : x0 + 30] != 0)
        np.testing.assert_array_equal(c.psf, exp.psf)
        bits = fits.open(io.BytesIO(blob))["MASK"]
        np.testing.assert_array_equal(bits.data, exp.mask[y0 : y0 + 30, x0 : x0 + 30])
        assert bits.header["MP_NO_DATA"] == MASK_PLANES["NO_DATA"]


@pytest.mark.parametrize(
    ("x", "y"),
    [(200.0, 150.0), (13.37, 291.2), (399.4, 0.1)],
    ids=["centre", "near-edge", "corner"],
)
def test_wcs_maps_source_pixel_to_its_sky_position_and_back(bundle, x, y):
    src = _sources(bundle, [x], [y], [60])
    c = _read(make_cutouts(src, bundle)[1][0])
    x0, y0 = c.meta["CUTMINX"] + 1, c.meta["CUTMINY"] + 1  # the stamp's first pixel
    # the source's own pixel maps to its (ra, dec)
    ra, dec = c.wcs.all_pix2world([[x - x0, y - y0]], 0)[0]
    assert ra == pytest.approx(src.ra[0], abs=1e-9)
    assert dec == pytest.approx(src.dec[0], abs=1e-9)
    # every stamp pixel agrees with the detector WCS to < 1 mas and round-trips
    px = np.array([[0, 0], [59, 0], [0, 59], [59, 59], [30, 17]], dtype=float)
    sky = c.wcs.all_pix2world(px, 0)
    det = bundle.difference.wcs.all_pix2world(px + [x0, y0], 0)
    dra = (sky[:, 0] - det[:, 0]) * np.cos(np.deg2rad(det[:, 1]))
    assert np.max(np.hypot(dra, sky[:, 1] - det[:, 1])) * 3.6e6 < 1.0
    np.testing.assert_allclose(c.wcs.all_world2pix(sky, 0), px, atol=1e-8)
    # CRPIX is 1-based: the source sits at FITS pixel x - x0 + 1 = x - CUTMINX (Rubin's rule)
    h = fits.getheader(io.BytesIO(make_cutouts(src, bundle)[1][0]))
    assert h["CRPIX1"] == pytest.approx(np.float32(x) - x0 + 1)
    assert h["CRPIX1"] == pytest.approx(np.float32(x) - h["CUTMINX"])


def test_side_is_clipped_bbox_and_stamp_is_centred(bundle):
    bbox = pd.array([10, 30, 57, 102, 500, None], dtype="Int64")
    assert cutout_side(bbox, CutoutConfig()).tolist() == [30, 30, 57, 102, 102, 30]
    src = _sources(bundle, [200.49] * 6, [150.51] * 6, bbox)
    out = make_cutouts(src, bundle)
    for i, side in enumerate([30, 30, 57, 102, 102, 30], start=1):
        h = fits.getheader(io.BytesIO(out[i][0]))
        assert (h["NAXIS1"], h["NAXIS2"]) == (side, side)
        assert abs(200.49 - (h["CUTMINX"] + 1) - (side - 1) / 2) <= 0.5
        assert abs(150.51 - (h["CUTMINY"] + 1) - (side - 1) / 2) <= 0.5


def test_stamp_off_the_edge_is_nan_padded_with_no_data_bit(bundle):
    diff = make_cutouts(_sources(bundle, [2.0], [NY - 3.0], [30]), bundle)[1][0]
    c = _read(diff)
    x0, y0 = c.meta["CUTMINX"] + 1, c.meta["CUTMINY"] + 1  # the stamp's first pixel
    assert x0 < 0 and y0 + 30 > NY
    cols = np.arange(30) + x0
    rows = np.arange(30) + y0
    off = (cols[None, :] < 0) | (rows[:, None] >= NY)
    assert np.isnan(c.data[off]).all() and np.isfinite(c.data[~off]).all()
    assert np.isnan(c.uncertainty.array[off]).all()
    bits = fits.open(io.BytesIO(diff))["MASK"].data
    assert (bits[off] & (1 << MASK_PLANES["NO_DATA"]) != 0).all()


def test_source_off_image_or_nan_gets_null_stamps(bundle):
    src = _sources(bundle, [-3.0, 100.0, np.nan, NX + 10.0], [50.0, 50.0, 50.0, 50.0])
    out = make_cutouts(src, bundle)
    assert out[1] == (None, None, None)
    assert all(isinstance(b, bytes) for b in out[2])
    assert out[3] == (None, None, None)
    assert out[4] == (None, None, None)


def test_empty_input_and_missing_column(bundle):
    assert make_cutouts(_sources(bundle, [], []), bundle) == {}
    with pytest.raises(InputError, match=r"\['y'\]"):
        make_cutouts(pd.DataFrame({"diaSourceId": [1], "x": [1.0]}), bundle)


def test_input_not_modified_and_deterministic():
    bundle = make_bundle(5)
    src = _sources(bundle, [50.5, 300.2], [60.1, 200.9], [44, 31])
    before = src.copy()
    a = make_cutouts(src, bundle)
    b = make_cutouts(src, bundle)
    pd.testing.assert_frame_equal(src, before)
    assert a == b


def _real_alerts() -> list[dict]:
    with open(REAL, "rb") as f:
        return list(fastavro.reader(f))


@pytest.mark.parametrize("kind", ["cutoutDifference", "cutoutScience", "cutoutTemplate"])
def test_origin_and_centre_are_rubins_on_the_real_stamps(bundle, kind):
    """Same source position and side → Rubin's CUTMINX/CUTMINY and CRPIX, on all 7 real alerts.

    Rubin's relation is ``diaSource.x - CUTMINX == CRPIX1`` (its ``CUTMINX`` is
    the stamp's first pixel minus 1). The real detector images are not at hand,
    so each source is moved by a whole number of pixels onto the test image:
    the fractional position, which decides the rounding, is kept. ``CRPIX``
    agrees to the float32 resolution of the packet's ``x``/``y`` (Rubin takes
    the centre from the sky position).
    """
    reals = _real_alerts()
    assert len(reals) == 7
    xs, ys, want = [], [], []
    for a in reals:
        src, h = a["diaSource"], fits.getheader(io.BytesIO(a[kind]))
        assert h["NAXIS1"] == cutout_side(np.array([src["bboxSize"]]), CutoutConfig())[0] == 30
        assert src["x"] - h["CUTMINX"] == pytest.approx(h["CRPIX1"], abs=3e-4)  # x is float32
        shift_x, shift_y = np.floor(src["x"]) - 150, np.floor(src["y"]) - 120
        xs.append(src["x"] - shift_x)
        ys.append(src["y"] - shift_y)
        want.append((h["CUTMINX"] - shift_x, h["CUTMINY"] - shift_y, h["CRPIX1"], h["CRPIX2"]))
    out = make_cutouts(
        _sources(bundle, xs, ys, [a["diaSource"]["bboxSize"] for a in reals]), bundle
    )
    for i, (cutmin_x, cutmin_y, crpix1, crpix2) in enumerate(want, start=1):
        h = fits.getheader(io.BytesIO(out[i][0]))
        assert (h["CUTMINX"], h["CUTMINY"]) == (cutmin_x, cutmin_y)
        assert (h["CRPIX1"], h["CRPIX2"]) == (
            pytest.approx(crpix1, abs=3e-4),
            pytest.approx(crpix2, abs=3e-4),
        )
