"""``alert_timing_since_shutter_close``: from the shutter closing to the visit's alerts being out.

Per detector, the metric is the time from the shutter close to the moment the
detector's last alert was written to the alert store and acknowledged by Kafka
(``produced_at`` in the produce stage's value and the detector's receipt,
taken after the file write and after :func:`alerts.kafka.produce_alerts` has
flushed the producer); a detector with no alerts ends when its empty receipt
is due. The visit's metric is the largest of its detectors' (the last alert
out). Only detectors produced by this run have one: a detector finished by an
earlier run is skipped and reports none.

The shutter-close time comes from, in this order (the result says which,
under ``source``):

1. ``"parameter"``: the flow's ``shutter_close_utc`` parameter (an upstream
   system that announces visits only as ``diapipe.visit.next`` events can pass
   the message's time on through its trigger);
2. ``"next-visit"``: ``shutter_close_utc`` of ``{root}/{visit}/next-visit.json``;
3. ``"bundle-complete"``: when the bundle became complete, the latest
   modification time of the files its marker ``complete.json`` lists and of the
   marker itself (:func:`core.completion.check_complete`): this misses the
   transfer time from the camera, so it reads low;
4. ``"visit.json"``: ``midpointMjdTai`` + ``exposureTime``/2 of ``visit.json``
   (TAI converted to UTC).

A source that is missing or does not validate is logged and the next one is
taken; the metric never fails a visit.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import fsspec
from astropy.time import Time

from core.bundle import VisitInfo, visit_path
from core.completion import check_complete
from core.nextvisit import NEXT_VISIT_FILE, format_utc, parse_next_visit, parse_utc

__all__ = ["METRIC", "ShutterClose", "add_latency", "shutter_close"]

log = logging.getLogger(__name__)

METRIC = "alert_timing_since_shutter_close"


class ShutterClose(NamedTuple):
    """When the shutter closed (aware UTC datetime) and where that came from."""

    time: datetime
    source: str


def _from_visit_json(info: VisitInfo) -> datetime:
    mid = Time(info.midpointMjdTai, format="mjd", scale="tai").utc.to_datetime(timezone=UTC)
    return mid + timedelta(seconds=info.exposureTime / 2.0)


def shutter_close(
    bundle_root: str, info: VisitInfo, given: str | None = None, storage_options=None
) -> ShutterClose:
    """The visit's shutter-close time and its source (see the module docstring)."""
    if given:
        try:
            return ShutterClose(parse_utc(given, "shutter_close_utc"), "parameter")
        except Exception as exc:
            log.warning("visit %s: %s; looking further", info.visit, exc)
    url = f"{visit_path(bundle_root, info.visit)}/{NEXT_VISIT_FILE}"
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if fs.exists(path):
            message = parse_next_visit(fs.cat_file(path), url)
            if message.visit == info.visit:
                return ShutterClose(message.shutter_close, "next-visit")
            log.warning("%s: announces visit %s, not %s", url, message.visit, info.visit)
    except Exception as exc:
        log.warning("visit %s: next-visit message not used: %s", info.visit, exc)
    try:
        done = check_complete(bundle_root, info.visit, storage_options)
        if done is not None:
            return ShutterClose(done.completed_at, "bundle-complete")
    except Exception as exc:
        log.warning("visit %s: completion marker not used: %s", info.visit, exc)
    return ShutterClose(_from_visit_json(info), "visit.json")


def add_latency(result: dict, close: ShutterClose) -> None:
    """Put the metric into a visit result (in place).

    Each table row with a ``produced_at`` (Unix seconds) gets
    ``alert_timing_since_shutter_close_s``; ``result[METRIC]`` becomes
    ``{"visit_s", "detectors_s" (detector → s), "shutter_close_utc", "source"}``
    with ``visit_s`` the largest detector value, None when no detector was
    produced by this run.
    """
    t0 = close.time.timestamp()
    per: dict[int, float] = {}
    for row in result["table"]:
        at = row.get("produced_at")
        if at is None:
            continue
        row[f"{METRIC}_s"] = round(float(at) - t0, 3)
        per[int(row["detector"])] = row[f"{METRIC}_s"]
    result[METRIC] = {
        "visit_s": max(per.values()) if per else None,
        "detectors_s": dict(sorted(per.items())),
        "shutter_close_utc": format_utc(close.time),
        "source": close.source,
    }
