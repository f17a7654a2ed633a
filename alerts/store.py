"""Alert files and the dead-letter store (docs/design.md §4.9a).

Alerts are written as Avro object container files named
``{visit}_{detector}.avro`` under a local directory or an ``s3://`` URL (any
fsspec URL works; S3 through s3fs). The container is assembled directly from
the already encoded alert payloads (no decode/re-encode): the header carries
the official schema, the codec (``null`` or ``deflate``) and
``diapipe.schema_id``; every alert is its own block, so a file can be split
back into the original payloads without decoding them. Any Avro reader
(``fastavro.reader``, Spark, ...) reads the files.

Writes are atomic: on a local disk the file is written under a temporary name
in the same directory, flushed to disk and renamed over the final name; on S3
the object is sent with one PUT (or one completed multipart upload), which S3
makes visible only once complete. No reader ever sees a half-written file
under its final name. A write that fails because the store could not be
reached (connection refused or dropped, timeout, HTTP 5xx after the client's
own retries) raises :class:`~core.errors.TransientError`, which the flow's
tasks retry; rewriting the same name is harmless.

The dead-letter store has the same format in its own location, with unique
file names ``{visit}_{detector}_{utc}_{random}.avro`` so that repeated
failures never overwrite each other; it lists, reads, rewrites and removes
files for :func:`alerts.kafka.replay_dead_letters`.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import json
import os
import re
import secrets
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import fastavro
import fsspec
import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, field_validator, model_validator

from alerts.packet import AlertBatch, AlertSchema, load_schema, varint
from core.bundle import missing_credentials
from core.errors import AlertError, InputError, TransientError
from core.frames import column_values

__all__ = [
    "QA_KINDS",
    "AlertStoreConfig",
    "DeadLetterStore",
    "alert_file_url",
    "container_bytes",
    "iter_container_payloads",
    "qa_sources_url",
    "read_alert_batch",
    "read_alert_file",
    "write_alert_file",
    "write_alerts",
    "write_qa_sources",
]

_MAGIC = b"Obj\x01"
_NAME = re.compile(r"^(?P<visit>-?\d+)_(?P<detector>-?\d+)(?:_.*)?\.avro$")


class AlertStoreConfig(BaseModel, frozen=True, extra="forbid"):
    """Where and how alert files are written."""

    location: str = Field(
        "./alerts",
        description="Directory or s3:// URL for alert files (Rubin: alertWriteLocation).",
    )
    codec: Literal["null", "deflate"] = Field(
        "null", description="Avro container block codec; deflate trades CPU for ~30% less space."
    )
    storage_options: dict[str, object] = Field(
        default_factory=dict,
        description=(
            "fsspec options, e.g. {'endpoint_url': ...} for S3; credentials come from "
            "the environment (AWS_ACCESS_KEY_ID, ...), never from here: a credential "
            "option (key, secret, token, password, ...) is refused, since the options "
            "are stored in clear with the flow's parameters."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _mask_credentials(cls, data):
        return mask_field(data, "storage_options", _is_storage_secret)

    @field_validator("storage_options")
    @classmethod
    def _refuse_credentials(cls, options: dict) -> dict:
        return refuse_secrets(
            options,
            _is_storage_secret,
            "AlertStoreConfig.storage_options",
            "give credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_SESSION_TOKEN) or a credentials file instead",
        )


_STORAGE_SECRET_WORDS = ("secret", "token", "password", "credential", "access_key", "account_key")


def _is_storage_secret(key: str) -> bool:
    k = key.lower()
    return k in ("key", "connection_string", "sas") or any(w in k for w in _STORAGE_SECRET_WORDS)


def mask_secrets(options: dict, is_secret) -> dict:
    """A copy of ``options`` (nested dicts too) with the value of every secret key as ``***``."""
    out = {}
    for k, v in options.items():
        if isinstance(k, str) and is_secret(k):
            out[k] = "***"
        elif isinstance(v, dict):
            out[k] = mask_secrets(v, is_secret)
        else:
            out[k] = v
    return out


def secret_keys(options: dict, is_secret, prefix: str = "") -> list[str]:
    """Dotted names of the secret keys in ``options`` (nested dicts too)."""
    found = []
    for k, v in options.items():
        name = f"{prefix}{k}"
        if isinstance(k, str) and is_secret(k):
            found.append(name)
        elif isinstance(v, dict):
            found += secret_keys(v, is_secret, f"{name}.")
    return sorted(found)


def mask_field(data, name: str, is_secret):
    """``data`` with the secret values of its options dict ``name`` masked (a model's input).

    Run before validation, so that neither the error of :func:`refuse_secrets`
    nor pydantic's echo of the input can show a secret.
    """
    if isinstance(data, dict) and isinstance(data.get(name), dict):
        return {**data, name: mask_secrets(data[name], is_secret)}
    return data


def refuse_secrets(options: dict, is_secret, what: str, advice: str) -> dict:
    """``options`` unchanged, or a ValueError naming its secret keys (never their values)."""
    found = secret_keys(options, is_secret)
    if found:
        raise ValueError(
            f"{what}: {found} would be stored in clear with the flow's parameters; {advice}"
        )
    return options


# --------------------------------------------------------------------------
# container format
# --------------------------------------------------------------------------


def _avro_bytes(b: bytes) -> bytes:
    return varint(len(b)) + b


def container_bytes(
    schema: AlertSchema, payloads: list[bytes], codec: str = "null", sync: bytes | None = None
) -> bytes:
    """An Avro object container file holding ``payloads`` (one block each).

    Parameters
    ----------
    schema : AlertSchema
        Written to the header as ``avro.schema``.
    payloads : list of bytes
        Schemaless encodings of records of that schema.
    codec : {"null", "deflate"}
    sync : bytes, optional
        16-byte sync marker (random by default).
    """
    if codec not in ("null", "deflate"):
        raise AlertError(f"Avro codec {codec!r} is not supported (null, deflate)")
    sync = sync or secrets.token_bytes(16)
    meta = {
        "avro.schema": json.dumps(schema.definition).encode(),
        "avro.codec": codec.encode(),
        "diapipe.schema_id": str(schema.schema_id).encode(),
    }
    parts = [_MAGIC, varint(len(meta))]
    for k, v in meta.items():
        parts += [_avro_bytes(k.encode()), _avro_bytes(v)]
    parts += [b"\x00", sync]
    for p in payloads:
        data = p
        if codec == "deflate":
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            data = c.compress(p) + c.flush()
        parts += [b"\x02", varint(len(data)), data, sync]
    return b"".join(parts)


def _read_long(buf: bytes, pos: int) -> tuple[int, int]:
    shift = z = 0
    while True:
        b = buf[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if not b & 0x80:
            return (z >> 1) ^ -(z & 1), pos
        shift += 7


def record_dia_source_id(record: bytes) -> int:
    """The ``diaSourceId`` of one alert record (Avro binary, unframed): its first field."""
    return _read_long(record, 0)[0]


def iter_container_payloads(data: bytes, source: str = "") -> tuple[dict, Iterator[bytes]]:
    """Split a container file into its header metadata and raw record payloads.

    Blocks holding one record are returned as they are; blocks holding several
    are decoded and re-encoded record by record (same bytes: Avro's encoding
    is canonical).

    Raises
    ------
    InputError
        If ``data`` is not an Avro container file.
    """
    if data[:4] != _MAGIC:
        raise InputError(f"{source or 'alert file'}: not an Avro container file")
    pos = 4
    meta: dict[str, bytes] = {}
    try:
        while True:
            count, pos = _read_long(data, pos)
            if count == 0:
                break
            if count < 0:
                _, pos = _read_long(data, pos)
                count = -count
            for _ in range(count):
                klen, pos = _read_long(data, pos)
                key = data[pos : pos + klen].decode()
                pos += klen
                vlen, pos = _read_long(data, pos)
                meta[key] = data[pos : pos + vlen]
                pos += vlen
    except (IndexError, UnicodeDecodeError) as exc:
        raise InputError(f"{source or 'alert file'}: truncated or corrupt Avro header") from exc
    if pos + 16 > len(data):
        raise InputError(f"{source or 'alert file'}: truncated Avro header (no sync marker)")
    sync = data[pos : pos + 16]
    pos += 16
    codec = meta.get("avro.codec", b"null").decode()
    if codec not in ("null", "deflate"):
        raise InputError(f"{source}: Avro codec {codec!r} is not supported")

    def blocks() -> Iterator[bytes]:
        p = pos
        parsed = None
        while p < len(data):
            try:
                n, p = _read_long(data, p)
                size, p = _read_long(data, p)
            except IndexError as exc:
                raise InputError(f"{source}: truncated Avro block header") from exc
            block = data[p : p + size]
            p += size
            if data[p : p + 16] != sync:
                raise InputError(f"{source}: corrupt Avro block (sync marker mismatch)")
            p += 16
            if codec == "deflate":
                block = zlib.decompress(block, -15)
            if n == 1:
                yield block
                continue
            if parsed is None:
                parsed = fastavro.parse_schema(json.loads(meta["avro.schema"]))
            bio = io.BytesIO(block)
            for _ in range(n):
                rec = fastavro.schemaless_reader(bio, parsed, None)
                out = io.BytesIO()
                fastavro.schemaless_writer(out, parsed, rec)
                yield out.getvalue()

    return meta, blocks()


def _schema_of(meta: dict, source: str) -> AlertSchema:
    if "diapipe.schema_id" in meta:
        sid = int(meta["diapipe.schema_id"])
        return load_schema(f"{sid // 100}.{sid % 100}")
    definition = json.loads(meta.get("avro.schema", b"{}"))
    m = re.match(r"lsst\.v(\d+)_(\d+)", str(definition.get("namespace", "")))
    if not m:
        raise InputError(f"{source}: not written with an lsst-alert-packet schema")
    return load_schema(f"{m.group(1)}.{m.group(2)}")


# --------------------------------------------------------------------------
# atomic files
# --------------------------------------------------------------------------


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the store could not be reached this time"."""
    from fsspec.exceptions import FSTimeoutError

    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError, FSTimeoutError]
    try:  # S3 through s3fs/aiobotocore: refused, dropped, timed out
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        kinds += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        kinds += [ClientConnectionError, ClientPayloadError]
    except ImportError:
        pass
    return tuple(kinds)


