"""Forced photometry: exact fluxes, pulls, PSF shift bias, edges, masks, real LSSTCam stamps."""

from __future__ import annotations

import dataclasses
import io

import fastavro
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import tasks.forced as forced_module
from apdb import sdm
from core.bundle import MASK_PLANES
from core.errors import InputError
from core.ids import IdPacker
from tasks.forced import (
    OBJECT_COLUMNS,
    ForcedConfig,
    forced_photometry,
    measure_psf_flux,
    objects_after_visit,
    shifted_psf,
)
from tests.data import RUBIN_ALERTS
from tests.tasks.factories import (
    gaussian_psf,
    make_bundle,
    make_exposure,
    pixel_gaussian,
    render,
    tan_wcs,
)

PACKER = IdPacker()
ALERTS = RUBIN_ALERTS


def objects_at(wcs, x, y, n_src=3, first_id=1):
    ra, dec = wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    n = len(ra)
    return pd.DataFrame(
        {
            "diaObjectId": np.arange(first_id, first_id + n, dtype=np.int64),
            "ra": ra,
            "dec": dec,
            "nDiaSources": np.broadcast_to(n_src, n).astype(np.int32),
        }
    )


@pytest.mark.parametrize(
    ("sigma", "tol"), [(1.0, 1e-4), (1.5, 1e-6), (2.5, 1e-6)], ids=["s1.0", "s1.5", "s2.5"]
)
def test_shifted_psf_bias_is_negligible(sigma, tol):
    """Fourier shift vs the exact pixel-integrated Gaussian at the shifted position."""
    psf = gaussian_psf(25, sigma)
    d = np.array([-0.5, -0.3, 0.0, 0.17, 0.5])
    k = shifted_psf(psf, d, d[::-1])
    o = np.arange(-12, 13.0)
    for m in range(d.size):
        truth = pixel_gaussian(o[None, :] - d[m], o[:, None] - d[::-1][m], sigma)
        truth = truth / pixel_gaussian(o[None, :], o[:, None], sigma).sum()
        assert k[m].sum() == pytest.approx(1.0, abs=1e-12)
        ratio = (k[m] * truth).sum() / (k[m] * k[m]).sum()  # flux estimate of a unit source
        assert abs(ratio - 1) < tol


@pytest.mark.parametrize(
    ("steps", "rtol"),
    [(0, 2e-5), (32, 6e-5)],
    ids=["exact-shift", "1/32-px-grid"],  # grid: bias ≤ 2·(1/64)²/(4σ²) = 5.4e-5 at σ = 1.5
)
def test_noise_free_point_sources_are_recovered_exactly_in_njy(steps, rtol):
    rng = np.random.default_rng(5)
    shape = (300, 300)
    g = np.arange(20, 281, 40.0)  # isolated: no two footprints overlap
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
    n = x.size
    diff_f = rng.uniform(-500, 500, n)
    sci_f = rng.uniform(1000, 5000, n)
    wcs = tan_wcs(150.0, 2.0, 300, 300)
    diff = make_exposure(shape, wcs, image=render(shape, x, y, diff_f), photo_calib=2.0)
    sci = make_exposure(shape, wcs, image=render(shape, x, y, sci_f), photo_calib=3.0)
    bundle = make_bundle(difference=diff, science=sci)
    res = forced_photometry(
        objects_at(wcs, x, y),
        bundle,
        ForcedConfig(subpixel_steps=steps),
        id_packer=PACKER,
        time_processed_mjd=60001.0,
    )
    out = res.sources
    np.testing.assert_allclose(out["psfFlux"], diff_f * 2.0, rtol=rtol, atol=1e-3)
    np.testing.assert_allclose(out["scienceFlux"], sci_f * 3.0, rtol=rtol)
    # σ = sqrt(Σ P² V)/Σ P² with V = 1: 1/sqrt(Σ P²) counts
    p2 = (gaussian_psf() ** 2).sum()
    np.testing.assert_allclose(out["psfFluxErr"], 2.0 / np.sqrt(p2), rtol=0.02)
    assert not res.edge.any()
    assert {c: str(t) for c, t in out.dtypes.items()} == sdm.dtypes("DiaForcedSource")
    np.testing.assert_array_equal(out["diaForcedSourceId"], PACKER.pack(1000, 7, np.arange(n)))
    assert (out["visit"] == 1000).all() and (out["band"] == "r").all()
    assert (out["timeProcessedMjdTai"] == 60001.0).all()
    assert (out["midpointMjdTai"] == 60000.0).all()


