"""docs/design.md §3 IDs: deterministic, unique, round-trippable, never wrapping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import IdOverflowError
from core.ids import IdConfig, IdPacker

PACKER = IdPacker()


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
    p = IdPacker(IdConfig(ccd_exposure_id_bits=40, n_detectors=200))
    assert p.counter_bits == 23
    ccd = p.ccd_visit_id(1234, 56)
    assert ccd == 1234 * 200 + 56
    assert int(p.pack(1234, 56, 7)) == (ccd << 23) | 7


def test_deterministic():
    a = PACKER.pack(2024061200, 94, np.arange(100))
    b = PACKER.pack(2024061200, 94, np.arange(100))
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
