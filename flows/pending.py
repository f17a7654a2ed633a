"""A flow for schedules: process every visit under a root that is not finished.

Operators point a cron-scheduled deployment at the directory (or bucket) where
visit bundles land; each run finds the visits with a detector that is not
*finished* — not in the APDB's (visit, detector) marker table, or stored there
but without its produce receipt (the process died between the commit and the
alerts) — and processes them, oldest first. :func:`flows.visit.process_visit`
stores the first kind and rebuilds the alerts of the second from the APDB.

A visit that an upstream system delivers with the completion contract
(docs/realtime.md: ``next-visit.json`` first, ``complete.json`` last) waits
until :func:`core.completion.check_complete` says its bundle is complete, so the
backstop never processes a half-copied bundle either. A folder with neither
file is taken as it is, as before that contract existed.
"""

import fsspec
from prefect import flow, get_run_logger

from core.bundle import read_visit_info
from core.completion import COMPLETE_FILE, check_complete
from core.errors import InputError
from core.nextvisit import NEXT_VISIT_FILE
from flows.config import PipelineConfig
from flows.detector import get_apdb
from flows.produce import receipts_by_visit
from flows.visit import process_visit

__all__ = ["find_pending_visits", "process_pending_visits"]


def find_pending_visits(bundle_root: str, config: PipelineConfig) -> list[int]:
    """Visits under ``bundle_root`` with a detector not stored, or stored without a receipt."""
    fs, _, (path,) = fsspec.get_fs_token_paths(bundle_root)
    if not fs.exists(path):
        return []
    visits = sorted(
        int(p.rstrip("/").rsplit("/", 1)[-1])
        for p in fs.ls(path, detail=False)
        if p.rstrip("/").rsplit("/", 1)[-1].isdigit() and fs.exists(f"{p}/visit.json")
    )
    apdb = get_apdb(config)
    produced = receipts_by_visit(config)
    pending = []
    for v in visits:
        if not _delivered(fs, path, bundle_root, v):
            continue
        wanted = set(read_visit_info(bundle_root, v).detectors)
        finished = apdb.done_detectors(v) & produced.get(v, set())
        if wanted - finished:
            pending.append(v)
    return pending


def _delivered(fs, path: str, bundle_root: str, visit: int) -> bool:
    """False while a visit delivered under the completion contract is still arriving."""
    folder = f"{path.rstrip('/')}/{visit}"
    if not (fs.exists(f"{folder}/{COMPLETE_FILE}") or fs.exists(f"{folder}/{NEXT_VISIT_FILE}")):
        return True
    try:
        return check_complete(bundle_root, visit) is not None
    except InputError:
        return False  # a broken marker: the watcher logs it; the flow would fail on it


@flow(name="process-pending-visits", validate_parameters=True)
def process_pending_visits(
    bundle_root: str,
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - frozen pydantic model
    max_visits: int = 10,
) -> dict[int, str]:
    """Process up to ``max_visits`` pending visits, oldest first; returns visit → outcome."""
    logger = get_run_logger()
    pending = find_pending_visits(bundle_root, config)[:max_visits]
    logger.info("%d pending visit(s) under %s: %s", len(pending), bundle_root, pending)
    outcome: dict[int, str] = {}
    for v in pending:
        state = process_visit(bundle_root, v, None, config, return_state=True)
        outcome[v] = f"{state.name}: {state.message or ''}".strip()
    return outcome
