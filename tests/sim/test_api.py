"""Config validation, focal plane, fsspec URLs and the command line."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
from pydantic import ValidationError

from sim.__main__ import main
from sim.config import SurveyConfig
from sim.focalplane import FocalPlane
from sim.psf import Psf
from sim.survey import Survey


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_detectors": 0}, "greater than or equal to 1"),
        ({"n_detectors": 190}, "less than or equal to 189"),
        ({"bands": ("g", "q")}, "bands must be among"),
        ({"detector_size": (16, 16)}, "at least 32"),
        ({"seeing_min_arcsec": 1.5, "seeing_max_arcsec": 1.0}, "seeing_max_arcsec"),
        ({"bogus_mix": (0, 0, 0)}, "positive sum"),
        ({"psf_model": "airy"}, "gaussian"),
        ({"colour": 1}, "Extra inputs"),
    ],
    ids=["zero-detectors", "too-many", "band", "tiny", "seeing", "mix", "psf", "extra"],
)
def test_config_rejects(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        SurveyConfig(**kwargs)


def test_config_is_frozen_and_documented():
    cfg = SurveyConfig(detector_size=256)
    assert cfg.detector_size == (256, 256)
    with pytest.raises(ValidationError):
        cfg.seed = 3
    for name, field in SurveyConfig.model_fields.items():
        assert field.description, name


def test_focal_plane_grid():
    fp = FocalPlane.lsstcam_like(512, 512, 0.04, 0.02)
    assert len(fp.centres) == 189
    assert fp.names[0] == "R01_S00" and fp.names[94] == "R22_S11" and fp.names[188] == "R43_S22"
    np.testing.assert_array_equal(fp.centres[94], [0.0, 0.0])
    assert fp.central(1) == (94,)
    assert fp.central(9) == tuple(range(90, 99))  # raft R22
    assert fp.central(189) == tuple(range(189))
    # detectors never overlap: centre distances exceed a detector size on some axis
    d = np.abs(fp.centres[:, None, :] - fp.centres[None, :, :])
    off_diag = ~np.eye(189, dtype=bool)
    assert (np.max(d / 512.0, axis=2)[off_diag] > 1.0).all()
    # locate() agrees with the per-detector bounds
    rng = np.random.default_rng(0)
    u, v = rng.uniform(-fp.radius, fp.radius, (2, 5000))
    det, x, y = fp.locate(u, v)
    on = det >= 0
    assert 0.3 < on.mean() < 0.9
    for d_, xx, yy, uu, vv in zip(det[on][:200], x[on], y[on], u[on], v[on], strict=False):
        np.testing.assert_allclose(fp.to_detector(d_, uu, vv), (xx, yy))
    only = fp.locate(u, v, detectors=[94])[0]
    assert set(np.unique(only)) <= {-1, 94}


@pytest.mark.parametrize("model", ["gaussian", "moffat"])
def test_psf_kernel_and_stamps(model):
    psf = Psf(fwhm=4.0, model=model)
    k = psf.kernel()
    assert k.shape == (21, 21) and k.sum() == pytest.approx(1.0, abs=1e-14)
    # the half maximum is at FWHM/2 from the centre
    assert psf.profile(np.array(2.0), np.array(0.0)) == pytest.approx(0.5)
    # shifted stamps keep unit sum (well sampled) and move the centroid
    _, _, st = psf.stamps(np.array([10.3]), np.array([20.0]))
    assert st.sum() == pytest.approx(1.0, abs=1e-4)
    g = np.arange(-psf.half, psf.half + 1)
    assert np.sum(st[0] * g[None, :]) == pytest.approx(0.3, abs=2e-3)  # truncated wings


def test_memory_filesystem_url():
    """write_visit goes through fsspec: a memory:// root works like a local path."""
    s = Survey(SurveyConfig(seed=9, n_detectors=1, detector_size=(96, 96), n_visits=5))
    paths = s.write_visit("memory://simtest/root", 2)
    v = s.config.visit_number(2)
    assert paths[0] == f"memory://simtest/root/{v}/visit.json"
    fs = fsspec.filesystem("memory")
    assert json.loads(fs.cat(f"/simtest/root/{v}/visit.json"))["detectors"] == [94]
    assert fs.exists(f"/simtest/root/{v}/94/difference.fits")
    fs.rm("/simtest", recursive=True)


def test_cli_writes_visits(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "--out", str(out), "--visits", "2", "--first-visit", "3", "--detectors", "2",
            "--sources-per-detector", "30", "--seed", "4", "--detector-size", "128",
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    # indices 3 and 4 of a survey starting at MJD 61000.0 (2025-11-21 00:00 TAI) every 3 days
    assert "visit 2025112900001:" in text and "visit 2025120200001:" in text
    for visit in (2025112900001, 2025120200001):
        info = json.loads((out / str(visit) / "visit.json").read_text())
        assert info["visit"] == visit and len(info["detectors"]) == 2
        for det in info["detectors"]:
            assert (out / str(visit) / str(det) / "diaSources.parquet").exists()
    assert (out / "truth" / "objects.parquet").exists()


def test_unknown_visit_or_detector_is_refused(small_survey):
    with pytest.raises(ValueError, match="non-negative integer"):
        small_survey.visit_info(-1)
    with pytest.raises(ValueError, match="not among this survey's detectors"):
        small_survey.visit_catalog(0, detectors=[0])
    with pytest.raises(ValueError, match="not among this survey's"):
        small_survey.scene(0, 188)
