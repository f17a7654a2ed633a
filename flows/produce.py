"""Stage 9 for one detector: alert files, Kafka, dead letters (SPEC §4.9)."""

from __future__ import annotations

from typing import Any

from alerts.kafka import produce_alerts
from alerts.packet import AlertBatch
from alerts.store import DeadLetterStore, write_alerts
from flows.config import PipelineConfig
from tasks.bundle import VisitInfo
from tasks.errors import AlertError

__all__ = ["produce_detector"]


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
        ``value``: ``alerts``, ``file`` (URL or None), ``delivered``,
        ``dead_letters`` (URL or None); ``counts`` the same numbers.
    """
    out: dict[str, Any] = {"alerts": 0, "file": None, "delivered": 0, "dead_letters": None}
    if batch is None or len(batch) == 0:
        return out, {"alerts": 0, "delivered": 0, "failed": 0}
    out["alerts"] = len(batch)
    if config.output.do_write_alerts:
        out["file"] = write_alerts(batch, config.output.store)
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
    return out, {"alerts": out["alerts"], "delivered": out["delivered"], "failed": failed}
