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
