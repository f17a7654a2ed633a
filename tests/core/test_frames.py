"""Fast column reads: the same values as the public pandas path, read-only, with a fallback."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pandas.core.internals import BlockManager

from core.errors import InputError
from core.frames import column_to_numpy, column_values, frame_from_blocks, take_rows


def mixed_frame() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame(
        {
            "f64": rng.normal(size=5),
            "f32": rng.normal(size=5).astype(np.float32),
            "i16": np.arange(5, dtype=np.int16),
            "nullable": pd.array([1, None, 3, None, 5], dtype="Int64"),
            "full": pd.array([1, 2, 3, 4, 5], dtype="Int64"),
            "flag": pd.array([True, None, False, True, None], dtype="boolean"),
            "band": np.array(["g", "r", None, "i", "z"], dtype=object),
            "text": pd.array(["a", "b", None, "d", "e"], dtype="str"),
        }
    )


NAMES = ["f64", "f32", "i16", "nullable", "full", "flag", "band", "text"]


def public(df: pd.DataFrame, name: str):
    col = df[name]
    return col.to_numpy() if isinstance(col.dtype, np.dtype) else col.array


@pytest.mark.parametrize("name", NAMES)
def test_values_equal_the_public_path(name):
    df = mixed_frame()
    got, want = column_values(df, name), public(df, name)
    assert type(got) is type(want) and got.dtype == want.dtype
    pd.testing.assert_series_equal(pd.Series(got), pd.Series(want), check_exact=True)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("i16", {"dtype": np.int64}),
        ("f32", {}),
        ("f64", {"dtype": np.float64, "na_value": 0.0}),
        ("nullable", {"dtype": np.int64, "na_value": -1}),
        ("nullable", {"dtype": np.float64, "na_value": np.nan}),
        ("full", {"dtype": np.int64, "na_value": -1}),
        ("flag", {"dtype": bool, "na_value": False}),
    ],
    ids=[
        "int-widen",
        "float",
        "float-na",
        "Int64-na",
        "Int64-float",
        "Int64-no-null",
        "boolean-na",
    ],
)
def test_to_numpy_equals_series_to_numpy(name, kwargs):
    df = mixed_frame()
    before = df.copy()
    got, want = column_to_numpy(df, name, **kwargs), df[name].to_numpy(**kwargs)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    if got.flags.writeable:  # a copy: writing to it leaves the frame alone
        got[:] = 0
    pd.testing.assert_frame_equal(df, before)


def test_numpy_values_are_read_only_views():
    df = mixed_frame()
    before = df.copy()
    values = column_values(df, "f64")
    with pytest.raises(ValueError, match="read-only"):
        values[0] = 99.0
    pd.testing.assert_frame_equal(df, before)


def test_missing_and_duplicated_columns():
    with pytest.raises(KeyError):
        column_values(mixed_frame(), "nope")
    dup = pd.DataFrame(np.ones((2, 3)), columns=["a", "a", "b"])
    with pytest.raises(InputError, match="'a' appears 2 times"):
        column_values(dup, "a")
    np.testing.assert_array_equal(column_values(dup, "b"), [1.0, 1.0])


@pytest.mark.parametrize("name", NAMES)
def test_fallback_without_the_private_accessor(monkeypatch, name):
    """Where pandas lacks ``BlockManager.iget_values``, the public path gives the same."""
    df = mixed_frame()
    want = column_values(df, name)
    monkeypatch.delattr(BlockManager, "iget_values")
    got = column_values(df, name)
    assert type(got) is type(want)
    pd.testing.assert_series_equal(pd.Series(got), pd.Series(want), check_exact=True)


@pytest.mark.parametrize(
    "rows",
    [
        np.array([], dtype=np.int64),
        np.array([0, 1, 2, 3, 4]),
        np.array([4, 0, 2]),
        np.array([1, 1]),
    ],
    ids=["empty", "all", "shuffled", "repeated"],
)
def test_take_rows_equals_iloc_and_owns_its_data(rows):
    df = mixed_frame()
    df.index = pd.RangeIndex(10, 15)
    before = df.copy()
    ids = pd.array(np.arange(rows.size), dtype="Int64")
    got = take_rows(df, rows, {"nullable": ids})
    want = df.iloc[rows].reset_index(drop=True)
    want["nullable"] = ids
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    if rows.size:
        got.loc[0, "f64"] = 99.0
        got.loc[0, "nullable"] = 99
    pd.testing.assert_frame_equal(df, before)


@pytest.mark.parametrize(
    "replace",
    [
        {"new": np.arange(2)},  # appended
        {"f64": pd.array([1, 2], dtype="Int64")},  # in a 2-D numpy block: changes dtype
        {"when": np.array(["2020-01-01", "2021-01-01"], dtype="datetime64[ns]")},
    ],
    ids=["new-column", "shared-block", "datetime-block"],
)
def test_take_rows_public_path_cases(replace):
    df = mixed_frame().assign(when=pd.Timestamp("2019-01-01"))
    rows = np.array([3, 1])
    want = df.iloc[rows].reset_index(drop=True)
    for name, values in replace.items():
        want[name] = values
    pd.testing.assert_frame_equal(take_rows(df, rows, replace), want, check_exact=True)


def frame_blocks():
    n = 4
    return [
        (np.arange(2 * n, dtype=np.float64).reshape(2, n), np.array([0, 3], dtype=np.intp)),
        (np.array([["a", "b", None, "d"]], dtype=object), np.array([1], dtype=np.intp)),
        (pd.array([1, None, 3, 4], dtype="Int64"), np.array([2], dtype=np.intp)),
    ]


@pytest.mark.parametrize("fast", [True, False], ids=["private-constructors", "public-api"])
def test_frame_from_blocks_equals_pandas(monkeypatch, fast):
    import core.frames

    monkeypatch.setattr(core.frames, "_FAST_BLOCKS", fast and core.frames._FAST_BLOCKS)
    columns, index = pd.Index(["a", "b", "c", "d"]), pd.RangeIndex(4)
    got = frame_from_blocks(frame_blocks(), index, columns)
    if got is None:  # pandas < 2.3 without the private constructors: the caller's public path
        assert not fast and core.frames._from_blocks is None
        return
    want = pd.DataFrame(
        {
            "a": np.arange(4, dtype=np.float64),
            "b": pd.Series(["a", "b", None, "d"], dtype=object),
            "c": pd.array([1, None, 3, 4], dtype="Int64"),
            "d": np.arange(4, 8, dtype=np.float64),
        },
        index=index,
        columns=columns,
    )
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    got.loc[0, "a"] = -1.0  # owns its arrays, and they are writable
    assert got.loc[0, "a"] == -1.0


def test_frame_from_blocks_checks_lengths_and_positions():
    columns = pd.Index(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="a block of 4 rows for an index of 5"):
        frame_from_blocks(frame_blocks(), pd.RangeIndex(5), columns)
    with pytest.raises(ValueError, match="blocks hold 4 columns, the frame 5"):
        frame_from_blocks(frame_blocks(), pd.RangeIndex(4), pd.Index([*columns, "e"]))


@pytest.mark.parametrize("simple", [True, False], ids=["simple-new", "public-take"])
def test_take_rows_masked_columns_both_paths(monkeypatch, simple):
    """Masked columns taken with ``_simple_new`` or with ``ExtensionArray.take``: the same."""
    import core.frames

    monkeypatch.setattr(core.frames, "_SIMPLE_MASKED", simple and core.frames._SIMPLE_MASKED)
    df = mixed_frame()
    for rows in (np.array([4, 0, 2]), np.arange(5), np.array([], dtype=np.intp)):
        got = take_rows(df, rows)
        pd.testing.assert_frame_equal(got, df.iloc[rows].reset_index(drop=True), check_exact=True)
        for name in ("nullable", "flag"):
            assert not np.shares_memory(got[name].array._data, df[name].array._data)
