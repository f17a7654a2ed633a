"""Fast column reads from pandas DataFrames for the science stages.

The stages read some seventy columns per detector. ``df[name].to_numpy()``
builds a Series (and, with pandas 3's arrow-backed ``str`` column index, a
sliced index) for every read: about 20 µs each, a millisecond per detector.
:func:`column_values` goes to the frame's block manager instead (≈ 1.3 µs):
the column's position from the column index, then its array. It uses
``DataFrame._mgr.iget_values``, private pandas API present since pandas 1.x;
where it is missing (or the name is duplicated) the public path is taken, with
the same result (tests run with pandas 3.1 and 2.2.3).

:func:`take_rows` selects rows block by block (one numpy fancy index per
numpy block; per nullable column, one on its data and one on its mask, which
``_simple_new`` wraps without re-checking them; ``ExtensionArray.take`` for
other extension columns) and makes each block with its own class:
``iloc`` + ``reset_index`` + a column assignment cost ≈ 0.7 ms on the
49-block ``DiaSource`` frame, this ≈ 0.13 ms, nearly all of it the ~2.5 µs
of Python objects (array, block) per block. Where the block layout is not the
plain one (or pandas is older) it takes the public path. :func:`frame_from_blocks` is
:func:`pandas.api.internals.create_dataframe_from_blocks` (pandas ≥ 2.3)
without its per-block verification, through the private block constructors
where they exist.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pandas.api.extensions import ExtensionArray
from pandas.api.extensions import no_default as _NO_DEFAULT

from core.errors import InputError

try:  # private: the base of pandas' nullable integer, float and boolean arrays
    from pandas.core.arrays.masked import BaseMaskedArray as _Masked
except ImportError:  # pragma: no cover - a pandas with another layout
    _Masked = None

__all__ = ["column_to_numpy", "column_values", "frame_from_blocks", "take_rows"]


def _public_values(df: pd.DataFrame, name: str) -> np.ndarray | ExtensionArray:
    col = df[name]
    if isinstance(col, pd.DataFrame):
        raise InputError(f"column {name!r} appears {col.shape[1]} times")
    return col.to_numpy() if isinstance(col.dtype, np.dtype) else col.array


def column_values(df: pd.DataFrame, name: str) -> np.ndarray | ExtensionArray:
    """The values of column ``name`` of ``df``, without building a Series.

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
    loc = df.columns.get_loc(name)
    if type(loc) is not int:  # duplicated name: a slice or mask
        return _public_values(df, name)
    try:
        values = df._mgr.iget_values(loc)
    except AttributeError:  # a pandas without BlockManager.iget_values
        return _public_values(df, name)
    if isinstance(values, np.ndarray):
        values = values.view()
        values.flags.writeable = False
    return values


def column_to_numpy(df: pd.DataFrame, name: str, dtype=None, na_value=_NO_DEFAULT) -> np.ndarray:
    """``df[name].to_numpy(dtype, na_value=na_value)``, read through :func:`column_values`.

    Raises
    ------
    KeyError
        ``df`` has no column ``name``.
    """
    values = column_values(df, name)
    if isinstance(values, np.ndarray):
        if na_value is _NO_DEFAULT or values.dtype.kind in "iub":  # no nulls to fill
            return np.asarray(values, dtype=dtype)
        return df[name].to_numpy(dtype=dtype, na_value=na_value)
    if (
        _Masked is not None
        and isinstance(values, _Masked)
        and dtype is not None
        and na_value is not _NO_DEFAULT
        and na_value is not pd.NA
        and values._data.dtype.kind in "biu"  # a cast that cannot warn
    ):
        # what BaseMaskedArray.to_numpy does, without its warning filters (~15 µs)
        mask = values._mask
        if not mask.any():  # no copy where none is needed (a read-only view then)
            data = values._data.astype(dtype, copy=False)
            if data is values._data:
                data = data.view()
                data.flags.writeable = False
            return data
        data = values._data.astype(dtype)
        data[mask] = na_value
        return data
    return values.to_numpy(dtype=dtype, na_value=na_value)


try:  # pandas >= 2.3
    from pandas.api.internals import create_dataframe_from_blocks as _from_blocks
except ImportError:  # pragma: no cover - older pandas
    _from_blocks = None
try:  # private pandas API (1.x to 3.x): frame_from_blocks' fast path
    from pandas._libs.internals import BlockPlacement as _Placement
    from pandas.core.internals import BlockManager as _Manager
    from pandas.core.internals.blocks import ExtensionBlock as _ExtensionBlock
    from pandas.core.internals.blocks import NumpyBlock as _NumpyBlock
    from pandas.core.internals.blocks import new_block as _new_block

    _FAST_BLOCKS = hasattr(pd.DataFrame, "_from_mgr")
except ImportError:  # pragma: no cover - a pandas with another layout
    _FAST_BLOCKS = False
#: private: build a masked array without re-validating its two arrays (~0.5 µs, not ~2 µs)
_SIMPLE_MASKED = _Masked is not None and hasattr(_Masked, "_simple_new")


def masked_array(cls: type, data: np.ndarray, mask: np.ndarray) -> ExtensionArray:
    """``cls(data, mask)`` for a pandas masked array class, without its checks.

    ``data`` (1-D, of ``cls``' numpy dtype) and ``mask`` (bool, same shape)
    are taken as they are: the caller guarantees both. The public constructor
    where pandas has no ``_simple_new``.
    """
    if _SIMPLE_MASKED:
        return cls._simple_new(data, mask)
    return cls(data, mask)  # pragma: no cover - a pandas without _simple_new


