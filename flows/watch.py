"""``python -m flows.watch ROOT``: announce new visits and complete bundles as Prefect events.

The watcher polls a bundle root (a local path or ``s3://bucket/prefix``) and
sends two kinds of event to the Prefect API (``PREFECT_API_URL``), both about
the resource ``diapipe.visit.{visit}``:

``diapipe.visit.next``
    for each new or changed ``{root}/{visit}/next-visit.json``; the payload is
    the validated message (:mod:`core.nextvisit`). A message that does not
    validate is logged once and not sent.
``diapipe.visit.ready``
    once per visit, when its bundle is complete (:func:`core.completion.check_complete`:
    the producer's marker ``complete.json`` lists every file with its size and
    all of them are there at that size); the payload is ``{"bundle_root",
    "visit", "completed_utc"}``. A half-copied bundle is never reported.

The ``visit-on-ready`` deployment of ``prefect.yaml`` runs
:func:`flows.visit.process_visit` on each ready event (docs/deploying.md).

What was sent is remembered in memory and, with ``--state FILE``, in a small
JSON file written after every poll that sent something, so a restarted watcher
does not announce every visit under the root again. A repeated event is
harmless anyway: a visit whose detectors are all stored and produced is
skipped by the flow (per (visit, detector) marker and receipt). Once a visit is
ready, its folder is not listed again; a next-visit file that appears after
its bundle is complete is ignored.

Events go through Prefect's events client directly rather than
``prefect.events.emit_event``: ``emit_event`` hands the event to a background
worker and swallows a failure to send, so the watcher could record as sent an
event the server never got. Here a failed send raises, the poll's events that
were not sent stay unrecorded, and the next poll tries them again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from core.bundle import visit_path
from core.completion import check_complete
from core.errors import InputError, TransientError
from core.nextvisit import NEXT_VISIT_FILE, format_utc, parse_next_visit

__all__ = [
    "NEXT_EVENT",
    "READY_EVENT",
    "Watcher",
    "WatchEvent",
    "main",
    "resource_id",
]

log = logging.getLogger("diapipe.watch")

NEXT_EVENT = "diapipe.visit.next"
READY_EVENT = "diapipe.visit.ready"


def resource_id(visit: int) -> str:
    """The Prefect resource id of a visit: ``diapipe.visit.{visit}``."""
    return f"diapipe.visit.{int(visit)}"


@dataclass(frozen=True)
class WatchEvent:
    """One event to send: its name, visit and payload; ``key`` identifies what it reports."""

    event: str
    visit: int
    payload: dict
    key: str = ""

    def resource(self, root: str) -> dict[str, str]:
        """The event's Prefect resource (labels are strings)."""
        return {
            "prefect.resource.id": resource_id(self.visit),
            "prefect.resource.name": f"visit {self.visit}",
            "diapipe.bundle-root": root,
        }