def _is_transient(exc: BaseException) -> bool:
    """A network-level failure, or an S3 HTTP 5xx (also when s3fs re-raised it as OSError)."""
    kinds = _transient_types()
    for _ in range(5):  # the exception and a few of its causes
        if exc is None:
            break
        if isinstance(exc, kinds):
            return True
        response = getattr(exc, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int) and code >= 500:
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def _atomic_write(url: str, data: bytes, storage_options: dict | None = None) -> str:
    """Write ``data`` to ``url`` so that the final name only ever holds complete data.

    Raises
    ------
    TransientError
        When the store could not be reached (see :func:`_is_transient`).
    """
    try:
        return _write_once(url, data, storage_options)
    except Exception as exc:
        if _is_transient(exc):
            raise TransientError(
                f"{url}: write not confirmed, object store unreachable "
                f"({type(exc).__name__}: {exc}); a retry rewrites it whole"
            ) from exc
        if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise AlertError(f"{url}: cannot write: {missing_credentials(exc)}") from exc
        if isinstance(exc, OSError):
            # e.g. ENOSPC: the final name is untouched (written under a temporary name).
            reason = f"{exc.strerror} (errno {exc.errno})" if exc.strerror else str(exc)
            raise AlertError(f"{url}: cannot write: {reason}; nothing was left under it") from exc
        raise


