"""The SQL backend of the APDB (:class:`ApdbSql`): SQLite and PostgreSQL.

One class serves both databases, chosen by the URL. SQLAlchemy provides the
engine, the connection pool, the URL handling and the DDL (compiled from
:mod:`apdb.sdm`); the hot paths talk to the DB-API driver underneath it, in
columns:

* reads fetch the packed ``payload`` of every row, concatenated by the
  server into one value (``group_concat`` on SQLite, ``string_agg`` in
  binary on PostgreSQL), and decode all rows with one ``numpy.frombuffer``
  (see "Packed payloads" below);
* writes bind whole columns: ``executemany`` on SQLite, binary ``COPY ...
  FROM STDIN`` (psycopg 3) on PostgreSQL; all-null columns are left out;
* long DiaObject ID lists go to the server as one parameter: a JSON array
  expanded by ``json_each`` on SQLite, ``= ANY(%s::int8[])`` on a bigint array
  literal on PostgreSQL — no chunking, no 999-parameter limit.

Layout
------
``DiaObject``
    Every version of every DiaObject (SDM columns). A new version closes the
    previous one by setting its ``validityEndMjdTai``, as Rubin's dax_apdb does.
``DiaObjectLast``
    The latest version of each DiaObject: the SDM ``DiaObjectLast`` columns,
    plus ``pixelId`` (the HEALPix nest pixel of (ra, dec) at the database's
    order) and ``payload`` (the whole SDM ``DiaObject`` row, packed). A
    region query scans the pixel ranges covering the region in the covering
    index on ``pixelId``, decodes the payloads and then filters exactly.
``DiaSource``, ``DiaForcedSource``
    SDM columns plus ``payload``; primary keys ``diaSourceId`` and the SDM
    ``(diaObjectId, visit, detector)`` (DiaForcedSource; on SQLite the table is
    keyed :data:`SQLITE_FORCED_KEY` instead and read by that key, the SDM key
    kept by a unique index). The history read goes through a covering index on
    ``(diaObjectId, midpointMjdTai)`` that also holds the string columns and the
    payload: it seeks to the window start of each object and reads that
    object's rows one after another from the index, never the table, whose
    rows lie in the order the visits stored them.
``ApdbVisitDetector````ApdbVisitDetector``
    One row per stored (visit, detector), written in the same transaction as
    the data: the idempotency marker, with the row counts written.
``metadata``
    SDM ``metadata`` (name, value): ``version:schema`` (SDM version),
    ``version:ApdbSql`` (this layout), ``config:healpix_order``.

Covering indexes (layout 2.1)
----------------------------
:data:`COVERING_INDEXES`: PostgreSQL keeps the extra columns as ``INCLUDE``
columns (index-only scans, which need the visibility map that ``VACUUM`` sets:
:meth:`ApdbSql.optimize` after a bulk load, autovacuum later), SQLite as
trailing key columns. They replace the plain indexes of layout 2.0 and cost a
second copy of each payload on disk (the 12-month ``bench visit`` database:
+48 % on SQLite, +46 % on PostgreSQL). A history row read through a plain index
was an index probe plus a random table-row read; ``bench/RESULTS.md`` (section
"apdb-load") has what a detector's load costs with each layout.

Packed payloads
---------------
Reading a DiaSource through a DB-API driver costs one Python object per
column per row (~100 per row), which dominates a history load. Every row of
the three tables read in bulk therefore also carries its SDM values packed
into one little-endian fixed-width record (:class:`_Packing`): a bulk read
fetches the payloads as one concatenated value (plus each string column as one
array) and decodes all rows with one ``numpy.frombuffer``; no Python object is
made per row. The SDM columns stay the queryable truth for SQL
users; both are written from the same arrays in the same statement, and the
layout signature is recorded in ``metadata`` so a mismatching database is
refused. The price is ~1.6x the row size on disk.

Concurrency
-----------
SQLite runs in WAL mode with ``busy_timeout``; writes open with ``BEGIN
IMMEDIATE`` so two writers queue on the lock instead of failing on a
read-to-write upgrade. PostgreSQL writes are one READ COMMITTED transaction;
concurrent stores of the same (visit, detector) serialise on the marker's
primary key and the second one finds it stored.

A store with a :class:`~apdb.interface.RegionGuard` (the pipeline's, one per
detector) checks that the DiaObjects of its footprint are still those its
association was made against, under a lock on the footprint: on SQLite the
write lock every write transaction takes; on PostgreSQL transaction-level
advisory locks (``pg_advisory_xact_lock``), one per HEALPix pixel of order
:data:`LOCK_ORDER` the footprint touches, taken in ascending pixel order (so
two stores never wait on each other in a cycle) before any row is written, and
released at commit. Stores of footprints that share no lock pixel never wait on
each other; the lock is held for the store transaction only, not from load to
store.

Errors
------
Connection and lock problems (``OperationalError`` that is not a schema
problem, pool timeouts) raise :class:`core.errors.TransientError`;
integrity and schema problems raise :class:`core.errors.ApdbError`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import hpgeom
import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import StaticPool
from sqlalchemy.schema import CreateIndex, CreateTable

from apdb import sdm
from apdb.config import ApdbConfig
from apdb.interface import Apdb, BulkLoadResult, MergeResult, RegionGuard, StoreResult
from apdb.region import Region
from core.errors import ApdbError, InputError, SchemaVersionError, StaleLoadError, TransientError
from core.extras import import_extra
from core.frames import column_values

__all__ = ["IMPLEMENTATION_VERSION", "ApdbSql"]

_LOG = logging.getLogger(__name__)

#: Version of this table layout; a different major version cannot be opened.
IMPLEMENTATION_VERSION = "2.2.0"

MARKER_TABLE = "ApdbVisitDetector"
LAST_TABLE = "DiaObjectLast"
PIXEL_COLUMN = "pixelId"
PAYLOAD_COLUMN = "payload"

#: SQLite WAL pages after which a commit checkpoints (SQLite's default is 1,000). A
#: detector's store dirties ~1,000-2,000 pages of the history indexes (its objects'
#: entries lie all over them), so with the default every store ran a checkpoint and
#: its fsync; at 16,384 (128 MiB of WAL) one checkpoint writes many stores' pages,
#: each once: a store costs half as much, averaged over the checkpoints.
SQLITE_WAL_CHECKPOINT_PAGES = 16384

#: PostgreSQL ``random_page_cost`` of the APDB's sessions (the server default, 4, models
#: spinning disks). A history read probes the covering index once per DiaObject; with
#: 4 the planner prefers a sequential scan of the whole table to ~10,000 probes, ~2x
#: slower when the table is in memory, as an APDB serving alerts must be. 1.1 is the
#: usual value for SSDs and cached data.
PG_RANDOM_PAGE_COST = 1.1

#: A pooled PostgreSQL connection idle for this long (s) is pinged before it is used.
PING_AFTER_IDLE_S = 1.0

#: HEALPix order of the PostgreSQL region locks of a guarded store (0.23 deg pixels:
#: an LSSTCam detector touches about four).
LOCK_ORDER = 8
#: First key of the two-key ``pg_advisory_xact_lock(int, int)`` of a region lock
#: ("DIAP"), so diapipe's locks do not collide with another application's.
LOCK_CLASS = 0x44494150
#: Most lock pixels one guarded store takes (a region of ~6 deg across at LOCK_ORDER).
MAX_LOCK_PIXELS = 4096

_SA_TYPES = {
    "double": sa.Double,
    "float": sa.REAL,
    "long": sa.BigInteger,
    "int": sa.Integer,
    "short": sa.SmallInteger,
    "byte": sa.SmallInteger,
    "boolean": sa.Boolean,
}

_FLOAT = ("float64", "float32")
_INT = ("int64", "int32", "int16", "int8")
_NULLABLE_INT = ("Int64", "Int32", "Int16", "Int8")


def _q(name: str) -> str:
    """Quote an SDM identifier (camelCase must survive PostgreSQL)."""
    return '"' + name.replace('"', '""') + '"'


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"1.2.3"`` → ``(1, 2, 3)``; a version that is not dotted integers sorts first."""
    try:
        return tuple(int(p) for p in str(version).split("."))
    except ValueError:
        return ()


# --------------------------------------------------------------------------- schema


def _sdm_columns(table: str) -> list[sa.Column]:
    return [
        sa.Column(c.name, _SA_TYPES.get(c.datatype, sa.Text)(), nullable=c.nullable)
        for c in sdm.columns(table)
    ]


#: The packed reads (:meth:`ApdbSql._select_packed`) each scan one covering index:
#: table → (index name, key columns). The index also holds the string columns
#: and the ``payload`` the read returns, so a read never visits the table rows.
COVERING_INDEXES = {
    LAST_TABLE: ("IDX_DiaObjectLast_pixelId_payload", (PIXEL_COLUMN,)),
    "DiaSource": ("IDX_DiaSource_diaObjectId_payload", ("diaObjectId", "midpointMjdTai")),
    "DiaForcedSource": (
        "IDX_DiaForcedSource_diaObjectId_payload",
        ("diaObjectId", "midpointMjdTai"),
    ),
}


#: SQLite stores DiaForcedSource as a ``WITHOUT ROWID`` table whose key is the
#: history read's (diaObjectId, midpointMjdTai), then the SDM key: one object's
#: rows are contiguous and in time order in the table itself, so the read
#: seeks to each object's window start in the table and the payload is stored
#: once (a covering index would be a second copy of every row). A small unique
#: index keeps the SDM primary key (diaObjectId, visit, detector) enforced.
SQLITE_FORCED_KEY = ("diaObjectId", "midpointMjdTai", "visit", "detector")
SQLITE_FORCED_SDM_KEY = "IDX_DiaForcedSource_sdmKey"


def read_index(table: str, dialect: str) -> str | None:
    """The covering index a packed read of ``table`` scans; None: the table's own key."""
    if table == "DiaForcedSource" and dialect == "sqlite":
        return None
    return COVERING_INDEXES[table][0]


def forced_source_table(md: sa.MetaData, dialect: str, name: str = "DiaForcedSource") -> sa.Table:
    """The ``DiaForcedSource`` table for ``dialect`` (:data:`SQLITE_FORCED_KEY` on SQLite).

    ``name`` other than the default is for a migration's copy of the table
    (its indexes keep their names: they are created after the rename).
    """
    if dialect == "sqlite":
        keys: tuple = (
            sa.PrimaryKeyConstraint(*SQLITE_FORCED_KEY),
            sa.Index(SQLITE_FORCED_SDM_KEY, *sdm.primary_key("DiaForcedSource"), unique=True),
        )
    else:
        keys = (
            sa.PrimaryKeyConstraint(*sdm.primary_key("DiaForcedSource")),
            covering_index("DiaForcedSource", dialect),
        )
    return sa.Table(
        name,
        md,
        *_sdm_columns("DiaForcedSource"),
        sa.Column(PAYLOAD_COLUMN, sa.LargeBinary, nullable=False),
        *keys,
        sa.Index("IDX_DiaForcedSource_visitDetector", "visit", "detector"),
        sqlite_with_rowid=False,
    )


