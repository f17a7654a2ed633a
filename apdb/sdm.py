"""Rubin's SDM APDB schema (``apdb.yaml`` from ``lsst-sdm-schemas``) as Python.

This is the single source of column names and types for the DiaObject,
DiaSource and DiaForcedSource tables: the SQL tables (:mod:`apdb.sql`), the
calibrated catalogs of the stages and the alert packets all derive from it.

Type mapping (Felis datatype → pandas dtype): ``double`` → float64, ``float``
→ float32, ``long``/``int``/``short`` → int64/int32/int16 (the pandas nullable
``Int64``/``Int32``/``Int16`` when the column is nullable), ``boolean`` → bool
(nullable: ``boolean``), ``char``/``string``/``text``/``timestamp`` → object.
Floating-point nulls are NaN.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd
import yaml

from core.errors import InputError
from core.frames import frame_from_columns

__all__ = [
    "Column",
    "columns",
    "conform",
    "dtypes",
    "empty_frame",
    "frame",
    "primary_key",
    "schema_version",
    "table_names",
]

_NUMERIC = {
    "double": ("float64", "float64"),
    "float": ("float32", "float32"),
    "long": ("int64", "Int64"),
    "int": ("int32", "Int32"),
    "short": ("int16", "Int16"),
    "byte": ("int8", "Int8"),
    "boolean": ("bool", "boolean"),
}


@dataclass(frozen=True)
class Column:
    """One column of an SDM table."""

    name: str
    datatype: str
    nullable: bool
    description: str
    unit: str | None

    @property
    def dtype(self) -> str:
        """The pandas dtype used for this column in memory."""
        if self.datatype in _NUMERIC:
            plain, nullable = _NUMERIC[self.datatype]
            return nullable if self.nullable else plain
        return "object"


@functools.cache
def _schema() -> dict:
    text = resources.files("lsst.sdm.schemas").joinpath("apdb.yaml").read_text()
    return yaml.safe_load(text)


def schema_version() -> str:
    """Version string of the SDM APDB schema in use (e.g. ``"10.0.0"``)."""
    return str(_schema()["version"])


def table_names() -> list[str]:
    """All table names in the SDM APDB schema."""
    return [t["name"] for t in _schema()["tables"]]


@functools.cache
def columns(table: str) -> tuple[Column, ...]:
    """The columns of ``table`` in schema order.

    Raises
    ------
    KeyError
        If the schema has no such table.
    """
    for t in _schema()["tables"]:
        if t["name"] == table:
            return tuple(
                Column(
                    name=c["name"],
                    datatype=c["datatype"],
                    nullable=bool(c.get("nullable", True)),
                    description=str(c.get("description", "")).strip(),
                    unit=c.get("fits:tunit"),
                )
                for c in t["columns"]
            )
    raise KeyError(f"apdb.yaml has no table {table!r}")


@functools.cache
def primary_key(table: str) -> tuple[str, ...]:
    """Column names of ``table``'s primary key, in key order.

    Raises
    ------
    KeyError
        If the schema has no such table.
    """
    for t in _schema()["tables"]:
        if t["name"] == table:
            key = t.get("primaryKey", [])
            refs = [key] if isinstance(key, str) else list(key)
            return tuple(ref.rsplit(".", 1)[-1] for ref in refs)
    raise KeyError(f"apdb.yaml has no table {table!r}")


@functools.cache
def dtypes(table: str) -> dict[str, str]:
    """Column name → pandas dtype for ``table``."""
    return {c.name: c.dtype for c in columns(table)}


def empty_frame(table: str) -> pd.DataFrame:
    """An empty DataFrame with all of ``table``'s columns and dtypes."""
    return pd.DataFrame({name: pd.Series([], dtype=dt) for name, dt in dtypes(table).items()})


def _null_column(dtype: str, n: int):
    if dtype in ("float64", "float32"):
        return np.full(n, np.nan, dtype=dtype)
    if dtype == "object":
        return np.full(n, None, dtype=object)
    return pd.array([pd.NA] * n, dtype=dtype)


def conform(df: pd.DataFrame, table: str, *, extra: str = "drop") -> pd.DataFrame:
    """Return ``df`` with exactly ``table``'s columns, in schema order and dtype.

    Missing nullable columns are filled with nulls. ``df`` is not modified.

    Parameters
    ----------
    df : pandas.DataFrame
        Input rows.
    table : str
        SDM table name.
    extra : {"drop", "keep", "raise"}
        What to do with columns the table does not have.

    Raises
    ------
    InputError
        If a non-nullable column is missing, or a value cannot be cast.
    """
    n = len(df)
    out: dict[str, object] = {}
    for col in columns(table):
        if col.name in df.columns:
            values = df[col.name]
            try:
                if col.dtype in ("int64", "int32", "int16", "int8", "bool") and values.hasnans:
                    raise InputError(
                        f"{table}.{col.name}: column is not nullable but has "
                        f"{int(values.isna().sum())} null value(s)"
                    )
                out[col.name] = (
                    values.to_numpy()
                    if values.dtype == col.dtype
                    else values.astype(col.dtype).to_numpy()
                )
            except (TypeError, ValueError) as exc:
                if isinstance(exc, InputError):
                    raise
                raise InputError(
                    f"{table}.{col.name}: cannot convert {values.dtype} to {col.dtype}: {exc}"
                ) from exc
        elif col.nullable:
            out[col.name] = _null_column(col.dtype, n)
        else:
            raise InputError(f"{table}: required column {col.name!r} is missing")
    result = pd.DataFrame(out, index=df.index)
    for name, dt in dtypes(table).items():
        if str(result[name].dtype) != dt:
            result[name] = result[name].astype(dt)
    if extra != "drop":
        others = [c for c in df.columns if c not in out]
        if others and extra == "raise":
            raise InputError(f"{table}: unknown column(s) {others}")
        for c in others:
            result[c] = df[c]
    return result


