"""alert_timing_since_shutter_close: where the shutter close comes from, and the flow's figures."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.bundle import read_visit_info
from core.completion import mark_complete
from core.nextvisit import NEXT_VISIT_FILE, NextVisit, format_utc
from flows.timing import METRIC, shutter_close
from flows.visit import run_visit
from tests.conftest import N_DETECTORS, V0, make_config

STAGES_MS = ("load", "calibrate", "associate", "forced", "store", "cutout", "package", "produce")


@pytest.fixture
def root(survey_root, tmp_path) -> Path:
    """A private copy of visit V0 of the session survey (no marker, no next-visit file)."""
    shutil.copytree(Path(survey_root) / str(V0), tmp_path / "bundles" / str(V0))
    return tmp_path / "bundles"


def _announce(root: Path, close: datetime) -> None:
    info = read_visit_info(str(root), V0)
    message = NextVisit(
        visit=V0,
        band=info.band,
        boresightRa=info.boresightRa,
        boresightDec=info.boresightDec,
        rotAngle=info.rotAngle,
        detectors=info.detectors,
        shutter_close=close,
    )
    (root / str(V0) / NEXT_VISIT_FILE).write_bytes(message.to_json_bytes())


def test_sources_in_order_of_preference(root, caplog):
    info = read_visit_info(str(root), V0)
    # visit.json: midpoint + half the exposure, TAI → UTC (37 s apart since 2017)
    close = shutter_close(str(root), info)
    assert close.source == "visit.json"
    mid_tai = datetime(1858, 11, 17, tzinfo=UTC) + timedelta(days=info.midpointMjdTai)
    expect = mid_tai - timedelta(seconds=37) + timedelta(seconds=info.exposureTime / 2)
    assert abs((close.time - expect).total_seconds()) < 1e-3

    mark_complete(str(root), V0)
    os.utime(root / str(V0) / "complete.json", (1_900_000_000, 1_900_000_000))
    close = shutter_close(str(root), info)
    assert close.source == "bundle-complete"
    assert close.time.timestamp() == 1_900_000_000, "the marker is the latest file"

    (root / str(V0) / NEXT_VISIT_FILE).write_text(json.dumps({"visit": V0}))
    with caplog.at_level(logging.WARNING, logger="flows.timing"):
        assert shutter_close(str(root), info).source == "bundle-complete"
    assert "next-visit message not used" in caplog.text and "missing field(s)" in caplog.text

    announced = datetime(2026, 12, 2, 3, 0, 0, tzinfo=UTC)
    _announce(root, announced)
    assert shutter_close(str(root), info) == (announced, "next-visit")

    given = "2026-12-02T03:00:05Z"
    assert shutter_close(str(root), info, given) == (announced + timedelta(seconds=5), "parameter")


@pytest.mark.usefixtures("prefect_harness")
def test_flow_reports_latency_per_detector_in_result_artifact_and_log(root, tmp_path, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    lead_s = 5.0
    close = datetime.now(UTC) - timedelta(seconds=lead_s)
    _announce(root, close)
    config = make_config(tmp_path, cache=False)
    with caplog.at_level(logging.INFO):
        started = time.time()
        state, result = run_visit(str(root), V0, config)
        ended = time.time()
    assert state.is_completed() and result["failed"] == {}, state.message

    timing = result[METRIC]
    assert timing["source"] == "next-visit"
    assert timing["shutter_close_utc"] == format_utc(close)
    per = timing["detectors_s"]
    assert sorted(per) == sorted(result["detectors"]) and len(per) == N_DETECTORS
    for row in result["table"]:
        own_s = sum(row.get(f"{s}_ms", 0.0) for s in STAGES_MS) / 1000.0
        assert own_s > 0
        latency = row[f"{METRIC}_s"]
        assert latency == per[row["detector"]]
        # the detector ran after the shutter closed: its latency holds the lead and its stages
        assert latency > lead_s + own_s, (row["detector"], latency, own_s)
    assert timing["visit_s"] == max(per.values())
    t0 = close.timestamp()
    assert started < t0 + min(per.values()) and t0 + timing["visit_s"] < ended, "during the run"

    # the receipts hold the same end time
    for det, latency in per.items():
        receipt = json.loads((tmp_path / "alerts" / "receipts" / f"{V0}_{det}.json").read_text())
        assert receipt["produced_at"] - close.timestamp() == pytest.approx(latency, abs=1e-3)

    lines = [r.getMessage() for r in caplog.records if METRIC in r.getMessage()]
    assert len(lines) == 1 and f"{timing['visit_s']:.2f} s" in lines[0], lines
    assert "from next-visit" in lines[0]

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    by_key = {a.key: a for a in arts}
    table = by_key[f"visit-{V0}-detectors"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert {r["detector"]: r[f"{METRIC}_s"] for r in table} == per
    assert f"{METRIC}: {timing['visit_s']:.2f} s" in by_key[f"visit-{V0}-summary"].data

    # a re-run produces nothing: no latency to report
    state2, result2 = run_visit(str(root), V0, config)
    assert result2["skipped"] == sorted(per) and result2[METRIC]["visit_s"] is None
