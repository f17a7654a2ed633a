"""The next-visit message: what an upstream system announces before an exposure.

Before each exposure the scheduler says which visit comes next and where the
camera will point, so that workers can prepare (preload the APDB rows of the
predicted footprint) and so that the pipeline knows when the shutter closed.
The message is one JSON object; it arrives either as the Prefect event
``diapipe.visit.next`` (the object is the event's payload) or as the file
``{root}/{visit}/next-visit.json`` beside the bundle (:data:`NEXT_VISIT_FILE`),
which ``python -m flows.watch`` turns into that event.

Fields (schema version 1)::

    {
      "schema_version": 1,
      "visit": 2026120200123,              # int >= 0, the visit.json visit
      "band": "r",                         # one of ugrizy
      "boresightRa": 150.1134,             # predicted boresight, deg ICRS, [0, 360)
      "boresightDec": 2.2051,              # deg, [-90, 90]
      "rotAngle": 87.3,                    # deg, sky position angle of the focal plane +y
      "detectors": [90, 91, 94],           # non-empty, unique ints
      "shutter_close_utc": "2026-12-02T03:14:15.926Z",   # expected, ISO-8601 with offset
      "issued_utc": "2026-12-02T03:13:45.926Z",          # optional: when it was published
      "detector_corners": {                # optional: predicted footprint per detector
        "94": [[ra, dec], [ra, dec], [ra, dec], [ra, dec]]
      }
    }

Footprint. The message carries each detector's predicted footprint as the sky
positions (deg) of its four pixel-edge corners, in order around the detector,
as the announcing system's camera model computes them from the predicted
boresight and rotation. The pipeline holds no camera geometry of its own: the
same four corners, computed from the bundle's WCS, are what
``flows.detector.footprint`` uses for the real footprint, so the predicted and
real footprints are the same kind of polygon and a consumer pads either one
(:meth:`NextVisit.corners`). A message without ``detector_corners`` still
announces the visit and its shutter-close time; it gives no predicted
footprint.

Unknown fields are refused (a misspelt optional field would otherwise vanish
silently); a newer ``schema_version`` than :data:`SCHEMA_VERSION` is refused
with a message saying so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from core.errors import InputError

__all__ = [
    "NEXT_VISIT_FILE",
    "SCHEMA_VERSION",
    "NextVisit",
    "format_utc",
    "parse_next_visit",
    "parse_utc",
]

#: The file name of a next-visit message beside the bundle: ``{root}/{visit}/next-visit.json``.
NEXT_VISIT_FILE = "next-visit.json"

#: The schema version this module writes and the newest it reads.
SCHEMA_VERSION = 1

_BANDS = ("u", "g", "r", "i", "z", "y")
_REQUIRED = (
    "schema_version",
    "visit",
    "band",
    "boresightRa",
    "boresightDec",
    "rotAngle",
    "detectors",
    "shutter_close_utc",
)
_OPTIONAL = ("issued_utc", "detector_corners")


def parse_utc(text: str, what: str = "time") -> datetime:
    """An ISO-8601 time with a UTC offset (``Z`` or ``+00:00``...) → aware UTC datetime.

    Raises
    ------
    InputError
        Not a string, not ISO-8601, or without an offset (a local time is ambiguous).
    """
    if not isinstance(text, str):
        raise InputError(f"{what} must be an ISO-8601 string, got {text!r}")
    try:
        t = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InputError(f"{what} is not an ISO-8601 time: {text!r}") from exc
    if t.tzinfo is None or t.utcoffset() is None:
        raise InputError(f"{what} must carry a UTC offset such as 'Z', got {text!r}")
    return t.astimezone(UTC)


def format_utc(t: datetime) -> str:
    """``2026-12-02T03:14:15.926000Z``: UTC, microseconds, ``Z``."""
    if t.tzinfo is None:
        raise ValueError("format_utc needs an aware datetime")
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class NextVisit:
    """A validated next-visit message (see the module docstring for the fields)."""

    visit: int
    band: str
    boresightRa: float
    boresightDec: float
    rotAngle: float
    detectors: tuple[int, ...]
    shutter_close: datetime
    issued: datetime | None = None
    detector_corners: dict[int, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def corners(self, detector: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Predicted (ra, dec) of ``detector``'s four corners (deg), or None when not given."""
        c = self.detector_corners.get(int(detector))
        if c is None:
            return None
        a = np.asarray(c, dtype=np.float64)
        return a[:, 0].copy(), a[:, 1].copy()

    def to_json_dict(self) -> dict:
        """The JSON object of the message (the event payload, the file's content)."""
        d: dict = {
            "schema_version": self.schema_version,
            "visit": self.visit,
            "band": self.band,
            "boresightRa": self.boresightRa,
            "boresightDec": self.boresightDec,
            "rotAngle": self.rotAngle,
            "detectors": list(self.detectors),
            "shutter_close_utc": format_utc(self.shutter_close),
        }
        if self.issued is not None:
            d["issued_utc"] = format_utc(self.issued)
        if self.detector_corners:
            d["detector_corners"] = {
                str(k): [list(p) for p in v] for k, v in sorted(self.detector_corners.items())
            }
        return d

    def to_json_bytes(self) -> bytes:
        """The message as UTF-8 JSON (indented, trailing newline)."""
        return (json.dumps(self.to_json_dict(), indent=2) + "\n").encode()


