"""apdb.sdm.frame: the stages' one-step frame equals conform (columns, order, dtypes, values)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apdb import sdm
from core.errors import InputError


def source_columns(n: int) -> dict:
    rng = np.random.default_rng(11)
    return {
        "diaSourceId": np.arange(n, dtype=np.int64) + 7,
        "visit": np.full(n, 5, dtype=np.int64),
        "detector": np.full(n, 3, dtype=np.int16),
        "band": np.array(["g", "r", None, "i", "z"] * n, dtype=object)[:n],
        "midpointMjdTai": rng.uniform(6e4, 6.1e4, n),
        "ra": rng.uniform(0, 360, n),
        "dec": rng.uniform(-90, 90, n),
        "x": rng.normal(size=n).astype(np.float32),
        "y": rng.normal(size=n),  # float64 into a float32 column
        "psfFlux": rng.normal(size=n),
        "psfFluxErr": rng.normal(size=n),
        "timeProcessedMjdTai": np.full(n, 6e4),
        "psfNdata": np.full(n, 625, dtype=np.int64),  # int64 into int32
        "trailNdata": np.zeros(n, dtype=np.int32),
        "dipoleNdata": np.zeros(n, dtype=np.int32),
        "bboxSize": np.full(n, 25, dtype=np.int32),
        "diaObjectId": pd.array([1, None, 3, 4, 5] * n, dtype="Int64")[:n],
        "parentDiaSourceId": np.arange(n, dtype=np.int32),  # int32 into Int64
        "pixelFlags_bad": rng.random(n) < 0.5,  # numpy bool into boolean
        "isNegative": pd.array([True, None, False, True, None] * n, dtype="boolean")[:n],
    }


@pytest.mark.parametrize("n", [0, 1, 7], ids=["empty", "one", "seven"])
def test_frame_equals_conform(n):
    data = source_columns(n)
    got = sdm.frame(data, "DiaSource", n)
    want = sdm.conform(pd.DataFrame(data), "DiaSource")
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    if n:  # owns its arrays: writing leaves the inputs alone
        got.loc[0, "x"] = 99.0
        got.loc[0, "diaObjectId"] = 99
        assert data["x"][0] != 99.0 and data["diaObjectId"][0] == 1
        got.loc[0, "psfFlux"] = 5.0  # a column of the float64 group, beside ra and dec
        assert got.loc[0, "ra"] == want.loc[0, "ra"] and got.loc[0, "dec"] == want.loc[0, "dec"]


def test_frame_errors():
    data = source_columns(3)
    del data["visit"]
    with pytest.raises(InputError, match="required column 'visit' is missing"):
        sdm.frame(data, "DiaSource", 3)
    data = source_columns(3)
    data["psfNdata"] = np.array([1.0, np.nan, 2.0])
    with pytest.raises(InputError, match=r"DiaSource.psfNdata: column is not nullable but has 1"):
        sdm.frame(data, "DiaSource", 3)
    data = source_columns(3)
    data["ra"] = np.array(["a", "b", "c"], dtype=object)
    with pytest.raises(InputError, match=r"DiaSource.ra: cannot convert to float64"):
        sdm.frame(data, "DiaSource", 3)
    data = source_columns(3)
    data["parentDiaSourceId"] = np.arange(4)
    with pytest.raises(InputError, match=r"parentDiaSourceId: 4 values for 3 rows"):
        sdm.frame(data, "DiaSource", 3)
