"""The alert schemas as a Confluent Schema Registry: a read-only server and a sync to a registry.

Stock Kafka clients decode Rubin's alert stream by looking the schema id of
each message (bytes 1-4 of the Confluent wire format) up in a Confluent
Schema Registry. Rubin registers every schema version that
``lsst-alert-packet`` ships with the id ``major * 100 + minor`` (so ``11.1`` is
1101), under two subjects (``syncAllSchemasToRegistry.py`` /
``syncLatestSchemaToRegistry.py`` in lsst/alert_packet):

* ``alert-packet``: every version, with the registry version equal to the id;
* ``lsst-alerts-v{M.m}-value``: one subject per version holding that one
  schema as version 1 (the subject the ``TopicNameStrategy`` of a topic
  ``lsst-alerts-v{M.m}`` would use).

Schemas are given in Avro's parsing canonical form, as Rubin's sync does.

:func:`serve` answers the REST calls that ``SchemaRegistryClient`` and the
Avro serdes of ``confluent-kafka`` make (``GET /schemas/ids/{id}``,
``/schemas/ids/{id}/versions``, ``/schemas/ids/{id}/subjects``, ``/subjects``,
``/subjects/{s}/versions``, ``/subjects/{s}/versions/{v|latest}``, ``POST
/subjects/{s}`` to look a schema up, ``/mode``, ``/config``); an unknown id,
subject or version gets a 404 with Confluent's error codes (40403 schema, 40401
subject, 40402 version). It changes nothing: every write answers 405.

:func:`sync_registry` registers the same ids, subjects and versions into an
existing Confluent-compatible registry: each subject is put in ``IMPORT`` mode
(``PUT /mode/{subject}?force=true``), each schema posted with its ``id`` and
``version``, and the subject set back to ``READWRITE``. A schema already
registered with the same id is accepted as it is, so a sync can be repeated.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fastavro
from lsst.alert.packet import Schema, get_schema_root

from core.errors import ConfigError

__all__ = [
    "RegisteredSchema",
    "SyncResult",
    "alert_subjects",
    "registered_schemas",
    "serve",
    "sync_registry",
]

log = logging.getLogger(__name__)

#: The subject holding every version (Rubin's default ``--subject``).
PACKET_SUBJECT = "alert-packet"
_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


@dataclass(frozen=True)
class RegisteredSchema:
    """One alert schema version as the registry knows it."""

    version: str  # "MAJOR.MINOR"
    schema_id: int
    schema: str  # parsing canonical form

    @property
    def topic_subject(self) -> str:
        """``lsst-alerts-v{M.m}-value``."""
        return f"lsst-alerts-v{self.version}-value"


@cache
def registered_schemas() -> tuple[RegisteredSchema, ...]:
    """Every alert schema version the installed lsst-alert-packet ships, by id."""
    root = get_schema_root()
    out = []
    for major in os.listdir(root):
        if not major.isdigit():
            continue
        for minor in os.listdir(os.path.join(root, major)):
            path = os.path.join(root, major, minor, f"lsst.v{major}_{minor}.alert.avsc")
            if not (minor.isdigit() and os.path.exists(path)):
                continue
            definition = Schema.from_file(path).definition
            out.append(
                RegisteredSchema(
                    version=f"{int(major)}.{int(minor)}",
                    schema_id=int(major) * 100 + int(minor),
                    schema=fastavro.schema.to_parsing_canonical_form(definition),
                )
            )
    if not out:
        raise ConfigError(f"lsst-alert-packet ships no alert schema under {root}")
    return tuple(sorted(out, key=lambda s: s.schema_id))


def alert_subjects() -> dict[str, dict[int, RegisteredSchema]]:
    """Subject → {registry version → schema}, as Rubin registers them."""
    schemas = registered_schemas()
    subjects = {PACKET_SUBJECT: {s.schema_id: s for s in schemas}}
    for s in schemas:
        subjects[s.topic_subject] = {1: s}
    return subjects


# --------------------------------------------------------------------------
# the read-only server
# --------------------------------------------------------------------------


class _Error(Exception):
    def __init__(self, status: int, code: int, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _schema_not_found(what: str) -> _Error:
    return _Error(404, 40403, f"Schema {what} not found")


class _Catalogue:
    """The lookups the handler answers, over :func:`alert_subjects`."""

    def __init__(self) -> None:
        self.subjects = alert_subjects()
        self.by_id = {s.schema_id: s for s in registered_schemas()}

    def subject(self, name: str) -> dict[int, RegisteredSchema]:
        if name not in self.subjects:
            raise _Error(404, 40401, f"Subject '{name}' not found.")
        return self.subjects[name]

    def version(self, subject: str, version: str) -> tuple[int, RegisteredSchema]:
        versions = self.subject(subject)
        if version == "latest" or version == "-1":
            v = max(versions)
        else:
            try:
                v = int(version)
            except ValueError:
                raise _Error(
                    422, 42202, f"The specified version '{version}' is not a valid version id."
                ) from None
        if v not in versions:
            raise _Error(404, 40402, f"Version {version} not found.")
        return v, versions[v]

    def schema(self, schema_id: str) -> RegisteredSchema:
        try:
            return self.by_id[int(schema_id)]
        except (ValueError, KeyError):
            raise _schema_not_found(schema_id) from None

    def uses(self, schema_id: int) -> list[tuple[str, int]]:
        return [
            (name, v)
            for name, versions in self.subjects.items()
            for v, s in versions.items()
            if s.schema_id == schema_id
        ]

    def get(self, path: str) -> object:
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        match parts:
            case ["schemas", "ids", sid]:
                return {"schema": self.schema(sid).schema}
            case ["schemas", "ids", sid, "versions"]:
                s = self.schema(sid)
                return [{"subject": n, "version": v} for n, v in self.uses(s.schema_id)]
            case ["schemas", "ids", sid, "subjects"]:
                s = self.schema(sid)
                return sorted({n for n, _ in self.uses(s.schema_id)})
            case ["schemas", "types"]:
                return ["AVRO"]
            case ["subjects"]:
                return sorted(self.subjects)
            case ["subjects", name, "versions"]:
                return sorted(self.subject(name))
            case ["subjects", name, "versions", version]:
                v, s = self.version(name, version)
                return self._registered(name, v, s)
            case ["subjects", name, "versions", version, "schema"]:
                return json.loads(self.version(name, version)[1].schema)
            case ["mode"] | ["mode", _]:
                return {"mode": "READONLY"}
            case ["config"] | ["config", _]:
                return {"compatibilityLevel": "NONE"}
            case [""]:
                return {}
        raise _Error(404, 404, "HTTP 404 Not Found")

    def lookup(self, path: str, body: bytes) -> object:
        """``POST /subjects/{subject}``: the registered version of a given schema."""
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if len(parts) != 2 or parts[0] != "subjects":
            raise _Error(405, 405, "HTTP 405 Method Not Allowed: this registry is read-only")
        versions = self.subject(parts[1])
        try:
            wanted = fastavro.schema.to_parsing_canonical_form(
                json.loads(json.loads(body)["schema"])
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise _Error(422, 42201, f"Invalid schema: {exc}") from None
        for v, s in versions.items():
            if s.schema == wanted:
                return self._registered(parts[1], v, s)
        raise _schema_not_found("in subject " + parts[1])

    @staticmethod
    def _registered(subject: str, version: int, s: RegisteredSchema) -> dict:
        return {"subject": subject, "version": version, "id": s.schema_id, "schema": s.schema}


class _Handler(BaseHTTPRequestHandler):
    catalogue: _Catalogue
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", _CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _run(self, fn) -> None:
        try:
            self._answer(200, fn())
        except _Error as err:
            self._answer(err.status, {"error_code": err.code, "message": err.message})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        self._run(lambda: self.catalogue.get(path))

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        body = self._body()
        self._run(lambda: self.catalogue.lookup(path, body))

    def _read_only(self) -> None:
        self._body()
        self._answer(
            405, {"error_code": 405, "message": "HTTP 405 Method Not Allowed: read-only registry"}
        )

    do_PUT = do_DELETE = _read_only

    def log_message(self, format: str, *args) -> None:
        log.debug("registry %s: " + format, self.client_address[0], *args)


def serve(host: str = "127.0.0.1", port: int = 8081) -> ThreadingHTTPServer:
    """A threaded registry server bound to ``host:port`` (port 0: any free port).

    The caller runs it (``serve_forever``) and closes it (``shutdown`` then
    ``server_close``); ``server.server_address`` tells the port.
    """
    handler = type("AlertRegistryHandler", (_Handler,), {"catalogue": _Catalogue()})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_in_thread(host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start :func:`serve` in a daemon thread; returns the server and its URL."""
    server = serve(host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}"


