"""A flow for schedules: process every visit under a root that is not finished.

Operators point a cron-scheduled deployment at the directory (or bucket) where
visit bundles land; each run finds the visits with a detector that is not
*finished* — not in the APDB's (visit, detector) marker table, or stored there
but without its produce receipt (the process died between the commit and the
alerts) — and processes them, oldest first. :func:`flows.visit.process_visit`
stores the first kind and rebuilds the alerts of the second from the APDB.
"""

import fsspec
from prefect import flow, get_run_logger

from core.bundle import read_visit_info
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
        wanted = set(read_visit_info(bundle_root, v).detectors)
        finished = apdb.done_detectors(v) & produced.get(v, set())
        if wanted - finished:
            pending.append(v)
    return pending


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