@dataclass
class _State:
    ready: set[int] = field(default_factory=set)
    next: dict[int, str] = field(default_factory=dict)  # visit → key of the file sent

    def to_json(self) -> str:
        return json.dumps(
            {"ready": sorted(self.ready), "next": {str(k): v for k, v in sorted(self.next.items())}}
        )

    @classmethod
    def load(cls, path: Path | None) -> _State:
        if path is None or not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(
                ready={int(v) for v in data.get("ready", [])},
                next={int(k): str(v) for k, v in data.get("next", {}).items()},
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise InputError(f"{path}: not a watcher state file: {exc}") from exc


class Watcher:
    """Scan a bundle root for next-visit files and complete bundles not yet reported.

    Parameters
    ----------
    root : str
        Bundle root (local path or fsspec URL such as ``s3://bucket/prefix``).
    state_path : str or Path, optional
        Local JSON file remembering what was sent, across restarts.
    storage_options : dict, optional
        fsspec options for the root (default: credentials and endpoint from the
        environment, as everywhere else).
    """

    def __init__(self, root: str, state_path=None, storage_options: dict | None = None):
        self.root = root.rstrip("/") if "://" in root else str(Path(root).resolve())
        self.storage_options = dict(storage_options or {})
        self.state_path = Path(state_path) if state_path else None
        self.state = _State.load(self.state_path)
        self._bad: dict[tuple[int, str], str] = {}  # (visit, key) → error logged once

    def _fs(self):
        fs, path = fsspec.core.url_to_fs(self.root, **self.storage_options)
        return fs, path

    def visits(self) -> list[int]:
        """Visit folders under the root, ascending."""
        fs, path = self._fs()
        try:
            entries = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TransientError(f"{self.root}: cannot list the bundle root: {exc}") from exc
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in entries)
        return sorted(int(n) for n in names if n.isdigit())

    def scan(self) -> list[WatchEvent]:
        """The events due now, next-visit messages first; nothing is recorded as sent."""
        fs, _ = self._fs()
        fs.invalidate_cache()  # s3fs caches listings; every poll must see the storage as it is
        nexts, readies = [], []
        for v in self.visits():
            if v in self.state.ready:
                continue
            nexts += self._next_event(fs, v)
            readies += self._ready_event(v)
        return nexts + readies

    def _once(self, visit: int, key: str, message: str) -> None:
        if self._bad.get((visit, key)) != message:
            self._bad[(visit, key)] = message
            log.warning("visit %s: %s", visit, message)

    def _next_event(self, fs, visit: int) -> list[WatchEvent]:
        url = f"{visit_path(self.root, visit)}/{NEXT_VISIT_FILE}"
        _, path = fsspec.core.url_to_fs(url, **self.storage_options)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return []
        mtime = info.get("mtime", info.get("LastModified", ""))
        key = f"{info.get('size')}:{mtime}"
        if self.state.next.get(visit) == key:
            return []
        try:
            message = parse_next_visit(fs.cat_file(path), url)
        except InputError as exc:
            self._once(visit, key, f"next-visit message not sent: {exc}")
            return []
        except FileNotFoundError:
            return []
        if message.visit != visit:
            self._once(visit, key, f"{url}: visit is {message.visit} but the folder says {visit}")
            return []
        return [WatchEvent(NEXT_EVENT, visit, message.to_json_dict(), key)]

    def _ready_event(self, visit: int) -> list[WatchEvent]:
        try:
            done = check_complete(self.root, visit, self.storage_options)
        except InputError as exc:
            self._once(visit, "ready", f"bundle not reported ready: {exc}")
            return []
        if done is None:
            return []
        payload = {
            "bundle_root": self.root,
            "visit": visit,
            "completed_utc": format_utc(done.completed_at),
        }
        return [WatchEvent(READY_EVENT, visit, payload, "ready")]

    def record(self, ev: WatchEvent) -> None:
        """Remember that ``ev`` was sent."""
        if ev.event == READY_EVENT:
            self.state.ready.add(ev.visit)
        else:
            self.state.next[ev.visit] = ev.key

    def save(self) -> None:
        """Write the state file (atomically: a temporary file, then a rename)."""
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + f".{os.getpid()}.tmp")
        tmp.write_text(self.state.to_json())
        os.replace(tmp, self.state_path)

    def poll(self) -> list[WatchEvent]:
        """Scan, send the due events to Prefect, record them; returns those sent."""
        due = self.scan()
        if not due:
            return []
        sent = asyncio.run(_send(self.root, due, self.record))
        self.save()
        for ev in sent:
            log.info("visit %s: sent %s", ev.visit, ev.event)
        return sent


async def _send(root: str, events: list[WatchEvent], record) -> list[WatchEvent]:
    """Send ``events`` in order; each is recorded as soon as the client has sent it."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    sent: list[WatchEvent] = []
    async with get_events_client() as client:
        for ev in events:
            await client.emit(Event(event=ev.event, resource=ev.resource(root), payload=ev.payload))
            record(ev)
            sent.append(ev)
    return sent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.watch",
        description="Send diapipe.visit.next and diapipe.visit.ready Prefect events for the "
        "next-visit files and complete bundles under ROOT.",
    )
    p.add_argument("root", metavar="ROOT", help="bundle root: a local path or s3://bucket/prefix")
    p.add_argument("--once", action="store_true", help="poll once and exit")
    p.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds between polls (1)"
    )
    p.add_argument("--state", metavar="FILE", help="remember what was sent in this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line: poll until interrupted (or once); exit status 2 on bad arguments."""
    args = _parser().parse_args(argv)
    if not args.interval > 0:
        _parser().error(f"--interval must be > 0, got {args.interval}")
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        # without it Prefect would start a private temporary server that no trigger watches
        print(
            "python -m flows.watch: error: PREFECT_API_URL is not set: point it at the "
            "Prefect server whose deployments the events should trigger",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        watcher = Watcher(args.root, args.state)
    except InputError as exc:
        print(f"python -m flows.watch: error: {exc}", file=sys.stderr)
        return 2
    log.info("watching %s every %g s", watcher.root, args.interval)
    try:
        while True:
            try:
                watcher.poll()
            except Exception as exc:  # storage or Prefect API down: a watcher keeps going
                if args.once:
                    print(f"python -m flows.watch: error: {exc}", file=sys.stderr)
                    return 1
                log.warning("poll failed (%s: %s); trying again", type(exc).__name__, exc)
            if args.once:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
