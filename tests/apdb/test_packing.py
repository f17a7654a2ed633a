"""The packed payloads: the block-assembled frame equals the column-by-column one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apdb import sdm
from apdb.sql import FAST_UNPACK, _Columns, _Packing
from tests.apdb.conftest import make_forced, make_objects, make_sources


def _frames(n: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(5)
    ids = np.arange(1, n + 1, dtype=np.int64)
    ra, dec = rng.uniform(0, 360, n), rng.uniform(-90, 90, n)
    nulls = [1, None, 3] * n
    return {
        "DiaObject": make_objects(
            ids,
            ra,
            dec,
            r_psfFluxMean=np.where(rng.random(n) < 0.3, np.nan, 1.0),
            validityStartMjdTai=np.full(n, 60100.0),
        ),
        "DiaSource": make_sources(
            ids + 100,
            ids,
            ra,
            dec,
            visit=4,
            detector=2,
            mjd=60100.0,
            ssObjectId=pd.array(nulls[:n], dtype="Int64"),
            isNegative=pd.array([True, None, False] * n, dtype="boolean")[:n],
            pixelFlags_bad=rng.random(n) < 0.5,
            reliabilityVersion=np.array(["v1", None, "ü\t"] * n, dtype=object)[:n],
            band=np.array(list("ugrizy") * n, dtype=object)[:n],
        ),
        "DiaForcedSource": make_forced(
            ids + 900, ids, ra, dec, visit=4, detector=2, mjd=60100.0, seed=3
        ),
    }


def test_installed_pandas_takes_the_block_path():
    assert FAST_UNPACK


@pytest.mark.parametrize("n", [1, 2, 50], ids=["one", "two", "fifty"])
@pytest.mark.parametrize("table", ["DiaObject", "DiaSource", "DiaForcedSource"])
def test_block_frame_equals_column_frame_and_the_input(table, n):
    frame = _frames(n)[table]
    packing = _Packing(table)
    cols = _Columns(frame, table)
    buf = b"".join(packing.pack(cols.arrays, cols.n))
    text = {name: list(cols.arrays[name]) for name in packing.text}
    fast = packing.unpack(buf, n, text)
    slow = packing.unpack_by_column(buf, n, text)
    pd.testing.assert_frame_equal(fast, slow, check_exact=True)
    pd.testing.assert_frame_equal(fast, sdm.conform(frame, table), check_exact=True)
    assert list(fast.columns) == list(sdm.dtypes(table))
    # the frame owns its data: a write to one column changes nothing else
    first = fast.columns[fast.dtypes == "float64"][0]
    fast.loc[0, first] = -1.0
    pd.testing.assert_frame_equal(fast.drop(columns=first), slow.drop(columns=first))
