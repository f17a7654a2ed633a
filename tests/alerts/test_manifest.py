"""Night manifests are grouped by Rubin's day_obs, the night LSSTCam visit ids carry."""

from __future__ import annotations

import datetime as dt

import pytest

from alerts import __main__ as cli
from alerts.manifest import (
    day_obs_of,
    night_of,
    read_night,
    visit_entry,
    write_visit_manifest,
)
from core.errors import InputError
from core.ids import SEQ_NUM_RADIX
from sim.config import SurveyConfig

from .conftest import make_visit

# 2025-11-21 00:00 TAI is MJD 61000.0; 12:00 TAI, the rollover, is 61000.5
HALF_EXPOSURE = 15.0 / 86400.0  # make_visit's 30 s exposure


@pytest.mark.parametrize(
    ("mjd", "night"),
    [
        (61000.2, "2025-11-20"),  # 04:48 UTC: after UTC midnight, before noon in TAI
        (61000.0 + HALF_EXPOSURE, "2025-11-20"),  # starts at 00:00:00 TAI
        (61000.5 + HALF_EXPOSURE - 1e-6, "2025-11-20"),  # starts 0.09 s before 12:00 TAI
        (61000.5 + HALF_EXPOSURE + 1e-6, "2025-11-21"),  # starts 0.09 s after 12:00 TAI
        (61000.9, "2025-11-21"),  # 21:36 UTC, the next evening
        (60999.99, "2025-11-20"),  # 23:45 UTC on 2025-11-20
    ],
    ids=["after-utc-midnight", "midnight", "just-before-rollover", "rollover", "evening", "late"],
)
def test_a_visit_belongs_to_the_day_obs_of_its_start(mjd, night):
    entry = visit_entry(make_visit(visit=7001, mjd=mjd), [], {}, {})
    assert entry["night"] == night == night_of(mjd, 30.0)
    assert entry["day_obs"] == int(night.replace("-", "")) == day_obs_of(mjd, 30.0)


def test_night_is_the_day_obs_of_the_lsstcam_visit_number():
    """Every simulated visit over three days, at all hours: night == visit id // 10⁵."""
    survey = SurveyConfig(start_mjd=61000.05, cadence_days=0.07, exposure_time=30.0)
    seen = set()
    for k in range(45):
        number = survey.visit_number(k)
        visit = make_visit(visit=number, mjd=survey.visit_mjd(k))
        entry = visit_entry(visit, [], {}, {})
        assert entry["day_obs"] == number // SEQ_NUM_RADIX, (k, survey.visit_mjd(k))
        seen.add(entry["night"])
    assert seen == {"2025-11-20", "2025-11-21", "2025-11-22", "2025-11-23"}


def test_read_night_finds_a_visit_after_utc_midnight_under_its_day_obs(tmp_path, capsys):
    location = str(tmp_path / "alerts")
    visit = make_visit(visit=2025112000042, mjd=61000.2)  # 04:48 UTC on 2025-11-21
    write_visit_manifest(location, visit_entry(visit, [], {}, {}))
    for spelling in ("2025-11-20", "20251120"):
        summary = read_night(location, spelling)
        assert summary["night"] == "2025-11-20"
        assert [v["visit"] for v in summary["visits"]] == [2025112000042]
    assert read_night(location, "2025-11-21")["visits"] == []
    assert cli.main(["night", "20251120", "--store", location]) == 0
    assert '"night": "2025-11-20"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("night", "match"),
    [
        ("tonight", "YYYY-MM-DD or YYYYMMDD"),
        ("2025-1120", "YYYY-MM-DD or YYYYMMDD"),
        ("2025-13-01", "month must be in 1..12"),
    ],
    ids=["not-a-date", "mixed-spelling", "no-such-month"],
)
def test_read_night_rejects_what_is_not_a_day_obs(tmp_path, night, match):
    with pytest.raises(InputError, match=match):
        read_night(str(tmp_path), night)


def test_a_non_finite_visit_time_names_the_value():
    with pytest.raises(InputError, match="midpointMjdTai nan"):
        day_obs_of(float("nan"))
    assert dt.date.fromisoformat(night_of(61000.0)) == dt.date(2025, 11, 20)


def test_replay_night_names_its_night_one_way_however_spelled(tmp_path, capsys):
    from alerts.kafka import KafkaConfig
    from alerts.stream import replay_night

    config = KafkaConfig(servers="127.0.0.1:9", topic="alerts-test")
    assert replay_night("20010101", str(tmp_path), config) == 1
    assert "night 2001-01-01: no alerts" in capsys.readouterr().err