# --------------------------------------------------------------------------
# sync into an existing registry
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncResult:
    """What a sync did: schemas registered, already there, refused (subject/version → error)."""

    registered: int
    unchanged: int
    errors: dict[str, str]


def _call(url: str, method: str, body: dict | None, headers: dict) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
            return resp.status, json.loads(text) if text else None
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, text.decode(errors="replace")


def _auth_headers(url: str) -> tuple[str, dict]:
    """Split ``user:password@`` out of ``url`` into a basic-auth header (never logged)."""
    import base64

    parts = urllib.parse.urlsplit(url)
    headers = {"Content-Type": _CONTENT_TYPE, "Accept": _CONTENT_TYPE}
    if parts.username is not None:
        token = (
            f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        )
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urllib.parse.urlunsplit(parts).rstrip("/"), headers


def _safe(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//", url)


def sync_registry(url: str) -> SyncResult:
    """Register every alert schema into the registry at ``url`` with Rubin's ids and subjects.

    Raises
    ------
    ConfigError
        If the registry cannot be reached.
    """
    base, headers = _auth_headers(url)
    registered = unchanged = 0
    errors: dict[str, str] = {}
    for subject, versions in alert_subjects().items():
        quoted = urllib.parse.quote(subject, safe="")
        try:
            status, body = _call(
                f"{base}/mode/{quoted}?force=true", "PUT", {"mode": "IMPORT"}, headers
            )
        except urllib.error.URLError as exc:
            raise ConfigError(f"schema registry {_safe(url)}: {exc.reason}") from exc
        if status >= 300:
            errors[subject] = f"IMPORT mode refused: HTTP {status} {body}"
            continue
        for version, s in sorted(versions.items()):
            request = {
                "schema": s.schema,
                "schemaType": "AVRO",
                "id": s.schema_id,
                "version": version,
            }
            status, body = _call(f"{base}/subjects/{quoted}/versions", "POST", request, headers)
            if status < 300 and isinstance(body, dict) and body.get("id") == s.schema_id:
                registered += 1
            elif isinstance(body, dict) and _already_there(base, quoted, version, s, headers):
                unchanged += 1
            else:
                errors[f"{subject}/{version}"] = f"HTTP {status} {body}"
        status, body = _call(f"{base}/mode/{quoted}", "PUT", {"mode": "READWRITE"}, headers)
        if status >= 300:
            errors[f"{subject} mode"] = f"READWRITE refused: HTTP {status} {body}"
    return SyncResult(registered, unchanged, errors)


def _already_there(base: str, quoted: str, version: int, s: RegisteredSchema, headers) -> bool:
    """The registry already holds this exact schema, id and version."""
    status, body = _call(f"{base}/subjects/{quoted}/versions/{version}", "GET", None, headers)
    if status != 200 or not isinstance(body, dict) or body.get("id") != s.schema_id:
        return False
    try:
        same = fastavro.schema.to_parsing_canonical_form(json.loads(body["schema"])) == s.schema
    except (ValueError, KeyError, TypeError):
        return False
    return same