def test_pulls_are_unit_normal_with_noise():
    rng = np.random.default_rng(9)
    shape = (400, 400)
    g = np.arange(25, 380, 30.0)
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
    flux = rng.uniform(100, 300, x.size)
    var = np.full(shape, 25.0)
    pulls = []
    for seed in range(4):
        noise = np.random.default_rng(100 + seed).normal(0, 5.0, shape)
        exp = make_exposure(
            shape, image=render(shape, x, y, flux) + noise, variance=var, photo_calib=1.0
        )
        f, e, _ = measure_psf_flux(exp, x, y)
        pulls.append((f - flux) / e)
    pulls = np.concatenate(pulls)
    assert pulls.size == 576
    assert abs(pulls.mean()) < 0.1
    assert 0.93 < pulls.std() < 1.07


def test_edge_objects_are_flagged_and_measured_on_pixels_inside():
    shape = (100, 100)
    x = np.array([2.3, 50.0, 97.6, 50.2])
    y = np.array([50.0, 1.1, 60.0, 50.4])
    flux = np.array([100.0, 200.0, 300.0, 400.0])
    wcs = tan_wcs(10.0, 10.0, 100, 100)
    diff = make_exposure(shape, wcs, image=render(shape, x, y, flux), photo_calib=1.0)
    bundle = make_bundle(difference=diff, science=diff)
    res = forced_photometry(
        objects_at(wcs, x, y), bundle, ForcedConfig(), id_packer=PACKER, time_processed_mjd=1.0
    )
    np.testing.assert_array_equal(res.edge, [True, True, True, False])
    # on a cut footprint the 1/32-px grid's position error biases to first order: < 1e-3
    np.testing.assert_allclose(res.sources["psfFlux"], flux, rtol=1e-3)
    exact = forced_photometry(
        objects_at(wcs, x, y),
        bundle,
        ForcedConfig(subpixel_steps=0),
        id_packer=PACKER,
        time_processed_mjd=1.0,
    )
    np.testing.assert_allclose(exact.sources["psfFlux"], flux, rtol=1e-5)


def test_off_image_and_ineligible_objects_are_counted_not_measured():
    shape = (100, 100)
    wcs = tan_wcs(10.0, 10.0, 100, 100)
    bundle = make_bundle(difference=make_exposure(shape, wcs), science=make_exposure(shape, wcs))
    obj = objects_at(wcs, [-5.0, 50.0, 50.0, 104.0], [50.0, 50.0, 60.0, 50.0])
    obj.loc[2, "nDiaSources"] = 1
    res = forced_photometry(obj, bundle, ForcedConfig(), id_packer=PACKER, time_processed_mjd=1.0)
    assert list(res.sources["diaObjectId"]) == [2]
    assert res.n_off_image == 2 and res.n_ineligible == 1
    res0 = forced_photometry(
        obj, bundle, ForcedConfig(min_dia_sources=0), id_packer=PACKER, time_processed_mjd=1.0
    )
    assert list(res0.sources["diaObjectId"]) == [2, 3]


