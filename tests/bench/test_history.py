"""The benchmark's history builder: truth association, DiaSource conversion, bulk load.

The visit benchmark's numbers are only meaningful if the APDB it starts from is
what the pipeline itself would have written; these tests pin that down on
small seeded inputs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apdb import sdm
from apdb.config import ApdbConfig
from apdb.sql import ApdbSql
from bench.history import (
    HistorySpec,
    associate_by_truth,
    build_frames,
    bulk_load,
    dia_sources,
)
from core.ids import IdConfig, IdPacker
from tasks.associate import AssociationConfig


def _sources(flags_bad, reliability, ids) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "diaSourceId": np.asarray(ids, np.int64),
            "pixelFlags_bad": np.asarray(flags_bad, bool),
            "reliability": np.asarray(reliability, np.float32),
        }
    )


def test_truth_association_first_good_detection_creates_the_object():
    # one variable star seen 4 times (first detection has a bad pixel),
    # one bogus that fails the reliability cut, one bogus that passes, one mover
    src = _sources(
        flags_bad=[True, False, False, False, False, False, True],
        reliability=[0.9, 0.9, 0.05, 0.9, 0.05, 0.8, 0.9],
        ids=[10, 20, 30, 40, 50, 60, 70],
    )
    truth = np.array([7, 7, 7, 7, -1, -1, 9])
    kind = np.array(
        ["variable", "variable", "variable", "variable", "bogus_noise", "bogus_cr", "moving"]
    )
    obj, stored = associate_by_truth(src, truth, kind, AssociationConfig())
    # the bad first detection is dropped; the second creates object 20; later ones
    # join it even when they would fail the cut themselves (they are matched)
    assert obj.tolist() == [-1, 20, 20, 20, -1, 60, -1]
    assert stored.tolist() == [False, True, True, True, False, True, False]


def test_truth_association_keeps_objects_apart():
    src = _sources([False] * 4, [0.9] * 4, [1, 2, 3, 4])
    truth = np.array([5, 6, 5, 6])
    kind = np.array(["transient", "variable", "transient", "variable"])
    obj, _ = associate_by_truth(src, truth, kind, AssociationConfig())
    assert obj.tolist() == [1, 2, 1, 2]


def test_dia_sources_ids_and_fluxes_follow_the_calibrate_stage():
    n = 5
    cat = pd.DataFrame(
        {
            "visit": np.full(n, 3, np.int64),
            "detector": np.array([4, 4, 4, 9, 9], np.int64),
            "ra": np.linspace(10, 10.1, n),
            "dec": np.linspace(-5, -5.1, n),
            "x": np.arange(n, dtype=float),
            "y": np.arange(n, dtype=float) + 1,
            "xErr": np.full(n, 0.5, np.float32),
            "yErr": np.full(n, 0.25, np.float32),
            "snr": np.full(n, 7, np.float32),
            "bboxSize": np.full(n, 31, np.int32),
            "reliability": np.full(n, 0.5, np.float32),
            "trailLength": np.full(n, 2.0, np.float32),
            "photoCalib": np.array([0.5, 0.5, 0.5, 2.0, 2.0]),
            "band": "r",
            "midpointMjdTai": 61000.0,
            "pixelFlags_bad": np.zeros(n, bool),
        }
    )
    for inst in ("psfInstFlux", "apInstFlux", "scienceInstFlux", "templateInstFlux"):
        cat[inst] = np.arange(1.0, n + 1)
        cat[inst + "Err"] = -np.full(n, 2.0)
    packer = IdPacker(IdConfig())
    out = dia_sources(cat, packer, pixel_scale_arcsec=0.2)
    want = np.r_[packer.pack(3, 4, np.arange(3)), packer.pack(3, 9, np.arange(2))]
    assert out["diaSourceId"].tolist() == want.tolist()
    np.testing.assert_allclose(out["psfFlux"], np.arange(1.0, n + 1) * cat["photoCalib"])
    np.testing.assert_allclose(out["psfFluxErr"], 2.0 * cat["photoCalib"])
    np.testing.assert_allclose(out["raErr"], 0.5 * 0.2 / 3600)
    np.testing.assert_allclose(out["decErr"], 0.25 * 0.2 / 3600)
    np.testing.assert_allclose(out["trailLength"], 0.4)
    conformed = sdm.conform(out, "DiaSource")
    assert list(conformed.columns) == [c.name for c in sdm.columns("DiaSource")]


@pytest.fixture(scope="module")
def small_frames():
    """Six prior visits of four small detectors (seeded)."""
    spec = HistorySpec(seed=3, prior_visits=6, n_detectors=4, detector_px=256)
    return spec, build_frames(spec, workers=1, log=lambda *_: None)


def test_built_history_is_consistent(small_frames):
    spec, frames = small_frames
    src, forced, objects = frames["sources"], frames["forced"], frames["objects"]
    assert len(src) > 0 and len(forced) > 0
    # every source belongs to a DiaObject, and nDiaSources counts them
    counts = src["diaObjectId"].astype("int64").value_counts()
    by_id = objects.set_index("diaObjectId")["nDiaSources"]
    assert set(counts.index) == set(by_id.index)
    np.testing.assert_array_equal(by_id.loc[counts.index].to_numpy(), counts.to_numpy())
    # a new DiaObject takes the diaSourceId of the source that created it
    first = src.sort_values(["visit", "diaSourceId"]).groupby("diaObjectId")["diaSourceId"].first()
    np.testing.assert_array_equal(first.index.to_numpy(), first.to_numpy())
    # forced sources only for objects with >= 2 DiaSources, one per (object, visit)
    assert set(forced["diaObjectId"]) <= set(counts.index[counts >= 2])
    assert not forced.duplicated(["diaObjectId", "visit"]).any()
    assert len(frames["markers"]) == spec.prior_visits * spec.n_detectors
    # the history carries the survey's LSSTCam visit numbers, as the timed visit's bundle
    numbers = [spec.survey_config().visit_number(k) for k in range(spec.prior_visits)]
    assert sorted(set(frames["markers"]["visit"])) == numbers
    assert set(src["visit"]) <= set(numbers) and set(forced["visit"]) <= set(numbers)
    assert spec.visit_number == spec.survey_config().visit_number(spec.prior_visits) > numbers[-1]


def test_bulk_load_reads_back_like_store(small_frames, tmp_path):
    spec, frames = small_frames
    v0, v1 = (spec.survey_config().visit_number(k) for k in (0, 1))
    apdb = ApdbSql.create(ApdbConfig(url=str(tmp_path / "apdb.sqlite3")))
    try:
        bulk_load(apdb, frames)
        rows = apdb.row_counts()
        assert rows["DiaSource"] == len(frames["sources"])
        assert rows["DiaForcedSource"] == len(frames["forced"])
        assert rows["DiaObject"] == rows["DiaObjectLast"] == len(frames["objects"])
        assert rows["ApdbVisitDetector"] == len(frames["markers"])
        ids = frames["objects"]["diaObjectId"].to_numpy()
        got = apdb.get_sources(ids, None).sort_values("diaSourceId").reset_index(drop=True)
        want = frames["sources"].sort_values("diaSourceId").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want, check_dtype=True)
        fgot = apdb.get_forced_sources(ids, None)
        assert len(fgot) == len(frames["forced"])
        assert apdb.done_detectors(v0) == set(frames["markers"].query("visit == @v0")["detector"])
        summary = apdb.visit_summary(v1)
        per = frames["sources"].query("visit == @v1").groupby("detector").size()
        assert len(per) > 0
        np.testing.assert_array_equal(
            summary.set_index("detector")["nDiaSources"].loc[per.index].to_numpy(), per.to_numpy()
        )
    finally:
        apdb.close()


def _old_case(tmp_path, visits=(120,)):
    """A case folder as an older ``bench history`` left it: bundles named by visit index,
    a layout-1.0.0 SQLite template (the migration fixture of tests/apdb/data)."""
    import json
    import shutil
    from pathlib import Path

    case = tmp_path / "case"
    for visit in visits:
        (case / "bundles" / str(visit)).mkdir(parents=True)
        (case / "bundles" / str(visit) / "visit.json").write_text(json.dumps({"visit": visit}))
    (case / "spec.json").write_text(json.dumps({"seed": 1, "prior_visits": 120}))
    (case / "history-stats.json").write_text(json.dumps({"rows": {"DiaObject": 3}}))
    fixture = Path(__file__).resolve().parents[1] / "apdb" / "data" / "layout-1.0.0.sqlite3"
    shutil.copyfile(fixture, case / "apdb-template.sqlite3")
    return case


def test_adopt_times_an_older_case_as_it_is_after_upgrading_its_template(tmp_path):
    from apdb import make_apdb
    from apdb.sql import IMPLEMENTATION_VERSION
    from bench.history import adopt

    case = _old_case(tmp_path)
    lines: list[str] = []
    prepared = adopt(case, "sqlite", log=lines.append)
    assert prepared.visit == 120 and prepared.bundle_root == str(case / "bundles")
    assert prepared.spec == HistorySpec(seed=1, prior_visits=120)
    assert lines, "the upgrade plan is logged"
    with make_apdb(str(case / "apdb-template.sqlite3")) as db:
        assert db.metadata["version:ApdbSql"] == IMPLEMENTATION_VERSION

    with pytest.raises(SystemExit, match="must hold one visit, found 2"):
        adopt(_old_case(tmp_path / "two", visits=(119, 120)), "sqlite")
    with pytest.raises(SystemExit, match="only an SQLite template"):
        adopt(case, "postgresql")
