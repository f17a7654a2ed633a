"""Per-night manifest and statistics of the alerts produced, for brokers to reconcile against.

When a visit finishes, the flow records it in the alert store as
``manifests/{night}/{visit}.json``, written atomically and only by that
visit, so two visits finishing at once never write the same file. A night's
summary is merged from its visit files when it is read (:func:`read_night`,
``python -m alerts night NIGHT``); nothing holds a night-wide file that
concurrent visits would have to update.

``night`` is Rubin's observing day, ``day_obs``, written ``YYYY-MM-DD``: the
date of the exposure's start (midpoint − half the exposure time) minus 12 h,
in TAI (obs_lsst ``LsstBaseTranslator._ROLLOVER_TIME``, SITCOMTN-032). A
night in Chile (about 23:00 to 11:00 UTC) so keeps one ``day_obs`` across UTC
midnight, and a visit taken after UTC midnight belongs to the night before,
as LSSTCam numbers it: its visit id is ``day_obs·10⁵ + seq_num``
(:mod:`core.ids`), so for LSSTCam visits ``night`` is the id's first eight
digits. The 12 h TAI rollover is Rubin's; an observatory far from Chile's
longitude (ZTF at Palomar, UTC−8, observes until ~14:00 UTC) would split its
nights at it.

The counts of a visit come from the detectors' receipts (written after their
alert file and after Kafka acknowledged every alert or the rest went to the
dead-letter store, see ``flows/produce.py``), so they are the alert files'
and the broker's own numbers:

``alerts``
    alerts written, per detector, in total and per band (a visit has one band);
``delivered`` / ``dead_lettered``
    alerts Kafka acknowledged / did not (those are in the dead-letter store);
``new_objects``
    DiaObjects created by association in this visit (``null`` for detectors
    whose association ran in an earlier run and was not repeated);
``ss_alerts``
    alerts of solar-system objects (``diaSource.ssObjectId`` set and not 0);
``failed``
    detector → reason, for detectors that produced no alerts this visit;
``latency_s``
    per detector, seconds from the end of the exposure (midpoint + half the
    exposure time, TAI converted to UTC) to its receipt; the percentiles are
    meaningful for live processing only (reprocessed data measures the delay
    of the reprocessing).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import numpy as np

from core.errors import InputError
from core.ids import DAY_OBS_ROLLOVER_DAYS, day_obs_date, day_obs_of

__all__ = [
    "DAY_OBS_ROLLOVER_DAYS",
    "day_obs_of",
    "manifest_url",
    "night_markdown",
    "night_of",
    "publish_night_artifact",
    "read_night",
    "visit_entry",
    "write_visit_manifest",
]

_NIGHT = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$|^(\d{4})(\d{2})(\d{2})$")
_PERCENTILES = (50, 90, 99)


def night_of(mjd_tai: float, exposure_time_s: float = 0.0) -> str:
    """The manifest night of an exposure: its :func:`day_obs_of` written ``YYYY-MM-DD``."""
    return day_obs_date(mjd_tai, exposure_time_s).isoformat()


def _night_date(night: str) -> str:
    """``night`` (``YYYY-MM-DD`` or ``YYYYMMDD``, a day_obs) as ``YYYY-MM-DD``, or InputError."""
    m = _NIGHT.match(night)
    if not m:
        raise InputError(f"night {night!r}: expected the night's day_obs as YYYY-MM-DD or YYYYMMDD")
    try:
        return dt.date(*(int(g) for g in m.groups() if g is not None)).isoformat()
    except ValueError as exc:
        raise InputError(f"night {night!r}: {exc}") from None


def _exposure_end_unix(mjd_tai: float, exposure_s: float) -> float:
    from astropy.time import Time

    return float(Time(float(mjd_tai), format="mjd", scale="tai").unix) + exposure_s / 2


def manifest_url(location: str, night: str, visit: int) -> str:
    """``{location}/manifests/{night}/{visit}.json``."""
    return f"{location.rstrip('/')}/manifests/{night}/{int(visit)}.json"


def _percentiles(values: Iterable[float]) -> dict[str, float] | None:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return None
    out = {f"p{p}": round(float(np.percentile(v, p)), 3) for p in _PERCENTILES}
    out["max"] = round(float(v.max()), 3)
    return out


def visit_entry(
    visit: Any,
    receipts: Iterable[Mapping[str, Any]],
    failed: Mapping[int, str],
    new_objects: Mapping[int, int | None],
) -> dict[str, Any]:
    """The manifest record of one visit.

    Parameters
    ----------
    visit : VisitInfo
        ``visit``, ``band``, ``midpointMjdTai``, ``exposureTime``.
    receipts : iterable of mapping
        The receipts of the detectors finished for this visit (``detector``,
        ``alerts``, ``file``, ``delivered``, ``failed``, ``ss_alerts``,
        ``produced_at``: Unix seconds).
    failed : mapping
        Detector → reason, for detectors that failed.
    new_objects : mapping
        Detector → DiaObjects created by association (None when unknown).
    """
    night = night_of(visit.midpointMjdTai, float(visit.exposureTime))
    end = _exposure_end_unix(visit.midpointMjdTai, float(visit.exposureTime))
    detectors: dict[str, dict[str, Any]] = {}
    for r in sorted(receipts, key=lambda r: int(r["detector"])):
        det = int(r["detector"])
        at = r.get("produced_at")
        detectors[str(det)] = {
            "alerts": int(r.get("alerts", 0)),
            "delivered": int(r.get("delivered", 0)),
            "dead_lettered": int(r.get("failed", 0) or 0),
            "ss_alerts": int(r.get("ss_alerts", 0) or 0),
            "new_objects": new_objects.get(det),
            "file": os.path.basename(r["file"]) if r.get("file") else None,
            "latency_s": round(at - end, 3) if at is not None else None,
        }
    rows = detectors.values()
    alerts = sum(d["alerts"] for d in rows)
    new = [d["new_objects"] for d in rows]
    return {
        "visit": int(visit.visit),
        "night": night,
        "day_obs": int(night.replace("-", "")),
        "band": visit.band,
        "midpointMjdTai": float(visit.midpointMjdTai),
        "alerts": alerts,
        "alerts_by_band": {visit.band: alerts} if alerts else {},
        "delivered": sum(d["delivered"] for d in rows),
        "dead_lettered": sum(d["dead_lettered"] for d in rows),
        "ss_alerts": sum(d["ss_alerts"] for d in rows),
        "new_objects": sum(n for n in new if n is not None),
        "new_objects_complete": all(n is not None for n in new),
        "failed": {str(int(d)): str(e) for d, e in sorted(failed.items())},
        "files": sorted(d["file"] for d in rows if d["file"]),
        "latency_s": _percentiles(d["latency_s"] for d in rows),
        "detectors": detectors,
        "recorded_at": time.time(),
    }


def write_visit_manifest(
    location: str, entry: Mapping[str, Any], storage_options: dict | None = None
) -> str:
    """Write one visit's record atomically; returns its URL (a re-run replaces it)."""
    from alerts.store import _atomic_write

    url = manifest_url(location, entry["night"], entry["visit"])
    return _atomic_write(url, json.dumps(entry, sort_keys=True).encode(), storage_options)


