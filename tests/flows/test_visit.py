"""The per-visit flow under a real (temporary) Prefect server."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from alerts.store import read_alert_batch, read_alert_file
from apdb import make_apdb
from core.bundle import read_visit_info
from core.ids import IdPacker
from flows.visit import process_visit, run_visit
from tests.conftest import N_DETECTORS, V0, V1, V2, make_config

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.avro"))
    }


def test_visit_end_to_end_then_rerun_is_a_no_op(survey_root, tmp_path):
    config = make_config(tmp_path)
    state, result = run_visit(survey_root, V0, config)
    assert state.is_completed() and state.name == "Completed", state.message
    assert result["failed"] == {}
    assert len(result["succeeded"]) == N_DETECTORS
    assert result["alerts"] > 0

    # Alerts: one file per detector, one alert per stored DiaSource, all decodable.
    files = sorted((tmp_path / "alerts").glob("*.avro"))
    assert [f.name for f in files] == sorted(f"{V0}_{d}.avro" for d in result["detectors"])
    alerts = [a for f in files for a in read_alert_file(str(f))]
    assert len(alerts) == result["alerts"]
    ids = [a["diaSourceId"] for a in alerts]
    assert len(set(ids)) == len(ids), "no duplicate alerts"
    # visit.json's LSSTCam visit number is the alerts' diaSource.visit and is packed in the IDs
    assert read_visit_info(survey_root, V0).visit == V0
    assert {a["diaSource"]["visit"] for a in alerts} == {V0}
    assert set(IdPacker(config.ids).unpack(ids)[0].tolist()) == {V0}

    # APDB: every alerted DiaSource stored once, each (visit, detector) marked.
    apdb = make_apdb(config.apdb)
    counts = apdb.row_counts()
    assert counts["DiaSource"] == len(ids)
    assert apdb.done_detectors(V0) == set(result["detectors"])
    # Visit 0 on an empty APDB: every source makes its own DiaObject, except the known
    # asteroids, which join their solar-system object and make none.
    sso = [a for a in alerts if a["diaSource"]["ssObjectId"]]
    assert all(a["diaSource"]["diaObjectId"] == 0 and a["diaObject"] is None for a in sso)
    assert all(a["diaSource"]["diaObjectId"] == a["diaSourceId"] for a in alerts if a not in sso)
    assert counts["SSSource"] == len(sso)

    # The visit's picture: a PNG beside the alerts, embedded in the summary artifact.
    png = tmp_path / "alerts" / "reports" / f"visit-{V0}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert result["report_png"] == str(png)

    before = _digests(tmp_path / "alerts")
    state2, result2 = run_visit(survey_root, V0, config)
    assert state2.is_completed(), state2.message
    assert result2["skipped"] == sorted(result["detectors"]) and result2["alerts"] == 0
    assert make_apdb(config.apdb).row_counts() == counts, "a re-run adds no row"
    assert _digests(tmp_path / "alerts") == before, "a re-run rewrites the same bytes"


def test_second_visit_associates_with_history(survey_root, tmp_path):
    config = make_config(tmp_path, cache=False)
    run_visit(survey_root, V0, config)
    state, result = run_visit(survey_root, V1, config)
    assert state.name == "Completed"
    matched = sum(row.get("associate_matched", 0) for row in result["table"])
    assert matched > 0, "visit 1 re-detects objects first seen in visit 0"
    alerts = [
        a for f in (tmp_path / "alerts").glob(f"{V1}_*.avro") for a in read_alert_file(str(f))
    ]
    with_history = [a for a in alerts if a["prvDiaSources"]]
    assert len(with_history) == matched
    for a in with_history:
        assert all(p["visit"] == V0 for p in a["prvDiaSources"])
        assert all(p["diaObjectId"] == a["diaSource"]["diaObjectId"] for p in a["prvDiaSources"])


def test_bad_detector_is_isolated(survey_root, tmp_path):
    root = tmp_path / "bundles"
    shutil.copytree(Path(survey_root) / str(V2), root / str(V2))
    bad = sorted(p for p in (root / str(V2)).iterdir() if p.is_dir())[0]
    (bad / "science.fits").write_bytes(b"not a FITS file")
    config = make_config(tmp_path, cache=False)
    state, result = run_visit(str(root), V2, config)
    assert state.is_completed() and state.name == "Partial"
    assert set(result["failed"]) == {int(bad.name)}
    assert "science.fits: not a readable FITS file" in result["failed"][int(bad.name)]
    assert len(result["succeeded"]) == N_DETECTORS - 1
    apdb = make_apdb(config.apdb)
    assert apdb.done_detectors(V2) == set(result["succeeded"]), "nothing stored for the bad one"
    assert not (tmp_path / "alerts" / f"{V2}_{bad.name}.avro").exists()


def test_dask_runner_on_a_local_cluster(survey_root, tmp_path):
    config = make_config(tmp_path, task_runner="dask", cache=False)
    state, result = run_visit(survey_root, V0, config, detectors=[*_first_two(survey_root)])
    assert state.name == "Completed", state.message
    assert len(result["succeeded"]) == 2 and result["alerts"] > 0
    assert make_apdb(config.apdb).done_detectors(V0) == set(result["succeeded"])


def test_dask_runs_each_group_in_one_worker_process(survey_root, tmp_path):
    """Every stage of a group runs in the same worker, and groups spread over workers."""
    config = make_config(tmp_path, task_runner="dask", cache=False, detectors_per_task=1)
    state, result = run_visit(survey_root, V0, config, detectors=[*_first_two(survey_root)])
    assert state.name == "Completed", state.message
    workers = [row["worker"] for row in result["table"]]
    assert all(w and "," not in w for w in workers), workers  # one process per group
    assert all(not w.endswith(f":{os.getpid()}") for w in workers), "ran in worker processes"
    if (os.cpu_count() or 1) >= 2:
        assert len(set(workers)) == 2, f"two groups, two workers: {workers}"


def test_flow_loaded_from_its_file_runs_on_a_standing_dask_cluster(survey_root, tmp_path):
    """As a deployment run loads it (``flows/visit.py:process_visit``), on a running cluster.

    Loaded from the file, flows/visit.py is a module of another name, which the
    scheduler and workers of a cluster started before (``task_runner:
    dask=tcp://...``) cannot import: nothing they unpickle may come from it.
    """
    from pathlib import Path

    from distributed import LocalCluster
    from prefect.flows import load_flow_from_entrypoint

    from flows.visit import local_cluster_kwargs

    repo = Path(__file__).resolve().parents[2]
    with LocalCluster(**local_cluster_kwargs()) as cluster:
        loaded = load_flow_from_entrypoint(f"{repo}/flows/visit.py:process_visit")
        assert loaded.fn.__module__ != "flows.visit", "loaded under another name"
        runner = f"dask={cluster.scheduler_address}"
        config = make_config(tmp_path, task_runner=runner, cache=False, detectors_per_task=1)
        state = loaded(survey_root, V0, _first_two(survey_root), config, return_state=True)
    assert state.name == "Completed", state.message
    assert state.result()["alerts"] > 0


def test_local_cluster_workers_keep_glibc_malloc_trimming():
    """Dask's nanny would export MALLOC_TRIM_THRESHOLD_=65536 to its workers and to us.

    At that threshold glibc hands freed heap back at once and faults it in again
    on the next allocation: the stages' multi-megabyte buffers made a visit's
    workers spend ~20 % more CPU.
    """
    from distributed import Client, LocalCluster

    from flows.visit import local_cluster_kwargs

    before = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    kwargs = {**local_cluster_kwargs(), "n_workers": 1}
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert list(seen.values()) == [None], seen
    assert os.environ.get("MALLOC_TRIM_THRESHOLD_") == before, "this process's environment"


def test_flow_called_directly_honours_the_configured_dask_runner(survey_root, tmp_path):
    """A deployment run starts the flow on threads; a Dask config moves it to a subflow on Dask."""
    config = make_config(tmp_path, task_runner="dask", cache=False, detectors_per_task=1)
    state = process_visit(survey_root, V0, _first_two(survey_root), config, return_state=True)
    assert state.name == "Completed", state.message
    result = state.result()
    assert len(result["succeeded"]) == 2 and result["alerts"] > 0
    workers = {row["worker"] for row in result["table"]}
    assert all(not w.endswith(f":{os.getpid()}") for w in workers), workers


def _first_two(root: str) -> list[int]:
    return sorted(int(p.name) for p in (Path(root) / str(V0)).iterdir() if p.is_dir())[:2]


def test_stored_but_unproduced_detector_is_recovered_with_the_same_bytes(survey_root, tmp_path):
    config = make_config(tmp_path, cache=False)
    state, result = run_visit(survey_root, V0, config)
    assert state.name == "Completed"
    det = result["detectors"][0]
    alert_file = tmp_path / "alerts" / f"{V0}_{det}.avro"
    original = read_alert_batch(str(alert_file)).payloads
    # As if the process died after the APDB commit, before the alerts went out.
    alert_file.unlink()
    (tmp_path / "alerts" / "receipts" / f"{V0}_{det}.json").unlink()
    rows = make_apdb(config.apdb).row_counts()

    state2, result2 = run_visit(survey_root, V0, config)
    assert state2.name == "Completed", state2.message
    assert result2["recovered"] == [det]
    assert sorted(result2["skipped"]) == sorted(d for d in result["detectors"] if d != det)
    assert make_apdb(config.apdb).row_counts() == rows, "recovery writes nothing to the APDB"
    # Avro container sync markers are random per write; the alerts themselves match.
    rebuilt = read_alert_batch(str(alert_file))
    assert rebuilt.payloads == original, "the rebuilt alerts are byte-identical"
