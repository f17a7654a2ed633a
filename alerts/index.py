"""Reading a few leading fields of encoded alerts, and the alert index (``python -m alerts get``).

Keys and counts need only ``diaSource.diaObjectId`` and
``diaSource.ssObjectId``, which every official schema puts within the first
few fields of the alert (after ``diaSourceId``, ``observation_reason``,
``target_name`` and, inside ``diaSource``, ``diaSourceId``, ``visit``,
``detector``). :func:`object_keys` walks just those bytes of each payload
instead of decoding the whole alert (histories and cutouts are most of it);
a schema whose layout puts anything but primitive fields before them is
decoded with fastavro instead.

The index: for every alert file ``{visit}_{detector}.avro`` the store writes
``index/{first}_{last}_{visit}_{detector}.json`` (``first``/``last``: the
smallest and largest ``diaSourceId`` in the file) holding the file name and its
sorted ids. :func:`find_alert` lists the index folder (names only), opens the
one or few index files whose id range holds the id, and reads only the alert
file they point to. diapipe's ids pack (visit, detector) in their high bits,
so the ranges of different files do not overlap and one file is opened.
"""

from __future__ import annotations

import io
import json
import os
import re
from functools import cache

import fastavro
import fsspec
import numpy as np

from alerts.packet import AlertSchema
from alerts.store import _read_long, _schema_of, iter_container_payloads

__all__ = ["find_alert", "index_name", "index_url", "object_key", "object_keys", "write_index"]

_PRIMITIVE_SIZES = {"null": 0, "boolean": 1, "float": 4, "double": 8}
_VARINTS = {"int", "long"}
_SIZED = {"string", "bytes"}
_INDEX = re.compile(
    r"^(?P<first>-?\d+)_(?P<last>-?\d+)_(?P<visit>-?\d+)_(?P<detector>-?\d+)\.json$"
)


def _base(t) -> str | None:
    """The primitive name of ``t`` (logical types included), or None."""
    if isinstance(t, dict):
        t = t.get("type")
    return (
        t
        if isinstance(t, str) and (t in _PRIMITIVE_SIZES or t in _VARINTS or t in _SIZED)
        else None
    )


def _step(t):
    """How to read one field of type ``t``: a primitive name, or a tuple of them (a union)."""
    if isinstance(t, list):
        branches = tuple(_base(b) for b in t)
        return branches if all(branches) else None
    return _base(t)


@cache
def _plan(schema: AlertSchema) -> tuple | None:
    """(top-level steps before diaSource, diaSource steps up to ssObjectId, names) or None."""
    top = []
    for f in schema.definition["fields"]:
        if f["name"] == "diaSource":
            record = f["type"]
            break
        s = _step(f["type"])
        if s is None:
            return None
        top.append(s)
    else:
        return None
    if not isinstance(record, dict) or record.get("type") != "record":
        return None
    inner, names = [], []
    wanted = {"diaObjectId", "ssObjectId"}
    for f in record["fields"]:
        s = _step(f["type"])
        if s is None:
            return None
        inner.append(s)
        names.append(f["name"])
        wanted.discard(f["name"])
        if not wanted:
            return tuple(top), tuple(inner), tuple(names)
    return None


def _read(buf: bytes, pos: int, step) -> tuple[object, int]:
    if isinstance(step, tuple):
        branch, pos = _read_long(buf, pos)
        step = step[branch]
    if step in _VARINTS:
        return _read_long(buf, pos)
    if step in _SIZED:
        n, pos = _read_long(buf, pos)
        return None, pos + n
    return None, pos + _PRIMITIVE_SIZES[step]


def object_key(payload: bytes, schema: AlertSchema) -> tuple[int | None, int | None]:
    """``diaSource.diaObjectId`` and ``diaSource.ssObjectId`` of one payload (None when null).

    Parameters
    ----------
    payload : bytes
        Schemaless alert encoding (no wire header) of ``schema``.
    """
    plan = _plan(schema)
    if plan is None:
        rec = fastavro.schemaless_reader(io.BytesIO(payload), schema.parsed, None)["diaSource"]
        return rec.get("diaObjectId"), rec.get("ssObjectId")
    top, inner, names = plan
    pos = 0
    for s in top:
        _, pos = _read(payload, pos, s)
    values = {}
    for name, s in zip(names, inner, strict=True):
        values[name], pos = _read(payload, pos, s)
    return values["diaObjectId"], values["ssObjectId"]


def object_keys(payloads: list[bytes], schema: AlertSchema) -> tuple[np.ndarray, np.ndarray]:
    """:func:`object_key` of each payload as two int64 arrays (-1 when null or 0: not set)."""
    obj = np.full(len(payloads), -1, dtype=np.int64)
    ss = np.full(len(payloads), -1, dtype=np.int64)
    for i, p in enumerate(payloads):
        o, s = object_key(p, schema)
        if o:
            obj[i] = o
        if s:
            ss[i] = s
    return obj, ss


# --------------------------------------------------------------------------
# the index
# --------------------------------------------------------------------------


def index_name(ids: np.ndarray, visit: int, detector: int) -> str:
    """``{first}_{last}_{visit}_{detector}.json`` for a file holding ``ids``."""
    return f"{int(ids.min())}_{int(ids.max())}_{int(visit)}_{int(detector)}.json"


def index_url(location: str, ids: np.ndarray, visit: int, detector: int) -> str:
    """Where the index of an alert file lives under the store ``location``."""
    return f"{location.rstrip('/')}/index/{index_name(ids, visit, detector)}"


def write_index(
    location: str, file_url: str, ids: np.ndarray, visit: int, detector: int, write
) -> str:
    """Write the index of one alert file with ``write(url, data)`` (the store's atomic write)."""
    body = {
        "file": os.path.basename(file_url),
        "visit": int(visit),
        "detector": int(detector),
        "diaSourceIds": sorted(int(i) for i in ids),
    }
    url = index_url(location, ids, visit, detector)
    write(url, json.dumps(body).encode())
    return url


def find_alert(
    location: str, dia_source_id: int, storage_options: dict | None = None
) -> tuple[str, bytes, AlertSchema] | None:
    """(alert file URL, payload, schema) of the alert of ``dia_source_id``; None if not indexed.

    Lists ``{location}/index`` once (names only), reads the index files whose id
    range holds the id, and reads the alert file of the one that lists it.
    """
    opts = storage_options or {}
    fs, path = fsspec.core.url_to_fs(f"{location.rstrip('/')}/index", **opts)
    if not fs.exists(path):
        return None
    sid = int(dia_source_id)
    for name in sorted(os.path.basename(p) for p in fs.ls(path, detail=False)):
        m = _INDEX.match(name)
        if not m or not int(m["first"]) <= sid <= int(m["last"]):
            continue
        with fs.open(f"{path}/{name}", "rb") as f:
            entry = json.load(f)
        ids = entry["diaSourceIds"]
        k = int(np.searchsorted(ids, sid))
        if k == len(ids) or ids[k] != sid:
            continue
        url = f"{location.rstrip('/')}/{entry['file']}"
        try:
            with fsspec.open(url, "rb", **opts) as f:
                data = f.read()
        except FileNotFoundError:
            continue
        meta, payloads = iter_container_payloads(data, url)
        for p in payloads:
            if _read_long(p, 0)[0] == sid:
                return url, p, _schema_of(meta, url)
    return None