def _write_once(url: str, data: bytes, storage_options: dict | None) -> str:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    elif "s3" in protocols or "s3a" in protocols:
        # One PUT (or one completed multipart upload): S3 never exposes a partial object.
        fs.pipe_file(path, data)
    else:
        tmp = f"{path}.{secrets.token_hex(6)}.tmp"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    return url


def alert_file_url(location: str, visit: int, detector: int) -> str:
    """``{location}/{visit}_{detector}.avro``."""
    return f"{location.rstrip('/')}/{int(visit)}_{int(detector)}.avro"


#: The QA source tables written beside a detector's alert file (:func:`write_qa_sources`).
QA_KINDS = ("marginal", "trailed")


def qa_sources_url(location: str, visit: int, detector: int, kind: str) -> str:
    """``{location}/{visit}_{detector}.{kind}.parquet``, ``kind`` one of :data:`QA_KINDS`."""
    if kind not in QA_KINDS:
        raise ValueError(f"QA table kind must be one of {QA_KINDS}, got {kind!r}")
    return f"{location.rstrip('/')}/{int(visit)}_{int(detector)}.{kind}.parquet"


def write_qa_sources(
    location: str,
    visit: int,
    detector: int,
    kind: str,
    sources: pd.DataFrame,
    storage_options: dict | None = None,
) -> str:
    """Write one QA source table (DiaSource columns, parquet) beside the alert file, atomically.

    ``marginal``: the unassociated sources that failed the new-object cut
    (not stored); ``trailed``: the long-trailed sources set aside before
    association. Written for every processed detector, empty tables included,
    so a missing file means the detector was not processed. Returns the URL.
    """
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(_arrow_table(sources), buf)
    return _atomic_write(
        qa_sources_url(location, visit, detector, kind), buf.getvalue(), storage_options
    )


