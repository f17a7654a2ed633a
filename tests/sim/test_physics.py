"""The simulator is physically consistent: forced PSF photometry at the TRUE
positions, computed independently from the written files (astropy + a
Fourier-shifted PSF kernel), recovers the true fluxes with unit-width pulls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sim.config import SurveyConfig
from sim.survey import Survey
from tests.sim.fitsread import forced_psf_flux, read_image, read_parquet

#: Lower static density than the default so that enough stars are isolated
#: (kernels are truncated, so a neighbour beyond two kernel half-widths adds
#: exactly nothing to a stamp).
PHYS = SurveyConfig(
    seed=5, n_detectors=6, n_visits=30, static_per_detector=60, sources_per_detector=40
)


@pytest.fixture(scope="module")
def phys_root(tmp_path_factory) -> str:
    survey = Survey(PHYS)
    root = str(tmp_path_factory.mktemp("phys"))
    for visit in (2, 3):
        survey.write_visit(root, visit)
    return root, survey


def _isolated(x, y, ox, oy, box):
    """True where no other point of (ox, oy) lies within the Chebyshev box."""
    dx = np.abs(x[:, None] - ox[None, :])
    dy = np.abs(y[:, None] - oy[None, :])
    close = (dx <= box) & (dy <= box)
    return close.sum(axis=1) <= 1  # itself


def _pulls(root, survey, image_kind, flux_col, movers_only):
    pulls = []
    for visit in (2, 3):
        for det in survey.detectors:
            base = f"{root}/{survey.config.visit_number(visit)}/{det}"
            im = read_image(f"{base}/{image_kind}.fits")
            objs = read_parquet(f"{base}/truth_objects.parquet")
            truth = read_parquet(f"{base}/truth.parquet")
            # every light source near the detector: true objects and injected bogus
            near = survey.scene(visit, det)
            if movers_only:
                keep = survey.sky.catalog["kind"].to_numpy()[near.idx] != "static"
                ox, oy = near.x[keep], near.y[keep]
            else:
                ox, oy = near.x, near.y
            ox = np.concatenate([ox, near.b_x])
            oy = np.concatenate([oy, near.b_y])
            box = im["psf"].shape[0]
            sel = objs if not movers_only else objs[objs["kind"] != "static"]
            x, y = sel["x"].to_numpy(), sel["y"].to_numpy()
            iso = _isolated(x, y, ox, oy, box)
            f, e, clean = forced_psf_flux(im["image"], im["variance"], im["mask"], im["psf"], x, y)
            ok = iso & clean
            true = sel[flux_col].to_numpy() / im["photcalib"]
            pulls.append((f[ok] - true[ok]) / e[ok])
            assert len(truth) == len(read_parquet(f"{base}/diaSources.parquet"))
    return np.concatenate(pulls)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("image_kind", "flux_col", "movers_only"),
    [
        ("difference", "diffFlux", True),
        ("science", "scienceFlux", False),
        ("template", "templateFlux", False),
    ],
    ids=["difference", "science", "template"],
)
def test_forced_flux_at_true_positions_has_unit_pulls(phys_root, image_kind, flux_col, movers_only):
    root, survey = phys_root
    pulls = _pulls(root, survey, image_kind, flux_col, movers_only)
    assert pulls.size >= 200, pulls.size
    assert abs(np.mean(pulls)) < 0.1, np.mean(pulls)
    assert 0.9 < np.std(pulls) < 1.1, np.std(pulls)
    # Gaussian tails, not a few wild outliers hiding in a unit std
    assert np.mean(np.abs(pulls) > 4) < 0.005


@pytest.mark.slow
def test_measured_positions_scatter_within_errors(phys_root):
    """Detected true objects lie within their measured errors of the truth."""
    root, survey = phys_root
    frames = []
    for visit in (PHYS.visit_number(2), PHYS.visit_number(3)):
        for det in survey.detectors:
            cat = read_parquet(f"{root}/{visit}/{det}/diaSources.parquet")
            truth = read_parquet(f"{root}/{visit}/{det}/truth.parquet")
            frames.append(pd.concat([cat, truth], axis=1))
    df = pd.concat(frames, ignore_index=True)
    real = df[(df["truthId"] >= 0) & ~df["centroid_flag"] & ~df["pixelFlags"]]
    assert len(real) > 100
    px = (real["x"] - real["trueX"]) / real["xErr"]
    py = (real["y"] - real["trueY"]) / real["yErr"]
    pos = np.concatenate([px, py])
    assert abs(np.median(pos)) < 0.1
    assert 0.85 < np.std(pos[np.abs(pos) < 6]) < 1.2
    assert np.mean(np.abs(pos) < 3) > 0.97


@pytest.mark.slow
def test_measured_psf_flux_tracks_true_difference_flux(phys_root):
    """psfInstFlux of real detections scatters around the true difference flux."""
    root, survey = phys_root
    pulls = []
    for visit in (PHYS.visit_number(2), PHYS.visit_number(3)):
        for det in survey.detectors:
            cat = read_parquet(f"{root}/{visit}/{det}/diaSources.parquet")
            truth = read_parquet(f"{root}/{visit}/{det}/truth.parquet")
            calib = read_image(f"{root}/{visit}/{det}/difference.fits")["photcalib"]
            ok = (truth["truthId"] >= 0).to_numpy() & ~cat["pixelFlags"].to_numpy()
            f = cat["psfInstFlux"].to_numpy()[ok]
            e = cat["psfInstFluxErr"].to_numpy()[ok]
            pulls.append((f - truth["trueDiffFlux"].to_numpy()[ok] / calib) / e)
    p = np.concatenate(pulls)
    # detection selects upward fluctuations near threshold, hence a small positive bias
    assert len(p) > 100
    assert -0.2 < np.median(p) < 0.4
    assert np.mean(np.abs(p) < 4) > 0.95
