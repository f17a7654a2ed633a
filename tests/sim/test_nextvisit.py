"""The simulated next-visit message: the predicted footprint, the pointing error, the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from core.bundle import read_visit_info
from core.completion import check_complete
from core.nextvisit import parse_next_visit
from sim.__main__ import main
from sim.nextvisit import next_visit_message


def _separation_arcsec(ra1, dec1, ra2, dec2):
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    s = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(s))) * 3600.0


def _edges(survey):
    nx, ny = survey.focal_plane.nx, survey.focal_plane.ny
    return np.array([[-0.5, -0.5], [nx - 0.5, -0.5], [nx - 0.5, ny - 0.5], [-0.5, ny - 0.5]])


def test_without_pointing_error_the_corners_are_the_bundle_wcs_corners(small_survey):
    m = next_visit_message(small_survey, 3, pointing_error_arcsec=0.0)
    info = small_survey.visit_info(3)
    assert (m.boresightRa, m.boresightDec, m.rotAngle) == (
        info.boresightRa,
        info.boresightDec,
        info.rotAngle,
    )
    assert m.detectors == info.detectors and m.band == info.band
    assert m.visit == info.visit == small_survey.config.visit_number(3)  # LSSTCam number
    for det in m.detectors:
        ra, dec = small_survey.detector_wcs(3, det).all_pix2world(_edges(small_survey), 0).T
        pra, pdec = m.corners(det)
        assert _separation_arcsec(ra, dec, pra, pdec).max() < 1e-6


def test_pointing_error_has_the_asked_rms_and_moves_the_footprint_with_it(small_survey):
    offsets, shifts = [], []
    for visit in range(40):
        m = next_visit_message(small_survey, visit, pointing_error_arcsec=2.0)
        info = small_survey.visit_info(visit)
        off = _separation_arcsec(info.boresightRa, info.boresightDec, m.boresightRa, m.boresightDec)
        offsets.append(float(off))
        det = m.detectors[0]
        ra, dec = small_survey.detector_wcs(visit, det).all_pix2world(_edges(small_survey), 0).T
        shifts.append(_separation_arcsec(ra, dec, *m.corners(det)))
    rms = math.sqrt(np.mean(np.square(offsets)))
    # 40 draws of a 2-d Gaussian: the RMS radius is within ~ +-25 % of 2" (3 sigma ~ 0.34)
    assert 1.5 < rms < 2.5, rms
    # every corner of the footprint moves by the boresight's offset (to 1 %, at <1 deg)
    for off, shift in zip(offsets, shifts, strict=True):
        np.testing.assert_allclose(shift, off, rtol=0.01, atol=1e-3)


def test_same_survey_same_messages(small_survey):
    a = next_visit_message(small_survey, 5)
    b = next_visit_message(small_survey, 5)
    assert a == b and a != next_visit_message(small_survey, 6)


def test_shutter_close_is_the_visit_midpoint_plus_half_the_exposure(small_survey):
    m = next_visit_message(small_survey, 2)
    info = small_survey.visit_info(2)
    # MJD 51544.5 TAI is 2000-01-01T11:59:28 UTC (TAI-UTC = 32 s then); at the
    # survey's MJD TAI-UTC is 37 s
    mjd_utc = info.midpointMjdTai - 37.0 / 86400.0
    unix = (mjd_utc - 40587.0) * 86400.0 + info.exposureTime / 2
    assert m.shutter_close.timestamp() == pytest.approx(unix, abs=1e-3)
    assert (m.shutter_close - m.issued).total_seconds() == info.exposureTime


def test_command_line_writes_message_then_bundle_then_marker(tmp_path):
    out = tmp_path / "survey"
    argv = ["--out", str(out), "--visits", "1", "--first-visit", "4", "--detectors", "2"]
    argv += ["--detector-size", "128", "--sources-per-detector", "30", "--survey-visits", "10"]
    argv += ["--no-truth-catalog", "--pointing-error", "0"]
    assert main(argv) == 0
    v4 = 2025120200001  # index 4: MJD 61000.0 + 4 x 3 d, the evening of 2025-12-02 in Chile
    assert sorted(p.name for p in out.iterdir()) == [str(v4)]
    m = parse_next_visit((out / str(v4) / "next-visit.json").read_bytes())
    info = read_visit_info(str(out), v4)
    assert m.visit == info.visit == v4
    assert (m.boresightRa, m.boresightDec) == (info.boresightRa, info.boresightDec)
    done = check_complete(str(out), v4)
    assert done is not None and "visit.json" in done.files
    marker = json.loads((out / str(v4) / "complete.json").read_text())
    assert "next-visit.json" not in marker["files"]
    times = {p.name: p.stat().st_mtime_ns for p in (out / str(v4)).rglob("*") if p.is_file()}
    assert times["next-visit.json"] <= min(times.values())
    assert times["complete.json"] == max(times.values())


def test_command_line_refuses_a_negative_pointing_error(tmp_path):
    with pytest.raises(SystemExit, match="--pointing-error must be in"):
        main(["--out", str(tmp_path / "o"), "--pointing-error", "-1"])