def test_masked_pixels_are_skipped_without_bias():
    shape = (100, 100)
    x, y, flux = np.array([50.2]), np.array([49.7]), np.array([1000.0])
    image = render(shape, x, y, flux)
    mask = np.zeros(shape, np.int32)
    image[50, 50] = 1e6  # a saturated, wrong pixel at the peak
    mask[50, 50] = 1 << MASK_PLANES["SAT"]
    image[48, 52] = np.nan  # a NaN pixel with no mask bit
    exp = make_exposure(shape, image=image, mask=mask, photo_calib=1.0)
    f, _, edge = measure_psf_flux(exp, x, y, subpixel_steps=0)
    assert f[0] == pytest.approx(1000.0, rel=1e-5) and not edge[0]
    assert measure_psf_flux(exp, x, y)[0][0] == pytest.approx(1000.0, rel=1e-3)
    # without the mask cut the wrong pixel biases the flux; the NaN pixel is still skipped
    f_all, _, _ = measure_psf_flux(exp, x, y, bad_mask_planes=())
    assert f_all[0] > 1e5


@pytest.mark.parametrize("steps", [32, 0])
def test_boxes_inside_and_at_the_edge_measure_as_one_at_a_time(steps, pixel_sums):
    """One call over inside and edge boxes (two gather paths) equals per-object calls."""
    shape = (120, 90)
    rng = np.random.default_rng(4)
    x = np.r_[rng.uniform(10, 80, 12), [0.3, 89.4, 2.0, 45.0, 45.0]]
    y = np.r_[rng.uniform(10, 110, 12), [60.0, 30.0, 1.6, 0.2, 119.3]]
    image = render(shape, x, y, np.full(x.size, 500.0)) + rng.normal(0, 1.0, shape)
    mask = np.zeros(shape, np.int32)
    mask[rng.integers(0, shape[0], 40), rng.integers(0, shape[1], 40)] = 1 << MASK_PLANES["BAD"]
    image[5, 7] = np.nan
    exp = make_exposure(shape, image=image.astype(np.float32), mask=mask, photo_calib=1.0)
    flux, err, edge = measure_psf_flux(exp, x, y, subpixel_steps=steps)
    assert edge.sum() == 5 and not edge[:12].any()
    for k in range(x.size):
        f1, e1, g1 = measure_psf_flux(exp, x[k : k + 1], y[k : k + 1], subpixel_steps=steps)
        assert (f1[0], e1[0], g1[0]) == (flux[k], err[k], edge[k])
    assert np.isfinite(flux).all()


def _reference_sums(exp, x, y, bad_bits):
    """Flux, error (nJy) and edge flag per object over the whole kernel, pixel by pixel."""
    psf = np.asarray(exp.psf, float)
    h = psf.shape[0] // 2
    flux, err, edge = [], [], []
    for xo, yo in zip(x, y, strict=True):
        ix, iy = int(np.floor(xo + 0.5)), int(np.floor(yo + 0.5))
        ny, nx = exp.shape
        edge.append(not (h <= ix < nx - h and h <= iy < ny - h))
        kern = shifted_psf(psf, np.array([xo - ix]), np.array([yo - iy]))[0]
        num = p2 = pv = 0.0
        for r in range(-h, h + 1):
            for c in range(-h, h + 1):
                yy, xx = iy + r, ix + c
                if not (0 <= yy < exp.shape[0] and 0 <= xx < exp.shape[1]):
                    continue
                v, w = float(exp.image[yy, xx]), float(exp.variance[yy, xx])
                if exp.mask[yy, xx] & bad_bits or not (np.isfinite(v) and np.isfinite(w)):
                    continue
                p = kern[r + h, c + h]
                num, p2, pv = num + p * v, p2 + p * p, pv + p * p * w
        flux.append(num / p2 * exp.photo_calib)
        err.append(np.sqrt(pv) / p2 * exp.photo_calib)
    return np.array(flux), np.array(err), np.array(edge)


@pytest.fixture(params=["numba", "numpy"])
def pixel_sums(request, monkeypatch):
    """Each implementation of the pixel sums in turn: numba's compiled loop, the numpy gather."""
    if request.param == "numpy":
        monkeypatch.setattr(forced_module, "_psf_sums", forced_module._psf_sums_numpy)
    else:  # the [dev] extra installs numba
        assert forced_module._psf_sums is not forced_module._psf_sums_numpy, "numba missing"
    return request.param


