"""Simulated visits carry LSSTCam visit numbers: day_obs·10⁵ + seq_num from their time."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from core.ids import IdPacker
from sim.config import SurveyConfig
from sim.survey import Survey


def _utc_date(mjd: float) -> dt.date:
    return dt.date(1858, 11, 17) + dt.timedelta(days=int(mjd // 1))


def test_default_survey_numbers_one_visit_per_night():
    """Every 3 days from MJD 61000.0 (2025-11-21 00:00 TAI, evening of 2025-11-20 in Chile)."""
    cfg = SurveyConfig()
    assert [cfg.visit_number(k) for k in range(3)] == [2025112000001, 2025112300001, 2025112600001]


def test_day_obs_is_the_date_twelve_hours_earlier():
    """day_obs rolls over at 12:00 TAI: an exposure starting 11:59 belongs to the night before."""
    before = SurveyConfig(start_mjd=61000.5 - 1 / 1440 + 15 / 86400)  # starts 11:59:00
    after = SurveyConfig(start_mjd=61000.5 + 1 / 1440 + 15 / 86400)  # starts 12:01:00
    assert before.day_obs(0) == 20251120
    assert after.day_obs(0) == 20251121
    # and the start of the exposure counts, not its midpoint (obs_lsst uses datetime_begin)
    straddle = SurveyConfig(start_mjd=61000.5 + 5 / 86400)  # starts 11:59:50, mid 12:00:05
    assert straddle.day_obs(0) == 20251120


def test_seq_num_counts_exposures_from_one_and_resets_each_night():
    cfg = SurveyConfig(start_mjd=61000.05, cadence_days=0.1)  # 10 exposures a day
    k = range(40)
    numbers = [cfg.visit_number(i) for i in k]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)  # increasing
    for i, n in zip(k, numbers, strict=True):
        day_obs, seq = divmod(n, 100_000)
        start = cfg.visit_mjd(i) - cfg.exposure_time / 2 / 86400
        assert day_obs == int(_utc_date(start - 0.5).strftime("%Y%m%d"))
        assert day_obs == cfg.day_obs(i) and seq == cfg.seq_num(i)
        assert seq >= 1
        # seq_num is 1 exactly at a night boundary, one more than the previous exposure else
        if i == 0 or cfg.day_obs(i - 1) != day_obs:
            assert seq == 1
        else:
            assert n == numbers[i - 1] + 1
    assert len({n // 100_000 for n in numbers}) == 5  # 4 days and a bit: five nights
    # 61000.05 + 0.1 k: k = 0..4 before 12:00 TAI of 2025-11-21 (night 20251120), then 10 a night
    assert numbers[:6] == [2025112000001 + i for i in range(5)] + [2025112100001]
    assert numbers[14:16] == [2025112100010, 2025112200001]


def test_visit_index_inverts_visit_number():
    cfg = SurveyConfig(start_mjd=61000.3, cadence_days=0.07)
    for k in range(0, 200, 7):
        assert cfg.visit_index(cfg.visit_number(k)) == k
    with pytest.raises(ValueError, match="no exposure 99 on night 20251121"):
        cfg.visit_index(2025112100099)
    with pytest.raises(ValueError, match="no exposure 0"):
        cfg.visit_index(2025112100000)
    with pytest.raises(ValueError, match="not a date"):
        cfg.visit_index(7)
    with pytest.raises(ValueError, match="no exposure 1 on night 20251122"):
        SurveyConfig().visit_index(2025112200001)  # every 3 days: no visit that night


def test_too_many_exposures_in_a_night_is_an_error():
    # one exposure every 0.5 s from 14:24 TAI: 155,520 before the next rollover
    cfg = SurveyConfig(start_mjd=60999.6, cadence_days=0.5 / 86400, exposure_time=0.1)
    assert cfg.visit_number(99_998) % 100_000 == 99_999
    with pytest.raises(ValueError, match="seq_num must be < 100000"):
        cfg.visit_number(99_999)


def test_visit_numbers_pack_with_the_default_ids():
    """The default IdConfig packs them and gives them back (diaSourceId round trip)."""
    cfg = SurveyConfig(start_mjd=61000.05, cadence_days=0.1)
    packer = IdPacker()
    for k in (0, 5, 39):
        visit = cfg.visit_number(k)
        ids = packer.pack(visit, 188, [0, 12345])
        v, d, r = packer.unpack(ids)
        assert v.tolist() == [visit, visit] and d.tolist() == [188, 188]
        assert r.tolist() == [0, 12345]


def test_written_bundle_uses_the_visit_number(tmp_path):
    """Directory, visit.json, FITS VISIT card and fast-path catalog all carry the number."""
    from astropy.io import fits

    cfg = SurveyConfig(
        seed=9, n_detectors=1, detector_size=(96, 96), start_mjd=61000.45, cadence_days=0.04
    )
    survey = Survey(cfg)
    number = cfg.visit_number(2)  # 61000.53: after 12:00 TAI, the first of night 20251121
    assert number == 2025112100001
    paths = survey.write_visit(str(tmp_path), 2)
    assert paths[0] == f"{tmp_path}/{number}/visit.json"
    assert json.loads((tmp_path / str(number) / "visit.json").read_text())["visit"] == number
    assert survey.visit_info(2).visit == number
    det = survey.detectors[0]
    assert fits.getheader(tmp_path / str(number) / str(det) / "difference.fits", 1)["VISIT"] == (
        number
    )
    assert (survey.visit_catalog(2)["visit"] == number).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(number), "truth"]
