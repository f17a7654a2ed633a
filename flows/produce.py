"""Stage 9 for one detector: alert files, Kafka, dead letters (docs/design.md §4.9), receipts.

A detector is *finished* when the APDB holds its (visit, detector) marker and
its receipt ``{alert location}/receipts/{visit}_{detector}.json`` exists. The
receipt is written last, after the alert file and after Kafka has acknowledged
every alert or the unacknowledged ones are in the dead-letter store, so a
process that dies anywhere before it leaves the detector unfinished and the
next run produces its alerts again (at least once, same bytes).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import fsspec

from alerts.index import object_keys
from alerts.kafka import produce_alerts
from alerts.manifest import publish_night_artifact, read_night, visit_entry, write_visit_manifest
from alerts.packet import AlertBatch
from alerts.store import DeadLetterStore, _atomic_write, write_alerts_with_digest
from core.bundle import VisitInfo
from core.errors import AlertError
from flows.config import PipelineConfig

__all__ = [
    "finished_detectors",
    "produce_detector",
    "receipt_url",
    "receipts_by_visit",
    "record_visit",
]

log = logging.getLogger(__name__)


def receipt_url(config: PipelineConfig, visit: int, detector: int) -> str:
    """Where the receipt of a produced (visit, detector) lives."""
    return f"{config.output.store.location.rstrip('/')}/receipts/{int(visit)}_{int(detector)}.json"


def receipts_by_visit(config: PipelineConfig, visit: int | None = None) -> dict[int, set[int]]:
    """Visit → detectors with a receipt, from one listing of the receipt directory.

    With ``visit``, only that visit's receipts are kept.
    """
    base = f"{config.output.store.location.rstrip('/')}/receipts"
    fs, path = fsspec.core.url_to_fs(base, **dict(config.output.store.storage_options))
    if not fs.exists(path):
        return {}
    out: dict[int, set[int]] = {}
    for p in fs.ls(path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        v, sep, rest = name.partition("_")
        if not (sep and name.endswith(".json") and v.isdigit() and rest[:-5].isdigit()):
            continue
        if visit is not None and int(v) != int(visit):
            continue
        out.setdefault(int(v), set()).add(int(rest[:-5]))
    return out


def finished_detectors(config: PipelineConfig, visit: int) -> set[int]:
    """Detectors of ``visit`` whose alerts were produced (receipt written)."""
    return receipts_by_visit(config, visit).get(int(visit), set())


def produce_detector(
    visit: VisitInfo, detector: int, config: PipelineConfig, batch: AlertBatch | None
) -> tuple[dict[str, Any], dict[str, int]]:
    """Write the detector's alert file and send its alerts to Kafka.

    Alerts Kafka did not acknowledge go to the dead-letter store (when
    ``do_write_failed_alerts``); none is dropped silently: when dead letters are
    off, an unacknowledged alert fails the detector instead.

    Returns
    -------
    (value, counts)
        ``value``: ``alerts``, ``file`` (URL or None), ``sha256`` (of the file's
        bytes, when written), ``delivered``, ``dead_letters`` (URL or None),
        ``produced_at`` (Unix time once the file is written and Kafka has
        acknowledged the last alert);
        ``counts`` the same numbers. The receipt holds the same.
    """
    out: dict[str, Any] = {"alerts": 0, "file": None, "delivered": 0, "dead_letters": None}
    if batch is None or len(batch) == 0:
        out["produced_at"] = time.time()
        _write_receipt(config, visit, detector, out)
        return out, {"alerts": 0, "delivered": 0, "failed": 0}
    out["alerts"] = len(batch)
    out["ss_alerts"] = int((object_keys(batch.payloads, batch.schema)[1] >= 0).sum())
    if config.output.do_write_alerts:
        out["file"], out["sha256"] = write_alerts_with_digest(batch, config.output.store)
    failed = 0
    if config.output.do_produce_alerts:
        dead = (
            DeadLetterStore(
                config.output.dead_letter_location, dict(config.output.store.storage_options)
            )
            if config.output.do_write_failed_alerts
            else None
        )
        result = produce_alerts(batch, config.kafka, dead)
        out["delivered"] = result.n_delivered
        failed = result.n_failed
        out["dead_letters"] = result.dead_letter_url
        if failed and dead is None:
            raise AlertError(
                f"visit {visit.visit} detector {detector}: Kafka did not acknowledge {failed} of "
                f"{len(batch)} alerts and do_write_failed_alerts is off"
            )
    out["failed"] = failed
    # the last alert is in the store and acknowledged by Kafka (or dead-lettered):
    # the end of alert_timing_since_shutter_close (flows/timing.py)
    out["produced_at"] = time.time()
    _write_receipt(config, visit, detector, out)
    return out, {"alerts": out["alerts"], "delivered": out["delivered"], "failed": failed}


def _write_receipt(config: PipelineConfig, visit: VisitInfo, detector: int, out: dict) -> None:
    body = {"visit": visit.visit, "detector": int(detector), "produced_at": time.time(), **out}
    _atomic_write(
        receipt_url(config, visit.visit, detector),
        json.dumps(body, sort_keys=True).encode(),
        dict(config.output.store.storage_options),
    )


def record_visit(config: PipelineConfig, visit: VisitInfo, result: dict[str, Any]) -> str | None:
    """Write the visit's manifest (:mod:`alerts.manifest`) and its night's Prefect artifact.

    Counts come from the receipts of the visit's finished detectors. A store
    that cannot be written is logged and leaves the receipts as the record
    (``python -m alerts night`` then lacks the visit); it never fails a visit
    whose alerts are out.
    """
    opts = dict(config.output.store.storage_options)
    location = config.output.store.location
    try:
        receipts = []
        for det in sorted(finished_detectors(config, visit.visit) & set(result["detectors"])):
            with fsspec.open(receipt_url(config, visit.visit, det), "rb", **opts) as f:
                receipts.append(json.load(f))
        new = {int(r["detector"]): r.get("associate_new") for r in result["table"]}
        entry = visit_entry(visit, receipts, result["failed"], new)
        url = write_visit_manifest(location, entry, opts)
        publish_night_artifact(read_night(location, entry["night"], opts))
    except Exception as exc:  # the alerts are out; only the summary is missing
        log.error("visit %s: manifest not written (%s: %s)", visit.visit, type(exc).__name__, exc)
        return None
    return url
