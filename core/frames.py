"""Column reads, row selection and frame assembly for the science stages' pandas frames.

Public pandas API only, but for the column read below (checked at import
against the public read, so a pandas release can slow it down but not change
what it returns). Each function pins down one behaviour the stages rely on,
which the public one-liners leave implicit:

- :func:`column_values` gives the column's array without a copy: a read-only
  numpy view for numpy dtypes (as under copy-on-write, on every pandas
  version), the frame's own extension array for nullable dtypes; a duplicated
  name is an :class:`~core.errors.InputError`, not a DataFrame.
- :func:`column_to_numpy` converts with ``na_value`` applied to numpy and
  nullable columns alike.
- :func:`take_rows` selects rows into a new frame with a fresh ``RangeIndex``
  that shares no data with its input, some columns replaced.
- :func:`frame_from_columns` assembles a frame from arrays without copying
  them and without pandas' value inference (object columns stay ``object``).

On the stages' frames (103-column ``DiaSource``, one pandas block per column,
43 of them nullable) a public column read (``df[name]``) costs ~17 µs, most of
it building the ``Series`` that is thrown away at once; the stages and alert
packaging read ~200,000 columns in a 189-detector visit. :func:`column_values`
therefore takes the one private path this project allows: it reads the
column's array from pandas' block manager (``df._mgr.iget_values``, ~1 µs),
and falls back to the public read when a pandas release lacks it or hands
back something else (:data:`FAST_COLUMN_READS` says which path is taken;
``tests/core/test_frames.py`` checks it is the fast one on the installed pandas).
The measured gain is in ``bench/RESULTS.md`` (section "visit").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pandas.api.extensions import ExtensionArray
from pandas.api.extensions import no_default as _NO_DEFAULT

from core.errors import InputError

__all__ = [
    "FAST_COLUMN_READS",
    "column_to_numpy",
    "column_values",
    "frame_from_columns",
    "take_rows",
]


def _public_column(df: pd.DataFrame, name: str) -> np.ndarray | ExtensionArray:
    col = df[name]
    if isinstance(col, pd.DataFrame):
        raise InputError(f"column {name!r} appears {col.shape[1]} times")
    if not isinstance(col.dtype, np.dtype):
        return col.array
    values = col.to_numpy(copy=False).view()
    values.flags.writeable = False
    return values


def _probe_fast_reads() -> bool:
    """Whether the block-manager read gives what the public read gives, on this pandas."""
    probe = pd.DataFrame(
        {
            "f": np.arange(3, dtype=np.float64),
            "i": pd.array([1, None, 3], dtype="Int64"),
            "o": np.array(["a", None, "c"], dtype=object),
        }
    )
    try:
        get = probe._mgr.iget_values
        for loc, name in enumerate(probe.columns):
            fast, public = get(loc), _public_column(probe, name)
            if type(fast) is not type(public) or fast.dtype != public.dtype:
                return False
            if not pd.Series(fast, copy=False).equals(pd.Series(public, copy=False)):
                return False
            if isinstance(fast, np.ndarray) and not np.shares_memory(fast, public):
                return False
    except Exception:  # any change of pandas' internals: the public path
        return False
    return True


#: True when :func:`column_values` reads through pandas' block manager.
FAST_COLUMN_READS: bool = _probe_fast_reads()


def column_values(df: pd.DataFrame, name: str) -> np.ndarray | ExtensionArray:
    """The values of column ``name`` of ``df``, without a copy.

    Parameters
    ----------
    df : pandas.DataFrame
        Any frame; not modified.
    name : str
        Column name.

    Returns
    -------
    numpy.ndarray or pandas.api.extensions.ExtensionArray
        A read-only view of the column's numpy array for numpy dtypes (as
        ``df[name].to_numpy()`` gives under copy-on-write), the frame's own
        extension array otherwise (as ``df[name].array``; callers must not
        modify it).

    Raises
    ------
    KeyError
        ``df`` has no column ``name``.
    InputError
        The name is duplicated.
    """
    if not FAST_COLUMN_READS:
        return _public_column(df, name)
    loc = df.columns.get_loc(name)  # KeyError for a missing column
    if not isinstance(loc, int):
        return _public_column(df, name)  # duplicated name: the public read raises
    values = df._mgr.iget_values(loc)
    if isinstance(values, np.ndarray):
        values = values.view()
        values.flags.writeable = False
    return values


def column_to_numpy(df: pd.DataFrame, name: str, dtype=None, na_value=_NO_DEFAULT) -> np.ndarray:
    """``df[name].to_numpy(dtype, na_value=na_value)``, read through :func:`column_values`.

    For a numpy column that needs no conversion and no fill the result is a
    read-only view of the column; otherwise a new array.

    Raises
    ------
    KeyError
        ``df`` has no column ``name``.
    InputError
        The name is duplicated.
    """
    values = column_values(df, name)
    if isinstance(values, np.ndarray):
        if na_value is _NO_DEFAULT or values.dtype.kind in "iub":  # no nulls to fill
            return np.asarray(values, dtype=dtype)
        return df[name].to_numpy(dtype=dtype, na_value=na_value)
    # an extension array may hand out its own buffer (a nullable column without
    # nulls): a copy, so that writing to the result cannot change the frame
    return values.to_numpy(dtype=dtype, na_value=na_value, copy=True)


def take_rows(df: pd.DataFrame, rows: np.ndarray, replace: dict | None = None) -> pd.DataFrame:
    """``df.iloc[rows]`` with a fresh RangeIndex, some columns replaced, as one new frame.

    Parameters
    ----------
    df : pandas.DataFrame
        Not modified; the result shares no data with it.
    rows : numpy.ndarray
        Integer row positions (non-negative).
    replace : dict, optional
        Column name → new values (numpy or extension array of ``rows.size``),
        as ``out[name] = values`` after the selection (a name ``df`` lacks is
        appended).

    Returns
    -------
    pandas.DataFrame
        Equal to ``df.iloc[rows].reset_index(drop=True)`` with the columns
        assigned.
    """
    rows = np.asarray(rows, dtype=np.intp)
    out = df.take(rows)
    out.index = pd.RangeIndex(rows.size)
    for name, values in (replace or {}).items():
        out[name] = values
    return out


def frame_from_columns(
    columns: dict[str, np.ndarray | ExtensionArray], index: pd.Index | None = None
) -> pd.DataFrame:
    """A DataFrame of ``columns`` (in their order) that takes the arrays as they are.

    Parameters
    ----------
    columns : dict
        Column name → 1-D numpy array or extension array, all of one length.
        The frame takes ownership: the caller must not modify them afterwards.
        An ``object`` numpy array stays ``object`` (pandas would infer ``str``
        for text).
    index : pandas.Index, optional
        Row labels; a ``RangeIndex`` by default.

    Returns
    -------
    pandas.DataFrame
        One column per entry, of the array's dtype, sharing its memory.

    Raises
    ------
    ValueError
        The arrays' lengths differ from each other or from ``index``.
    """
    n = len(index) if index is not None else len(next(iter(columns.values()), ()))
    if index is None:
        index = pd.RangeIndex(n)
    data = {}
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} rows, the frame {n}")
        if isinstance(values, np.ndarray) and values.dtype == object:
            values = pd.Series(values, index=index, dtype=object, copy=False)
        data[name] = values
    return pd.DataFrame(data, index=index, copy=False)
