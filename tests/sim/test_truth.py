"""Ground truth agrees with the catalog, the pixels and the sky model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sim.config import SurveyConfig
from sim.survey import Survey
from tests.sim.conftest import V0, V1
from tests.sim.fitsread import read_image, read_parquet


def _joined(root, survey, visits=(0, 1)):
    frames = []
    for visit in visits:
        number = survey.config.visit_number(visit)
        for det in survey.detectors:
            cat = read_parquet(f"{root}/{number}/{det}/diaSources.parquet")
            truth = read_parquet(f"{root}/{number}/{det}/truth.parquet")
            assert len(cat) == len(truth)
            assert (truth["row"].to_numpy() == np.arange(len(truth))).all()
            df = pd.concat([cat, truth], axis=1)
            df["visit"], df["detector"] = visit, det
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def test_truth_rows_align_with_catalog(small_root, small_survey):
    df = _joined(small_root, small_survey)
    real = df[df["truthId"] >= 0]
    bogus = df[df["truthId"] < 0]
    assert set(real["kind"]) <= {"variable", "transient", "moving"}
    assert set(bogus["kind"]) <= {"bogus_noise", "bogus_dipole", "bogus_cr"}
    assert len(real) > 0 and len(bogus) > 0
    # each true object is detected at most once per visit and detector
    assert not real.duplicated(["visit", "detector", "truthId"]).any()
    # matched rows sit close to their true position (a few pixels at most)
    d = np.hypot(real["x"] - real["trueX"], real["y"] - real["trueY"])
    assert np.quantile(d, 0.99) < 3.0
    # true sky position is the WCS of the true pixel position
    for (visit, det), g in real.groupby(["visit", "detector"]):
        w = small_survey.detector_wcs(visit, det)
        ra, dec = w.pixel_to_world_values(g["trueX"].to_numpy(), g["trueY"].to_numpy())
        np.testing.assert_allclose(ra, g["trueRa"], atol=1e-10)
        np.testing.assert_allclose(dec, g["trueDec"], atol=1e-10)


def test_truth_objects_mark_detections(small_root, small_survey):
    for visit in (V0, V1):
        for det in small_survey.detectors:
            objs = read_parquet(f"{small_root}/{visit}/{det}/truth_objects.parquet")
            truth = read_parquet(f"{small_root}/{visit}/{det}/truth.parquet")
            detected = set(truth.loc[truth["truthId"] >= 0, "truthId"])
            assert set(objs.loc[objs["detected"], "truthId"]) == detected
            nx, ny = small_survey.config.detector_size
            assert objs["x"].between(-0.5, nx - 0.5).all()
            assert objs["y"].between(-0.5, ny - 0.5).all()
            assert not objs.loc[objs["kind"] == "static", "detected"].any()
            np.testing.assert_allclose(
                objs["diffFlux"], objs["scienceFlux"] - objs["templateFlux"], atol=1e-6
            )
            moving = objs["kind"].isin(["moving", "transient"])
            assert (objs.loc[moving, "templateFlux"] == 0).all()


def test_bogus_are_flagged_and_unreliable(small_root, small_survey):
    df = _joined(small_root, small_survey)
    cr = df[df["kind"] == "bogus_cr"]
    dip = df[df["kind"] == "bogus_dipole"]
    assert len(cr) > 0 and cr["pixelFlags_cr"].all()
    assert dip["isDipole"].all() and not df.loc[df["kind"] != "bogus_dipole", "isDipole"].any()
    real = df[df["truthId"] >= 0]
    bogus = df[df["truthId"] < 0]
    assert real["reliability"].median() > 0.7 > 0.3 > bogus["reliability"].median()


def test_flags_follow_mask_pixels(small_root, small_survey):
    """A source flagged for a mask plane has that plane set near its centre."""
    from core.bundle import MASK_PLANES

    checked = 0
    for visit in (V0, V1):
        for det in small_survey.detectors:
            cat = read_parquet(f"{small_root}/{visit}/{det}/diaSources.parquet")
            mask = read_image(f"{small_root}/{visit}/{det}/difference.fits")["mask"]
            for col, plane in (("pixelFlags_crCenter", "CR"), ("pixelFlags_edge", "EDGE")):
                bit = 1 << MASK_PLANES[plane]
                ix = np.floor(cat["x"].to_numpy() + 0.5).astype(int)
                iy = np.floor(cat["y"].to_numpy() + 0.5).astype(int)
                for x, y, flag in zip(ix, iy, cat[col].to_numpy(), strict=True):
                    half = 1 if col.endswith("Center") else 12
                    win = mask[max(y - half, 0) : y + half + 1, max(x - half, 0) : x + half + 1]
                    if flag:
                        assert (win & bit).any()
                        checked += 1
                    elif col.endswith("Center"):
                        assert not (win & bit).any()
    assert checked > 0


def test_moving_objects_move_linearly(small_survey):
    cat = small_survey.truth_catalog()
    mov = cat[cat["kind"] == "moving"].iloc[:50]
    sky = small_survey.sky
    ids = mov["truthId"].to_numpy()
    x0, y0 = (a[ids] for a in sky.positions(61000.0))
    x1, y1 = (a[ids] for a in sky.positions(61001.0))
    x2, y2 = (a[ids] for a in sky.positions(61003.0))
    np.testing.assert_allclose(x2 - x0, 3 * (x1 - x0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(y2 - y0, 3 * (y1 - y0), rtol=1e-9, atol=1e-12)
    speed = np.hypot(x1 - x0, y1 - y0)
    lo, hi = small_survey.config.moving_speed_range
    assert ((speed >= lo * 0.999) & (speed <= hi * 1.001)).all()


def test_light_curves(small_survey):
    sky = small_survey.sky
    cat = sky.catalog
    t = 61000.0 + np.array([0.0, 3.0, 10.0])
    var = cat.index[cat["kind"] == "variable"][:20]
    tr = cat.index[cat["kind"] == "transient"]
    for mjd in t:
        for band in ("g", "r"):
            sci, tmpl = sky.fluxes(mjd, band)
            mean = cat[f"{band}_flux"].to_numpy()
            amp = cat[f"{band}_amplitude"].to_numpy()
            # variables oscillate within their amplitude around the template
            np.testing.assert_array_equal(tmpl[var], mean[var])
            assert (np.abs(sci[var] / mean[var] - 1) <= amp[var] + 1e-12).all()
            # transients never exceed their peak and are absent from the template
            assert (sci[tr] <= mean[tr] * (1 + 1e-12)).all() and (tmpl[tr] == 0).all()
    # at its peak a transient has exactly its peak flux
    i = tr[0]
    sci, _ = sky.fluxes(float(cat.loc[i, "peakMjd"]), "r")
    assert sci[i] == pytest.approx(cat.loc[i, "r_flux"])


@pytest.mark.slow
@pytest.mark.parametrize("m", [20.0, 120.0], ids=["M20", "M120"])
def test_sources_per_detector_controls_counts(m):
    """Averaged over visits, the fast-path count per detector is ≈ M."""
    s = Survey(SurveyConfig(seed=2, n_detectors=12, sources_per_detector=m, n_visits=60))
    n = [len(s.visit_catalog(v)) / 12 for v in range(0, 60, 6)]
    assert np.mean(n) == pytest.approx(m, rel=0.2)


def test_image_path_counts_match_fast_path(small_root, small_survey):
    """Rendered-and-measured catalogs have about as many rows as the fast path."""
    m = small_survey.config.sources_per_detector
    rows = [
        len(read_parquet(f"{small_root}/{v}/{d}/diaSources.parquet"))
        for v in (V0, V1)
        for d in small_survey.detectors
    ]
    fast = [len(small_survey.visit_catalog(v)) / 4 for v in (0, 1)]
    assert np.mean(rows) == pytest.approx(np.mean(fast), rel=0.3)
    assert 0.5 * m < np.mean(rows) < 1.5 * m


def test_visit_catalog_columns(small_survey):
    cat = small_survey.visit_catalog(1)
    for col in (
        "visit",
        "detector",
        "ra",
        "dec",
        "truthId",
        "kind",
        "trueDiffFlux",
        "x",
        "y",
        "psfInstFlux",
        "psfInstFluxErr",
        "photoCalib",
        "band",
    ):
        assert col in cat.columns
    assert (cat["visit"] == V1).all()  # the LSSTCam visit number, as visit.json's
    assert set(cat["detector"]) <= set(small_survey.detectors)
    # positions on the sky agree with the detector WCS
    g = cat[cat["detector"] == 94]
    ra, dec = small_survey.detector_wcs(1, 94).pixel_to_world_values(g["x"], g["y"])
    np.testing.assert_allclose(ra, g["ra"], atol=1e-12)