def read_night(location: str, night: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The summary of ``night``, merged from its visit records (no visits: ``visits == []``).

    ``night`` is a ``day_obs``, as ``YYYY-MM-DD`` or ``YYYYMMDD`` (the first
    eight digits of an LSSTCam visit id); the summary names it ``YYYY-MM-DD``.

    Raises
    ------
    InputError
        If ``night`` is not such a date.
    """
    night = _night_date(night)
    fs, path = fsspec.core.url_to_fs(
        f"{location.rstrip('/')}/manifests/{night}", **(storage_options or {})
    )
    visits = []
    if fs.exists(path):
        for p in fs.ls(path, detail=False):
            if p.endswith(".json") and os.path.basename(p)[:-5].lstrip("-").isdigit():
                with fs.open(p, "rb") as f:
                    visits.append(json.load(f))
    visits.sort(key=lambda v: (v["midpointMjdTai"], v["visit"]))
    by_band: dict[str, int] = {}
    for v in visits:
        for band, n in v["alerts_by_band"].items():
            by_band[band] = by_band.get(band, 0) + n
    latencies = [
        d["latency_s"]
        for v in visits
        for d in v["detectors"].values()
        if d["latency_s"] is not None
    ]
    return {
        "night": night,
        "visits": visits,
        "n_visits": len(visits),
        "alerts": sum(v["alerts"] for v in visits),
        "alerts_by_band": dict(sorted(by_band.items())),
        "delivered": sum(v["delivered"] for v in visits),
        "dead_lettered": sum(v["dead_lettered"] for v in visits),
        "new_objects": sum(v["new_objects"] for v in visits),
        "new_objects_complete": all(v["new_objects_complete"] for v in visits),
        "ss_alerts": sum(v["ss_alerts"] for v in visits),
        "failed_detectors": [
            {"visit": v["visit"], "detector": int(d), "reason": e}
            for v in visits
            for d, e in v["failed"].items()
        ],
        "latency_s": _percentiles(latencies),
    }


def night_markdown(summary: Mapping[str, Any]) -> str:
    """The night's summary as a markdown page (the Prefect artifact)."""
    lat = summary["latency_s"]
    lines = [
        f"# Night {summary['night']}",
        "",
        f"- visits: {summary['n_visits']}",
        f"- alerts: {summary['alerts']} (by band: "
        + ", ".join(f"{b} {n}" for b, n in summary["alerts_by_band"].items())
        + ")",
        f"- Kafka: {summary['delivered']} acknowledged, {summary['dead_lettered']} dead-lettered",
        f"- new DiaObjects: {summary['new_objects']}"
        + ("" if summary["new_objects_complete"] else " (some detectors not counted)"),
        f"- solar-system alerts: {summary['ss_alerts']}",
        f"- failed detectors: {len(summary['failed_detectors'])}",
    ]
    if lat:
        lines.append("- latency (s): " + ", ".join(f"{k} {v}" for k, v in lat.items()))
    lines += [
        "",
        "| visit | band | alerts | acknowledged | dead letters | failed |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {v['visit']} | {v['band']} | {v['alerts']} | {v['delivered']} | "
        f"{v['dead_lettered']} | {len(v['failed'])} |"
        for v in summary["visits"]
    ]
    if summary["failed_detectors"]:
        lines += ["", "## Failed detectors", "", "| visit | detector | reason |", "|---|---|---|"]
        lines += [
            f"| {f['visit']} | {f['detector']} | {f['reason'].replace('|', '/')[:300]} |"
            for f in summary["failed_detectors"]
        ]
    return "\n".join(lines)


def publish_night_artifact(summary: Mapping[str, Any]) -> None:
    """The night's markdown summary as the Prefect artifact ``night-{YYYY-MM-DD}``."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key=f"night-{summary['night']}",
        markdown=night_markdown(summary),
        description=f"Alerts of night {summary['night']} (day_obs), merged from its visits.",
    )