def covering_index(table: str, dialect: str) -> sa.Index:
    """The covering index of a packed table (:data:`COVERING_INDEXES`) for ``dialect``.

    PostgreSQL keeps the string columns and the payload as ``INCLUDE`` columns
    (in the leaf pages only, read by an index-only scan); SQLite, which has no
    ``INCLUDE``, as trailing key columns, which its planner reads the same way
    (a "covering index"). One DiaObject's history is then contiguous in the
    index, in time order, while the table rows stay in insertion order.
    """
    name, keys = COVERING_INDEXES[table]
    sdm_table = "DiaObject" if table == LAST_TABLE else table
    extra = [*_Packing(sdm_table).text, PAYLOAD_COLUMN]
    if dialect == "postgresql":
        return sa.Index(name, *keys, postgresql_include=extra)
    return sa.Index(name, *keys, *extra)


def build_metadata(dialect: str = "sqlite") -> sa.MetaData:
    """The SQLAlchemy tables of the APDB, generated from the SDM schema.

    ``dialect`` ('sqlite' or 'postgresql') only changes how the covering
    indexes are declared (:func:`covering_index`).
    """
    md = sa.MetaData()
    sa.Table(
        "DiaObject",
        md,
        *_sdm_columns("DiaObject"),
        sa.PrimaryKeyConstraint(*sdm.primary_key("DiaObject")),
        sa.Index("IDX_DiaObject_validityStart", "validityStartMjdTai"),
    )
    sa.Table(
        LAST_TABLE,
        md,
        *_sdm_columns("DiaObjectLast"),
        sa.Column(PIXEL_COLUMN, sa.BigInteger, nullable=False),
        sa.Column(PAYLOAD_COLUMN, sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint(*sdm.primary_key("DiaObjectLast")),
        covering_index(LAST_TABLE, dialect),
    )
    sa.Table(
        "DiaSource",
        md,
        *_sdm_columns("DiaSource"),
        sa.Column(PAYLOAD_COLUMN, sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint(*sdm.primary_key("DiaSource")),
        sa.Index("IDX_DiaSource_visitDetector", "visit", "detector"),
        covering_index("DiaSource", dialect),
    )
    forced_source_table(md, dialect)
    sa.Table(
        "SSSource",
        md,
        *_sdm_columns("SSSource"),
        sa.PrimaryKeyConstraint(*sdm.primary_key("SSSource")),
        sa.Index("IDX_SSSource_ssObjectId", "ssObjectId"),
    )
    sa.Table(
        "metadata",
        md,
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    sa.Table(
        MARKER_TABLE,
        md,
        sa.Column("visit", sa.BigInteger, nullable=False),
        sa.Column("detector", sa.SmallInteger, nullable=False),
        sa.Column("validityStartMjdTai", sa.Double, nullable=True),
        sa.Column("storedUtc", sa.Text, nullable=False),
        sa.Column("nDiaObjects", sa.Integer, nullable=False),
        sa.Column("nDiaObjectsUpdated", sa.Integer, nullable=False),
        sa.Column("nDiaSources", sa.Integer, nullable=False),
        sa.Column("nDiaForcedSources", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("visit", "detector"),
    )
    return md


_PG_TYPE_OF = {
    "double": "float8",
    "float": "float4",
    "long": "int8",
    "int": "int4",
    "short": "int2",
    "byte": "int2",
    "boolean": "bool",
}


def _pg_types(sdm_table: str) -> dict[str, str]:
    return {c.name: _PG_TYPE_OF.get(c.datatype, "text") for c in sdm.columns(sdm_table)}


_EXTRA_PG_TYPES = {PIXEL_COLUMN: "int8", PAYLOAD_COLUMN: "bytea"}
_PG_TYPES = {
    "DiaObject": _pg_types("DiaObject"),
    LAST_TABLE: _pg_types("DiaObjectLast") | _EXTRA_PG_TYPES,
    "DiaSource": _pg_types("DiaSource") | _EXTRA_PG_TYPES,
    "DiaForcedSource": _pg_types("DiaForcedSource") | _EXTRA_PG_TYPES,
    "SSSource": _pg_types("SSSource"),
}

TABLES = (
    "DiaObject",
    LAST_TABLE,
    "DiaSource",
    "DiaForcedSource",
    "SSSource",
    MARKER_TABLE,
    "metadata",
)


# --------------------------------------------------------------------------- columns


def _frame(rows: Sequence[tuple], names: Sequence[str], dtypes: dict[str, str]) -> pd.DataFrame:
    """Build a DataFrame from fetched tuples, one numpy conversion per column.

    NULL becomes NaN in float columns and ``pd.NA`` in nullable integer and
    boolean columns.
    """
    if not rows:
        return pd.DataFrame({n: pd.Series([], dtype=dtypes[n]) for n in names})
    data: dict[str, object] = {}
    for name, values in zip(names, zip(*rows, strict=True), strict=True):
        dtype = dtypes[name]
        if dtype in _FLOAT:
            data[name] = np.array(values, dtype=dtype)
        elif dtype in _INT or dtype == "bool":
            data[name] = np.array(values, dtype=dtype)
        elif dtype in _NULLABLE_INT or dtype == "boolean":
            arr = np.array(values, dtype=object)
            mask = np.equal(arr, np.array(None, dtype=object))
            if mask.any():
                arr[mask] = 0
            if dtype == "boolean":
                data[name] = pd.arrays.BooleanArray(arr.astype(bool), mask)
            else:
                data[name] = pd.arrays.IntegerArray(arr.astype(dtype.lower()), mask)
        else:
            data[name] = pd.Series(np.array(values, dtype=object), dtype=object)
    return pd.DataFrame(data)


_PACKED_BASE = {
    "float64": "<f8",
    "float32": "<f4",
    "int64": "<i8",
    "Int64": "<i8",
    "int32": "<i4",
    "Int32": "<i4",
    "int16": "<i2",
    "Int16": "<i2",
    "int8": "i1",
    "Int8": "i1",
    "bool": "u1",
    "boolean": "u1",
}


class _Packing:
    """The packed-row layout of one SDM table (the ``payload`` column).

    Every numeric and boolean SDM column of a row, little-endian and fixed
    width, in schema order; a nullable integer or boolean column is followed
    by a one-byte validity flag; float nulls are NaN. String columns are not
    packed: they are read from their own SDM columns. A bulk read fetches the
    payloads of all rows as one value and decodes them with a single
    ``numpy.frombuffer``, instead of creating one Python object per value.
    """

    def __init__(self, table: str):
        self.table = table
        self.columns = sdm.columns(table)
        fields = []
        self.text: list[str] = []
        for col in self.columns:
            if col.dtype not in _PACKED_BASE:
                self.text.append(col.name)
                continue
            fields.append((col.name, _PACKED_BASE[col.dtype]))
            if col.dtype in _NULLABLE_INT or col.dtype == "boolean":
                fields.append(("valid:" + col.name, "u1"))
        self.dtype = np.dtype(fields)
        digest = hashlib.sha1(repr((fields, self.text)).encode()).hexdigest()[:16]
        self.signature = f"{self.dtype.itemsize}:{digest}"

    def pack(self, arrays: Mapping[str, Any], n: int) -> list[bytes]:
        """One ``bytes`` payload per row from the converted column arrays."""
        rec = np.zeros(n, dtype=self.dtype)
        for col in self.columns:
            if col.dtype not in _PACKED_BASE:
                continue
            values = arrays[col.name]
            if col.dtype in _NULLABLE_INT or col.dtype == "boolean":
                ext = values
                valid = ~np.asarray(pd.isna(ext), dtype=bool)
                rec["valid:" + col.name] = valid
                rec[col.name] = np.asarray(ext.to_numpy(dtype=_PACKED_BASE[col.dtype], na_value=0))
            else:
                rec[col.name] = values
        return rec.view(f"V{self.dtype.itemsize}").ravel().tolist()

    def unpack(self, buf: bytes, n: int, text: dict[str, Sequence]) -> pd.DataFrame:
        """The SDM frame (all columns, schema order and dtypes) of ``n`` packed rows.

        ``buf`` holds the rows' payloads one after another; ``text`` the string
        columns, in the same row order.
        """
        if n == 0:
            return sdm.empty_frame(self.table)
        if len(buf) != n * self.dtype.itemsize:
            raise ApdbError(
                f"{self.table}.payload: {len(buf)} bytes for {n} rows do not match the "
                f"{self.dtype.itemsize}-byte layout {self.signature}"
            )
        rec = np.frombuffer(buf, dtype=self.dtype)
        data: dict[str, object] = {}
        for col in self.columns:
            name, dtype = col.name, col.dtype
            if name in text:
                data[name] = pd.Series(np.array(text[name], dtype=object), dtype=object)
            elif dtype in _NULLABLE_INT:
                values = rec[name].astype(dtype.lower())
                data[name] = pd.arrays.IntegerArray(values, rec["valid:" + name] == 0)
            elif dtype == "boolean":
                data[name] = pd.arrays.BooleanArray(
                    rec[name].astype(bool), rec["valid:" + name] == 0
                )
            elif dtype == "bool":
                data[name] = rec[name].astype(bool)
            else:
                # the field's strided view of ``buf`` when it has the column's dtype
                # (little-endian machines): the DataFrame copies every column into its
                # blocks (a dict's arrays are always copied), so a cast here would copy
                # the values twice
                view = rec[name]
                data[name] = view if view.dtype == dtype else view.astype(dtype)
        return pd.DataFrame(data)


_INT_RANGE = {name: np.iinfo(name) for name in _INT}


class _Columns:
    """One SDM table's rows as driver-ready column lists (nulls as None).

    A single pass over the input frame: each column is read once, cast to the
    SDM dtype with numpy, checked, and turned into a Python list with one
    ``tolist()``. This replaces :func:`apdb.sdm.conform` on the write path,
    with the same rules: a missing non-nullable column, a null in a
    non-nullable column or a value that does not cast is an :class:`InputError`.

    Parameters
    ----------
    df : pandas.DataFrame
        Input rows; columns the table lacks are ignored.
    table : str
        SDM table name.
    overrides : dict
        Column → scalar written to every row instead of the input column.
    nan_to_none : bool
        Turn float NaN into None (PostgreSQL; SQLite stores NaN as NULL itself).
    """

    def __init__(self, df, table, *, overrides=None, nan_to_none=False):
        overrides = overrides or {}
        n = len(df)
        present = set(df.columns)
        self.names: list[str] = []
        self.lists: list[list] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.n = n
        for col in sdm.columns(table):
            name, dtype = col.name, col.dtype
            if name in overrides:
                value = overrides[name]
                self.arrays[name] = np.full(n, value, dtype=dtype if dtype in _FLOAT else None)
                if not (isinstance(value, float) and np.isnan(value)):
                    self.names.append(name)
                    self.lists.append([value] * n)
                continue
            if name not in present:
                # Left out of the INSERT: the column defaults to NULL, and binding
                # None costs the sqlite3 module a failed adaptation per value.
                if not col.nullable:
                    raise InputError(f"{table}: required column {name!r} is missing")
                self.arrays[name] = _null_array(dtype, n)
                continue
            try:
                converted = _convert_numeric(column_values(df, name), dtype, nan_to_none)
                if converted is None:
                    converted = _convert(df[name], dtype, nan_to_none)
                arr, values = converted
            except InputError as exc:
                raise InputError(f"{table}.{name}: {exc}") from None
            except (TypeError, ValueError, OverflowError) as exc:
                raise InputError(
                    f"{table}.{name}: cannot convert {df[name].dtype} to {dtype}: {exc}"
                ) from exc
            self.arrays[name] = arr
            if values is not None:
                self.names.append(name)
                self.lists.append(values)

    def subset(self, names: Sequence[str]) -> list[str]:
        """Those of ``names`` that are written (not entirely null)."""
        written = set(self.names)
        return [name for name in names if name in written]

    def rows(self, *extra: list, names: Sequence[str] | None = None) -> list[tuple]:
        """Rows as tuples (written columns, or ``names``), with ``extra`` column lists appended."""
        if names is None:
            lists = self.lists
        else:
            index = {name: i for i, name in enumerate(self.names)}
            lists = [self.lists[index[name]] for name in names]
        return list(zip(*lists, *extra, strict=True))


def _null_array(dtype: str, n: int):
    if dtype in _FLOAT:
        return np.full(n, np.nan, dtype=dtype)
    if dtype in _NULLABLE_INT or dtype == "boolean":
        return pd.array([pd.NA] * n, dtype=dtype)
    return np.full(n, None, dtype=object)


def _convert_numeric(
    values, dtype: str, nan_to_none: bool
) -> tuple[np.ndarray, list | None] | None:
    """:func:`_convert` of a numpy numeric column into a float or int SDM column, else None.

    Most columns a store writes are numpy floats and ints; taking them from the
    frame's array (:func:`core.frames.column_values`) skips making a Series per
    column. Converting a detector's ~370 columns was ~30 % of a store's CPU
    (py-spy), and the Series were 3.0 of its 7.0 ms. Same rules and
    messages as :func:`_convert`; anything else (extension arrays, objects,
    nullable SDM dtypes, text) returns None and goes through :func:`_convert`.
    """
    if not isinstance(values, np.ndarray) or values.dtype.kind not in "biuf":
        return None
    if dtype in _FLOAT:
        return _float_lists(values.astype(dtype, copy=False), nan_to_none)
    if dtype not in _INT and dtype != "bool":
        return None
    if values.dtype.kind == "f":
        nan = np.isnan(values)
        if nan.any():
            raise InputError(f"column is not nullable but has {int(nan.sum())} null value(s)")
    return _int_lists(values, dtype)


def _float_lists(arr: np.ndarray, nan_to_none: bool) -> tuple[np.ndarray, list]:
    """(arr, its values for the driver): NaN as None when ``nan_to_none``."""
    if nan_to_none:
        nan = np.isnan(arr)
        if nan.any():
            obj = arr.astype(object)
            obj[nan] = None
            return arr, obj.tolist()
    return arr, arr.tolist()


def _int_lists(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, list]:
    """``arr`` (no nulls) cast to the int or bool SDM ``dtype``, checked, and its list."""
    if dtype in _INT:
        if arr.dtype.kind == "f" and np.any(arr != np.round(arr)):
            raise InputError(f"non-integer value {arr[arr != np.round(arr)][0]}")
        if arr.dtype.kind in "iuf" and arr.size:
            info = _INT_RANGE[dtype]
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise InputError(f"value {lo if lo < info.min else hi} overflows {dtype}")
    arr = arr.astype(dtype)
    return arr, arr.tolist()


def _convert(series: pd.Series, dtype: str, nan_to_none: bool) -> tuple[np.ndarray, list | None]:
    """(numpy array in the SDM dtype, list for the driver) of one column.

    The list is None when every value is null and the column need not be written.
    A column whose values are not of the SDM kind (text in a numeric column,
    numbers in a text column) is an :class:`InputError`, never cast.
    """
    _check_kind(series, dtype)
    if dtype in _FLOAT:
        return _float_lists(series.to_numpy(dtype=dtype, na_value=np.nan), nan_to_none)
    if dtype in _INT or dtype == "bool":
        if series.hasnans:
            raise InputError(
                f"column is not nullable but has {int(series.isna().sum())} null value(s)"
            )
        return _int_lists(series.to_numpy(), dtype)
    if dtype in _NULLABLE_INT or dtype == "boolean":
        ext = pd.array(series, dtype=dtype)
        null = ext.isna()
        if null.all():
            return ext, None
        if not null.any():
            return ext, ext.to_numpy(dtype=dtype.lower() if dtype != "boolean" else bool).tolist()
        return ext, ext.to_numpy(dtype=object, na_value=None).tolist()
    arr = series.to_numpy(dtype=object)
    null = pd.isna(arr)
    if null.all():
        return arr, None
    if null.any():
        arr = arr.copy()
        arr[null] = None
    return arr, arr.tolist()


_NUMERIC_KINDS = {"integer", "floating", "mixed-integer-float", "boolean", "decimal", "empty"}


def _check_kind(series: pd.Series, dtype: str) -> None:
    """InputError unless ``series`` holds values of the SDM dtype's kind (numeric or text)."""
    text = dtype not in _PACKED_BASE
    want = "text" if text else dtype
    values = series
    if isinstance(series.dtype, pd.CategoricalDtype):
        values = pd.Series(series.cat.categories)
    if values.dtype == object or isinstance(values.dtype, pd.StringDtype):
        inferred = pd.api.types.infer_dtype(values, skipna=True)
        if inferred in (("string", "empty") if text else _NUMERIC_KINDS):
            return
        raise InputError(f"cannot convert {series.dtype} to {want}: got {inferred} values")
    if text or values.dtype.kind not in "biuf":
        raise InputError(f"cannot convert {series.dtype} to {want}")


def _ids_array(object_ids: Iterable[int] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(object_ids if not isinstance(object_ids, pd.Series) else object_ids.to_numpy())
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        if arr.dtype == object or arr.dtype.kind == "f":
            if pd.isna(arr).any():
                raise InputError(f"{what}: object IDs contain null values")
        try:
            arr = arr.astype(np.int64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{what}: object IDs must be integers: {exc}") from exc
    return np.unique(arr.astype(np.int64).ravel())


# --------------------------------------------------------------------------- errors


_SCHEMA_WORDS = ("no such table", "no such column", "has no column", "syntax error")


def psycopg_errors(*names: str) -> tuple[type[BaseException], ...]:
    """The classes ``psycopg.errors.<name>``, or ``()`` while psycopg is not loaded.

    psycopg is the PostgreSQL driver: SQLAlchemy's dialect imports it when a
    PostgreSQL URL is opened, and no psycopg error can exist before that, so
    the error mapping needs no import of its own and a SQLite-only process
    never loads the driver. ``isinstance(exc, ())`` is false.
    """
    pg = sys.modules.get("psycopg")
    if pg is None:
        return ()
    return tuple(getattr(pg.errors, name) for name in names)


def _pg_timeout(orig: BaseException, what: str, url: str) -> TransientError | None:
    """A TransientError (and a warning) for a PostgreSQL lock or statement timeout."""
    if isinstance(orig, psycopg_errors("LockNotAvailable")):
        kind = "a lock held by another session (lock_timeout_ms)"
    elif isinstance(orig, psycopg_errors("QueryCanceled")):
        kind = "the statement to finish (statement_timeout_ms, or cancelled)"
    else:
        return None
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    message = (
        f"APDB {url}: {what}: gave up waiting for {kind}: {first}. Another session may hold "
        f"a table lock (CREATE INDEX, VACUUM FULL, REINDEX, an idle transaction: see "
        f"pg_stat_activity and pg_locks); the operation is retried"
    )
    _LOG.warning("%s", message)
    return TransientError(message)


def _sqlite_readonly(orig: BaseException, what: str, url: str) -> ApdbError | None:
    """An ApdbError saying why a SQLite APDB cannot be written, or None."""
    text = str(orig).lower()
    if "readonly database" in text or "read-only" in text:
        return ApdbError(
            f"APDB {url}: {what}: the database is read-only ({orig}); SQLite in WAL mode "
            f"needs write access to the file and to its directory (for the -wal and -shm files)"
        )
    if "unable to open database file" in text:
        return ApdbError(
            f"APDB {url}: {what}: unable to open the database file: the file or its "
            f"directory is missing or read-only (SQLite in WAL mode needs a writable "
            f"directory for the -wal and -shm files)"
        )
    return None


def _translate(exc: BaseException, what: str, url: str) -> BaseException | None:
    """The diapipe error for a driver error (None: let it through as it is)."""
    if isinstance(exc, (InputError, ApdbError, TransientError)):
        return None
    if isinstance(exc, sa.exc.TimeoutError):
        return TransientError(f"APDB {url}: {what}: connection pool timeout: {exc}")
    if isinstance(exc, sa.exc.DBAPIError):
        orig = exc.orig if exc.orig is not None else exc
        mapped = _pg_timeout(orig, what, url) or _sqlite_readonly(orig, what, url)
        if mapped is not None:
            return mapped
        if exc.connection_invalidated or isinstance(
            orig, (sqlite3.OperationalError, *psycopg_errors("OperationalError"))
        ):
            if not any(w in str(orig).lower() for w in _SCHEMA_WORDS):
                return TransientError(f"APDB {url}: {what}: {orig}")
        return ApdbError(f"APDB {url}: {what}: {orig}")
    if isinstance(exc, (sqlite3.Error, *psycopg_errors("Error"))):
        mapped = _pg_timeout(exc, what, url) or _sqlite_readonly(exc, what, url)
        if mapped is not None:
            return mapped
    if isinstance(exc, sqlite3.OperationalError):
        if any(w in str(exc).lower() for w in _SCHEMA_WORDS):
            return ApdbError(f"APDB {url}: {what}: {exc}")
        return TransientError(f"APDB {url}: {what}: {exc}")
    if isinstance(
        exc,
        psycopg_errors("OperationalError", "SerializationFailure", "DeadlockDetected"),
    ):
        return TransientError(f"APDB {url}: {what}: {exc}")
    if isinstance(exc, (sqlite3.Error, *psycopg_errors("Error"))):
        return ApdbError(f"APDB {url}: {what}: {exc}")
    return None


@contextlib.contextmanager
def _mapped_errors(what: str, url: str) -> Iterator[None]:
    """Translate driver errors: transient ones are retryable, the rest are ApdbError.

    PostgreSQL lock and statement timeouts (``lock_timeout_ms``,
    ``statement_timeout_ms``) are transient, logged as a warning naming the
    operation that waited; a read-only SQLite file or directory is an ApdbError
    that says so.
    """
    try:
        yield
    except Exception as exc:
        mapped = _translate(exc, what, url)
        if mapped is None:
            raise
        raise mapped from exc


class _AlreadyStored(Exception):
    pass


def driver_connection(proxy: Any) -> Any:
    """The DB-API connection inside a pooled SQLAlchemy connection (open, never None)."""
    conn = proxy.driver_connection
    if conn is None:  # only after the pool has invalidated and closed it
        raise TransientError("APDB: the pooled database connection was closed")
    return conn


def _too_big() -> tuple[type[BaseException], ...]:
    """What a database raises when an aggregated value would pass its size limit.

    SQLITE_TOOBIG; PostgreSQL's 1 GB string buffer.
    """
    return (sqlite3.DataError, *psycopg_errors("ProgramLimitExceeded", "OutOfMemory"))


# --------------------------------------------------------------------------- backend


def _sqlite_read_only_url(path: str, config: ApdbConfig) -> sa.URL:
    """The URL that opens the SQLite file ``path`` for reading only.

    ``mode=ro`` first. A WAL-mode file opened so still needs its ``-shm``
    file: where SQLite cannot create it (a read-only directory) the open
    fails, and the file is opened ``immutable=1`` instead (no locks, no
    ``-shm``), which reads everything committed only when no ``-wal`` file
    holds transactions not yet copied into the main file: with one, the open
    is refused.

    Raises
    ------
    ApdbError
        The directory is read-only and a non-empty ``-wal`` file lies beside
        the database.
    """
    uri = "file:" + urllib.parse.quote(path)
    query = {"mode": "ro"}
    try:
        probe = sqlite3.connect(
            f"{uri}?mode=ro", uri=True, timeout=config.sqlite_busy_timeout_ms / 1000.0
        )
        try:
            probe.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            probe.close()
    except sqlite3.OperationalError as exc:
        if "unable to open" in str(exc).lower():
            wal = path + "-wal"
            if os.path.exists(wal) and os.path.getsize(wal) > 0:
                raise ApdbError(
                    f"APDB {config.safe_url()}: cannot read it read-only: its directory is "
                    f"read-only, so SQLite cannot make the -shm file, and {wal} holds "
                    f"transactions not yet checkpointed into the database; copy the database "
                    f"with its -wal file to a writable directory, or checkpoint it where it is "
                    f"written (PRAGMA wal_checkpoint(TRUNCATE))"
                ) from exc
            query["immutable"] = "1"
        # any other error: the engine's first connection reports it, mapped
    return sa.URL.create("sqlite", database=uri, query={**query, "uri": "true"})


class ApdbSql(Apdb):
    """The APDB on SQLite or PostgreSQL (see the module docstring for the layout).

    Parameters
    ----------
    config : ApdbConfig
        Connection settings. With ``auto_create`` an empty database gets the
        tables; otherwise it must have been made with :meth:`create`.

    Raises
    ------
    repair : bool
        Create APDB tables that are missing from an existing APDB (what
        :meth:`create` does) instead of refusing it.
    read_only : bool
        Open for reading only, as the inspection commands do: a SQLite file is
        opened with SQLite's read-only URI mode (``mode=ro``; where SQLite
        cannot make the ``-shm`` file beside it, e.g. in a read-only
        directory, and no ``-wal`` file holds uncheckpointed transactions, as
        ``immutable=1``), a PostgreSQL session with
        ``default_transaction_read_only``. Nothing is created, repaired or
        migrated and the journal mode is left as it is; ``auto_create`` and
        ``repair`` do not apply. Every write fails.

    Raises
    ------
    SchemaVersionError
        The database was made with an incompatible SDM schema or layout version.
    ApdbError
        The database has no APDB tables and ``auto_create`` is False; it holds
        other tables and no APDB (``auto_create`` never writes into a foreign
        database); or an APDB table is missing or lacks columns (checked table by
        table at open; ``python -m apdb create`` fills in missing tables).
    TransientError
        The server cannot be reached.
    """

    def __init__(self, config: ApdbConfig, *, repair: bool = False, read_only: bool = False):
        if read_only:
            config = config.model_copy(update={"auto_create": False})
            repair = False
        self.config = config
        self.read_only = read_only
        self._url = config.safe_url()
        url = config.sqlalchemy_url()
        self._sqlite_path = (
            url.database
            if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
            else None
        )
        if (
            not config.auto_create
            and self._sqlite_path is not None
            and not os.path.exists(self._sqlite_path)
        ):
            raise ApdbError(
                f"APDB {self._url}: no such SQLite file; create it with: python -m apdb create URL"
            )
        self._engine = self._make_engine(config, read_only=read_only)
        self.dialect = self._engine.dialect.name
        self._ph = "?" if self.dialect == "sqlite" else "%s"
        self._last_names = [c.name for c in sdm.columns("DiaObjectLast")]
        self._packing = {t: _Packing(t) for t in ("DiaObject", "DiaSource", "DiaForcedSource")}
        self._dtypes = {
            "DiaObject": sdm.dtypes("DiaObject"),
            "DiaSource": sdm.dtypes("DiaSource"),
            "DiaForcedSource": sdm.dtypes("DiaForcedSource"),
        }
        try:
            meta = self._read_metadata()
            if meta is None:
                if not config.auto_create:
                    raise ApdbError(
                        f"APDB {self._url}: no APDB tables (no 'metadata' table); "
                        f"create them with: python -m apdb create URL"
                    )
                if not repair:
                    self._refuse_foreign_tables()
                self._create_schema()
                meta = self._read_metadata()
            self.metadata = self._check_versions(meta or {})
            self._check_tables(repair=repair)
            self.order = int(self.metadata["config:healpix_order"])
            self._aggregate_reads = self._can_aggregate()
        except BaseException:
            self._engine.dispose()
            raise

    # ------------------------------------------------------------------ setup

    @classmethod
    def create(cls, config: ApdbConfig, *, drop: bool = False) -> ApdbSql:
        """Create the APDB tables (optionally dropping existing ones) and open it.

        Creating over an existing compatible APDB keeps its data.
        """
        if drop:
            engine = cls._make_engine(config)
            try:
                with _mapped_errors("drop tables", config.safe_url()), engine.begin() as conn:
                    for name in TABLES:
                        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {_q(name)}")
            finally:
                engine.dispose()
        return cls(config.model_copy(update={"auto_create": True}), repair=True)

    @staticmethod
    def _make_engine(config: ApdbConfig, *, read_only: bool = False) -> sa.Engine:
        url = config.sqlalchemy_url()
        if url.get_backend_name() == "sqlite":
            path = url.database
            memory = path in (None, "", ":memory:")
            read_only = read_only and not memory
            if read_only and path is not None:
                url = _sqlite_read_only_url(path, config)
            kwargs: dict = {
                "connect_args": {
                    "check_same_thread": False,
                    "timeout": config.sqlite_busy_timeout_ms / 1000.0,
                }
            }
            if memory:
                kwargs["poolclass"] = StaticPool
            else:
                kwargs.update(pool_size=config.pool_size, max_overflow=config.max_overflow)
                kwargs["pool_timeout"] = config.pool_timeout_s
            engine = sa.create_engine(url, **kwargs)
            busy = int(config.sqlite_busy_timeout_ms)
            mmap_bytes = int(config.sqlite_mmap_mb) * 2**20

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn, _record):
                # Transactions are ours (BEGIN / BEGIN IMMEDIATE), not the driver's.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute(f"PRAGMA busy_timeout = {busy}")
                if not read_only:
                    cur.execute("PRAGMA page_size = 8192")  # only before the first table
                cur.execute("PRAGMA cache_size = -32768")
                cur.execute("PRAGMA temp_store = MEMORY")
                if read_only:  # the journal mode is the file's; changing it is a write
                    cur.execute(f"PRAGMA mmap_size = {mmap_bytes}")
                elif not memory:
                    cur.execute("PRAGMA journal_mode = WAL")
                    cur.execute("PRAGMA synchronous = NORMAL")
                    cur.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_WAL_CHECKPOINT_PAGES}")
                    cur.execute(f"PRAGMA mmap_size = {mmap_bytes}")
                cur.close()

            return engine
        if url.get_driver_name() == "psycopg":
            import_extra("psycopg", "postgresql", "A PostgreSQL APDB")
        engine = sa.create_engine(
            url,
            pool_size=config.pool_size,
            max_overflow=config.max_overflow,
            pool_timeout=config.pool_timeout_s,
            connect_args={"connect_timeout": config.connect_timeout_s},
        )
        lock_ms, statement_ms = int(config.lock_timeout_ms), int(config.statement_timeout_ms)

        # Pessimistic disconnect handling, as pool_pre_ping but only for a connection
        # that sat in the pool for PING_AFTER_IDLE_S or more: a detector's three reads
        # and its store then cost no extra round trip each. A connection that failed
        # (closed) is replaced without one; DisconnectionError makes the pool discard
        # the connection and check out another.
        @event.listens_for(engine, "checkin")
        def _on_checkin(_dbapi_conn, record):
            record.info["idle_since"] = time.monotonic()

        @event.listens_for(engine, "checkout")
        def _on_checkout(dbapi_conn, record, _proxy):
            if dbapi_conn.closed:
                raise sa.exc.DisconnectionError("connection closed")
            since = record.info.pop("idle_since", None)
            if since is None or time.monotonic() - since < PING_AFTER_IDLE_S:
                return
            try:
                dbapi_conn.autocommit = True
                dbapi_conn.execute("SELECT 1")
            except Exception as exc:
                raise sa.exc.DisconnectionError(f"ping failed: {exc}") from exc

        @event.listens_for(engine, "connect")
        def _on_pg_connect(dbapi_conn, _record):
            # Session settings, so no statement waits for ever behind another session's
            # lock (a CREATE INDEX, VACUUM FULL, an idle transaction); see _mapped_errors.
            with dbapi_conn.cursor() as cur:
                cur.execute(f"SET lock_timeout = {lock_ms}")
                cur.execute(f"SET statement_timeout = {statement_ms}")
                cur.execute(f"SET random_page_cost = {PG_RANDOM_PAGE_COST}")
                if read_only:
                    cur.execute("SET default_transaction_read_only = on")
            dbapi_conn.commit()

        return engine

    @contextlib.contextmanager
    def _connection(self, what: str, *, write: bool = False) -> Iterator:
        """A pooled DB-API connection; with ``write`` one transaction, committed on success."""
        with _mapped_errors(what, self._url):
            proxy = self._engine.raw_connection()
            try:
                conn = driver_connection(proxy)
                if self.dialect != "sqlite":
                    # Reads in autocommit: no BEGIN and ROLLBACK round trips around each
                    # one (under READ COMMITTED every statement reads its own snapshot
                    # anyway). Set on every checkout, so that a connection some read left
                    # in autocommit never runs a write outside its transaction.
                    conn.autocommit = not write
                elif write:
                    conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.rollback()
                    raise
                if write:
                    conn.commit()
                else:
                    conn.rollback()
            finally:
                proxy.close()

    def _read_metadata(self) -> dict[str, str] | None:
        with _mapped_errors("read metadata", self._url):
            if not sa.inspect(self._engine).has_table("metadata"):
                return None
        with self._connection("read metadata") as conn:
            cur = conn.cursor()
            cur.execute('SELECT "name", "value" FROM "metadata"')
            return dict(cur.fetchall())

    def _refuse_foreign_tables(self) -> None:
        """Auto-create only into an empty database, never beside someone else's tables."""
        with _mapped_errors("list tables", self._url):
            names = sorted(sa.inspect(self._engine).get_table_names())
        if names:
            raise ApdbError(
                f"APDB {self._url}: the database holds other tables ({', '.join(names[:5])}"
                f"{', ...' if len(names) > 5 else ''}) and no APDB; auto_create adds APDB "
                f"tables only to an empty database. Use a new file or database, or make the "
                f"tables here on purpose with: python -m apdb create URL"
            )

    def _check_tables(self, *, repair: bool) -> None:
        """Every APDB table exists with every column it needs (one catalog read per table).

        With ``repair``, missing tables (and indexes) are created; a table that
        exists but lacks columns cannot be repaired here and is refused.
        """
        with _mapped_errors("check tables", self._url):
            inspector = sa.inspect(self._engine)
            have = set(inspector.get_table_names())
            short: dict[str, list[str]] = {}
            for table in build_metadata().sorted_tables:
                if table.name not in have:
                    continue
                cols = {c["name"] for c in inspector.get_columns(table.name)}
                lacking = [c.name for c in table.columns if c.name not in cols]
                if lacking:
                    short[table.name] = lacking
        missing = [t for t in TABLES if t not in have]
        if short:
            raise ApdbError(
                f"APDB {self._url}: damaged: "
                + "; ".join(f"table {t} lacks column(s) {c[:5]}" for t, c in sorted(short.items()))
                + "; restore it from a backup or migrate it (python -m apdb create cannot fill "
                "in columns)"
            )
        if missing and not repair:
            raise ApdbError(
                f"APDB {self._url}: damaged: table(s) {missing} missing; create them with: "
                f"python -m apdb create URL"
            )
        if missing:
            _LOG.warning("APDB %s: creating missing table(s) %s", self._url, missing)
            self._create_schema()

    def _create_schema(self) -> None:
        dialect = self._engine.dialect
        md = build_metadata(dialect.name)
        statements = []
        for table in md.sorted_tables:
            statements.append(str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)))
            for index in table.indexes:
                statements.append(
                    str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect))
                )
        meta = {
            "version:schema": sdm.schema_version(),
            "version:ApdbSql": IMPLEMENTATION_VERSION,
            "config:healpix_order": str(self.config.healpix_order),
            "config:pixelization": "healpix-nest",
            **{f"config:packing:{t}": p.signature for t, p in self._packing.items()},
        }
        ph = self._ph
        try:
            with self._connection("create tables", write=True) as conn:
                cur = conn.cursor()
                for stmt in statements:
                    cur.execute(stmt)
                cur.executemany(
                    f'INSERT INTO "metadata" ("name", "value") VALUES ({ph}, {ph}) '
                    f'ON CONFLICT ("name") DO NOTHING',
                    list(meta.items()),
                )
        except ApdbError:
            # A concurrent creator on PostgreSQL may win the race; accept its tables.
            if self._read_metadata() is None:
                raise
        _LOG.info("created APDB tables at %s", self._url)

    def _check_versions(self, meta: dict[str, str]) -> dict[str, str]:
        want_schema = sdm.schema_version()
        have_schema = meta.get("version:schema")
        if have_schema is None or _major(have_schema) != _major(want_schema):
            raise SchemaVersionError(
                f"APDB {self._url}: metadata version:schema is {have_schema!r}, this code "
                f"uses SDM APDB schema {want_schema} (major versions must match)"
            )
        have_impl = meta.get("version:ApdbSql")
        if have_impl is None or _major(have_impl) != _major(IMPLEMENTATION_VERSION):
            older = have_impl is not None and _version_tuple(have_impl) < _version_tuple(
                IMPLEMENTATION_VERSION
            )
            hint = "; upgrade it with: python -m apdb migrate URL" if older else ""
            raise SchemaVersionError(
                f"APDB {self._url}: metadata version:ApdbSql is {have_impl!r}, this code "
                f"writes layout {IMPLEMENTATION_VERSION} (major versions must match){hint}"
            )
        if _version_tuple(have_impl) < _version_tuple(IMPLEMENTATION_VERSION):
            _LOG.warning(
                "APDB %s: layout %s is older than this code's %s; it is read and written "
                "as it is, and 'python -m apdb migrate URL' upgrades it (see apdb/migrate.py "
                "for what changes)",
                self._url,
                have_impl,
                IMPLEMENTATION_VERSION,
            )
        if "config:healpix_order" not in meta:
            raise SchemaVersionError(f"APDB {self._url}: metadata lacks config:healpix_order")
        for table, packing in self._packing.items():
            have = meta.get(f"config:packing:{table}")
            if have != packing.signature:
                raise SchemaVersionError(
                    f"APDB {self._url}: metadata config:packing:{table} is {have!r}, this code "
                    f"packs {table} rows as {packing.signature}"
                )
        return meta

    def _can_aggregate(self) -> bool:
        """Whether payloads can be read concatenated by the server (:meth:`_select_packed`).

        SQLite concatenates blobs as text and casts back to a blob, which keeps
        the bytes only in a UTF-8 database (the default, and how
        :meth:`create` makes it).
        """
        if self.dialect != "sqlite":
            return True
        with self._connection("read encoding") as conn:
            return conn.execute("PRAGMA encoding").fetchone()[0] == "UTF-8"

    def optimize(self) -> None:
        """Make a freshly filled database fast to read: planner statistics, WAL folded in.

        Runs ``ANALYZE`` and, on SQLite, a WAL checkpoint that truncates the
        log; on PostgreSQL ``VACUUM (ANALYZE)``, which also sets the visibility
        map that lets the bulk reads' index-only scans skip the table rows.
        Meant after :meth:`bulk_load` or :meth:`migrate`.
        """
        with self._connection("optimize") as conn:
            if self.dialect == "sqlite":
                conn.execute("ANALYZE")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            else:
                conn.execute("VACUUM (ANALYZE)")

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __repr__(self) -> str:
        return f"ApdbSql({self._url!r})"

    # ------------------------------------------------------------------ reads

    def _select(self, table: str, columns: Sequence[str], where: str, params: list, what: str):
        return self._select_from(_q(table), columns, f"WHERE {where}", params, what)

    def _select_from(self, source: str, columns: Sequence[str], where: str, params, what: str):
        sql = f"SELECT {', '.join(_q(c) for c in columns)} FROM {source} {where}"
        with self._connection(what) as conn:
            cur = conn.cursor()
            cur.execute(sql, params)
            return cur.fetchall()

    def get_objects(self, region: Region) -> pd.DataFrame:
        """The latest version of every DiaObject inside ``region`` (all SDM columns).

        Rows come from the ``pixelId`` ranges covering ``region``, one range
        scan of the covering index each (``UNION ALL``: the ranges are
        disjoint), and are then filtered exactly with ``region.contains``.
        """
        ranges = region.pixel_ranges(self.order, self.config.max_pixel_ranges)
        if len(ranges) == 0:
            return sdm.empty_frame("DiaObject")
        df = self._select_packed(*self._objects_read(ranges), "DiaObject", "get_objects")
        if len(df):
            inside = region.contains(df["ra"].to_numpy(), df["dec"].to_numpy())
            if not inside.all():
                df = df.loc[inside].reset_index(drop=True)
        return df

    def _objects_read(self, ranges: np.ndarray) -> tuple[str, str, list]:
        """(FROM item, WHERE clause, parameters) of the DiaObjectLast rows in pixel ``ranges``."""
        ph, pix = self._ph, _q(PIXEL_COLUMN)
        cols = ", ".join(_q(c) for c in [PAYLOAD_COLUMN, *self._packing["DiaObject"].text])
        scan = f"SELECT {cols} FROM {_q(LAST_TABLE)} WHERE {pix} >= {ph} AND {pix} < {ph}"
        source = "(" + " UNION ALL ".join([scan] * len(ranges)) + ") AS ranged"
        return source, "", ranges.ravel().tolist()

    def _history_read(self, table: str, ids: np.ndarray, since_mjd) -> tuple[str, str, list]:
        """(FROM item, WHERE clause, parameters) of the history rows of ``ids`` since a time."""
        test, param = self._id_filter(ids)
        where = f'WHERE "diaObjectId" {test}'
        params: list = [param]
        if since_mjd is not None:
            where += f' AND "midpointMjdTai" >= {self._ph}'
            params.append(float(since_mjd))
        return _q(table), where, params

    def _select_packed(self, source: str, where: str, params: list, sdm_table: str, what: str):
        """Rows of ``source`` (FROM item) and ``where`` (SQL clause or "") as an SDM frame.

        The frame is decoded from the rows' packed payloads. They come back
        aggregated, as one result row: the payloads concatenated by the server
        (``group_concat`` / ``string_agg``) and each string column as one
        array (``json_group_array`` / ``array_agg``), all in the same row
        order. A row-per-row fetch would create a tuple and a ``bytes`` per
        row, which costs more than the decode (and, with ~15,000 rows a
        detector, frequent garbage collections). A result too large for one
        value (SQLite's and PostgreSQL's limit is 1 GB) is read row by row.
        """
        packing = self._packing[sdm_table]
        got = self._select_aggregated(source, packing, where, params, what)
        if got is None:
            names = [PAYLOAD_COLUMN, *packing.text]
            rows = self._select_from(source, names, where, params, what)
            columns = list(zip(*rows, strict=True)) or [()] * (1 + len(packing.text))
            got = (
                b"".join(columns[0]),
                len(rows),
                dict(zip(packing.text, columns[1:], strict=True)),
            )
        return packing.unpack(*got)

    def _select_aggregated(self, source: str, packing: _Packing, where: str, params: list, what):
        """(payloads concatenated, row count, string columns) in one result row, or None.

        None when the database cannot build a value that large.
        """
        if not self._aggregate_reads:
            return None
        sql = self._aggregated_sql(source, where, packing)
        with self._connection(what) as conn:
            cur = conn.cursor()
            try:
                if self.dialect == "sqlite":
                    cur.execute(sql, params)
                else:  # binary results: the bytea as is, not hex text
                    cur.execute(sql, params, binary=True)
                row = cur.fetchone()
            except _too_big() as exc:
                _LOG.info("%s: %s; reading the rows one by one", what, exc)
                return None
        n = int(row[0])
        if n == 0:
            return b"", 0, {}
        values = row[2:]
        if self.dialect == "sqlite":
            values = [json.loads(v) for v in values]
        return bytes(row[1]), n, dict(zip(packing.text, values, strict=True))

    def _aggregated_sql(self, source: str, where: str, packing: _Packing) -> str:
        """The statement of :meth:`_select_aggregated`: count, payloads and string arrays."""
        if self.dialect == "sqlite":
            blob = f"CAST(group_concat({_q(PAYLOAD_COLUMN)}, '') AS BLOB)"
            texts = [f"json_group_array({_q(c)})" for c in packing.text]
        else:
            blob = f"string_agg({_q(PAYLOAD_COLUMN)}, ''::bytea)"
            texts = [f"array_agg({_q(c)})" for c in packing.text]
        return f"SELECT count(*), {', '.join([blob, *texts])} FROM {source} {where}"

    def _get_history(self, table: str, object_ids, since_mjd: float | None) -> pd.DataFrame:
        ids = _ids_array(object_ids, f"{table} query")
        if ids.size == 0:
            return sdm.empty_frame(table)
        if since_mjd is not None and not np.isfinite(since_mjd):
            raise InputError(f"{table} query: since_mjd must be finite, got {since_mjd}")
        return self._select_packed(
            *self._history_read(table, ids, since_mjd), table, f"read {table}"
        )

    def get_sources(self, object_ids, since_mjd: float | None) -> pd.DataFrame:
        """DiaSources of ``object_ids`` with ``midpointMjdTai >= since_mjd`` (MJD TAI).

        ``since_mjd`` None reads the whole history; see :meth:`history_start`.
        """
        return self._get_history("DiaSource", object_ids, since_mjd)

    def get_forced_sources(self, object_ids, since_mjd: float | None) -> pd.DataFrame:
        """DiaForcedSources of ``object_ids`` with ``midpointMjdTai >= since_mjd`` (MJD TAI)."""
        return self._get_history("DiaForcedSource", object_ids, since_mjd)

    def get_ss_sources(self, dia_source_ids) -> pd.DataFrame:
        """The ``SSSource`` rows of the given DiaSources (all SDM columns, any order)."""
        ids = _ids_array(dia_source_ids, "SSSource query")
        names = list(sdm.dtypes("SSSource"))
        if ids.size == 0:
            return sdm.empty_frame("SSSource")
        test, param = self._id_filter(ids)
        rows = self._select("SSSource", names, f'"diaSourceId" {test}', [param], "read SSSource")
        return _frame(rows, names, sdm.dtypes("SSSource"))

    def get_object_history(self, object_ids) -> pd.DataFrame:
        """Every stored version of the given DiaObjects (from the ``DiaObject`` table)."""
        ids = _ids_array(object_ids, "DiaObject query")
        if ids.size == 0:
            return sdm.empty_frame("DiaObject")
        names = list(self._dtypes["DiaObject"])
        test, param = self._id_filter(ids)
        rows = self._select("DiaObject", names, f'"diaObjectId" {test}', [param], "read DiaObject")
        return _frame(rows, names, self._dtypes["DiaObject"])

    # ------------------------------------------------------------------ markers

    def is_done(self, visit: int, detector: int) -> bool:
        """Whether (visit, detector) has been stored."""
        ph = self._ph
        with self._connection("is_done") as conn:
            cur = conn.cursor()
            cur.execute(
                f'SELECT 1 FROM {_q(MARKER_TABLE)} WHERE "visit" = {ph} AND "detector" = {ph}',
                [int(visit), int(detector)],
            )
            return cur.fetchone() is not None

    def done_detectors(self, visit: int) -> set[int]:
        """Detectors of ``visit`` that have been stored."""
        with self._connection("done_detectors") as conn:
            cur = conn.cursor()
            cur.execute(
                f'SELECT "detector" FROM {_q(MARKER_TABLE)} WHERE "visit" = {self._ph}',
                [int(visit)],
            )
            return {int(r[0]) for r in cur.fetchall()}

    def visit_summary(self, visit: int) -> pd.DataFrame:
        """Per stored detector of ``visit``: counts written and when, sorted by detector."""
        names = [
            "detector",
            "nDiaObjects",
            "nDiaObjectsUpdated",
            "nDiaSources",
            "nDiaForcedSources",
            "validityStartMjdTai",
            "storedUtc",
        ]
        dtypes = dict.fromkeys(names, "int64") | {
            "validityStartMjdTai": "float64",
            "storedUtc": "object",
        }
        rows = self._select(MARKER_TABLE, names, f'"visit" = {self._ph}', [int(visit)], "visit")
        return _frame(rows, names, dtypes).sort_values("detector").reset_index(drop=True)

    def visits(self) -> pd.DataFrame:
        """Per stored visit: number of detectors and rows written."""
        sql = (
            f'SELECT "visit", COUNT(*), SUM("nDiaObjects"), SUM("nDiaSources"), '
            f'SUM("nDiaForcedSources") FROM {_q(MARKER_TABLE)} GROUP BY "visit" ORDER BY "visit"'
        )
        names = ["visit", "nDetectors", "nDiaObjects", "nDiaSources", "nDiaForcedSources"]
        with self._connection("visits") as conn:
            cur = conn.cursor()
            cur.execute(sql)
            rows = cur.fetchall()
        return _frame(rows, names, dict.fromkeys(names, "int64"))

    def row_counts(self) -> dict[str, int]:
        """Number of rows in each APDB table."""
        out = {}
        with self._connection("row counts") as conn:
            cur = conn.cursor()
            for name in TABLES:
                cur.execute(f"SELECT COUNT(*) FROM {_q(name)}")
                out[name] = int(cur.fetchone()[0])
        return out

    def size_bytes(self) -> int:
        """Bytes on disk: the SQLite file with its WAL, or the PostgreSQL database."""
        if self.dialect == "sqlite":
            path = self._sqlite_path
            if path is None:
                return 0
            return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
        with self._connection("size") as conn:
            cur = conn.cursor()
            cur.execute("SELECT pg_database_size(current_database())")
            return int(cur.fetchone()[0])

    # ------------------------------------------------------------------ store

    def store(
        self,
        visit: int,
        detector: int,
        objects: pd.DataFrame | None,
        sources: pd.DataFrame | None,
        forced_sources: pd.DataFrame | None,
        *,
        time_mjd: float | None = None,
        ss_sources: pd.DataFrame | None = None,
        guard: RegionGuard | None = None,
    ) -> StoreResult:
        """Store one detector's objects, sources and forced sources in one transaction.

        See :meth:`apdb.interface.Apdb.store`; with ``guard`` the region lock
        (module docstring, *Concurrency*) is taken first, then the marker is
        written (a detector stored before returns ``already_stored``), then the
        region's DiaObjects are compared with the guard's
        (:class:`~core.errors.StaleLoadError` on a difference). Inputs are validated against the
        SDM schema before the transaction opens (:class:`InputError`); a
        failure inside it rolls everything back, marker included.
        ``ss_sources`` are the SDM ``SSSource`` rows of the solar-system
        DiaSources among ``sources``; each must name one of them by ``diaSourceId``.
        """
        visit, detector = int(visit), int(detector)
        objects = sdm.empty_frame("DiaObject") if objects is None else objects
        sources = sdm.empty_frame("DiaSource") if sources is None else sources
        forced_sources = (
            sdm.empty_frame("DiaForcedSource") if forced_sources is None else forced_sources
        )
        if time_mjd is None:
            for frame in (sources, forced_sources):
                if len(frame) and "midpointMjdTai" in frame.columns:
                    time_mjd = float(frame["midpointMjdTai"].iloc[0])
                    break
            else:
                if len(objects):
                    raise InputError(
                        f"store({visit}, {detector}): time_mjd is needed when there are "
                        f"DiaObjects but no sources to take the visit time from"
                    )
                time_mjd = float("nan")
        elif not np.isfinite(time_mjd):
            raise InputError(f"store({visit}, {detector}): time_mjd must be finite")

        nan_none = self.dialect != "sqlite"
        objs, ids, ra, dec = _object_columns(objects, time_mjd, nan_none, "DiaObject.diaObjectId")
        srcs = _Columns(sources, "DiaSource", nan_to_none=nan_none)
        fsrcs = _Columns(forced_sources, "DiaForcedSource", nan_to_none=nan_none)
        for cols, table in ((srcs, "DiaSource"), (fsrcs, "DiaForcedSource")):
            _check_visit_detector(cols.arrays, table, visit, detector)
        _unique(srcs.arrays["diaSourceId"], "DiaSource.diaSourceId")
        _unique(fsrcs.arrays["diaObjectId"], "DiaForcedSource.diaObjectId")
        ss = _Columns(
            sdm.empty_frame("SSSource") if ss_sources is None else ss_sources,
            "SSSource",
            nan_to_none=nan_none,
        )
        _unique(ss.arrays["diaSourceId"], "SSSource.diaSourceId")
        orphan = ~np.isin(ss.arrays["diaSourceId"], srcs.arrays["diaSourceId"])
        if orphan.any():
            raise InputError(
                f"SSSource: diaSourceId {int(ss.arrays['diaSourceId'][orphan][0])} is not among "
                f"the DiaSources of visit {visit} detector {detector}"
            )

        pixels = hpgeom.angle_to_pixel(hpgeom.order_to_nside(self.order), ra, dec)
        obj_rows = objs.rows()
        last_rows = objs.rows(
            pixels.tolist(),
            self._packing["DiaObject"].pack(objs.arrays, objs.n),
            names=objs.subset(self._last_names),
        )
        src_rows = srcs.rows(self._packing["DiaSource"].pack(srcs.arrays, srcs.n))
        fsrc_rows = fsrcs.rows(self._packing["DiaForcedSource"].pack(fsrcs.arrays, fsrcs.n))
        stored = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")

        lock_pixels = self._lock_pixels(guard.region) if guard is not None else []
        ph = self._ph
        try:
            with self._connection(f"store visit {visit} detector {detector}", write=True) as conn:
                cur = conn.cursor()
                for pixel in lock_pixels:  # ascending: no two stores wait on each other in a cycle
                    cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", [LOCK_CLASS, pixel])
                cur.execute(
                    f"INSERT INTO {_q(MARKER_TABLE)} "
                    f'("visit", "detector", "validityStartMjdTai", "storedUtc", "nDiaObjects", '
                    f'"nDiaObjectsUpdated", "nDiaSources", "nDiaForcedSources") '
                    f"VALUES ({', '.join([ph] * 8)}) "
                    f'ON CONFLICT ("visit", "detector") DO NOTHING',
                    [
                        visit,
                        detector,
                        None if np.isnan(time_mjd) else time_mjd,
                        stored,
                        objs.n,
                        0,
                        srcs.n,
                        fsrcs.n,
                    ],
                )
                if cur.rowcount == 0:
                    raise _AlreadyStored
                if guard is not None:
                    self._check_guard(cur, guard, time_mjd, visit, detector)
                n_updated = 0
                if objs.n:
                    n_updated = self._write_objects(cur, ids, time_mjd, objs, obj_rows, last_rows)
                    if n_updated:
                        cur.execute(
                            f'UPDATE {_q(MARKER_TABLE)} SET "nDiaObjectsUpdated" = {ph} '
                            f'WHERE "visit" = {ph} AND "detector" = {ph}',
                            [n_updated, visit, detector],
                        )
                self._insert(cur, "DiaSource", [*srcs.names, PAYLOAD_COLUMN], src_rows)
                self._insert(cur, "DiaForcedSource", [*fsrcs.names, PAYLOAD_COLUMN], fsrc_rows)
                self._insert(cur, "SSSource", ss.names, ss.rows())
        except _AlreadyStored:
            _LOG.info("visit %d detector %d already stored in %s", visit, detector, self._url)
            return StoreResult(visit, detector, already_stored=True)
        except ApdbError as exc:
            cause = exc.__cause__
            unique = isinstance(cause, psycopg_errors("UniqueViolation")) or (
                isinstance(cause, sqlite3.IntegrityError) and "UNIQUE constraint" in str(cause)
            )
            if unique:  # not any integrity error: a trigger's RAISE(ABORT) is one too
                raise self._collision(visit, detector, srcs.arrays["diaSourceId"], ids) from exc
            raise
        return StoreResult(
            visit,
            detector,
            already_stored=False,
            n_objects=objs.n,
            n_objects_updated=n_updated,
            n_sources=srcs.n,
            n_forced_sources=fsrcs.n,
        )

    def bulk_load(
        self,
        objects: pd.DataFrame,
        sources: pd.DataFrame,
        forced_sources: pd.DataFrame,
        markers: pd.DataFrame | None = None,
    ) -> BulkLoadResult:
        """Fill the APDB with history in one transaction (see :meth:`Apdb.bulk_load`).

        Writes the layout :meth:`store` writes (``DiaObject`` and
        ``DiaObjectLast`` rows with their pixel and packed payload, sources
        and forced sources with theirs, one ``ApdbVisitDetector`` marker per
        (visit, detector) with its row counts) through the same bulk paths
        (``executemany`` on SQLite, binary ``COPY`` on PostgreSQL). Every frame
        is converted and checked before the transaction opens.
        """
        nan_none = self.dialect != "sqlite"
        objs, ids, ra, dec = _object_columns(objects, None, nan_none, "DiaObject.diaObjectId")
        srcs = _Columns(sources, "DiaSource", nan_to_none=nan_none)
        fsrcs = _Columns(forced_sources, "DiaForcedSource", nan_to_none=nan_none)
        _unique(srcs.arrays["diaSourceId"], "DiaSource.diaSourceId")
        _unique(fsrcs.arrays["diaForcedSourceId"], "DiaForcedSource.diaForcedSourceId")
        marker_rows = self._bulk_markers(markers, srcs.arrays, fsrcs.arrays)

        pixels = hpgeom.angle_to_pixel(hpgeom.order_to_nside(self.order), ra, dec)
        last_names = objs.subset(self._last_names)
        jobs = [
            (MARKER_TABLE, list(_MARKER_COLUMNS), marker_rows),
            ("DiaObject", objs.names, objs.rows()),
            (
                LAST_TABLE,
                [*last_names, PIXEL_COLUMN, PAYLOAD_COLUMN],
                objs.rows(
                    pixels.tolist(),
                    self._packing["DiaObject"].pack(objs.arrays, objs.n),
                    names=last_names,
                ),
            ),
            (
                "DiaSource",
                [*srcs.names, PAYLOAD_COLUMN],
                srcs.rows(self._packing["DiaSource"].pack(srcs.arrays, srcs.n)),
            ),
            (
                "DiaForcedSource",
                [*fsrcs.names, PAYLOAD_COLUMN],
                fsrcs.rows(self._packing["DiaForcedSource"].pack(fsrcs.arrays, fsrcs.n)),
            ),
        ]
        with self._connection("bulk load", write=True) as conn:
            cur = conn.cursor()
            for table, names, rows in jobs:
                if table == MARKER_TABLE and rows:
                    cols = ", ".join(_q(n) for n in names)
                    values = ", ".join([self._ph] * len(names))
                    cur.executemany(f"INSERT INTO {_q(table)} ({cols}) VALUES ({values})", rows)
                else:
                    self._insert(cur, table, names, rows)
        return BulkLoadResult(objs.n, srcs.n, fsrcs.n, len(marker_rows))

    def _bulk_markers(self, markers, src: dict, fsrc: dict) -> list[tuple]:
        """Marker rows of a bulk load: the given (or seen) pairs with their row counts."""
        keys = [pd.DataFrame({"visit": a["visit"], "detector": a["detector"]}) for a in (src, fsrc)]
        if markers is not None:
            for column in ("visit", "detector"):
                if column not in markers.columns:
                    raise InputError(f"{MARKER_TABLE}: required column {column!r} is missing")
            given = markers[["visit", "detector"]]
            for column in ("visit", "detector"):
                try:
                    _check_kind(given[column], "int64")
                    if given[column].hasnans:
                        raise InputError("null value")
                except InputError as exc:
                    raise InputError(f"{MARKER_TABLE}.{column}: {exc}") from None
            pairs = given.astype("int64").drop_duplicates()
            everything = pd.concat([pairs, *keys]).drop_duplicates()
            if len(everything) != len(pairs):
                extra = everything.iloc[len(pairs)]
                raise InputError(
                    f"{MARKER_TABLE}: rows of (visit {extra['visit']}, detector "
                    f"{extra['detector']}) are loaded but the pair is not in markers"
                )
        else:
            pairs = pd.concat(keys).astype("int64").drop_duplicates()
        counts = pairs.reset_index(drop=True)
        start = pd.Series(src["midpointMjdTai"]).groupby(np.asarray(src["visit"])).min()
        for name, arrays in (("nDiaSources", src), ("nDiaForcedSources", fsrc)):
            n = pd.DataFrame({"visit": arrays["visit"], "detector": arrays["detector"]})
            n = n.groupby(["visit", "detector"]).size().rename(name).reset_index()
            counts = counts.merge(n.astype("int64"), on=["visit", "detector"], how="left")
        counts = counts.fillna(0)
        stored = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        rows = []
        for v, d, ns, nf in counts[
            ["visit", "detector", "nDiaSources", "nDiaForcedSources"]
        ].itertuples(index=False):
            t = start.get(v, np.nan)
            rows.append(
                (int(v), int(d), None if np.isnan(t) else float(t), stored, 0, 0, int(ns), int(nf))
            )
        return rows

    def _collision(
        self, visit: int, detector: int, source_ids: np.ndarray, object_ids: np.ndarray
    ) -> InputError:
        """The error for new IDs that are already in the APDB (the store was rolled back).

        Only given ``diaSourceId`` values can collide (diapipe's own are unique
        per (visit, detector)); the message names some of them and who stored them.
        """
        ids = np.unique(np.concatenate([source_ids, object_ids]).astype(np.int64))
        cond, param = self._id_filter(ids)
        with self._connection(f"store visit {visit} detector {detector}") as conn:
            cur = conn.cursor()
            cur.execute(
                f'SELECT "diaSourceId", "visit", "detector" FROM "DiaSource" '
                f'WHERE "diaSourceId" {cond} ORDER BY "diaSourceId" LIMIT 5',
                [param],
            )
            rows = cur.fetchall()
            cur.execute(f'SELECT COUNT(*) FROM "DiaSource" WHERE "diaSourceId" {cond}', [param])
            n = int(cur.fetchone()[0])
        where = "; ".join(f"{r[0]} (visit {r[1]}, detector {r[2]})" for r in rows)
        return InputError(
            f"store({visit}, {detector}): diaSourceId values collide with IDs already in the "
            f"APDB {self._url}: {n} of them, e.g. {where or '(a DiaObject ID)'}. Given "
            "diaSourceIds must be unique over the survey; leave the column out to have diapipe "
            "make them. Nothing of this detector was stored."
        )

    def _lock_pixels(self, region: Region) -> list[int]:
        """The PostgreSQL region-lock pixels of ``region``, ascending; none on SQLite."""
        if self.dialect == "sqlite":
            return []  # BEGIN IMMEDIATE: every write transaction holds the one write lock
        ranges = region.pixel_ranges(LOCK_ORDER, MAX_LOCK_PIXELS)
        n = int((ranges[:, 1] - ranges[:, 0]).sum()) if len(ranges) else 0
        if n > MAX_LOCK_PIXELS:
            raise InputError(
                f"guarded store: the region covers {n} HEALPix order-{LOCK_ORDER} pixels, "
                f"more than {MAX_LOCK_PIXELS}; a detector footprint covers a few"
            )
        if n == 0:
            return []
        pixels = np.unique(np.concatenate([np.arange(a, b) for a, b in ranges]))
        return [int(p) for p in pixels]

    def _check_guard(
        self, cur, guard: RegionGuard, time_mjd: float, visit: int, detector: int
    ) -> None:
        """Raise StaleLoadError when the region's DiaObjects differ from the guard's.

        Runs inside the store's transaction, after the region lock: what it reads
        is what the store will write against. Versions started at ``time_mjd``
        were written by the same visit run and are not a conflict.
        """
        ranges = guard.region.pixel_ranges(self.order, self.config.max_pixel_ranges)
        if len(ranges) == 0:
            return
        ph, pix = self._ph, _q(PIXEL_COLUMN)
        where = " OR ".join([f"({pix} >= {ph} AND {pix} < {ph})"] * len(ranges))
        cur.execute(
            f'SELECT "diaObjectId", "validityStartMjdTai", "ra", "dec" FROM {_q(LAST_TABLE)} '
            f"WHERE {where}",
            ranges.ravel().tolist(),
        )
        rows = cur.fetchall()
        now = np.array([r[0] for r in rows], dtype=np.int64)
        start = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=np.float64)
        if len(rows):
            ra = np.array([r[2] for r in rows], dtype=np.float64)
            dec = np.array([r[3] for r in rows], dtype=np.float64)
            inside = guard.region.contains(ra, dec)
            now, start = now[inside], start[inside]
        read = pd.Series(guard.validity_starts, index=guard.object_ids)
        read = read[~read.index.duplicated()]
        ours = start == time_mjd  # written by this visit run (another of its detectors)
        known = np.isin(now, read.index.to_numpy())
        new = now[~known & ~ours]
        was = read.reindex(now[known]).to_numpy(dtype=np.float64)
        changed = now[known][(start[known] != was) & ~ours[known]]
        gone = np.setdiff1d(read.index.to_numpy(), now)
        if len(new) or len(changed) or len(gone):
            raise StaleLoadError(
                f"store visit {visit} detector {detector}: since this detector loaded its "
                f"DiaObjects, another store changed its footprint: {len(new)} new, "
                f"{len(changed)} with a new version, {len(gone)} gone "
                f"(e.g. diaObjectId {int(np.concatenate([new, changed, gone])[0])}); "
                f"nothing written, the detector must be loaded and associated again"
            )

    def _id_filter(self, ids: np.ndarray) -> tuple[str, str]:
        """SQL test and its one parameter for "diaObjectId in ``ids``" (int64 array).

        The IDs go as one text parameter: a JSON array expanded by ``json_each``
        on SQLite, a bigint array literal on PostgreSQL (the driver's adaptation
        of a list of Python ints costs ~1 ms per 1,000 IDs).
        """
        text = ",".join(map(str, ids.tolist()))
        if self.dialect == "sqlite":
            return "IN (SELECT value FROM json_each(?))", f"[{text}]"
        return "= ANY(%s::int8[])", f"{{{text}}}"

    def _write_objects(self, cur, ids, time_mjd, objs, obj_rows, last_rows) -> int:
        """Close the open versions of ``ids``, replace them in the last table, add rows."""
        cond, param = self._id_filter(ids)
        cur.execute(
            f'UPDATE "DiaObject" SET "validityEndMjdTai" = {self._ph} '
            f'WHERE "diaObjectId" {cond} AND "validityEndMjdTai" IS NULL',
            [time_mjd, param],
        )
        n_updated = max(cur.rowcount, 0)
        cur.execute(f'DELETE FROM {_q(LAST_TABLE)} WHERE "diaObjectId" {cond}', [param])
        last_names = [*objs.subset(self._last_names), PIXEL_COLUMN, PAYLOAD_COLUMN]
        self._insert(cur, LAST_TABLE, last_names, last_rows)
        self._insert(cur, "DiaObject", objs.names, obj_rows)
        return n_updated

    def _insert(self, cur, table: str, names: list[str], rows: list[tuple]) -> None:
        if not rows:
            return
        cols = ", ".join(_q(n) for n in names)
        if self.dialect == "sqlite":
            values = ", ".join(["?"] * len(names))
            cur.executemany(f"INSERT INTO {_q(table)} ({cols}) VALUES ({values})", rows)
        else:
            # Binary COPY: psycopg's C dumpers write each value without text formatting.
            types = [_PG_TYPES[table][n] for n in names]
            with cur.copy(f"COPY {_q(table)} ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(types)
                for row in rows:
                    copy.write_row(row)

    # ------------------------------------------------------------------ de-duplication

    def object_pixels(self, order: int) -> np.ndarray:
        """HEALPix nest pixels at ``order`` holding a current DiaObject (from ``pixelId``)."""
        order = int(order)
        if not 0 <= order <= self.order:
            raise InputError(
                f"object_pixels: order must be within [0, {self.order}] (the database's "
                f"HEALPix order), got {order}"
            )
        factor = 4 ** (self.order - order)
        with self._connection("object pixels") as conn:
            cur = conn.cursor()
            cur.execute(f"SELECT DISTINCT {_q(PIXEL_COLUMN)} / {factor} FROM {_q(LAST_TABLE)}")
            pixels = np.array([int(r[0]) for r in cur.fetchall()], dtype=np.int64)
        return np.sort(pixels)

    def merge_objects(
        self,
        merges: pd.DataFrame,
        survivors: pd.DataFrame,
        *,
        time_mjd: float,
        expected: pd.DataFrame,
    ) -> MergeResult:
        """Merge DiaObjects into survivors in one transaction (see :meth:`Apdb.merge_objects`).

        The rows moved are read inside the transaction, their ``diaObjectId``
        changed, and written back through the store path (SDM columns and
        packed payload together), so the payloads stay in step with the columns.
        The current versions are checked against ``expected`` under the write
        lock (``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE`` on
        PostgreSQL) before anything changes.
        """
        for column in ("diaObjectId", "survivorId"):
            if column not in merges.columns:
                raise InputError(f"merge_objects: merges lacks column {column!r}")
        for column in ("diaObjectId", "validityStartMjdTai"):
            if column not in expected.columns:
                raise InputError(f"merge_objects: expected lacks column {column!r}")
        removed = _ids_array(merges["diaObjectId"], "merge_objects merges")
        if removed.size != len(merges):
            raise InputError("merge_objects: a diaObjectId is merged away more than once")
        if removed.size == 0:
            return MergeResult(0, 0, 0, 0, 0)
        target = dict(
            zip(
                merges["diaObjectId"].to_numpy(dtype=np.int64).tolist(),
                merges["survivorId"].to_numpy(dtype=np.int64).tolist(),
                strict=True,
            )
        )
        kept = np.unique(np.fromiter(target.values(), dtype=np.int64))
        both = np.intersect1d(kept, removed)
        if both.size:
            raise InputError(
                f"merge_objects: DiaObject {int(both[0])} is both a survivor and merged away"
            )
        time_mjd = float(time_mjd)
        if not np.isfinite(time_mjd):
            raise InputError(f"merge_objects: time_mjd must be finite, got {time_mjd}")
        nan_none = self.dialect != "sqlite"
        objs, ids, ra, dec = _object_columns(
            survivors, time_mjd, nan_none, "merge_objects survivors.diaObjectId"
        )
        if not np.array_equal(np.sort(ids.astype(np.int64)), kept):
            raise InputError(
                "merge_objects: survivors must hold exactly one row per survivorId of merges"
            )
        involved = np.concatenate([kept, removed])
        want = dict(
            zip(
                expected["diaObjectId"].to_numpy(dtype=np.int64).tolist(),
                expected["validityStartMjdTai"].to_numpy(dtype=np.float64).tolist(),
                strict=True,
            )
        )
        missing = [int(i) for i in involved if int(i) not in want]
        if missing:
            raise InputError(f"merge_objects: expected lacks DiaObject {missing[0]}")
        latest = max(want[int(i)] for i in involved)
        if not time_mjd > latest:
            raise InputError(
                f"merge_objects: time_mjd {time_mjd} must be later than the validity start "
                f"{latest} of the current versions merged"
            )
        pixels = hpgeom.angle_to_pixel(hpgeom.order_to_nside(self.order), ra, dec)
        obj_rows = objs.rows()
        last_rows = objs.rows(
            pixels.tolist(),
            self._packing["DiaObject"].pack(objs.arrays, objs.n),
            names=objs.subset(self._last_names),
        )
        cond_all, param_all = self._id_filter(involved)
        cond_removed, param_removed = self._id_filter(removed)
        cond_kept, param_kept = self._id_filter(kept)
        lock = "" if self.dialect == "sqlite" else " FOR UPDATE"
        with self._connection(f"merge {removed.size} DiaObjects", write=True) as conn:
            cur = conn.cursor()
            cur.execute(
                f'SELECT "diaObjectId", "validityStartMjdTai" FROM {_q(LAST_TABLE)} '
                f'WHERE "diaObjectId" {cond_all}{lock}',
                [param_all],
            )
            have = {int(i): float(t) for i, t in cur.fetchall()}
            changed = [int(i) for i in involved if have.get(int(i)) != want[int(i)]]
            if changed:
                i = changed[0]
                now = "no longer current" if i not in have else f"at version {have[i]}"
                raise ApdbError(
                    f"APDB {self._url}: merge_objects: DiaObject {i} is {now}, not at the "
                    f"version {want[i]} read ({len(changed)} object(s) changed since the "
                    f"merge was computed); nothing was merged"
                )
            sources = self._read_rows(
                cur, "DiaSource", f'"diaObjectId" {cond_removed}', param_removed
            )
            sources["diaObjectId"] = pd.array(
                [target[int(i)] for i in sources["diaObjectId"].to_numpy(dtype=np.int64)],
                dtype="Int64",
            )
            forced = self._read_rows(
                cur, "DiaForcedSource", f'"diaObjectId" {cond_removed}', param_removed
            )
            cur.execute(
                f'SELECT "diaObjectId", "visit", "detector" FROM "DiaForcedSource" '
                f'WHERE "diaObjectId" {cond_kept}',
                [param_kept],
            )
            taken = pd.DataFrame(cur.fetchall(), columns=["diaObjectId", "visit", "detector"])
            n_forced_read = len(forced)
            forced = _reassign_forced(forced, target, taken)
            srcs = _Columns(sources, "DiaSource", nan_to_none=nan_none)
            fsrcs = _Columns(forced, "DiaForcedSource", nan_to_none=nan_none)
            cur.execute(
                f'DELETE FROM "DiaSource" WHERE "diaObjectId" {cond_removed}', [param_removed]
            )
            cur.execute(
                f'DELETE FROM "DiaForcedSource" WHERE "diaObjectId" {cond_removed}', [param_removed]
            )
            self._insert(
                cur,
                "DiaSource",
                [*srcs.names, PAYLOAD_COLUMN],
                srcs.rows(self._packing["DiaSource"].pack(srcs.arrays, srcs.n)),
            )
            self._insert(
                cur,
                "DiaForcedSource",
                [*fsrcs.names, PAYLOAD_COLUMN],
                fsrcs.rows(self._packing["DiaForcedSource"].pack(fsrcs.arrays, fsrcs.n)),
            )
            cur.execute(
                f'UPDATE "DiaObject" SET "validityEndMjdTai" = {self._ph} '
                f'WHERE "diaObjectId" {cond_removed} AND "validityEndMjdTai" IS NULL',
                [time_mjd, param_removed],
            )
            cur.execute(
                f'DELETE FROM {_q(LAST_TABLE)} WHERE "diaObjectId" {cond_removed}', [param_removed]
            )
            self._write_objects(cur, ids, time_mjd, objs, obj_rows, last_rows)
        return MergeResult(
            n_survivors=int(kept.size),
            n_merged=int(removed.size),
            n_sources=srcs.n,
            n_forced_sources=fsrcs.n,
            n_forced_dropped=n_forced_read - fsrcs.n,
        )

    def _read_rows(self, cur, table: str, where: str, param) -> pd.DataFrame:
        """Rows of a packed table read on an open cursor (inside a write transaction)."""
        packing = self._packing[table]
        cols = ", ".join(_q(c) for c in [PAYLOAD_COLUMN, *packing.text])
        cur.execute(f"SELECT {cols} FROM {_q(table)} WHERE {where}", [param])
        rows = cur.fetchall()
        columns = list(zip(*rows, strict=True)) or [()] * (1 + len(packing.text))
        return packing.unpack(
            b"".join(bytes(b) for b in columns[0]),
            len(rows),
            dict(zip(packing.text, columns[1:], strict=True)),
        )


def _reassign_forced(forced: pd.DataFrame, target: dict, taken: pd.DataFrame) -> pd.DataFrame:
    """Forced rows of merged-away objects moved to their survivor, one per (visit, detector).

    A row is dropped when the survivor already has one for its (visit,
    detector) (``taken``) or when another merged-away object of the same
    survivor has one with a smaller ``diaForcedSourceId``.
    """
    if len(forced) == 0:
        return forced
    forced = forced.assign(
        diaObjectId=np.array(
            [target[int(i)] for i in forced["diaObjectId"].to_numpy(dtype=np.int64)],
            dtype=np.int64,
        )
    )
    forced = forced.sort_values("diaForcedSourceId", kind="stable")
    forced = forced.drop_duplicates(["diaObjectId", "visit", "detector"], keep="first")
    key = ["diaObjectId", "visit", "detector"]
    if len(taken):
        taken = taken.astype("int64").drop_duplicates()
        hit = forced[key].astype("int64").merge(taken, on=key, how="left", indicator=True)
        forced = forced[(hit["_merge"] == "left_only").to_numpy()]
    return forced.reset_index(drop=True)


_MARKER_COLUMNS = (
    "visit",
    "detector",
    "validityStartMjdTai",
    "storedUtc",
    "nDiaObjects",
    "nDiaObjectsUpdated",
    "nDiaSources",
    "nDiaForcedSources",
)


def _object_columns(
    frame: pd.DataFrame, start_mjd: float | None, nan_to_none: bool, what: str
) -> tuple[_Columns, np.ndarray, np.ndarray, np.ndarray]:
    """DiaObject rows as columns to write, positions checked, IDs unique (``what`` names them).

    Every row is written as the current version (``validityEndMjdTai`` null);
    ``start_mjd`` replaces ``validityStartMjdTai`` unless it is None.
    """
    overrides: dict[str, float] = {"validityEndMjdTai": float("nan")}
    if start_mjd is not None:
        overrides["validityStartMjdTai"] = start_mjd
    objs = _Columns(frame, "DiaObject", overrides=overrides, nan_to_none=nan_to_none)
    ids, ra, dec = (objs.arrays[k] for k in ("diaObjectId", "ra", "dec"))
    _check_positions(ids, ra, dec)
    _unique(ids, what)
    return objs, ids, ra, dec


def _check_positions(ids: np.ndarray, ra: np.ndarray, dec: np.ndarray) -> None:
    bad = ~(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"DiaObject: ra/dec must be finite with |dec| <= 90 deg; diaObjectId "
            f"{ids[i]} has ({ra[i]}, {dec[i]})"
        )


def _unique(values: np.ndarray, what: str) -> None:
    uniq, counts = np.unique(values, return_counts=True)
    if len(uniq) != len(values):
        raise InputError(f"{what}: duplicate value {uniq[counts > 1][0]} in the input")


def _check_visit_detector(arrays: dict, table: str, visit: int, detector: int) -> None:
    for column, want in (("visit", visit), ("detector", detector)):
        values = arrays[column]
        wrong = values != want
        if wrong.any():
            raise InputError(
                f"{table}.{column}: store({visit}, {detector}) got {int(wrong.sum())} row(s) "
                f"with {column} = {values[wrong][0]}"
            )
