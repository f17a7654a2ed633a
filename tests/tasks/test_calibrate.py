"""Calibrate: positions, propagated errors, nJy fluxes, IDs and SDM columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apdb import sdm
from core.errors import IdOverflowError, InputError
from core.ids import IdConfig, IdPacker
from tasks.calibrate import CalibrateConfig, calibrate, sky_jacobian
from tests.tasks.factories import make_bundle, make_exposure, raw_sources, tan_wcs

PACKER = IdPacker()


def run(src, bundle=None, config=None, t=60001.5):
    bundle = bundle or make_bundle(src)
    return calibrate(
        src, bundle, config or CalibrateConfig(), id_packer=PACKER, time_processed_mjd=t
    )


def test_columns_and_dtypes_follow_the_sdm():
    out = run(raw_sources(6))
    assert list(out.columns) == list(sdm.dtypes("DiaSource"))
    assert {c: str(t) for c, t in out.dtypes.items()} == sdm.dtypes("DiaSource")
    assert len(out) == 6
    assert isinstance(out.index, pd.RangeIndex)


def test_output_is_what_conform_makes_and_owns_its_data():
    """The block-built frame equals the per-column ``sdm.conform`` of its content."""
    src = raw_sources(6)
    src["isDipole"] = pd.array([True, None, False, None, True, False], dtype="boolean")
    src["pixelFlags_bad"] = [True, False, False, True, False, False]
    src["ssObjectId"] = pd.array([7, None, None, 9, None, None], dtype="Int64")
    out = run(src)
    pd.testing.assert_frame_equal(out, sdm.conform(out, "DiaSource"), check_exact=True)
    assert out["isDipole"].isna().sum() == 2 and out["ssObjectId"].isna().sum() == 4
    assert out["pixelFlags_bad"].tolist()[:2] == [True, False]
    assert out["pixelFlags_edge"].isna().all() and out["band"].dtype == object
    # writing into the output touches neither the input nor a second output
    again = run(src)
    out.loc[0, "pixelFlags_edge"] = True
    out.loc[0, "snr"] = -1.0
    assert pd.isna(again.loc[0, "pixelFlags_edge"]) and again.loc[0, "snr"] != -1.0
    assert src["isDipole"].isna().sum() == 2


def test_position_is_the_difference_wcs_at_origin_zero():
    src = raw_sources(10, seed=3)
    bundle = make_bundle(src)
    out = run(src, bundle)
    ra, dec = bundle.difference.wcs.all_pix2world(src["x"], src["y"], 0)
    np.testing.assert_allclose(out["ra"], ra, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["dec"], dec, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("ra0", "dec0", "rot"),
    [
        (150.0, 2.0, 0.0),
        (0.0, -30.0, 30.0),
        (359.9999, 10.0, 75.0),
        (45.0, 89.999, 10.0),
        (200.0, -89.999, -40.0),
    ],
    ids=["equator", "ra0", "ra360", "north-pole", "south-pole"],
)
def test_errors_propagate_through_the_jacobian(ra0, dec0, rot):
    """At the tangent point a TAN WCS is exactly the CD matrix: closed-form covariance."""
    shape = (101, 101)
    scale = 0.2
    wcs = tan_wcs(ra0, dec0, shape[1], shape[0], scale_arcsec=scale, rot_deg=rot)
    diff = make_exposure(shape, wcs, path="difference.fits")
    sx, sy = 0.3, 0.1
    src = pd.DataFrame(
        {
            "x": [50.0],
            "y": [50.0],
            "xErr": [sx],
            "yErr": [sy],
            "psfInstFlux": [1.0],
            "psfInstFluxErr": [1.0],
        }
    )
    out = run(src, make_bundle(src, difference=diff))
    s = scale / 3600.0
    c, si = np.cos(np.radians(rot)), np.sin(np.radians(rot))
    # east = -dα·cosδ direction of CD row 1 (RA grows to the east)
    var_a = s**2 * (c**2 * sx**2 + si**2 * sy**2)
    var_d = s**2 * (si**2 * sx**2 + c**2 * sy**2)
    cov = s**2 * (-c * si * sx**2 + si * c * sy**2)
    assert out["raErr"].iloc[0] == pytest.approx(np.sqrt(var_a), rel=1e-5)
    assert out["decErr"].iloc[0] == pytest.approx(np.sqrt(var_d), rel=1e-5)
    assert out["ra_dec_Cov"].iloc[0] == pytest.approx(cov, rel=1e-4, abs=1e-7 * s**2)
    assert out["ra"].iloc[0] == pytest.approx(ra0 % 360, abs=1e-9)
    assert out["dec"].iloc[0] == pytest.approx(dec0, abs=1e-9)


def test_jacobian_is_pixel_scale_at_ra_wrap():
    wcs = tan_wcs(0.0, 0.0, 101, 101, scale_arcsec=0.5)
    exp = make_exposure((101, 101), wcs)
    ra, dec, jac = sky_jacobian(exp, np.array([50.0, 49.0, 51.0]), np.array([50.0] * 3))
    assert ra[1] < 0.01 and ra[2] > 359.99  # the three straddle RA = 0
    np.testing.assert_allclose(jac[:, 0, 0], -0.5 / 3600, rtol=1e-6)
    np.testing.assert_allclose(jac[:, 1, 1], 0.5 / 3600, rtol=1e-6)


@pytest.mark.parametrize("with_calib_err", [False, True], ids=["stat-only", "with-PHOTCERR"])
def test_fluxes_in_njy_use_each_images_calibration(with_calib_err):
    src = raw_sources(5, seed=2)
    diff = make_exposure(photo_calib=2.0, photo_calib_err=0.1, path="difference.fits")
    bundle = make_bundle(src, difference=diff)
    out = run(src, bundle, CalibrateConfig(include_calibration_error=with_calib_err))
    for inst, cal, k in [
        ("psfInstFlux", "psfFlux", 2.0),
        ("apInstFlux", "apFlux", 2.0),
        ("scienceInstFlux", "scienceFlux", 3.0),
        ("templateInstFlux", "templateFlux", 5.0),
    ]:
        np.testing.assert_allclose(out[cal], src[inst] * k, rtol=1e-6)
        err = src[inst + "Err"] * k
        if with_calib_err and k == 2.0:
            err = np.hypot(err, src[inst] * 0.1)
        np.testing.assert_allclose(out[cal + "Err"], err, rtol=1e-6)


def test_visit_metadata_ids_and_counters():
    src = raw_sources(4).drop(columns=["bboxSize"])
    bundle = make_bundle(src)
    out = run(src, bundle, t=60123.25)
    np.testing.assert_array_equal(out["diaSourceId"], PACKER.pack(1000, 7, np.arange(4)))
    assert (out["visit"] == 1000).all() and (out["detector"] == 7).all()
    assert (out["band"] == "r").all()
    assert (out["midpointMjdTai"] == 60000.0).all()
    assert (out["exposureTime"] == 30.0).all()
    assert (out["timeProcessedMjdTai"] == 60123.25).all()
    assert (out["bboxSize"] == 21).all()  # the PSF kernel side when not given
    assert (out["psfNdata"] == 21 * 21).all()
    assert (out["trailNdata"] == 0).all() and (out["dipoleNdata"] == 0).all()
    assert out["diaObjectId"].isna().all()


def test_given_ids_flags_and_trail_are_carried():
    src = raw_sources(5, seed=4)
    src["diaSourceId"] = np.arange(100, 105, dtype=np.int64)
    out = run(src)
    np.testing.assert_array_equal(out["diaSourceId"], np.arange(100, 105))
    np.testing.assert_array_equal(out["pixelFlags_bad"].to_numpy(bool), src["pixelFlags_bad"])
    np.testing.assert_array_equal(out["isDipole"].to_numpy(bool), src["isDipole"])
    np.testing.assert_array_equal(out["bboxSize"], src["bboxSize"])
    np.testing.assert_allclose(out["reliability"], src["reliability"])
    # 0.2"/px at the tangent point, TAN distortion negligible on 200 px
    np.testing.assert_allclose(out["trailLength"], src["trailLength"] * 0.2, rtol=1e-5)
    # columns the input lacks are null
    assert out["pixelFlags_saturated"].isna().all()
    assert out["psfChi2"].isna().all()
    assert out["ssObjectId"].isna().all()


def test_missing_optional_columns_are_null():
    src = raw_sources(3)[["x", "y", "psfInstFlux", "psfInstFluxErr"]]
    out = run(src)
    for col in (
        "raErr",
        "decErr",
        "ra_dec_Cov",
        "apFlux",
        "scienceFlux",
        "templateFlux",
        "trailLength",
        "snr",
        "reliability",
    ):
        assert out[col].isna().all(), col
    np.testing.assert_array_equal(out["isNegative"].to_numpy(bool), src["psfInstFlux"] < 0)


def test_empty_in_empty_out():
    out = run(raw_sources(3).iloc[:0])
    assert len(out) == 0
    assert list(out.columns) == list(sdm.dtypes("DiaSource"))


def test_nan_pixel_position_gives_nan_sky_position():
    src = raw_sources(3)
    src.loc[1, "x"] = np.nan
    out = run(src)
    assert np.isnan(out["ra"].iloc[1]) and np.isfinite(out["ra"].iloc[[0, 2]]).all()


def test_input_is_not_mutated():
    src = raw_sources(4)
    before = src.copy(deep=True)
    run(src)
    pd.testing.assert_frame_equal(src, before)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s, b: (s.drop(columns=["psfInstFluxErr"]), b), "psfInstFluxErr"),
        (lambda s, b: (s.drop(columns=["x"]), b), "missing required column.*x"),
        (lambda s, b: (s.assign(psfInstFlux="a"), b), "psfInstFlux"),
        (lambda s, b: (s.assign(diaSourceId=[1.0, np.nan, 3.0]), b), "diaSourceId has 1 null"),
        (
            lambda s, b: (
                s,
                make_bundle(s, science=make_exposure(photo_calib=-1.0, path="science.fits")),
            ),
            r"science.fits: PHOTCALIB must be > 0, got -1.0",
        ),
        (
            lambda s, b: (
                s,
                make_bundle(s, difference=make_exposure(photo_calib=0.0, path="difference.fits")),
            ),
            r"difference.fits: PHOTCALIB must be > 0",
        ),
    ],
    ids=["no-flux-err", "no-x", "non-numeric", "partial-ids", "negative-calib", "zero-calib"],
)
def test_bad_input_names_the_problem(mutate, match):
    src = raw_sources(3)
    src, bundle = mutate(src, make_bundle(src))
    with pytest.raises(InputError, match=match):
        run(src, bundle)


def test_id_overflow_is_an_error():
    packer = IdPacker(IdConfig(ccd_exposure_id_bits=60))  # 3 counter bits: 8 rows
    src = raw_sources(9)
    with pytest.raises(IdOverflowError, match="row counter"):
        calibrate(
            src, make_bundle(src), CalibrateConfig(), id_packer=packer, time_processed_mjd=1.0
        )


def _with(column, value, row=1, n=4):
    src = raw_sources(n)
    values = src[column].to_numpy(dtype=np.float64, copy=True) if column in src else np.full(n, 0.5)
    values[row] = value
    return src.assign(**{column: values})


@pytest.mark.parametrize(
    ("src", "match"),
    [
        (
            _with("psfInstFluxErr", 0.0),
            r"'psfInstFluxErr' must be > 0 .*1 value\(s\), first at row 1",
        ),
        (_with("xErr", 0.0, row=2), r"'xErr' must be > 0 .*first at row 2 \(0.0\)"),
        (_with("yErr", 0.0), r"'yErr' must be > 0"),
        (_with("apInstFluxErr", 0.0), r"'apInstFluxErr' must be > 0"),
        (_with("apInstFlux", np.inf), r"'apInstFlux' must be finite \(NaN if not measured\)"),
        (_with("scienceInstFlux", -np.inf), r"'scienceInstFlux' must be finite"),
        (_with("templateInstFluxErr", np.inf), r"'templateInstFluxErr' must be finite"),
        (
            _with("reliability", 7.5),
            r"'reliability' must be \[0, 1\]: 1 value\(s\), first at row 1 \(7.5\)",
        ),
        (_with("reliability", -0.01), r"'reliability' must be \[0, 1\]"),
        (_with("snr", -5.0), r"'snr' must be >= 0"),
        (
            raw_sources(3).assign(diaSourceId=np.array([5, -1, -2], dtype=np.int64)),
            r"'diaSourceId' must be >= 0 .*2 value\(s\), first at row 1 \(-1\)",
        ),
    ],
    ids=[
        "zero-flux-err",
        "zero-x-err",
        "zero-y-err",
        "zero-ap-err",
        "inf-ap-flux",
        "minus-inf-science-flux",
        "inf-template-err",
        "reliability-above-1",
        "reliability-negative",
        "negative-snr",
        "negative-ids",
    ],
)
def test_values_no_measurement_gives_are_refused(src, match):
    """L11/L12/L14: zero errors, ±inf, reliability outside [0, 1], negative snr or IDs."""
    with pytest.raises(
        InputError, match="DiaSource input \\(visit 1000, detector 7\\): column " + match
    ):
        run(src)


def test_value_errors_name_the_catalog_file():
    src = _with("reliability", 2.0)
    bundle = make_bundle(src)
    bundle = type(bundle)(**{**bundle.__dict__, "root": "s3://b/run"})
    with pytest.raises(InputError, match=r"^s3://b/run/1000/7/diaSources.parquet: column 'reliab"):
        run(src, bundle)


def test_nan_is_not_measured_and_is_accepted():
    src = raw_sources(4)
    for column in ("apInstFlux", "apInstFluxErr", "xErr", "reliability", "snr"):
        src = (
            _with(column, np.nan)
            if column not in src
            else src.assign(**{column: np.where(np.arange(4) == 1, np.nan, src[column])})
        )
    out = run(src)
    assert np.isnan(out["apFlux"][1]) and np.isnan(out["reliability"][1])
    assert np.isnan(out["raErr"][1])
    assert out["reliability"].between(0, 1).sum() == 3


@pytest.mark.parametrize(
    "values",
    [np.array(["soon"] * 4, dtype=object), np.array(["61000.5"] * 4)],
    ids=["object-text", "numpy-text"],
)
def test_text_in_a_numeric_pass_through_column_names_the_catalog_file(values):
    """L15: an SDM column of the wrong kind fails at calibrate, naming the file, not at the store."""
    src = raw_sources(4).assign(timeWithdrawnMjdTai=values)
    bundle = make_bundle(src)
    bundle = type(bundle)(**{**bundle.__dict__, "root": "/data/run"})
    with pytest.raises(
        InputError,
        match=r"^/data/run/1000/7/diaSources.parquet: column 'timeWithdrawnMjdTai' must be float64",
    ):
        run(src, bundle)


def test_numbers_in_an_object_pass_through_column_are_accepted():
    src = raw_sources(4).assign(timeWithdrawnMjdTai=np.array([None, 1.5, 2, None], dtype=object))
    out = run(src)
    assert out["timeWithdrawnMjdTai"].isna().sum() == 2
