"""Alert packets in Rubin's official Avro schema (docs/design.md §4.8).

One alert per new DiaSource, in the schema shipped by ``lsst-alert-packet``
(default: its latest version, 11.1 at the time of writing)::

    diaSourceId, observation_reason, target_name,
    diaSource            the new DiaSource (SDM row → schema record, by field name)
    prvDiaSources        its DiaObject's DiaSources of the last ``history_days``,
                         without this one; null when there are none
    prvDiaForcedSources  its DiaObject's DiaForcedSources of the same window, only
                         when the DiaObject has ≥ ``forced_source_history_threshold``
                         DiaSources (Rubin: forcedSourceHistoryThreshold); else null
    diaObject            the updated DiaObject; null for a source without one
    ssSource, mpc_orbits the SSSource row and published orbit of a solar-system source
                         (tasks.ssoassociate); null otherwise
    cutoutDifference, cutoutScience, cutoutTemplate   FITS bytes or null

Encoding
--------
Avro's binary encoding is a plain concatenation: a record is its fields in
order, an array is ``count`` + the items + ``0``, a ``["null", T]`` union is
the branch index (``0`` or ``1`` as a zig-zag varint, i.e. byte ``0x00`` or
``0x02``) followed by the value. So instead of turning every row into a Python
dict and handing it to an Avro writer, this module encodes whole tables
column by column with numpy (varints, little-endian floats, UTF-8 strings),
giving one byte string per row, and assembles each alert from byte pieces:
each history row is encoded once per batch and an object's history is one
contiguous slice of the encoded table. History rows never change once stored,
so nothing else is needed to reuse their encoding.

Nulls: a pandas ``NA``/``None`` and a float that is not finite (``NaN``,
``±inf``, or a double beyond the range of a ``float`` field) are null: written
as Avro ``null`` in a nullable field, and an :class:`~core.errors.AlertError`
naming the record, field and row in a field the schema declares non-nullable.
So no packet carries a NaN or an infinity; Rubin writes null for an undefined
value.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import fastavro
import numpy as np
import pandas as pd
from lsst.alert.packet import Schema, get_latest_schema_version, get_schema_path
from pydantic import BaseModel, Field, field_validator

from core.bundle import VisitInfo
from core.errors import AlertError, ConfigError
from core.frames import column_values

__all__ = [
    "AlertBatch",
    "AlertSchema",
    "PackagingConfig",
    "clean_alert_record",
    "decode_alert",
    "encode_alert_records",
    "encode_table",
    "load_schema",
    "package_alerts",
    "wire_header",
]

log = logging.getLogger(__name__)

_PRIMITIVES = ("long", "int", "float", "double", "boolean", "string", "bytes")
#: Avro logical types on ``long``: microseconds / milliseconds since 1970 UTC.
_TIMESTAMPS = {"timestamp-micros": 1_000_000, "timestamp-millis": 1_000}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_RANGE = np.arange(1 << 16)
_SHIFTS = np.arange(10, dtype=np.uint64) * np.uint64(7)
#: Smallest zig-zag value needing k + 2 varint bytes, k = 0..8.
_VARINT_LIMITS = np.uint64(1) << (_SHIFTS[1:])
_MASKED = (pd.arrays.IntegerArray, pd.arrays.BooleanArray, pd.arrays.FloatingArray)
_NULL = b"\x00"
_SOME = b"\x02"
_FLOAT_WIDTH = {"float": np.float32, "double": np.float64}


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------


class PackagingConfig(BaseModel, frozen=True, extra="forbid"):
    """How alerts are packaged."""

    schema_version: str | None = Field(
        None,
        description=(
            "Alert schema version 'MAJOR.MINOR' from lsst-alert-packet; None = the "
            "latest it ships (Rubin: alertSchemaVersion)."
        ),
    )
    forced_source_history_threshold: int = Field(
        2,
        ge=0,
        description=(
            "An alert carries prvDiaForcedSources only when its DiaObject has at "
            "least this many DiaSources (Rubin: forcedSourceHistoryThreshold)."
        ),
    )
    history_days: float = Field(
        360.0,
        gt=0,
        description=(
            "Days of DiaSource/DiaForcedSource history sent with an alert "
            "(Rubin: historyMonths = 12, i.e. 360 days)."
        ),
    )
    do_package: bool = Field(True, description="Build alerts at all (Rubin: doPackageAlerts).")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: str | None) -> str | None:
        if v is not None:
            load_schema(v)  # raises ConfigError for an unknown version
        return v


# --------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordLayout:
    """The fields of one record type: (name, primitive type, nullable)."""

    name: str
    fields: tuple[tuple[str, str, bool], ...]


@dataclass(frozen=True, eq=False)
class AlertSchema:
    """An official alert schema, resolved and parsed.

    Attributes
    ----------
    version : str
        ``"MAJOR.MINOR"``.
    schema_id : int
        ``major * 100 + minor``, the id of the Confluent wire format.
    definition : dict
        The fully resolved Avro schema (nested named types inlined).
    parsed : dict
        ``fastavro.parse_schema(definition)``.
    top : tuple
        The alert's top-level fields as (name, kind) with kind one of
        ``long``, ``string?``, ``record``, ``record?``, ``array?``, ``bytes?``, ``null``.
    records : dict
        Top-level field name → :class:`RecordLayout` of its record (or array item).
    """

    version: str
    schema_id: int
    definition: dict
    parsed: dict
    top: tuple[tuple[str, str], ...]
    records: Mapping[str, RecordLayout]


def _layout(record: dict) -> RecordLayout:
    fields = []
    for f in record["fields"]:
        t = f["type"]
        nullable = isinstance(t, list)
        if nullable:
            others = [x for x in t if x != "null"]
            if len(t) != 2 or "null" not in t or len(others) != 1:
                raise ConfigError(f"{record['name']}.{f['name']}: unsupported union {t}")
            t = others[0]
        if isinstance(t, dict) and t.get("logicalType") in _TIMESTAMPS and t.get("type") == "long":
            t = t["logicalType"]
        elif isinstance(t, dict) and t.get("type") in _PRIMITIVES and "logicalType" not in t:
            t = t["type"]
        if t not in _PRIMITIVES and t not in _TIMESTAMPS:
            raise ConfigError(f"{record['name']}.{f['name']}: unsupported type {t}")
        fields.append((f["name"], t, nullable))
    return RecordLayout(record["name"], tuple(fields))


@functools.cache
def load_schema(version: str | None = None) -> AlertSchema:
    """The official alert schema ``version`` (``"11.1"``; None = latest).

    Raises
    ------
    ConfigError
        If lsst-alert-packet has no such version or its layout is not one
        diapipe can write.
    """
    if version is None:
        major, minor = get_latest_schema_version()
    else:
        try:
            major, minor = (int(p) for p in str(version).split("."))
        except ValueError as exc:
            raise ConfigError(f"alert schema version {version!r} is not 'MAJOR.MINOR'") from exc
    path = os.path.join(get_schema_path(major, minor), f"lsst.v{major}_{minor}.alert.avsc")
    if not os.path.exists(path):
        raise ConfigError(f"lsst-alert-packet has no alert schema {major}.{minor} ({path})")
    definition = Schema.from_file(path).definition
    top = []
    records: dict[str, RecordLayout] = {}
    named: dict[str, dict] = {}

    def resolve(t):
        if isinstance(t, str) and t in named:
            return named[t]
        if isinstance(t, dict) and t.get("type") == "record":
            named[t["name"]] = t
            if "namespace" in t:
                named[f"{t['namespace']}.{t['name']}"] = t
        if isinstance(t, dict) and t.get("type") == "array":
            return {**t, "items": resolve(t["items"])}
        return t

    for f in definition["fields"]:
        name, t = f["name"], f["type"]
        nullable = isinstance(t, list)
        inner = resolve(next((x for x in t if x != "null"), None) if nullable else t)
        if isinstance(inner, dict) and inner.get("type") == "record":
            records[name] = _layout(inner)
            kind = "record?" if nullable else "record"
        elif isinstance(inner, dict) and inner.get("type") == "array":
            if not nullable:
                raise ConfigError(f"alert schema {major}.{minor}: array {name} must be nullable")
            records[name] = _layout(inner["items"])
            kind = "array?"
        elif inner in ("long", "string", "bytes"):
            kind = inner + ("?" if nullable else "")
        else:
            raise ConfigError(f"alert schema {major}.{minor}: unsupported field {name}: {t}")
        top.append((name, kind))
    required = {"diaSource"}
    if not required <= records.keys():
        raise ConfigError(f"alert schema {major}.{minor} has no diaSource record")
    return AlertSchema(
        version=f"{major}.{minor}",
        schema_id=major * 100 + minor,
        definition=definition,
        parsed=fastavro.parse_schema(definition),
        top=tuple(top),
        records=records,
    )


def wire_header(schema_id: int) -> bytes:
    """The 5-byte Confluent wire-format prefix: magic 0 + big-endian schema id."""
    return b"\x00" + int(schema_id).to_bytes(4, "big", signed=False)


# --------------------------------------------------------------------------
# column-wise Avro encoding
# --------------------------------------------------------------------------


def _zigzag_varint(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Avro ``long``/``int`` encoding of int64 ``v``: (bytes (n, w) uint8, lengths (n,)).

    ``w`` is the longest encoding in ``v`` (1 to 10 bytes), so small counters
    and flags do not carry the 10-byte width of a 64-bit ID.
    """
    v = np.asarray(v, dtype=np.int64)
    z = ((v << np.int64(1)) ^ (v >> np.int64(63))).view(np.uint64)
    top = int(z.max()) if z.size else 0
    width = max(1, (top.bit_length() + 6) // 7)
    shifted = z[:, None] >> _SHIFTS[None, :width]
    lens = np.searchsorted(_VARINT_LIMITS[: width - 1], z, side="right") + 1
    out = (shifted & np.uint64(0x7F)).astype(np.uint8)
    if width > 1:
        out[:, :-1] |= (_RANGE[None, : width - 1] < (lens[:, None] - 1)).view(np.uint8) << 7
    return out, lens


def varint(n: int) -> bytes:
    """Avro zig-zag varint of one Python int."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = z & 0x7F
        z >>= 7
        if z:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fixed(values: np.ndarray, dtype: str) -> tuple[np.ndarray, None]:
    """Little-endian fixed-width values as (bytes (n, width) uint8, None): a view when possible."""
    arr = np.ascontiguousarray(values, dtype=dtype)
    return arr.view(np.uint8).reshape(len(arr), arr.dtype.itemsize), None


def _strings(values: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Avro strings (length varint + UTF-8) of an object array: (bytes (n, w), lengths (n,)).

    Each distinct value is encoded once (a band or version column has a
    handful), then gathered by its code. Values are written as ``str(value)``.
    """
    codes, uniques = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=False)
    if len(uniques) == 0:
        return np.zeros((0, 1), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    encoded = []
    for u in uniques:
        try:
            raw = str(u).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise AlertError(f"{what}: cannot encode string as UTF-8: {exc}") from exc
        encoded.append(varint(len(raw)) + raw)
    width = max((len(e) for e in encoded), default=1)
    table = np.zeros((len(encoded), width), dtype=np.uint8)
    lens = np.zeros(len(encoded), dtype=np.int64)
    for k, e in enumerate(encoded):
        table[k, : len(e)] = np.frombuffer(e, dtype=np.uint8)
        lens[k] = len(e)
    return table[codes], lens[codes]


def _column(values: np.ndarray, kind: str, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(bytes (n, w) uint8, lengths (n,) or None when all w bytes are used) of a value column."""
    if kind in ("long", "int") or kind in _TIMESTAMPS:
        try:
            ints = values.astype(np.int64, copy=False)
        except (TypeError, ValueError) as exc:
            raise AlertError(f"{what}: values are not integers: {exc}") from exc
        return _zigzag_varint(ints)
    if kind == "float":
        return _fixed(values, "<f4")
    if kind == "double":
        return _fixed(values, "<f8")
    if kind == "boolean":
        return _fixed(values.astype(bool, copy=False), "u1")
    if kind == "string":
        return _strings(values, what)
    raise AlertError(f"{what}: cannot encode Avro type {kind} column-wise")


def _array_values(
    arr, kind: str, nullable: bool, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, null mask or None) of one frame column for an Avro ``kind``, at ``rows``.

    A NaN in a float column counts as null, like ``pandas.isna``. For a plain
    numpy float column of a nullable field the mask is left to
    :func:`encode_table` (``None``), which tests NaN itself.
    """
    if isinstance(arr, np.ndarray) and arr.dtype.kind in "biuf":
        v = arr if rows is None else arr[rows]
        if arr.dtype.kind != "f":
            return (v.astype(bool) if kind == "boolean" else v), None
        null = np.isnan(v)
        if kind in ("float", "double"):
            return v, (None if nullable else null)
        if kind in ("long", "int", "boolean") or kind in _TIMESTAMPS:
            filled = np.where(null, 0, v).astype(np.int64)
            return (filled.astype(bool) if kind == "boolean" else filled), null
    if kind in _TIMESTAMPS:
        s = pd.Series(arr)
        if rows is not None:
            s = s.iloc[rows]
        null = s.isna().to_numpy()
        ticks = pd.to_datetime(s, utc=True).astype("int64") // (1_000_000_000 // _TIMESTAMPS[kind])
        return ticks.to_numpy(dtype=np.int64), null
    if isinstance(arr, _MASKED):
        # values with the masked slots filled (encode_table never reads them) and the mask
        if rows is not None:
            arr = arr[rows]
        null = np.asarray(arr.isna(), dtype=bool)
        np_dtype = arr.dtype.numpy_dtype
        fill = np.nan if np_dtype.kind == "f" else np_dtype.type(0)
        data = arr.to_numpy(dtype=np_dtype, na_value=fill)
        if kind in ("long", "int", "boolean") and data.dtype.kind == "f":
            data = np.where(null, 0, data).astype(np.int64)
        if kind == "boolean":
            data = data.astype(bool, copy=False)
        elif kind in ("float", "double") and null.any():
            data = np.where(null, np.nan, data)
        if kind in ("long", "int", "float", "double", "boolean"):
            return data, null
    if kind == "string":
        codes, uniques = pd.factorize(arr, use_na_sentinel=True)
        if rows is not None:
            codes = codes[rows]
        texts = np.append(np.asarray(uniques, dtype=object), "")
        return texts[codes], codes < 0
    if isinstance(arr, np.ndarray):  # object (or other non-numeric) numpy column
        arr = pd.arrays.NumpyExtensionArray(arr)
    null = np.asarray(arr.isna(), dtype=bool)
    if kind in ("long", "int"):
        v = arr.to_numpy(dtype=np.int64, na_value=0) if null.any() else np.asarray(arr, np.int64)
    elif kind in ("float", "double"):
        v = np.asarray(arr.to_numpy(dtype=np.float64, na_value=np.nan))
    elif kind == "boolean":
        v = arr.to_numpy(dtype=bool, na_value=False) if null.any() else np.asarray(arr, bool)
    else:
        v = np.asarray(arr, dtype=object)
    if rows is not None:
        v, null = v[rows], null[rows]
    return v, null


def _frame_columns(
    frame: pd.DataFrame, layout: RecordLayout, rows: np.ndarray | None = None
) -> dict:
    """Field → (values, null mask or None) for the fields ``frame`` has, taken at ``rows``.

    Each column is read once as its underlying array and only the selected
    rows are converted: no intermediate DataFrame is built.
    """
    names = frame.columns.tolist()
    position = {name: i for i, name in enumerate(names)}
    if len(position) != len(names):
        dup = next(name for name in names if names.count(name) > 1)
        raise AlertError(f"{layout.name}: column {dup!r} appears more than once")
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for name, kind, nullable in layout.fields:
        if name in position:
            out[name] = _array_values(column_values(frame, name), kind, nullable, rows)
    return out


def encode_table(
    columns: Mapping[str, tuple[np.ndarray, np.ndarray | None]] | pd.DataFrame,
    layout: RecordLayout,
    n: int | None = None,
    *,
    rows: np.ndarray | None = None,
) -> tuple[bytes, np.ndarray]:
    """Avro-encode every row of a table as ``layout``'s record.

    Parameters
    ----------
    columns : pandas.DataFrame or mapping
        A DataFrame (NaN/NA in a nullable field → null), or a mapping
        field name → (values, null mask or None). Fields the table lacks are null.
    layout : RecordLayout
        The record's fields.
    n : int, optional
        Row count, needed when ``columns`` is a mapping.
    rows : numpy.ndarray, optional
        With a DataFrame: encode only these rows (integer positions), in this
        order, instead of all rows; the frame is not copied.

    Returns
    -------
    buffer : bytes
        All rows' encodings, concatenated.
    offsets : numpy.ndarray
        int64, length n + 1: row ``i`` is ``buffer[offsets[i]:offsets[i+1]]``.

    Raises
    ------
    AlertError
        If a field the schema declares non-nullable is missing or null.
    """
    if isinstance(columns, pd.DataFrame):
        n = len(columns) if rows is None else len(rows)
        columns = _frame_columns(columns, layout, rows)
    elif n is None:
        raise ValueError("encode_table: n is required with a column mapping")
    get = columns.get
    # (bytes (n, w) or (1, w) to broadcast, used bytes per row): the lengths (n,), or a
    # bool (n,) when a row uses all w bytes or none, or None when every row uses all w.
    pieces: list[tuple[np.ndarray, np.ndarray | None]] = []
    null_branch = np.zeros((1, 1), np.uint8)
    some_branch = np.full((1, 1), 2, np.uint8)
    for name, kind, nullable in layout.fields:
        what = f"{layout.name}.{name}"
        col = get(name)
        if col is None:
            if not nullable:
                raise AlertError(f"{what}: required by the alert schema but missing")
            pieces.append((null_branch, None))
            continue
        values, null = col
        values = np.asarray(values)
        if null is not None:
            null = np.asarray(null, dtype=bool)
        if kind in ("float", "double") and values.dtype.kind == "f":
            # NaN and ±inf (also a float64 beyond float32's range) are undefined values
            with np.errstate(over="ignore"):
                undefined = ~np.isfinite(values.astype(_FLOAT_WIDTH[kind], copy=False))
            if not nullable and undefined.any():
                bad = int(np.flatnonzero(undefined)[0])
                raise AlertError(
                    f"{what}: {values[bad]} at row {bad} but the alert schema field is not nullable"
                )
            null = undefined if null is None else (null | undefined)
        any_null = null is not None and bool(null.any())
        if any_null and not nullable:
            bad = int(np.flatnonzero(null)[0])
            raise AlertError(
                f"{what}: null at row {bad} but the alert schema field is not nullable"
            )
        if not any_null:
            if nullable:
                pieces.append((some_branch, None))
            pieces.append(_column(values, kind, what))
            continue
        pieces.append((((~null).view(np.uint8) << 1)[:, None], None))
        if null.all():
            continue
        if kind in ("long", "int", "boolean") or (
            kind in _FLOAT_WIDTH and values.dtype != _FLOAT_WIDTH[kind]
        ):  # (a float64 null beyond float32's range would warn when cast)
            values = np.where(null, 0, values)
        mat, lens = _column(values, kind, what)
        pieces.append((mat, ~null if lens is None else np.where(null, 0, lens)))
    if n == 0:
        return b"", np.zeros(1, dtype=np.int64)
    width = sum(m.shape[1] for m, _ in pieces)
    big = np.empty((n, width), dtype=np.uint8)
    keep = None
    row_len = np.zeros(n, dtype=np.int64)
    fixed = 0
    c = 0
    for mat, lens in pieces:
        w = mat.shape[1]
        big[:, c : c + w] = mat
        if lens is None:
            fixed += w
        else:
            if keep is None:
                keep = np.ones((n, width), dtype=bool)
            if lens.dtype == bool:
                keep[:, c : c + w] = lens[:, None]
                row_len += lens * w
            else:
                keep[:, c : c + w] = _RANGE[None, :w] < lens[:, None]
                row_len += lens
        c += w
    row_len += fixed
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(row_len, out=offsets[1:])
    # row-major: each row's kept bytes, rows one after another
    return (big.tobytes() if keep is None else big[keep].tobytes()), offsets


# --------------------------------------------------------------------------
# alerts
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AlertBatch:
    """The alerts of one detector of one visit.

    Attributes
    ----------
    payloads : list of bytes
        Schemaless Avro encodings (no wire header), one per alert.
    dia_source_ids : numpy.ndarray
        int64, the triggering DiaSource of each payload.
    schema : AlertSchema
        The schema they were written with.
    visit, detector : int
        Where they come from (names the alert files).
    n_history_sources, n_history_forced : int
        DiaSource / DiaForcedSource history rows encoded (each once).
    n_without_object, n_without_cutouts : int
        Alerts whose diaObject / cutoutDifference is null.
    """

    payloads: list[bytes]
    dia_source_ids: np.ndarray
    schema: AlertSchema
    visit: int
    detector: int
    n_history_sources: int = 0
    n_history_forced: int = 0
    n_without_object: int = 0
    n_without_cutouts: int = 0

    def __len__(self) -> int:
        return len(self.payloads)

    def subset(self, mask: np.ndarray) -> AlertBatch:
        """The alerts where ``mask`` is true (same schema, visit, detector)."""
        idx = np.flatnonzero(mask)
        return AlertBatch(
            payloads=[self.payloads[i] for i in idx],
            dia_source_ids=self.dia_source_ids[idx],
            schema=self.schema,
            visit=self.visit,
            detector=self.detector,
        )

    def records(self) -> list[dict]:
        """Decode every payload (slow; for tests and inspection)."""
        return [decode_alert(p, self.schema) for p in self.payloads]


def decode_alert(payload: bytes, schema: AlertSchema | None = None) -> dict:
    """One schemaless payload (with or without a Confluent wire header) → dict."""
    import io

    schema = schema or load_schema(None)
    if payload[:1] == b"\x00" and len(payload) > 5:
        sid = int.from_bytes(payload[1:5], "big")
        if sid == schema.schema_id:
            payload = payload[5:]
    return fastavro.schemaless_reader(io.BytesIO(payload), schema.parsed, None)


def _group_slices(keys: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For sorted ``keys``, the [start, stop) row range of each value in ``wanted``."""
    start = np.searchsorted(keys, wanted, side="left")
    stop = np.searchsorted(keys, wanted, side="right")
    return start, stop


def _member(values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """``np.isin(values, wanted)`` for a short ``wanted``, by binary search (~5x faster)."""
    table = np.unique(wanted)
    if table.size == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(table, values)
    pos[pos == table.size] = 0
    return table[pos] == values


def _history_rows(
    df: pd.DataFrame,
    what: str,
    id_col: str,
    start_mjd: float,
    obj_ids: np.ndarray,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a history table that alerts carry, and their DiaObject IDs.

    Rows in the time window (``midpointMjdTai >= start_mjd``) of a DiaObject in
    ``obj_ids``, minus those whose ``id_col`` is in ``exclude``, as integer
    positions sorted by (diaObjectId, midpointMjdTai, ``id_col``): each
    object's history is then one contiguous run. Only the key columns are
    read; the table is not copied.
    """
    none = np.zeros(0, dtype=np.intp)
    if len(df) == 0:
        return none, none.astype(np.int64)
    for col in ("diaObjectId", "midpointMjdTai"):
        if col not in df.columns:
            raise AlertError(f"{what}: column {col!r} is missing")
    mjd = df["midpointMjdTai"].to_numpy(dtype="float64", na_value=np.nan)
    obj_col = df["diaObjectId"]
    obj = obj_col.to_numpy(dtype=np.int64, na_value=0)
    keep = (mjd >= start_mjd) & obj_col.notna().to_numpy() & _member(obj, obj_ids)
    if not keep.any():
        return none, none.astype(np.int64)
    if id_col not in df.columns:
        raise AlertError(f"{what}: column {id_col!r} is missing")
    ids = df[id_col].to_numpy(dtype=np.int64, na_value=0)
    if exclude is not None:
        keep &= ~_member(ids, exclude)
    rows = np.flatnonzero(keep)
    rows = rows[np.lexsort((ids[rows], mjd[rows], obj[rows]))]
    return rows, obj[rows]


def _opt_string(s: str | None) -> bytes:
    if s is None:
        return _NULL
    raw = str(s).encode("utf-8")
    return _SOME + varint(len(raw)) + raw


def _opt_bytes(b: bytes | None) -> bytes:
    if b is None:
        return _NULL
    return _SOME + varint(len(b)) + b


def package_alerts(
    new_sources: pd.DataFrame,
    objects: pd.DataFrame,
    history_sources: pd.DataFrame,
    history_forced: pd.DataFrame,
    cutouts: Mapping[int, tuple[bytes | None, bytes | None, bytes | None]],
    visit: VisitInfo,
    config: PackagingConfig | None = None,
    *,
    detector: int | None = None,
    ss_sources: pd.DataFrame | None = None,
    orbits: pd.DataFrame | None = None,
) -> AlertBatch:
    """Build one Avro alert per new DiaSource.

    Parameters
    ----------
    new_sources : pandas.DataFrame
        SDM ``DiaSource`` rows of this detector that get alerts (need
        ``diaSourceId`` and ``diaObjectId``; other schema fields by name).
    objects : pandas.DataFrame
        SDM ``DiaObject`` rows (updated), at least those of ``new_sources``.
    history_sources : pandas.DataFrame
        SDM ``DiaSource`` rows loaded from the APDB for those objects; rows
        older than ``visit.midpointMjdTai - history_days`` (days, TAI) and the
        new sources themselves are left out of ``prvDiaSources``.
    history_forced : pandas.DataFrame
        SDM ``DiaForcedSource`` rows (loaded, plus this visit's new ones),
        same time window.
    cutouts : mapping
        ``diaSourceId -> (difference, science, template)`` FITS bytes or None,
        as made by :func:`alerts.cutouts.make_cutouts`; a missing id gives
        null stamps.
    visit : VisitInfo
        Supplies ``observation_reason``, ``target_name``, the time window and
        the visit number.
    config : PackagingConfig, optional
    detector : int, optional
        Detector number for the batch; default: ``new_sources.detector``.
    ss_sources : pandas.DataFrame, optional
        SDM ``SSSource`` rows of the solar-system sources among ``new_sources``
        (by ``diaSourceId``): their alerts carry ``ssSource``, and ``mpc_orbits``
        from the ``orbits`` row of the same ``ssObjectId`` (ephemeris table
        columns named as the schema's ``mpc_orbits`` fields; ``id`` 0 when absent,
        as in Rubin's alerts). A source with ``diaObjectId`` 0 has no DiaObject:
        null ``diaObject`` and no histories, as Rubin's solar-system alerts.

    Returns
    -------
    AlertBatch
        Payloads in the order of ``new_sources``. Empty input (or
        ``do_package=False``) gives an empty batch.

    Raises
    ------
    AlertError
        A required column is missing, or a non-nullable schema field is null.
    """
    config = config or PackagingConfig()
    schema = load_schema(config.schema_version)
    if detector is None:
        detector = (
            int(new_sources["detector"].iloc[0])
            if len(new_sources) and ("detector" in new_sources.columns)
            else -1
        )
    empty = AlertBatch([], np.zeros(0, np.int64), schema, int(visit.visit), int(detector))
    if not config.do_package or len(new_sources) == 0:
        return empty
    for col in ("diaSourceId", "diaObjectId"):
        if col not in new_sources.columns:
            raise AlertError(f"DiaSource: column {col!r} needed for alerts is missing")
    n = len(new_sources)
    src_ids = new_sources["diaSourceId"].to_numpy(dtype=np.int64)
    obj_null = new_sources["diaObjectId"].isna().to_numpy()
    obj_ids = new_sources["diaObjectId"].astype("Int64").to_numpy(dtype=np.int64, na_value=-1)

    start_mjd = float(visit.midpointMjdTai) - config.history_days
    hist_rows, hist_keys = _history_rows(
        history_sources, "DiaSource history", "diaSourceId", start_mjd, obj_ids, exclude=src_ids
    )
    forced_rows, forced_keys = _history_rows(
        history_forced, "DiaForcedSource history", "diaForcedSourceId", start_mjd, obj_ids
    )

    pieces: dict[str, list[bytes]] = {}
    records = schema.records

    # diaSource of each alert
    buf, off = encode_table(new_sources, records["diaSource"])
    pieces["diaSource"] = [buf[off[i] : off[i + 1]] for i in range(n)]

    # histories: one encoding per row, one slice per alert
    def arrays(
        name: str, table: pd.DataFrame, rows: np.ndarray, keys: np.ndarray, include: np.ndarray
    ) -> list[bytes]:
        if name not in records or len(rows) == 0:
            return [_NULL] * n
        hbuf, hoff = encode_table(table, records[name], rows=rows)
        start, stop = _group_slices(keys, obj_ids)
        out = []
        for i, (a, b) in enumerate(zip(start.tolist(), stop.tolist(), strict=True)):
            if a == b or not include[i]:
                out.append(_NULL)
            else:
                out.append(_SOME + varint(b - a) + hbuf[hoff[a] : hoff[b]] + _NULL)
        return out

    has_obj = ~obj_null & (obj_ids != 0)  # diaObjectId 0: a solar-system source
    pieces["prvDiaSources"] = arrays(
        "prvDiaSources", history_sources, hist_rows, hist_keys, has_obj
    )

    # diaObject rows, matched by id
    obj_pieces = [_NULL] * n
    n_dia = np.zeros(n, dtype=np.int64)
    if "diaObject" in records and len(objects):
        if "diaObjectId" not in objects.columns:
            raise AlertError("DiaObject: column 'diaObjectId' is missing")
        oid = objects["diaObjectId"].to_numpy(dtype=np.int64)
        order = np.argsort(oid, kind="stable")
        pos = np.searchsorted(oid[order], obj_ids)
        pos = np.minimum(pos, len(oid) - 1)
        found = has_obj & (oid[order][pos] == obj_ids)
        rows = order[pos[found]]
        obuf, ooff = encode_table(objects, records["diaObject"], rows=rows)
        for k, i in enumerate(np.flatnonzero(found)):
            obj_pieces[i] = _SOME + obuf[ooff[k] : ooff[k + 1]]
        if "nDiaSources" in objects.columns:
            counts = objects["nDiaSources"].to_numpy(dtype="float64", na_value=0)
            n_dia[found] = counts[rows].astype(np.int64)
    # history count + this source when nDiaSources is not known
    hs, he = _group_slices(hist_keys, obj_ids)
    n_dia = np.where(n_dia > 0, n_dia, (he - hs) + 1)
    pieces["diaObject"] = obj_pieces
    pieces.update(_solar_system_pieces(src_ids, ss_sources, orbits, records))
    include_forced = has_obj & (n_dia >= config.forced_source_history_threshold)
    pieces["prvDiaForcedSources"] = arrays(
        "prvDiaForcedSources", history_forced, forced_rows, forced_keys, include_forced
    )

    # fixed parts
    reason = _opt_string(visit.observation_reason)
    target = _opt_string(visit.target_name)
    null_stamps = (None, None, None)
    stamps = [cutouts.get(int(i), null_stamps) for i in src_ids]
    stamp_names = ("cutoutDifference", "cutoutScience", "cutoutTemplate")
    id_mat, id_len = _zigzag_varint(src_ids)

    payloads = []
    for i in range(n):
        parts = []
        for name, kind in schema.top:
            if name in ("diaSourceId", "alertId"):
                parts.append(id_mat[i, : id_len[i]].tobytes())
            elif name == "observation_reason":
                parts.append(reason)
            elif name == "target_name":
                parts.append(target)
            elif name in pieces:
                parts.append(pieces[name][i])
            elif name in stamp_names:
                stamp = stamps[i][stamp_names.index(name)]
                if stamp is None:
                    parts.append(_NULL)
                else:
                    parts += (_SOME, varint(len(stamp)), stamp)
            elif kind.endswith("?"):
                parts.append(_NULL)
            else:
                raise AlertError(f"alert schema {schema.version}: cannot fill field {name!r}")
        payloads.append(b"".join(parts))
    return AlertBatch(
        payloads=payloads,
        dia_source_ids=src_ids,
        schema=schema,
        visit=int(visit.visit),
        detector=int(detector),
        n_history_sources=len(hist_rows),
        n_history_forced=len(forced_rows),
        n_without_object=sum(p == _NULL for p in obj_pieces),
        n_without_cutouts=int(sum(s[0] is None for s in stamps)),
    )


def _solar_system_pieces(
    src_ids: np.ndarray, ss_sources: pd.DataFrame | None, orbits: pd.DataFrame | None, records
) -> dict[str, list[bytes]]:
    """Encoded ``ssSource`` and ``mpc_orbits`` union values per alert (null where none)."""
    n = len(src_ids)
    out = {"ssSource": [_NULL] * n, "mpc_orbits": [_NULL] * n}
    if ss_sources is None or len(ss_sources) == 0 or "ssSource" not in records:
        return out
    ss_ids = ss_sources["diaSourceId"].to_numpy(dtype=np.int64)
    pos = {int(v): k for k, v in enumerate(ss_ids)}
    rows = np.array([pos.get(int(i), -1) for i in src_ids], dtype=np.int64)
    has = np.flatnonzero(rows >= 0)
    if has.size == 0:
        return out
    sbuf, soff = encode_table(ss_sources, records["ssSource"], rows=rows[has])
    for k, i in enumerate(has):
        out["ssSource"][i] = _SOME + sbuf[soff[k] : soff[k + 1]]
    if orbits is None or len(orbits) == 0 or "mpc_orbits" not in records:
        return out
    orb = orbits
    if "id" not in orb.columns:
        orb = orb.assign(id=np.zeros(len(orb), np.int32))
    orb_pos = {int(v): k for k, v in enumerate(orb["ssObjectId"].to_numpy(dtype=np.int64))}
    want = ss_sources["ssObjectId"].to_numpy(dtype=np.int64)[rows[has]]
    orow = np.array([orb_pos.get(int(v), -1) for v in want], dtype=np.int64)
    ok = orow >= 0
    if ok.any():
        obuf, ooff = encode_table(orb, records["mpc_orbits"], rows=orow[ok])
        for k, i in enumerate(has[ok]):
            out["mpc_orbits"][i] = _SOME + obuf[ooff[k] : ooff[k + 1]]
    return out


# --------------------------------------------------------------------------
# dict records (reading real alerts, round trips)
# --------------------------------------------------------------------------


def clean_alert_record(record: Mapping, schema: AlertSchema | None = None) -> dict:
    """An alert dict reduced to ``schema``'s fields, as a broker may have extended it.

    Fields the schema does not have are dropped (e.g. Fink's ``lc_features``,
    ``clf``, ``xm``); a nested record whose fields are all null (as Fink's Spark
    export writes a null ``diaObject``) becomes None; missing nullable fields
    become None.
    """
    schema = schema or load_schema(None)
    out = {}
    for name, kind in schema.top:
        v = record.get(name)
        if kind.startswith("record") and isinstance(v, Mapping):
            if all(x is None for x in v.values()):
                v = None
            else:
                v = {f: _as_schema_value(v.get(f), k) for f, k, _ in schema.records[name].fields}
        elif kind == "array?" and v is not None:
            fields = [f for f, _, _ in schema.records[name].fields]
            v = [{f: item.get(f) for f in fields} for item in v]
        out[name] = v
    return out


def _ticks(v, scale: int) -> int:
    """A datetime (or an int already in ticks) → integer ticks since 1970-01-01 UTC."""
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.UTC)
        delta = v - _EPOCH
        return (
            delta.days * 86_400 + delta.seconds
        ) * scale + delta.microseconds * scale // 1_000_000
    return int(v)


def _as_schema_value(v, kind: str):
    """Integer ticks in a timestamp field → the UTC datetime a reader of the schema gets."""
    if kind in _TIMESTAMPS and isinstance(v, int | np.integer):
        return _EPOCH + dt.timedelta(microseconds=int(v) * (1_000_000 // _TIMESTAMPS[kind]))
    return v


def _dict_columns(rows: list[Mapping], layout: RecordLayout) -> dict:
    """Field → (values, null mask) from dict rows.

    ``None`` is null, and so, when encoded, is a float that is not finite.
    """
    cols = {}
    for name, kind, _ in layout.fields:
        raw = [r.get(name) for r in rows]
        null = np.array([v is None for v in raw], dtype=bool)
        if kind in _TIMESTAMPS:
            scale = _TIMESTAMPS[kind]
            vals = np.array([0 if v is None else _ticks(v, scale) for v in raw], dtype=np.int64)
        elif kind in ("long", "int", "boolean"):
            vals = np.array([0 if v is None else v for v in raw], dtype=np.int64)
        elif kind in ("float", "double"):
            vals = np.array([0.0 if v is None else v for v in raw], dtype=np.float64)
        else:
            vals = np.array(["" if v is None else v for v in raw], dtype=object)
        cols[name] = (vals, null)
    return cols


def encode_alert_records(
    records: Iterable[Mapping], schema: AlertSchema | None = None
) -> list[bytes]:
    """Encode alert dicts (already reduced to the schema) with the column encoder.

    ``None`` is written as null, and so is a NaN or ±inf in a nullable float
    field (an error in a non-nullable one), as for DataFrames. A decoded packet
    holds neither, so a decode → encode round trip is unchanged.
    """
    schema = schema or load_schema(None)
    out = []
    for rec in records:
        parts = []
        for name, kind in schema.top:
            v = rec.get(name)
            if kind in ("long",):
                parts.append(varint(int(v)))
            elif kind == "string?":
                parts.append(_opt_string(v))
            elif kind == "bytes?":
                parts.append(_opt_bytes(v))
            elif kind.startswith("record"):
                if v is None:
                    if kind == "record":
                        raise AlertError(f"alert {rec.get('diaSourceId')}: {name} is null")
                    parts.append(_NULL)
                    continue
                buf, _ = encode_table(
                    _dict_columns([v], schema.records[name]), schema.records[name], 1
                )
                parts.append(buf if kind == "record" else _SOME + buf)
            elif kind == "array?":
                if v is None:
                    parts.append(_NULL)
                elif len(v) == 0:
                    parts.append(_SOME + _NULL)
                else:
                    buf, _ = encode_table(
                        _dict_columns(v, schema.records[name]), schema.records[name], len(v)
                    )
                    parts.append(_SOME + varint(len(v)) + buf + _NULL)
            elif v is None and kind.endswith("?"):
                parts.append(_NULL)
            else:
                raise AlertError(f"alert schema {schema.version}: cannot encode {name}={v!r}")
        out.append(b"".join(parts))
    return out
