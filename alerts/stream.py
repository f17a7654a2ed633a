"""The archive as a stream: one alert by id, and a night re-published visit by visit.

``python -m alerts get`` and ``python -m alerts replay-night`` (docs/alert-stream.md).

A night replay sends the alert files of the night's visits (from the night
manifest, :mod:`alerts.manifest`: a night is a ``day_obs``) in the order of the visits' midpoints,
waiting between visits as long as the survey did (``cadence=None``) or
``cadence`` seconds, divided by ``speed``. It keeps its state under
``{store}/replays/{topic}/{night}/``:

``dead/``
    a dead-letter store for the alerts Kafka did not acknowledge;
``done/{visit}_{detector}.json``
    written once a file's alerts were all acknowledged or dead-lettered.

A re-run first re-sends the dead letters (removing those acknowledged), then
sends only the files not marked done. What Kafka acknowledged is therefore
not sent again, except an alert acknowledged after its delivery report timed
out (at-least-once, as for the pipeline's own production).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import fsspec

from alerts.index import find_alert
from alerts.kafka import KafkaConfig, produce_alerts, replay_dead_letters, topic_for
from alerts.manifest import read_night
from alerts.packet import decode_alert
from alerts.store import (
    DeadLetterStore,
    _atomic_write,
    container_bytes,
    read_alert_batch,
)
from core.errors import InputError

__all__ = ["get_alert", "replay_night"]

log = logging.getLogger(__name__)


def get_alert(
    dia_source_id: int, store: str, out: str | None = None, storage_options: dict | None = None
) -> int:
    """Print (or write to ``out``) the alert of ``dia_source_id``; exit status (1: not found)."""
    found = find_alert(store, dia_source_id, storage_options)
    if found is None:
        print(f"error: no alert with diaSourceId {dia_source_id} in {store}", file=sys.stderr)
        return 1
    url, payload, schema = found
    if out:
        with open(out, "wb") as f:
            f.write(container_bytes(schema, [payload]))
        print(f"alert {dia_source_id} (from {url}) written to {out}")
        return 0
    alert = decode_alert(payload, schema)
    src = alert["diaSource"]
    stamps = [k for k in ("cutoutDifference", "cutoutScience", "cutoutTemplate") if alert.get(k)]
    print(
        f"alert {dia_source_id} in {url}: schema {schema.version}, visit {src.get('visit')}, "
        f"detector {src.get('detector')}, diaObjectId {src.get('diaObjectId')}, "
        f"ra {src.get('ra'):.6f} dec {src.get('dec'):.6f}, band {src.get('band')}, "
        f"{len(alert.get('prvDiaSources') or [])} earlier sources, "
        f"{len(alert.get('prvDiaForcedSources') or [])} forced, stamps: {', '.join(stamps) or 'none'}"
    )
    return 0


def replay_night(
    night: str,
    store: str,
    config: KafkaConfig,
    cadence: float | None = None,
    speed: float = 1.0,
    storage_options: dict | None = None,
) -> int:
    """Re-publish ``night`` from ``store`` to Kafka; exit status (0: every alert acknowledged)."""
    opts = storage_options or {}
    if speed <= 0 or (cadence is not None and cadence < 0):
        print("error: --speed must be > 0 and --cadence >= 0", file=sys.stderr)
        return 2
    try:
        summary = read_night(store, night, opts)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    night = summary["night"]  # YYYY-MM-DD however it was given: one replay state per night
    visits = [v for v in summary["visits"] if v["files"]]
    if not visits:
        print(f"error: night {night}: no alerts in {store}", file=sys.stderr)
        return 1
    base = store.rstrip("/")
    topic_dir = config.topic.replace("{", "").replace("}", "")
    state = f"{base}/replays/{topic_dir}/{night}"
    dead = DeadLetterStore(f"{state}/dead", dict(opts))
    retried = replay_dead_letters(dead, config) if dead.list() else None
    done_fs, done_path = fsspec.core.url_to_fs(f"{state}/done", **opts)
    done = (
        {os.path.basename(p) for p in done_fs.ls(done_path, detail=False)}
        if done_fs.exists(done_path)
        else set()
    )
    sent = delivered = failed = skipped = unreadable = 0
    previous_mjd = None
    for v in visits:
        todo = [f for f in v["files"] if f[: -len(".avro")] + ".json" not in done]
        skipped += len(v["files"]) - len(todo)
        if not todo:
            continue
        if previous_mjd is not None:
            gap = cadence if cadence is not None else (v["midpointMjdTai"] - previous_mjd) * 86400
            time.sleep(max(0.0, gap) / speed)
        previous_mjd = v["midpointMjdTai"]
        for name in todo:
            try:
                batch = read_alert_batch(f"{base}/{name}", opts)
            except (OSError, InputError) as exc:
                print(f"error: {base}/{name}: {exc}; not sent", file=sys.stderr)
                unreadable += 1
                continue
            result = produce_alerts(batch, config, dead)
            sent += len(batch)
            delivered += result.n_delivered
            failed += result.n_failed
            marker = {
                "file": name,
                "topic": topic_for(config, batch.schema),
                "delivered": result.n_delivered,
                "dead_lettered": result.n_failed,
            }
            _atomic_write(
                f"{state}/done/{name[: -len('.avro')]}.json", json.dumps(marker).encode(), opts
            )
        log.info("night %s visit %s: %d file(s) sent", night, v["visit"], len(todo))
    left = dead.count()
    again = f"; {retried.n_delivered} earlier dead letter(s) delivered" if retried else ""
    print(
        f"night {night}: {len(visits)} visit(s), {sent} alert(s) sent, {delivered} acknowledged, "
        f"{failed} dead-lettered, {skipped} file(s) already sent{again}; "
        f"{left} alert(s) waiting in {state}/dead"
        + (f"; {unreadable} file(s) unreadable" if unreadable else "")
    )
    return 0 if left == 0 and unreadable == 0 else 1