def test_compiled_sums_match_a_pixel_by_pixel_reference(pixel_sums):
    """NaN values, infinite variances, masked bits, edge boxes; big-endian, strided planes."""
    shape = (60, 70)
    rng = np.random.default_rng(11)
    x = np.r_[rng.uniform(6, 63, 20), [0.2, 69.3, 1.0]]
    y = np.r_[rng.uniform(6, 53, 20), [30.0, 2.4, 59.4]]
    image = (render(shape, x, y, np.full(x.size, 300.0)) + rng.normal(0, 2.0, shape)).astype(
        np.float32
    )
    variance = np.full(shape, 4.0, np.float32)
    mask = np.zeros(shape, np.int32)
    image[rng.integers(0, 60, 30), rng.integers(0, 70, 30)] = np.nan
    variance[rng.integers(0, 60, 30), rng.integers(0, 70, 30)] = np.inf
    mask[rng.integers(0, 60, 40), rng.integers(0, 70, 40)] = 1 << MASK_PLANES["BAD"]
    mask[rng.integers(0, 60, 40), rng.integers(0, 70, 40)] = 1 << MASK_PLANES["DETECTED"]
    exp = make_exposure(shape, image=image, variance=variance, mask=mask, photo_calib=0.7)
    bad = 1 << MASK_PLANES["BAD"]
    want_f, want_e, want_edge = _reference_sums(exp, x, y, bad)
    opts = {"bad_mask_planes": ("BAD",), "subpixel_steps": 0, "footprint_fraction": 1.0}
    f, e, edge = measure_psf_flux(exp, x, y, **opts)
    np.testing.assert_allclose(f, want_f, rtol=1e-12)
    np.testing.assert_allclose(e, want_e, rtol=1e-12)
    assert np.array_equal(edge, want_edge) and edge[-3:].all() and not edge.all()

    # the same pixels as big-endian, non-contiguous planes (as FITS reads can give)
    def odd(a):
        big = np.zeros((a.shape[0], 2 * a.shape[1]), a.dtype.newbyteorder(">"))
        big[:, ::2] = a
        return big[:, ::2]

    exp2 = dataclasses.replace(exp, image=odd(image), variance=odd(variance), mask=odd(mask))
    assert not exp2.image.flags.c_contiguous and not exp2.mask.dtype.isnative
    f2, e2, _ = measure_psf_flux(exp2, x, y, **opts)
    assert np.array_equal(f2, f) and np.array_equal(e2, e)


@pytest.mark.parametrize("nullable", [False, True], ids=["numpy-columns", "nullable-column"])
def test_objects_after_visit_replaces_updated_rows_and_keeps_order(nullable):
    loaded = pd.DataFrame(
        {
            "diaObjectId": np.array([10, 11, 12, 13], np.int64),
            "ra": [1.0, 2.0, 3.0, 4.0],
            "dec": [-1.0, -2.0, -3.0, -4.0],
            "nDiaSources": np.array([2, 3, 4, 5], np.int32),
            "other": ["a", "b", "c", "d"],
        }
    )
    updated = pd.DataFrame(
        {
            "diaObjectId": np.array([12, 99], np.int64),
            "ra": [3.5, 9.0],
            "dec": [-3.5, -9.0],
            "nDiaSources": pd.array([5, 1], dtype="Int32") if nullable else np.int32([5, 1]),
        }
    )
    out = objects_after_visit(loaded, updated)
    assert list(out.columns) == list(OBJECT_COLUMNS)
    assert out["diaObjectId"].tolist() == [10, 11, 13, 12, 99]
    assert out["ra"].tolist() == [1.0, 2.0, 4.0, 3.5, 9.0]
    assert out["nDiaSources"].tolist() == [2, 3, 5, 5, 1]
    assert out.index.equals(pd.RangeIndex(5))
    with pytest.raises(InputError, match="nDiaSources"):
        objects_after_visit(loaded.drop(columns="nDiaSources"), updated)


