"""docs/design.md §3 IDs: deterministic, unique, round-trippable, never wrapping."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import IdOverflowError
from core.ids import IdConfig, IdPacker

PACKER = IdPacker(IdConfig(visit_packing="linear"))
LSSTCAM = IdPacker()  # the default


def lsstcam_visit(date: dt.date, seq_num: int) -> int:
    return int(date.strftime("%Y%m%d")) * 100_000 + seq_num


#: LSSTCam visit ids day_obs·10⁵ + seq_num up to the end of 2040, and plain numbers < 10⁵
LSSTCAM_VISITS = st.one_of(
    st.builds(
        lsstcam_visit, st.dates(dt.date(2010, 1, 1), dt.date(2040, 12, 31)), st.integers(0, 99_999)
    ),
    st.integers(0, 99_999),
)


@given(
    visit=LSSTCAM_VISITS,
    detector=st.integers(0, 188),
    rows=st.lists(st.integers(0, LSSTCAM.max_row), min_size=1, max_size=50, unique=True),
)
def test_lsstcam_visit_ids_round_trip(visit, detector, rows):
    ids = LSSTCAM.pack(visit, detector, rows)
    assert ids.dtype == np.int64 and (ids >= 0).all()
    v, d, r = LSSTCAM.unpack(ids)
    assert (v == visit).all() and (d == detector).all()
    assert r.tolist() == rows


@given(
    a=st.tuples(LSSTCAM_VISITS, st.integers(0, 255)),
    b=st.tuples(LSSTCAM_VISITS, st.integers(0, 255)),
)
def test_lsstcam_distinct_detector_visits_never_collide(a, b):
    if a != b:
        assert int(LSSTCAM.pack(*a, 0)) != int(LSSTCAM.pack(*b, 0))


def test_default_layout_takes_real_lsstcam_ids_with_room_for_a_crowded_detector():
    """A real LSSTCam visit id (from the alerts in tests/data) and detectors 0-188 fit."""
    assert LSSTCAM.config.ccd_exposure_id_bits == 40  # as Rubin's RubinDimensionPacker
    ids = LSSTCAM.pack(2026030500055, 188, [0, 1_000_000])
    assert LSSTCAM.unpack(ids)[0].tolist() == [2026030500055] * 2
    assert LSSTCAM.max_row + 1 >= 2**23  # 8.4 million DiaSources per detector
    last = lsstcam_visit(dt.date(2040, 12, 31), 99_999)
    assert int(LSSTCAM.unpack(LSSTCAM.pack(last, 188, 7))[0]) == last
    assert LSSTCAM.max_visit >= last


@pytest.mark.parametrize(
    ("visit", "match"),
    [
        (2026130500055, "visit 2026130500055: day_obs 20261305 is not a date"),
        (2009123100001, "day_obs 20091231 is before 20100101"),
        (123_456, "day_obs 1 is not a date"),
        (-5, "visit -5 outside"),
        (21500101 * 100_000, "visit 2150010100000 outside 0..21"),
    ],
    ids=["month-13", "before-2010", "not-a-day-obs", "negative", "beyond-the-bits"],
)
def test_lsstcam_visit_errors_name_the_field(visit, match):
    with pytest.raises(IdOverflowError, match=match):
        LSSTCAM.pack(visit, 0, [0])


def test_small_visit_numbers_pack_alike_in_both_layouts():
    """Below 10⁵ (day_obs 0) the LSSTCam layout is the linear one: simulations keep their IDs."""
    lin = IdPacker(IdConfig(visit_packing="linear", ccd_exposure_id_bits=40))
    for visit in (0, 1, 2, 99_999):
        assert int(LSSTCAM.pack(visit, 91, 3)) == int(lin.pack(visit, 91, 3))


@given(
    visit=st.integers(0, PACKER.max_visit),
    detector=st.integers(0, PACKER.config.n_detectors - 1),
    rows=st.lists(st.integers(0, PACKER.max_row), min_size=1, max_size=50, unique=True),
)
def test_round_trip_and_unique(visit, detector, rows):
    ids = PACKER.pack(visit, detector, rows)
    assert ids.dtype == np.int64
    assert (ids >= 0).all(), "IDs are non-negative signed 64-bit"
    assert len(np.unique(ids)) == len(rows)
    v, d, r = PACKER.unpack(ids)
    assert (v == visit).all() and (d == detector).all()
    assert r.tolist() == rows


@given(
    a=st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
    b=st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
    row=st.integers(0, 10**5),
)
def test_distinct_detector_visits_never_collide(a, b, row):
    if a != b:
        assert int(PACKER.pack(*a, row)) != int(PACKER.pack(*b, row))


def test_layout_matches_spec():
    p = IdPacker(IdConfig(visit_packing="linear", ccd_exposure_id_bits=40, n_detectors=200))
    assert p.counter_bits == 23
    ccd = p.ccd_visit_id(1234, 56)
    assert ccd == 1234 * 200 + 56
    assert int(p.pack(1234, 56, 7)) == (ccd << 23) | 7


def test_deterministic():
    for packer, visit in ((PACKER, 2024061200), (LSSTCAM, 2026030500055)):
        a = packer.pack(visit, 94, np.arange(100))
        b = packer.pack(visit, 94, np.arange(100))
        assert (a == b).all()


@pytest.mark.parametrize(
    ("visit", "detector", "rows", "match"),
    [
        (0, 256, [0], "detector 256 outside 0..255"),
        (0, -1, [0], "detector -1 outside"),
        (-1, 0, [0], "visit -1 outside"),
        (PACKER.max_visit + 1, 0, [0], f"visit {PACKER.max_visit + 1} outside"),
        (0, 0, [PACKER.max_row + 1], "row counter outside"),
        (0, 0, [-1], "row counter outside"),
    ],
    ids=[
        "detector-high",
        "detector-negative",
        "visit-negative",
        "visit-overflow",
        "row-overflow",
        "row-negative",
    ],
)
def test_overflow_is_an_error(visit, detector, rows, match):
    with pytest.raises(IdOverflowError, match=match):
        PACKER.pack(visit, detector, rows)


def test_extremes_fit_in_int64():
    ids = PACKER.pack(PACKER.max_visit, PACKER.config.n_detectors - 1, [PACKER.max_row])
    assert int(ids[0]) <= np.iinfo(np.int64).max
    assert PACKER.unpack(ids)[0][0] == PACKER.max_visit


def test_lsstcam_layout_is_rubins_mixed_radix():
    """detector + n_detectors · (seq_num + 10⁵ · (1 + days since 2010-01-01))."""
    day = (dt.date(2026, 3, 5) - dt.date(2010, 1, 1)).days + 1
    ccd = LSSTCAM.ccd_visit_id(2026030500055, 140)
    assert ccd == 140 + 256 * (55 + 100_000 * day)
    assert int(LSSTCAM.pack(2026030500055, 140, 9)) == (ccd << 23) | 9