def _number(data: dict, key: str, where: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: field {key!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{where}: field {key!r} must be finite, got {value!r}")
    return float(value)


def _corners(raw, detectors: tuple[int, ...], where: str) -> dict[int, tuple]:
    if not isinstance(raw, dict):
        raise InputError(
            f"{where}: field 'detector_corners' must be an object detector → corners, got "
            f"{type(raw).__name__}"
        )
    out: dict[int, tuple] = {}
    for key, corners in raw.items():
        k = str(key)
        if not k.isdigit() or int(k) not in detectors:
            raise InputError(
                f"{where}: detector_corners has detector {key!r}, which is not in 'detectors'"
            )
        ok = isinstance(corners, list) and len(corners) == 4
        ok = ok and all(isinstance(p, list) and len(p) == 2 for p in corners)
        ok = ok and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for p in corners
            for v in p
        )
        if not ok:
            raise InputError(
                f"{where}: detector_corners[{k}] must be four finite [ra, dec] pairs (deg), "
                f"got {corners!r}"
            )
        if not all(-90 <= p[1] <= 90 for p in corners):
            raise InputError(f"{where}: detector_corners[{k}] has a dec outside [-90, 90]")
        out[int(k)] = tuple((float(p[0]) % 360.0, float(p[1])) for p in corners)
    return out


def parse_next_visit(data, where: str = "next-visit message") -> NextVisit:
    """Validate a next-visit message (a dict, JSON text or bytes) → :class:`NextVisit`.

    ``where`` names the source in error messages (a file URL, an event id).

    Raises
    ------
    InputError
        Not JSON, not an object, a field missing, unknown or of the wrong type or
        range, a schema version this code does not know; the message names the
        field and the value.
    """
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)}")
    version = data["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(
            f"{where}: field 'schema_version' must be an integer >= 1, got {version!r}"
        )
    if version > SCHEMA_VERSION:
        raise InputError(
            f"{where}: schema_version {version} is newer than the {SCHEMA_VERSION} this "
            f"pipeline reads"
        )
    visit = data["visit"]
    if isinstance(visit, bool) or not isinstance(visit, int) or visit < 0:
        raise InputError(f"{where}: field 'visit' must be an integer >= 0, got {visit!r}")
    band = data["band"]
    if band not in _BANDS:
        raise InputError(f"{where}: field 'band' must be one of {''.join(_BANDS)}, got {band!r}")
    ra = _number(data, "boresightRa", where)
    dec = _number(data, "boresightDec", where)
    rot = _number(data, "rotAngle", where)
    if not 0 <= ra < 360:
        raise InputError(f"{where}: field 'boresightRa' must be in [0, 360), got {ra!r}")
    if not -90 <= dec <= 90:
        raise InputError(f"{where}: field 'boresightDec' must be in [-90, 90], got {dec!r}")
    dets = data["detectors"]
    if (
        not isinstance(dets, list)
        or not dets
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dets)
    ):
        raise InputError(
            f"{where}: field 'detectors' must be a non-empty list of integers >= 0, got {dets!r}"
        )
    if len(set(dets)) != len(dets):
        raise InputError(f"{where}: field 'detectors' has duplicates")
    detectors = tuple(int(d) for d in dets)
    close = parse_utc(data["shutter_close_utc"], f"{where}: field 'shutter_close_utc'")
    issued = None
    if data.get("issued_utc") is not None:
        issued = parse_utc(data["issued_utc"], f"{where}: field 'issued_utc'")
        if issued > close:
            raise InputError(
                f"{where}: field 'issued_utc' ({data['issued_utc']}) is after "
                f"shutter_close_utc ({data['shutter_close_utc']})"
            )
    corners = {}
    if data.get("detector_corners") is not None:
        corners = _corners(data["detector_corners"], detectors, where)
    return NextVisit(
        visit=int(visit),
        band=band,
        boresightRa=ra,
        boresightDec=dec,
        rotAngle=rot,
        detectors=detectors,
        shutter_close=close,
        issued=issued,
        detector_corners=corners,
        schema_version=version,
    )
