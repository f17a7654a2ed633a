"""Daytime de-duplication against ground truth, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest

from apdb import Circle, sdm
from apdb.config import ApdbConfig
from apdb.sql import ApdbSql
from core.errors import ApdbError
from flows.config import PipelineConfig
from flows.dedup import main, run_dedup
from tasks.dedup import DedupConfig
from tasks.summarise import SummaryConfig, summarise
from tests.apdb.conftest import fresh_pg_database
from tests.flows import dedup_case

T_MERGE = 61100.0


@pytest.fixture(scope="module")
def case() -> dedup_case.Case:
    return dedup_case.build()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'apdb.sqlite3'}"
    else:
        with fresh_pg_database("diapipe_dedup") as pg:
            yield pg


def _load(url: str, case: dedup_case.Case) -> ApdbSql:
    db = ApdbSql.create(ApdbConfig(url=url), drop=True)
    db.bulk_load(case.objects, case.sources, case.forced)
    return db


def _config(url: str) -> PipelineConfig:
    return PipelineConfig.model_validate({"apdb": {"url": url}})


def _everything(db: ApdbSql, case: dedup_case.Case) -> dict[str, pd.DataFrame]:
    """The whole content of the data tables, sorted, for before/after comparisons."""
    field = Circle(dedup_case.RA0, dedup_case.DEC0, 2 * dedup_case.FIELD_DEG)
    objects = db.get_objects(field).sort_values("diaObjectId", ignore_index=True)
    ids = case.objects["diaObjectId"].to_numpy()
    return {
        "objects": objects,
        "history": db.get_object_history(ids).sort_values(
            ["diaObjectId", "validityStartMjdTai"], ignore_index=True
        ),
        "sources": db.get_sources(ids, None).sort_values("diaSourceId", ignore_index=True),
        "forced": db.get_forced_sources(ids, None).sort_values(
            "diaForcedSourceId", ignore_index=True
        ),
        "counts": pd.DataFrame([db.row_counts()]),
    }


def _assert_same(a: dict, b: dict) -> None:
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True)


def _merges(regions) -> pd.DataFrame:
    got = [r.merges for r in regions if r.merges is not None]
    return (
        pd.concat(got, ignore_index=True)
        if got
        else pd.DataFrame({"diaObjectId": [], "survivorId": []}, dtype=np.int64)
    )


def test_merges_splits_against_truth_and_second_run_is_a_no_op(url, case):
    db = _load(url, case)
    try:
        before = _everything(db, case)
        dry, _ = run_dedup(_config(url), DedupConfig(), time_mjd=T_MERGE, dry_run=True)
        _assert_same(before, _everything(db, case))  # a dry run writes nothing

        result, regions = run_dedup(_config(url), DedupConfig(), time_mjd=T_MERGE)
        got = _merges(regions)
        expected = case.expected_merges()
        truth = case.truth

        # merges made are right, across true objects at most 1 %, splits found
        same_true = (
            truth.reindex(got["diaObjectId"]).to_numpy()
            == truth.reindex(got["survivorId"]).to_numpy()
        )
        assert same_true.mean() >= 0.99
        joined = got.merge(expected, on="diaObjectId", how="inner", suffixes=("", "_want"))
        right = (joined["survivorId"] == joined["survivorId_want"]).sum()
        assert right / len(got) >= 0.99, f"{right} of {len(got)} merges into the right survivor"
        assert right / len(expected) >= 0.99, f"{right} of {len(expected)} splits merged"

        # counts: the dry run predicted them, the return value and the APDB agree
        for key in ("groups", "objects_merged", "sources_reassigned", "forced_reassigned"):
            assert dry[key] == result[key], key
        assert dry["forced_dropped"] == result["forced_dropped"]
        assert result["objects_merged"] == len(got)
        assert result["groups"] == got["survivorId"].nunique()
        assert result["regions"] == len(regions) >= 4
        assert result["conflicts"] == 0
        removed = got["diaObjectId"].to_numpy()
        n_moved = int(case.sources["diaObjectId"].isin(removed).sum())
        assert result["sources_reassigned"] == n_moved
        f = case.forced
        f_removed = f[f["diaObjectId"].isin(removed)]
        assert result["forced_reassigned"] + result["forced_dropped"] == len(f_removed)

        after = _everything(db, case)
        objects = after["objects"]
        assert not objects["diaObjectId"].isin(removed).any()
        assert len(objects) == len(case.objects) - len(got)
        counts = db.row_counts()
        assert counts["DiaObjectLast"] == len(case.objects) - len(got)
        assert counts["DiaObject"] == len(case.objects) + result["groups"]
        assert counts["DiaSource"] == len(case.sources)
        assert counts["DiaForcedSource"] == len(case.forced) - result["forced_dropped"]

        # every DiaSource now belongs to its survivor
        target = dict(zip(got["diaObjectId"], got["survivorId"], strict=True))
        assert len(db.get_sources(removed, None)) == 0
        assert len(db.get_forced_sources(removed, None)) == 0
        src = after["sources"]
        want_owner = [target.get(int(i), int(i)) for i in case.sources["diaObjectId"]]
        owner = pd.Series(want_owner, index=case.sources["diaSourceId"].to_numpy())
        np.testing.assert_array_equal(
            src["diaObjectId"].to_numpy(np.int64),
            owner.reindex(src["diaSourceId"].to_numpy()).to_numpy(),
        )

        # forced photometry: one row per (object, visit, detector); the survivor's own
        # rows stay; a merged-away piece fills the visits the survivor lacked
        fs = after["forced"]
        assert not fs.duplicated(["diaObjectId", "visit", "detector"]).any()
        mapped = f.assign(diaObjectId=[target.get(int(i), int(i)) for i in f["diaObjectId"]])
        want_keys = mapped[["diaObjectId", "visit", "detector"]].drop_duplicates()
        assert len(fs) == len(want_keys)
        survivor_own = f[f["diaObjectId"].isin(got["survivorId"])]
        assert set(survivor_own["diaForcedSourceId"]) <= set(fs["diaForcedSourceId"])
        assert result["forced_reassigned"] > 0 and result["forced_dropped"] > 0

        # versions: merged-away ones closed at T_MERGE, survivors have a new one from T_MERGE
        hist = db.get_object_history(np.concatenate([removed, got["survivorId"].unique()]))
        closed = hist[hist["diaObjectId"].isin(removed)]
        assert len(closed) == len(removed)
        assert (closed["validityEndMjdTai"] == T_MERGE).all()
        surv = hist[~hist["diaObjectId"].isin(removed)]
        assert surv.groupby("diaObjectId").size().eq(2).all()
        new = surv[surv["validityStartMjdTai"] == T_MERGE]
        assert new["validityEndMjdTai"].isna().all()
        assert len(new) == result["groups"]

        # survivors' statistics: the pipeline's summarise of all the true object's sources
        true_src = case.sources.assign(
            diaObjectId=pd.array(want_owner, dtype="Int64"),
        )
        true_src = true_src[true_src["diaObjectId"].isin(got["survivorId"])]
        want = summarise(
            sdm.empty_frame("DiaObject"),
            sdm.empty_frame("DiaSource"),
            true_src.reset_index(drop=True),
            SummaryConfig(),
            time_mjd=T_MERGE,
            forced_sources=fs,
        ).set_index("diaObjectId")
        have = objects.set_index("diaObjectId").loc[want.index]
        for column in ("nDiaSources", "r_psfFluxNdata", "firstDiaSourceMjdTai"):
            np.testing.assert_array_equal(have[column].to_numpy(), want[column].to_numpy())
        for column in ("ra", "dec", "r_psfFluxMean", "g_psfFluxSigma", "i_fpFluxMean"):
            np.testing.assert_allclose(
                have[column].to_numpy(float), want[column].to_numpy(float), rtol=1e-6
            )
        detections = case.sources.groupby(
            case.truth.reindex(case.sources["diaObjectId"]).to_numpy()
        )
        n_true = detections.size()
        survivors_true = truth.reindex(want.index).to_numpy()
        np.testing.assert_array_equal(
            have["nDiaSources"].to_numpy(), n_true.reindex(survivors_true).to_numpy()
        )

        # a second run finds nothing and changes nothing
        again, regions2 = run_dedup(_config(url), DedupConfig(), time_mjd=T_MERGE + 1)
        assert {k: again[k] for k in ("groups", "objects_merged", "sources_reassigned")} == {
            "groups": 0,
            "objects_merged": 0,
            "sources_reassigned": 0,
        }
        assert again["forced_reassigned"] == again["forced_dropped"] == 0
        _assert_same(after, _everything(db, case))
    finally:
        db.close()


def test_region_size_does_not_change_the_merges(tmp_path, case):
    """Groups on region edges go to the region of their survivor, whatever the region size."""
    outcomes = []
    for order in (6, 8, 10):
        url = f"sqlite:///{tmp_path / f'o{order}.sqlite3'}"
        _load(url, case).close()
        result, regions = run_dedup(
            _config(url), DedupConfig(region_order=order), time_mjd=T_MERGE, dry_run=True
        )
        merges = _merges(regions)[["diaObjectId", "survivorId"]]
        outcomes.append((result["regions"], merges.sort_values("diaObjectId", ignore_index=True)))
    assert outcomes[0][0] < outcomes[1][0] < outcomes[2][0]
    for _, merges in outcomes[1:]:
        pd.testing.assert_frame_equal(merges, outcomes[0][1])


def test_killed_run_leaves_each_region_merged_or_untouched(tmp_path, case, monkeypatch):
    url = f"sqlite:///{tmp_path / 'apdb.sqlite3'}"
    _load(url, case).close()
    calls = {"n": 0}
    original = ApdbSql._write_objects

    def dies_in_third_merge(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the last statement of the third region's transaction
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ApdbSql, "_write_objects", dies_in_third_merge)
    with pytest.raises(KeyboardInterrupt):
        run_dedup(_config(url), DedupConfig(), time_mjd=T_MERGE)
    monkeypatch.setattr(ApdbSql, "_write_objects", original)

    expected = case.expected_merges()
    db = ApdbSql(ApdbConfig(url=url))
    try:
        field = Circle(dedup_case.RA0, dedup_case.DEC0, 2 * dedup_case.FIELD_DEG)
        current = set(db.get_objects(field)["diaObjectId"].tolist())
        merged = set(expected["diaObjectId"]) - current
        # two regions merged, the third rolled back whole: every group is all or nothing
        groups = expected.groupby("survivorId")["diaObjectId"].apply(set)
        state = [
            "merged" if g <= merged else "untouched" if not (g & merged) else "partial"
            for g in groups
        ]
        assert "partial" not in state
        assert 0 < state.count("merged") < len(state)
        n_src_moved = db.get_sources(sorted(merged), None)
        assert len(n_src_moved) == 0
    finally:
        db.close()
    result, regions = run_dedup(_config(url), DedupConfig(), time_mjd=T_MERGE)
    assert result["objects_merged"] == len(expected) - len(merged)
    db = ApdbSql(ApdbConfig(url=url))
    try:
        current = set(db.get_objects(field)["diaObjectId"].tolist())
        assert not current & set(expected["diaObjectId"])
        assert len(current) == len(case.objects) - len(expected)
    finally:
        db.close()


def test_a_url_that_is_not_an_apdb_is_refused_and_left_alone(tmp_path, capsys):
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (x INTEGER)")
        conn.execute("INSERT INTO notes VALUES (1)")
    data = other.read_bytes()
    with pytest.raises(ApdbError, match="no APDB tables"):
        run_dedup(_config(str(other)), DedupConfig())
    assert other.read_bytes() == data

    missing = tmp_path / "missing.sqlite3"
    assert main([str(missing), "--no-prefect"]) == 2
    assert "no such SQLite file" in capsys.readouterr().err
    assert not missing.exists()

    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    assert main([str(text), "--no-prefect", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m flows.dedup: error:") and "notes.txt" in err
    assert text.read_text() == "not a database\n" * 100


def test_command_line_dry_run_then_merge(tmp_path, case, capsys):
    url = f"sqlite:///{tmp_path / 'apdb.sqlite3'}"
    _load(url, case).close()
    n = len(case.expected_merges())
    assert main([url, "--no-prefect", "--dry-run", "--time-mjd", str(T_MERGE)]) == 0
    assert f"would merge {n} DiaObject(s)" in capsys.readouterr().out
    assert main([url, "--no-prefect", "--time-mjd", str(T_MERGE)]) == 0
    assert f"merged {n} DiaObject(s)" in capsys.readouterr().out
    assert main([url, "--no-prefect", "--time-mjd", str(T_MERGE + 1)]) == 0
    assert "merged 0 DiaObject(s)" in capsys.readouterr().out


@pytest.mark.usefixtures("prefect_harness")
def test_flow_returns_and_publishes_the_counts(tmp_path, case):
    from prefect.artifacts import Artifact

    from flows.dedup import process_dedup

    url = f"sqlite:///{tmp_path / 'apdb.sqlite3'}"
    _load(url, case).close()
    result = process_dedup(_config(url), DedupConfig(), T_MERGE)
    n = len(case.expected_merges())
    assert result["objects_merged"] == n
    assert result["groups"] == case.n_split
    artifact = Artifact.get("dedup-summary")
    assert artifact is not None
    assert f"| objects_merged | {n} |" in artifact.data
    assert f"| groups | {case.n_split} |" in artifact.data


def test_pipeline_output_of_a_crowded_survey_gets_no_wrong_merges(tmp_path):
    """The pipeline's own DiaObjects on a crowded simulated field, checked with sim truth.

    Alert production there splits no object into pieces that never shared a
    visit, so every merge would be wrong; distance alone (Rubin's rule) makes
    some, between neighbours a little over the association gate apart.
    """
    from apdb import make_apdb
    from core.ids import IdPacker
    from flows.visit import run_visit_plain
    from sim.config import SurveyConfig
    from sim.survey import Survey

    sim = SurveyConfig(
        seed=3, n_detectors=4, n_visits=6, detector_size=(512, 512), sources_per_detector=300
    )
    root = tmp_path / "bundles"
    survey = Survey(sim)
    for v in range(sim.n_visits):
        survey.write_visit(str(root), v)
    config = PipelineConfig.model_validate(
        {
            "apdb": {"url": str(tmp_path / "apdb.sqlite3")},
            "output": {
                "store": {"location": str(tmp_path / "alerts")},
                "dead_letter_location": str(tmp_path / "dead"),
                "do_write_alerts": False,
            },
            "orchestration": {"cache": False, "max_workers": 2},
        }
    )
    for v in range(sim.n_visits):
        assert not run_visit_plain(str(root), sim.visit_number(v), config)["failed"]

    with make_apdb(config.apdb) as db:
        objects = db.get_objects(Circle(sim.field_ra, sim.field_dec, 1.0))
        src = db.get_sources(objects["diaObjectId"], None)
    visit, detector, row = IdPacker(config.ids).unpack(src["diaSourceId"].to_numpy())
    true_id = np.full(len(src), -2, dtype=np.int64)
    for (v, d), idx in pd.DataFrame({"v": visit, "d": detector}).groupby(["v", "d"]).groups.items():
        idx = np.asarray(idx)
        t = pd.read_parquet(root / str(v) / str(d) / "truth.parquet")["truthId"].to_numpy()
        true_id[idx] = t[row[idx]]
    assert (true_id != -2).all()
    owner = (
        pd.DataFrame({"obj": src["diaObjectId"].to_numpy(np.int64), "t": true_id})
        .groupby("obj")["t"]
        .agg(lambda x: x.value_counts().index[0])
    )
    # a crowded field: ~2,700 DiaObjects after the pipeline's 0.5 reliability cut
    assert len(objects) > 2000

    def wrong(dedup: DedupConfig) -> tuple[int, int]:
        result, regions = run_dedup(config, dedup, dry_run=True)
        merges = _merges(regions)
        a = owner.reindex(merges["diaObjectId"]).to_numpy()
        b = owner.reindex(merges["survivorId"]).to_numpy()
        return int(((a != b) | (a < 0)).sum()), result["objects_merged"]

    n_wrong, n = wrong(DedupConfig())
    assert n_wrong <= 0.01 * n, f"{n_wrong} of {n} merges join different true objects"
    n_wrong_position_only, _ = wrong(DedupConfig(max_sigma=None))
    assert n_wrong_position_only > n_wrong  # distance alone joins more different objects (8 here)