@functools.cache
def _frame_plan(table: str) -> tuple[pd.Index, tuple, tuple]:
    """Column index, numpy groups and nullable (extension) columns of ``table``'s frames.

    The columns with a numpy dtype are grouped per dtype: (dtype, column
    positions, names, nullable flags). The nullable integer and boolean
    columns are listed per dtype: (dtype, ((name, nullable, position), ...)).
    """
    cols = columns(table)
    groups: dict[str, list[tuple[int, Column]]] = {}
    extension: dict[str, list[tuple[str, bool, int]]] = {}
    for pos, col in enumerate(cols):
        if col.dtype in _EXTENSION:
            extension.setdefault(col.dtype, []).append((col.name, col.nullable, pos))
        else:
            groups.setdefault(col.dtype, []).append((pos, col))
    blocks = tuple(
        (
            dt,
            tuple(pos for pos, _ in members),
            tuple(c.name for _, c in members),
            tuple(c.nullable for _, c in members),
        )
        for dt, members in groups.items()
    )
    ext = tuple((dt, tuple(members)) for dt, members in extension.items())
    return pd.Index([c.name for c in cols]), blocks, ext


#: nullable pandas dtypes → their masked array class
_EXTENSION: dict[
    str, tuple[type[pd.arrays.IntegerArray] | type[pd.arrays.BooleanArray], type[np.generic]]
] = {
    "Int64": (pd.arrays.IntegerArray, np.int64),
    "Int32": (pd.arrays.IntegerArray, np.int32),
    "Int16": (pd.arrays.IntegerArray, np.int16),
    "Int8": (pd.arrays.IntegerArray, np.int8),
    "boolean": (pd.arrays.BooleanArray, np.bool_),
}


def _masked(v, dt: str, n: int):
    """``v`` as a fresh pandas masked array of dtype ``dt``."""
    cls, np_dt = _EXTENSION[dt]
    if isinstance(v, cls) and str(v.dtype) == dt:
        return v.copy()
    if (
        type(v) is np.ndarray
        and v.ndim == 1
        and (v.dtype == np_dt or (v.dtype.kind in "iu" and dt != "boolean"))
        and np.can_cast(v.dtype, np_dt, casting="safe")
    ):
        return cls(v.astype(np_dt, copy=True), np.zeros(v.size, dtype=bool))
    return pd.array(v, dtype=dt)


def _numpy_block(data: dict, table: str, n: int, dt: str, names: tuple, nullable: tuple):
    """The 2-D block of the columns ``names`` (all of numpy dtype ``dt``), nulls where absent."""
    block = np.empty((len(names), n), dtype=dt)
    null_rows = []
    for row, (name, can_be_null) in enumerate(zip(names, nullable, strict=True)):
        v = data.get(name)
        if v is None:
            if not can_be_null:
                raise InputError(f"{table}: required column {name!r} is missing")
            null_rows.append(row)
            continue
        try:
            if dt in ("float64", "float32", "object"):
                # assignment casts as np.asarray(v, dtype=dt) would
                block[row] = v if type(v) is np.ndarray else np.asarray(v, dtype=dt)
            else:
                arr = np.asarray(v)
                if arr.dtype.kind == "f" and np.isnan(arr).any():
                    raise InputError(
                        f"{table}.{name}: column is not nullable but has "
                        f"{int(np.isnan(arr).sum())} null value(s)"
                    )
                block[row] = arr.astype(dt, copy=False)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{table}.{name}: cannot convert to {dt}: {exc}") from exc
    if null_rows:  # float and object columns (the others are never nullable here)
        block[null_rows] = None if dt == "object" else np.nan
    return block


def frame(data: dict, table: str, n: int) -> pd.DataFrame:
    """Build a ``table`` frame from column arrays in one step (the stages' fast path).

    Same result as :func:`conform` on a frame of ``data`` — exactly the
    table's columns in schema order and dtype, missing nullable columns null —
    for callers that hold plain arrays of ``n`` rows. It avoids conform's
    per-column pandas round trips: the columns of each numpy dtype are written
    into one 2-D array whose rows become the frame's columns without a further
    copy (:func:`core.frames.frame_from_columns`); the all-null nullable
    columns share two allocations per dtype. Columns not in the table are
    ignored.

    Raises
    ------
    InputError
        A non-nullable column is missing or holds NaN, or a value cannot be cast.
    """
    names, groups, ext_plan = _frame_plan(table)
    out: list = [None] * len(names)
    for dt, pos, group_names, nullable in groups:
        block = _numpy_block(data, table, n, dt, group_names, nullable)
        for r, p in enumerate(pos):
            out[p] = block[r]
    for dt, members in ext_plan:
        nulls = []
        for name, nullable, pos in members:
            v = data.get(name)
            if v is None:
                if not nullable:
                    raise InputError(f"{table}: required column {name!r} is missing")
                nulls.append(pos)
                continue
            try:
                arr = _masked(v, dt, n)
            except (TypeError, ValueError) as exc:
                raise InputError(f"{table}.{name}: cannot convert to {dt}: {exc}") from exc
            if len(arr) != n:
                raise InputError(f"{table}.{name}: {len(arr)} values for {n} rows")
            out[pos] = arr
        if nulls:  # all-null columns: rows of one data and one mask array
            cls, np_dt = _EXTENSION[dt]
            values = np.zeros((len(nulls), n), dtype=np_dt)
            mask = np.ones((len(nulls), n), dtype=bool)
            for r, p in enumerate(nulls):
                out[p] = cls(values[r], mask[r])
    return frame_from_columns(dict(zip(names, out, strict=True)), pd.RangeIndex(n))
