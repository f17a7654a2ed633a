"""The packed payloads: pack then unpack gives the SDM frame of the input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apdb import sdm
from apdb.sql import _Columns, _Packing
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


@pytest.mark.parametrize("n", [1, 2, 50], ids=["one", "two", "fifty"])
@pytest.mark.parametrize("table", ["DiaObject", "DiaSource", "DiaForcedSource"])
def test_unpack_gives_the_input_conformed(table, n):
    frame = _frames(n)[table]
    packing = _Packing(table)
    cols = _Columns(frame, table)
    buf = b"".join(packing.pack(cols.arrays, cols.n))
    text = {name: list(cols.arrays[name]) for name in packing.text}
    got = packing.unpack(buf, n, text)
    pd.testing.assert_frame_equal(got, sdm.conform(frame, table), check_exact=True)
    assert list(got.columns) == list(sdm.dtypes(table))


@pytest.mark.parametrize("table", ["DiaObject", "DiaSource", "DiaForcedSource"])
def test_unpacked_frames_own_their_values(table):
    """A loaded frame is the stages' to modify: no column is a read-only view of the payload."""
    frame = _frames(20)[table]
    packing = _Packing(table)
    cols = _Columns(frame, table)
    buf = b"".join(packing.pack(cols.arrays, cols.n))
    text = {name: list(cols.arrays[name]) for name in packing.text}
    got = packing.unpack(buf, 20, text)
    raw = np.frombuffer(buf, dtype=np.uint8)
    for name in got.columns:
        values = got[name].to_numpy()
        if values.dtype == object:
            continue
        assert not np.shares_memory(values, raw), name
    numeric = [c for c in got.columns if got[c].dtype.kind == "f"]
    got.loc[0, numeric[0]] = -1.0  # writable, and the buffer unchanged
    again = packing.unpack(buf, 20, text)
    assert again.loc[0, numeric[0]] != -1.0
