"""The written bundle follows docs/design.md §2 exactly: files, HDUs, dtypes, headers, WCS."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apdb import sdm
from core.bundle import BANDS, MASK_PLANES
from sim.survey import CATALOG_COLUMNS, TRUTH_COLUMNS, TRUTH_OBJECT_COLUMNS
from tests.sim.conftest import V0, V1
from tests.sim.fitsread import read_image, read_parquet

FILES = (
    "diaSources.parquet",
    "difference.fits",
    "science.fits",
    "template.fits",
    "truth.parquet",
    "truth_objects.parquet",
)


def test_visit_json(small_root, small_survey):
    info = json.loads(open(f"{small_root}/{V0}/visit.json").read())
    assert list(info) == [
        "visit",
        "band",
        "midpointMjdTai",
        "exposureTime",
        "boresightRa",
        "boresightDec",
        "rotAngle",
        "observation_reason",
        "target_name",
        "detectors",
    ]
    assert info["visit"] == V0 == 2025112000001  # LSSTCam day_obs·10⁵ + seq_num
    assert info["band"] in BANDS
    assert info["exposureTime"] == 30.0
    assert info["detectors"] == [91, 93, 94, 95]  # R22_S11 and its nearest neighbours
    assert info["midpointMjdTai"] == small_survey.config.start_mjd
    assert small_survey.visit_info(0).to_json_dict() == info


@pytest.mark.parametrize("name", FILES)
def test_every_detector_has_every_file(small_root, small_survey, name):
    import os

    for visit in (V0, V1):
        for det in small_survey.detectors:
            assert os.path.getsize(f"{small_root}/{visit}/{det}/{name}") > 0
    assert os.path.exists(f"{small_root}/truth/objects.parquet")


@pytest.mark.parametrize("kind", ["difference", "science", "template"])
def test_fits_layout(small_root, small_survey, kind):
    path = f"{small_root}/{V1}/94/{kind}.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FITSFixedWarning, no VerifyWarning
        with fits.open(path) as hdul:
            hdul.verify("exception")
            assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
            assert hdul[0].data is None
            assert "DATE" not in hdul[1].header and "CHECKSUM" not in hdul[1].header
        im = read_image(path)
    assert im["dtypes"] == {
        "IMAGE": np.dtype(">f4"),
        "MASK": np.dtype(">i4"),
        "VARIANCE": np.dtype(">f4"),
        "PSF": np.dtype(">f8"),
    }
    nx, ny = small_survey.config.detector_size
    assert im["image"].shape == im["mask"].shape == im["variance"].shape == (ny, nx)
    psf = im["psf"]
    assert psf.shape[0] == psf.shape[1] and psf.shape[0] % 2 == 1
    assert psf.sum() == pytest.approx(1.0, abs=1e-12)
    c = psf.shape[0] // 2
    assert np.unravel_index(np.argmax(psf), psf.shape) == (c, c)
    np.testing.assert_allclose(psf, psf.T, atol=1e-15)  # circular, centred
    h = im["header"]
    assert h["CTYPE1"] == "RA---TAN" and h["CTYPE2"] == "DEC--TAN"
    assert h["BUNIT"] == "count"
    assert h["PHOTCALIB"] > 0 and 0 < h["PHOTCERR"] < h["PHOTCALIB"]
    assert h["VISIT"] == V1 and h["DETECTOR"] == 94
    assert h["FILTER"] == h["BAND"] == small_survey.visit_info(1).band
    assert h["ROTPA"] == pytest.approx(small_survey.visit_info(1).rotAngle)
    assert (im["variance"] > 0).all()
    for plane, bit in MASK_PLANES.items():
        assert im["mask_header"][f"MP_{plane}"] == bit


def test_three_images_share_wcs_calibration_and_difference(small_root):
    base = f"{small_root}/{V0}/93"
    d, s, t = (read_image(f"{base}/{k}.fits") for k in ("difference", "science", "template"))
    assert d["photcalib"] == s["photcalib"] == t["photcalib"]
    for key in ("CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        assert d["header"][key] == s["header"][key] == t["header"][key]
    np.testing.assert_array_equal(d["image"], (s["image"] - t["image"]).astype(np.float32))
    np.testing.assert_allclose(d["variance"], s["variance"] + t["variance"], rtol=1e-6)
    np.testing.assert_array_equal(d["mask"], s["mask"] | t["mask"])
    np.testing.assert_array_equal(d["psf"], s["psf"])
    # template is deeper than the science image
    assert np.median(t["variance"]) < np.median(s["variance"]) / 10


def test_wcs_round_trip_and_detector_geometry(small_root, small_survey):
    nx, ny = small_survey.config.detector_size
    corners = np.array([[0, 0], [nx - 1, 0], [nx - 1, ny - 1], [0, ny - 1]], float)
    polys = {}
    for det in small_survey.detectors:
        w = read_image(f"{small_root}/{V0}/{det}/science.fits")["wcs"]
        ra, dec = w.pixel_to_world_values(corners[:, 0], corners[:, 1])
        x, y = w.world_to_pixel_values(ra, dec)
        np.testing.assert_allclose(np.c_[x, y], corners, atol=1e-6)
        # pixel scale 0.2″ and the API's WCS agree with the file's
        scale = np.sqrt(abs(np.linalg.det(w.pixel_scale_matrix))) * 3600
        assert scale == pytest.approx(0.2, rel=1e-9)
        api = small_survey.detector_wcs(0, det)
        np.testing.assert_allclose(
            api.pixel_to_world_values(10.5, 20.25), w.pixel_to_world_values(10.5, 20.25), atol=1e-12
        )
        polys[det] = (ra, dec)
    # gaps: every corner of one detector is off every other detector
    for det, (ra, dec) in polys.items():
        for other in small_survey.detectors:
            if other == det:
                continue
            w = small_survey.detector_wcs(0, other)
            x, y = w.world_to_pixel_values(ra, dec)
            inside = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
            assert not inside.any(), (det, other)


def test_catalog_columns_and_dtypes(small_root):
    cat = read_parquet(f"{small_root}/{V0}/94/diaSources.parquet")
    assert {c: str(t) for c, t in cat.dtypes.items()} == CATALOG_COLUMNS
    assert "diaSourceId" not in cat.columns
    apdb_columns = {c.name for c in sdm.columns("DiaSource")}
    for col in cat.columns:
        if col.startswith(("pixelFlags", "centroid_", "psfFlux_", "forced_")) or col in (
            "glint_trail",
            "isDipole",
            "isNegative",
            "snr",
            "bboxSize",
            "reliability",
            "trailLength",
        ):
            assert col in apdb_columns, col
    assert cat["bboxSize"].min() > 0
    assert ((cat["reliability"] >= 0) & (cat["reliability"] <= 1)).all()
    assert (cat["snr"] >= 5).all()
    assert (cat["psfInstFluxErr"] > 0).all()
    np.testing.assert_allclose(
        cat["snr"], np.abs(cat["psfInstFlux"]) / cat["psfInstFluxErr"], rtol=1e-5
    )
    assert (cat["isNegative"] == (cat["psfInstFlux"] < 0)).all()


def test_truth_files_columns(small_root):
    truth = read_parquet(f"{small_root}/{V0}/94/truth.parquet")
    objs = read_parquet(f"{small_root}/{V0}/94/truth_objects.parquet")
    for df, spec in ((truth, TRUTH_COLUMNS), (objs, TRUTH_OBJECT_COLUMNS)):
        assert list(df.columns) == list(spec)
        for col, dtype in spec.items():
            if dtype == "object":  # strings: object in pandas 2, str in pandas 3
                assert pd.api.types.is_string_dtype(df[col]), col
            else:
                assert str(df[col].dtype) == dtype, col
    assert set(truth["kind"]) <= {
        "variable",
        "transient",
        "moving",
        "bogus_noise",
        "bogus_dipole",
        "bogus_cr",
    }
    cat = read_parquet(f"{small_root}/truth/objects.parquet")
    assert cat["truthId"].is_unique
    assert set(cat["kind"]) == {"static", "variable", "transient", "moving"}
    for b in BANDS:
        assert (cat[f"{b}_flux"] > 0).all()


def test_wcs_headers_parse_without_warnings(small_root):
    h = fits.getheader(f"{small_root}/{V0}/91/difference.fits", "IMAGE")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = WCS(h)
    assert w.wcs.ctype[0] == "RA---TAN"


def test_bundle_reader_accepts_every_detector(small_root, small_survey):
    """The pipeline's own reader (core.bundle) validates what the simulator writes."""
    from core.bundle import read_detector_bundle, read_visit_info

    info = read_visit_info(small_root, V1)
    assert info == small_survey.visit_info(1)
    for det in small_survey.detectors:
        b = read_detector_bundle(small_root, V1, det)
        cat = read_parquet(f"{small_root}/{V1}/{det}/diaSources.parquet")
        assert len(b.sources) == len(cat)
        assert b.difference.photo_calib == b.science.photo_calib == b.template.photo_calib
        ra, dec = b.difference.wcs.pixel_to_world_values(3.0, 4.0)
        np.testing.assert_allclose(
            small_survey.pixel_to_sky(1, det, 3.0, 4.0), (ra, dec), rtol=0, atol=1e-10
        )
