"""An alert is a function of its visit alone: recovery and processing order cannot change it.

* A detector whose alerts are lost after its commit and rebuilt *after a later
  overlapping visit was stored* gets byte-identical payloads: recovery packages
  the DiaObject version its store committed, not the latest one, and history
  strictly before the visit.
* A visit processed after a later visit of the same sky area is refused
  (``OutOfOrderError``), never packaged with later DiaSources as its
  "previous" ones.
* ``process-pending-visits`` picks up a visit whose detectors are all stored
  but whose receipts are missing, and produces its alerts.
"""

from __future__ import annotations

import shutil
import sqlite3

import fastavro
import pytest

from alerts.store import read_alert_batch
from flows.pending import find_pending_visits, process_pending_visits
from flows.visit import run_visit
from tests.conftest import V0, V1, make_config

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _payloads(folder, visit) -> dict[int, bytes]:
    out = {}
    for f in sorted(folder.glob(f"{visit}_*.avro")):
        batch = read_alert_batch(str(f))
        out.update(zip(batch.dia_source_ids.tolist(), batch.payloads, strict=True))
    return out


def _lose_alerts(alerts, visit) -> None:
    """As if the process died after the APDB commits, before any alert went out."""
    for f in alerts.glob(f"{visit}_*.avro"):
        f.unlink()
    for f in (alerts / "receipts").glob(f"{visit}_*.json"):
        f.unlink()


def test_recovered_alerts_after_a_later_visit_are_byte_identical(survey_root, tmp_path):
    config = make_config(tmp_path, cache=False)
    for v in (V0, V1):
        state, result = run_visit(survey_root, v, config)
        assert state.name == "Completed", state.message
    alerts = tmp_path / "alerts"
    first = _payloads(alerts, V0)
    assert first
    with sqlite3.connect(tmp_path / "apdb.sqlite3") as db:
        (n_touched,) = db.execute(
            'SELECT count(*) FROM "DiaObjectLast" WHERE "diaObjectId" IN '
            f'(SELECT "diaObjectId" FROM "DiaSource" WHERE "visit" = {V0}) AND "nDiaSources" > 1'
        ).fetchone()
    assert n_touched > 0, "visit 1 updated DiaObjects of visit 0 (else nothing is tested)"

    _lose_alerts(alerts, V0)
    state, result = run_visit(survey_root, V0, config)
    assert state.name == "Completed", state.message
    assert sorted(result["recovered"]) == sorted(result["detectors"])
    rebuilt = _payloads(alerts, V0)
    assert sorted(rebuilt) == sorted(first)
    differ = [k for k in first if first[k] != rebuilt[k]]
    assert differ == [], f"{len(differ)} of {len(first)} recovered alerts differ"


def test_a_visit_processed_after_a_later_one_is_refused(survey_root, tmp_path):
    config = make_config(tmp_path, cache=False)
    state, _ = run_visit(survey_root, V1, config)
    assert state.name == "Completed", state.message
    state, result = run_visit(survey_root, V0, config)
    assert state.name == "Partial"
    assert result["failed"], "overlapping detectors of the earlier visit are refused"
    for err in result["failed"].values():
        assert "OutOfOrderError" in err and "time order" in err and f"visit(s) [{V1}]" in err, err
    # Nothing of the refused detectors was stored or sent; any alert written
    # (detectors that do not overlap visit 1) carries no later history.
    for f in (tmp_path / "alerts").glob(f"{V0}_*.avro"):
        with open(f, "rb") as fh:
            for r in fastavro.reader(fh):
                t = r["diaSource"]["midpointMjdTai"]
                assert all(p["midpointMjdTai"] < t for p in r["prvDiaSources"] or [])
    with sqlite3.connect(tmp_path / "apdb.sqlite3") as db:
        stored = {
            d
            for (d,) in db.execute(
                f'SELECT "detector" FROM "ApdbVisitDetector" WHERE "visit" = {V0}'
            )
        }
    assert not stored & set(result["failed"])


def test_stored_visit_without_receipts_is_pending_and_recovered(survey_root, tmp_path):
    root = tmp_path / "bundles"
    shutil.copytree(f"{survey_root}/{V0}", root / str(V0))
    config = make_config(tmp_path, cache=False)
    state, result = run_visit(str(root), V0, config)
    assert state.name == "Completed", state.message
    alerts = tmp_path / "alerts"
    first = _payloads(alerts, V0)
    assert find_pending_visits(str(root), config) == []

    _lose_alerts(alerts, V0)
    assert find_pending_visits(str(root), config) == [V0], "stored without receipts is pending"
    outcome = process_pending_visits(str(root), config)
    assert list(outcome) == [V0] and outcome[V0].startswith("Completed"), outcome
    assert _payloads(alerts, V0) == first, "every lost alert produced again, same bytes"
    assert len(list((alerts / "receipts").glob(f"{V0}_*.json"))) == len(result["detectors"])
    assert find_pending_visits(str(root), config) == []