def _arrow_table(frame: pd.DataFrame):
    """``frame`` (index dropped) as a pyarrow Table, built column by column.

    The file reads back as pandas' ``to_parquet`` writes it (same Arrow types,
    pandas metadata, so nullable dtypes come back nullable), but each column's
    array is read once (:func:`core.frames.column_values`) and handed to
    pyarrow as it is; the schema is inferred once per set of columns and
    dtypes. ``to_parquet`` takes ~4x as long on the ~100 DiaSource columns,
    inferring every column's conversion on every call.
    """
    import pyarrow as pa

    names = [str(name) for name in frame.columns]
    if len(set(names)) != len(names):
        dup = next(name for name in names if names.count(name) > 1)
        raise AlertError(f"QA table: column {dup!r} appears more than once")
    schema = _arrow_schema(tuple((name, str(dtype)) for name, dtype in frame.dtypes.items()))
    if schema is None:  # a dtype pyarrow cannot name from an empty frame
        return pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    arrays = []
    fields = list(schema)
    for i, (name, target) in enumerate(zip(frame.columns, schema, strict=True)):
        values = column_values(frame, name)
        if isinstance(values, np.ndarray) and values.dtype != object:
            arr = pa.array(values)
        else:
            arr = pa.array(values, from_pandas=True)
        if pa.types.is_null(target.type) and not pa.types.is_null(arr.type):
            # an object column: its empty frame names no type, the values do (strings, ...)
            fields[i] = target.with_type(arr.type)
        elif arr.type != target.type:
            arr = arr.cast(target.type)
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=schema.metadata))


@functools.lru_cache(maxsize=64)
def _arrow_schema(columns: tuple[tuple[str, str], ...]):
    """The Arrow schema (with pandas metadata) of an empty frame of these columns."""
    import pyarrow as pa

    try:
        empty = pd.DataFrame({name: pd.Series([], dtype=dtype) for name, dtype in columns})
        return pa.Schema.from_pandas(empty, preserve_index=False)
    except (TypeError, ValueError, pa.ArrowException):
        return None


def write_alert_file(
    url: str, batch: AlertBatch, codec: str = "null", storage_options: dict | None = None
) -> str:
    """Write ``batch`` as one container file at ``url``, atomically; returns ``url``."""
    return _atomic_write(url, container_bytes(batch.schema, batch.payloads, codec), storage_options)


def write_alerts(batch: AlertBatch, config: AlertStoreConfig | None = None) -> str | None:
    """Write ``{location}/{visit}_{detector}.avro``; None (nothing written) for an empty batch.

    Re-running the same (visit, detector) replaces the file atomically. The
    file's index entry (:func:`alerts.index.write_index`) is written after it,
    so an indexed alert is always in its file.
    """
    written = write_alerts_with_digest(batch, config)
    return None if written is None else written[0]


def write_alerts_with_digest(
    batch: AlertBatch, config: AlertStoreConfig | None = None
) -> tuple[str, str] | None:
    """:func:`write_alerts`, also returning the SHA-256 (hex) of the bytes written.

    The digest goes into the detector's receipt; ``python -m alerts list``
    checks each file against it (:func:`check_against_receipt`).
    """
    config = config or AlertStoreConfig()
    if len(batch) == 0:
        return None
    from alerts.index import write_index

    opts = dict(config.storage_options)
    url = alert_file_url(config.location, batch.visit, batch.detector)
    data = container_bytes(batch.schema, batch.payloads, config.codec)
    _atomic_write(url, data, opts)
    write_index(
        config.location,
        url,
        batch.dia_source_ids,
        batch.visit,
        batch.detector,
        lambda u, body: _atomic_write(u, body, opts),
    )
    return url, hashlib.sha256(data).hexdigest()


