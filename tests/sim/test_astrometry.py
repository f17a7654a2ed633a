"""Quoted centroid errors describe the scatter the simulator draws, systematic
floor included, in every brightness bin; chromatic offsets have a realistic size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sim.config import SurveyConfig
from sim.survey import Survey

CFG = SurveyConfig(seed=7, n_detectors=4, n_visits=20, detector_size=(1024, 1024))


@pytest.fixture(scope="module")
def measured() -> pd.DataFrame:
    survey = Survey(CFG)
    parts = []
    for visit in range(5):
        for det in survey.detectors:
            sc = survey.scene(visit, det)
            cat, truth, _ = survey.measure(sc, survey.render(sc))
            parts.append(pd.concat([cat, truth], axis=1))
    return pd.concat(parts, ignore_index=True)


@pytest.mark.slow
def test_position_pulls_have_unit_width_per_brightness_bin(measured):
    real = measured[
        (measured["truthId"] >= 0) & ~measured["centroid_flag"] & ~measured["pixelFlags"]
    ]
    floor_px = CFG.astrometric_floor_arcsec / CFG.pixel_scale_arcsec
    assert (real["xErr"] >= floor_px * 0.999).all() and (real["yErr"] >= floor_px * 0.999).all()
    pulls = np.r_[
        (real["x"] - real["trueX"]) / real["xErr"], (real["y"] - real["trueY"]) / real["yErr"]
    ]
    snr = np.r_[real["snr"], real["snr"]]
    edges = np.quantile(snr, [0, 0.25, 0.5, 0.75, 1.0])
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        p = pulls[(snr >= lo) & (snr <= hi)]
        assert p.size > 300
        robust = 1.4826 * np.median(np.abs(p - np.median(p)))
        assert 0.85 < robust < 1.25, (lo, hi, robust)
        assert abs(np.median(p)) < 0.2  # ~3 standard errors of a median of 300+
    # the brightest quarter is floor-dominated: without the floor it would be ≫ 1 wide
    bright = real[real["snr"] > edges[3]]
    assert np.median(bright["xErr"]) < 2 * floor_px


def test_chromatic_offsets_have_a_realistic_size():
    """g-band offsets: tens of mas typical, ≲ 0.3″ extremes; i/z/y offsets much smaller."""
    survey = Survey(CFG)
    by_band: dict[str, list[float]] = {}
    for visit in range(40):
        du, dv = survey.chromatic_offset(visit)
        r = np.hypot(du, dv) * CFG.pixel_scale_arcsec
        by_band.setdefault(survey.visit_params(visit).band, []).append(
            float(np.sqrt(np.mean(r**2)))
        )
    g = np.mean(by_band["g"])
    assert 0.01 < g < 0.15
    assert all(np.mean(by_band[b]) < g / 3 for b in "izy" if b in by_band)


def _pairs(cat: pd.DataFrame, radius_px: float) -> np.ndarray:
    from scipy.spatial import cKDTree

    xy = cat[["x", "y"]].to_numpy()
    if len(xy) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    return cKDTree(xy).query_pairs(radius_px, output_type="ndarray")


def test_one_diasource_per_peak():
    """Two true sources closer than the PSF resolves make one DiaSource, the brighter's.

    Without the rule (``peak_merge_sigma=0``) the fainter source's centroid
    fit slides onto its neighbour's peak and the catalogue holds two
    DiaSources a fraction of a pixel apart; with it, the source contributing
    more flux is the one kept and no two DiaSources of a detector lie within
    2 PSF σ. (No astrometric floor here, so catalogue positions are the fits.)
    """
    crowded = SurveyConfig(
        seed=3, n_detectors=4, n_visits=16, detector_size=(512, 512), astrometric_floor_arcsec=0.0
    )
    merged = Survey(crowded)
    unmerged = Survey(crowded.model_copy(update={"peak_merge_sigma": 0.0}))
    n_shared = 0
    for visit in range(16):
        r = 2.0 * merged.visit_params(visit).psf.sigma
        for det in merged.detectors:
            sc = unmerged.scene(visit, det)
            images = unmerged.render(sc)
            cat0, truth0, _ = unmerged.measure(sc, images)
            cat1, truth1, _ = merged.measure(merged.scene(visit, det), images)
            assert len(_pairs(cat1, r)) == 0
            # what each contributes to the peak (a dipole's detected lobe: its star's flux)
            dipole = truth0["kind"] == "bogus_dipole"
            flux = truth0["trueDiffFlux"].where(~dipole, truth0["trueScienceFlux"]).abs().to_numpy()
            weak = {int(j if flux[i] >= flux[j] else i) for i, j in _pairs(cat0, r)}
            n_shared += len(weak)
            key0 = list(zip(truth0["trueX"], truth0["trueY"], strict=True))
            key1 = set(zip(truth1["trueX"], truth1["trueY"], strict=True))
            # exactly the weaker detections of each shared peak are gone, nothing else
            assert {k for n, k in enumerate(key0) if n not in weak} == key1
    assert n_shared >= 5  # the crowded sky has blends to merge
