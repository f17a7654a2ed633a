"""The next-visit message: round trip, and an error naming the field for each bad input."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest

from core.errors import InputError
from core.nextvisit import SCHEMA_VERSION, NextVisit, parse_next_visit, parse_utc

GOOD = {
    "schema_version": 1,
    "visit": 2026120200123,
    "band": "r",
    "boresightRa": 359.9,
    "boresightDec": -30.0,
    "rotAngle": 12.5,
    "detectors": [90, 94],
    "shutter_close_utc": "2026-12-02T03:14:15.5Z",
    "issued_utc": "2026-12-02T03:13:45.5+00:00",
    "detector_corners": {
        "94": [[359.95, -30.1], [0.05, -30.1], [0.05, -29.9], [359.95, -29.9]],
    },
}


def _with(**changes):
    d = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return d


_DROP = object()


def test_round_trip_through_json_bytes():
    m = parse_next_visit(json.dumps(GOOD).encode(), "x.json")
    assert m.visit == 2026120200123 and m.band == "r" and m.detectors == (90, 94)
    assert m.shutter_close == datetime(2026, 12, 2, 3, 14, 15, 500000, tzinfo=UTC)
    assert (m.shutter_close - m.issued).total_seconds() == 30.0
    ra, dec = m.corners(94)
    np.testing.assert_allclose(ra, [359.95, 0.05, 0.05, 359.95])
    np.testing.assert_allclose(dec, [-30.1, -30.1, -29.9, -29.9])
    assert m.corners(90) is None, "no corners given for detector 90"
    again = parse_next_visit(m.to_json_bytes())
    assert again == m
    assert json.loads(m.to_json_bytes())["shutter_close_utc"] == "2026-12-02T03:14:15.500000Z"


def test_minimal_message_without_optional_fields():
    m = parse_next_visit(_with(issued_utc=_DROP, detector_corners=_DROP))
    assert m.issued is None and m.detector_corners == {}
    assert set(m.to_json_dict()) == set(GOOD) - {"issued_utc", "detector_corners"}


def test_offset_times_are_converted_to_utc():
    assert parse_utc("2026-12-02T00:30:00-03:00") == datetime(2026, 12, 2, 3, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"band": _DROP}, r"missing field\(s\) band"),
        ({"colour": "red"}, r"unknown field\(s\) colour"),
        ({"schema_version": SCHEMA_VERSION + 1}, "schema_version 2 is newer"),
        ({"schema_version": "1"}, "'schema_version' must be an integer"),
        ({"visit": -1}, "'visit' must be an integer >= 0, got -1"),
        ({"visit": True}, "'visit' must be an integer"),
        ({"band": "R"}, "'band' must be one of ugrizy, got 'R'"),
        ({"boresightRa": 360.0}, r"'boresightRa' must be in \[0, 360\), got 360.0"),
        ({"boresightDec": 91}, r"'boresightDec' must be in \[-90, 90\]"),
        ({"rotAngle": "east"}, "'rotAngle' must be a number, got 'east'"),
        ({"rotAngle": float("nan")}, "'rotAngle' must be finite"),
        ({"detectors": []}, "'detectors' must be a non-empty list"),
        ({"detectors": [1, 1]}, "'detectors' has duplicates"),
        (
            {"shutter_close_utc": "2026-12-02T03:14:15"},
            "'shutter_close_utc' must carry a UTC offset",
        ),
        ({"shutter_close_utc": "tonight"}, "'shutter_close_utc' is not an ISO-8601 time"),
        ({"issued_utc": "2026-12-02T03:15:00Z"}, "'issued_utc' .* is after shutter_close_utc"),
        (
            {"detector_corners": {"95": GOOD["detector_corners"]["94"]}},
            "detector '95', which is not",
        ),
        (
            {"detector_corners": {"94": [[1, 2], [3, 4], [5, 6]]}},
            r"detector_corners\[94\] must be four",
        ),
        (
            {"detector_corners": {"94": [[1, 2]] * 3 + [[1, 95]]}},
            r"detector_corners\[94\] has a dec",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
def test_bad_field_is_named(changes, match):
    with pytest.raises(InputError, match=match) as info:
        parse_next_visit(_with(**changes), "next-visit.json")
    assert str(info.value).startswith("next-visit.json: ")


@pytest.mark.parametrize(
    ("raw", "match"), [(b"{", "not valid JSON"), (b"[]", "expected a JSON object, got list")]
)
def test_not_an_object(raw, match):
    with pytest.raises(InputError, match=match):
        parse_next_visit(raw)


def test_dataclass_defaults_to_the_current_schema():
    m = NextVisit(1, "g", 10.0, 0.0, 0.0, (1,), datetime(2026, 1, 1, tzinfo=UTC))
    assert m.to_json_dict()["schema_version"] == SCHEMA_VERSION