def check_against_receipt(url: str, data: bytes, storage_options: dict | None = None) -> str | None:
    """Why the alert file ``url`` (its bytes ``data``) disagrees with its receipt, or None.

    The receipt is ``{dir}/receipts/{visit}_{detector}.json`` beside the file;
    a file without a receipt, or a receipt without a digest, is not checked.
    """
    m = _NAME.match(os.path.basename(url))
    if m is None:
        return None
    receipt = f"{url.rsplit('/', 1)[0]}/receipts/{m['visit']}_{m['detector']}.json"
    try:
        with fsspec.open(receipt, "rb", **(storage_options or {})) as f:
            body = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"{receipt}: unreadable receipt ({exc})"
    want = body.get("sha256") if isinstance(body, dict) else None
    if want is None:
        return None
    have = hashlib.sha256(data).hexdigest()
    if have != want:
        return f"content differs from its receipt (sha256 {have[:16]}..., receipt {want[:16]}...)"
    return None


def read_alert_batch(url: str, storage_options: dict | None = None) -> AlertBatch:
    """Read a container file written by diapipe back into an :class:`AlertBatch`."""
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        data = f.read()
    meta, payloads = iter_container_payloads(data, url)
    schema = _schema_of(meta, url)
    payloads = list(payloads)
    ids = np.array([_read_long(p, 0)[0] for p in payloads], dtype=np.int64)
    m = _NAME.match(os.path.basename(url))
    visit, detector = (int(m["visit"]), int(m["detector"])) if m else (-1, -1)
    return AlertBatch(payloads, ids, schema, visit, detector)


def read_alert_file(url: str, storage_options: dict | None = None) -> list[dict]:
    """All alerts of a container file as dicts (any Avro container, via fastavro)."""
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return list(fastavro.reader(f))


# --------------------------------------------------------------------------
# dead letters
# --------------------------------------------------------------------------


@dataclass
class DeadLetterStore:
    """Alerts that Kafka did not acknowledge, kept for :func:`alerts.kafka.replay_dead_letters`.

    Parameters
    ----------
    location : str
        Directory or ``s3://`` URL, separate from the alert files.
    storage_options : dict
        fsspec options (e.g. ``endpoint_url``).
    """

    location: str
    storage_options: dict = field(default_factory=dict)

    def _fs(self):
        return fsspec.core.url_to_fs(self.location, **self.storage_options)

    def put(self, batch: AlertBatch) -> str | None:
        """Store ``batch`` under a new unique name; None for an empty batch."""
        if len(batch) == 0:
            return None
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        name = f"{batch.visit}_{batch.detector}_{stamp}_{secrets.token_hex(4)}.avro"
        url = f"{self.location.rstrip('/')}/{name}"
        return write_alert_file(url, batch, "null", self.storage_options)

    def list(self) -> list[str]:
        """URLs of all dead-letter files, oldest name first."""
        fs, path = self._fs()
        if not fs.exists(path):
            return []
        names = sorted(p for p in fs.ls(path, detail=False) if _NAME.match(os.path.basename(p)))
        base = self.location.rstrip("/")
        return [f"{base}/{os.path.basename(p)}" for p in names]

    def read(self, url: str) -> AlertBatch:
        """The alerts of one dead-letter file."""
        return read_alert_batch(url, self.storage_options)

    def replace(self, url: str, batch: AlertBatch) -> None:
        """Rewrite ``url`` atomically with ``batch`` (remove it when empty)."""
        if len(batch) == 0:
            self.remove(url)
        else:
            write_alert_file(url, batch, "null", self.storage_options)

    def remove(self, url: str) -> None:
        """Delete one dead-letter file."""
        fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
        fs.rm(path)

    def count(self) -> int:
        """Alerts held in all files."""
        return sum(len(self.read(u)) for u in self.list())