def _positions(locs) -> np.ndarray:
    """Column positions as an intp array (from an array, a slice or a block placement)."""
    if isinstance(locs, slice):
        return np.arange(locs.start, locs.stop, dtype=np.intp)
    return np.asarray(getattr(locs, "as_array", locs), dtype=np.intp)


def _block(values, locs):
    """One pandas block of ``values`` at ``locs``; None where the fast path does not apply."""
    if not isinstance(locs, _Placement):
        locs = _Placement(locs)
    if _Masked is not None and isinstance(values, _Masked):  # always 1-D
        return _ExtensionBlock(values, locs, ndim=2)
    if type(values) is np.ndarray:
        if values.ndim != 2 or values.dtype.kind not in "biufO":
            return None
        return _NumpyBlock(values, locs, ndim=2)
    if values.ndim != 1:
        return None
    return _new_block(values, locs, ndim=2)


def frame_from_blocks(
    blocks: list[tuple[np.ndarray | ExtensionArray, np.ndarray | slice]],
    index: pd.Index,
    columns: pd.Index,
) -> pd.DataFrame | None:
    """A DataFrame made of ``blocks`` without copying; None for pandas < 2.3.

    Parameters
    ----------
    blocks : list of (values, positions)
        Each: a 2-D numpy array (one row per column; bool, integer, float or
        object dtype) or a 1-D extension array, and the positions of its
        columns in ``columns`` (intp array, a slice with a start and a stop, or
        a block's placement). Every position once. The frame takes ownership
        of the arrays.
    index, columns : pandas.Index
        Row and column labels.

    Returns
    -------
    pandas.DataFrame or None
        What :func:`pandas.api.internals.create_dataframe_from_blocks` makes.
        Its block-by-block checks (about half its time) are replaced by one
        pass over the arrays here, and the blocks are made with their classes
        (a masked array is an ``ExtensionBlock``, a numpy array a
        ``NumpyBlock``) instead of being looked up per dtype.

    Raises
    ------
    ValueError
        A block's length differs from the index, or the positions do not
        cover the columns.
    """
    n = len(index)
    total = 0
    made = [] if _FAST_BLOCKS else None  # the blocks, while the fast path applies
    for values, locs in blocks:
        length = values.shape[-1]
        if length != n:
            raise ValueError(f"a block of {length} rows for an index of {n}")
        total += locs.stop - locs.start if type(locs) is slice else len(locs)
        if made is not None:
            block = _block(values, locs)
            if block is None:
                made = None
            else:
                made.append(block)
    if total != len(columns):
        raise ValueError(f"blocks hold {total} columns, the frame {len(columns)}")
    if made is not None:
        return _manager_frame(made, index, columns)
    if _from_blocks is None:  # pragma: no cover - older pandas
        return None
    return _from_blocks([(v, _positions(locs)) for v, locs in blocks], index=index, columns=columns)


def _manager_frame(blocks: list, index: pd.Index, columns: pd.Index) -> pd.DataFrame:
    mgr = _Manager(tuple(blocks), [columns, index], verify_integrity=False)
    return pd.DataFrame._from_mgr(mgr, axes=mgr.axes)


def _public_take(df: pd.DataFrame, rows: np.ndarray, replace: dict) -> pd.DataFrame:
    out = df.iloc[rows].reset_index(drop=True)
    for name, values in replace.items():
        out[name] = values
    return out


def _taken(values, rows: np.ndarray, every_row: bool):
    """The rows ``rows`` of a block's values (2-D numpy or 1-D extension), as a new array."""
    if isinstance(values, np.ndarray):
        return values.copy() if every_row else values[:, rows]
    if _SIMPLE_MASKED and isinstance(values, _Masked):  # as .take / .copy, without their checks
        data, mask = values._data, values._mask
        if every_row:
            return type(values)._simple_new(data.copy(), mask.copy())
        return type(values)._simple_new(data[rows], mask[rows])
    return values.copy() if every_row else values.take(rows)


def _block_take(df: pd.DataFrame, rows: np.ndarray, replace: dict) -> pd.DataFrame | None:
    """The fast path of :func:`take_rows`; None where the frame's layout does not allow it."""
    if not _FAST_BLOCKS or any(name not in df.columns for name in replace):
        return None
    new = {df.columns.get_loc(name): values for name, values in replace.items()}
    if any(type(loc) is not int for loc in new):
        return None
    try:
        layout = df._mgr.blocks
    except AttributeError:  # not a BlockManager of this pandas
        return None
    every_row = rows.size == len(df) and (rows.size == 0 or (rows == np.arange(rows.size)).all())
    blocks = []
    for blk in layout:
        values = blk.values
        if values.ndim == 2 and not isinstance(values, np.ndarray):
            return None  # 2-D extension blocks (datetimes), ...
        locs = blk.mgr_locs
        if new and len(locs) == 1 and int(locs.as_array[0]) in new:
            repl = new.pop(int(locs.as_array[0]))
            if len(repl) != rows.size:
                return None
            made = _block(repl.reshape(1, -1) if isinstance(repl, np.ndarray) else repl, locs)
            if made is None:
                return None
        else:  # Block.make_block_same_class without its call
            made = type(blk)(_taken(values, rows, every_row), placement=locs, ndim=2)
        blocks.append(made)
    if new:  # a replaced column shares a block with others
        return None
    return _manager_frame(blocks, pd.RangeIndex(rows.size), df.columns).__finalize__(df)


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
    replace = replace or {}
    out = _block_take(df, rows, replace)
    return _public_take(df, rows, replace) if out is None else out