@pytest.mark.parametrize("case", ["do-run-off", "no-objects"])
def test_empty_results_have_the_sdm_columns(case):
    wcs = tan_wcs(10.0, 10.0, 100, 100)
    bundle = make_bundle(difference=make_exposure((100, 100), wcs))
    obj = objects_at(wcs, [50.0], [50.0])
    cfg = ForcedConfig(do_run=case != "do-run-off")
    if case == "no-objects":
        obj = obj.iloc[:0]
    res = forced_photometry(obj, bundle, cfg, id_packer=PACKER, time_processed_mjd=1.0)
    assert len(res.sources) == 0 and res.edge.size == 0
    assert list(res.sources.columns) == list(sdm.dtypes("DiaForcedSource"))


def test_bad_config_and_input_errors():
    with pytest.raises(ValueError, match="unknown plane"):
        ForcedConfig(bad_mask_planes=("NOPE",))
    bundle = make_bundle()
    with pytest.raises(InputError, match="missing required column.*nDiaSources"):
        forced_photometry(
            pd.DataFrame({"diaObjectId": [1], "ra": [1.0], "dec": [1.0]}),
            bundle,
            ForcedConfig(),
            id_packer=PACKER,
            time_processed_mjd=1.0,
        )


def _alerts():
    with ALERTS.open("rb") as fh:
        return list(fastavro.reader(fh))


def test_real_lsstcam_stamps_reproduce_packet_psf_flux():
    """Forced photometry at CRPIX of each real difference stamp gives the packet's psfFlux.

    The stamps are in nJy (PHOTCALIB = 1), ``UNCERT`` is the variance and
    ``PSFIMAGE`` (41×41) is larger than the 30×30 stamp: with the whole kernel
    every source is an edge case measured on the pixels inside; the default
    0.999-of-ΣP² box fits inside the stamp.
    """
    pulls = []
    for rec in _alerts():
        with fits.open(io.BytesIO(rec["cutoutDifference"])) as hdul:
            image = hdul[0].data.astype(np.float32)
            variance = hdul["UNCERT"].data.astype(np.float32)
            psf = hdul["PSFIMAGE"].data.astype(np.float64)
            hdr = hdul[0].header
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.crpix = [hdr["CRPIX1"], hdr["CRPIX2"]]
        wcs.wcs.crval = [hdr["CRVAL1"], hdr["CRVAL2"]]
        wcs.wcs.pc = [[hdr["PC1_1"], hdr["PC1_2"]], [hdr["PC2_1"], hdr["PC2_2"]]]
        exp = make_exposure(
            image.shape, wcs, image=image, variance=variance, psf=psf, photo_calib=1.0
        )
        bundle = make_bundle(difference=exp, science=exp)
        obj = pd.DataFrame(
            {"diaObjectId": [1], "ra": [hdr["CRVAL1"]], "dec": [hdr["CRVAL2"]], "nDiaSources": [2]}
        )
        ds = rec["diaSource"]
        for fraction in (0.999, 1.0):  # the default box, and the whole 41×41 kernel
            res = forced_photometry(
                obj,
                bundle,
                ForcedConfig(footprint_fraction=fraction),
                id_packer=PACKER,
                time_processed_mjd=1.0,
            )
            assert res.edge[0] == (fraction == 1.0)  # the whole kernel overhangs the stamp
            got = res.sources["psfFlux"].iloc[0]
            pulls.append((got - ds["psfFlux"]) / ds["psfFluxErr"])
            # our error comes from the same variance plane: within 10 % of Rubin's
            assert res.sources["psfFluxErr"].iloc[0] == pytest.approx(ds["psfFluxErr"], rel=0.1)
    pulls = np.abs(np.array(pulls))
    assert len(pulls) == 14
    assert (pulls < 1).sum() >= 12, pulls
