"""Apdb.bulk_load: the supported way to fill an APDB with history, on both backends."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apdb import Circle
from core.errors import ApdbError, InputError
from tests.apdb.conftest import make_forced, make_objects, make_sources, store_detector


def _history(n_objects: int = 20, visits: tuple[int, ...] = (1, 2, 3)):
    """Objects near (10, 10) with one source and one forced source per visit on detector 5."""
    rng = np.random.default_rng(4)
    ids = np.arange(100, 100 + n_objects, dtype=np.int64)
    ra = 10.0 + rng.uniform(-0.05, 0.05, n_objects)
    dec = 10.0 + rng.uniform(-0.05, 0.05, n_objects)
    objects = make_objects(ids, ra, dec, validityStartMjdTai=np.full(n_objects, 60003.0))
    sources, forced = [], []
    for v in visits:
        sid = v * 10_000 + np.arange(n_objects)
        mjd = 60000.0 + v
        sources.append(make_sources(sid, ids, ra, dec, visit=v, detector=5, mjd=mjd, seed=v))
        forced.append(make_forced(sid, ids, ra, dec, visit=v, detector=5, mjd=mjd, seed=v))
    return objects, pd.concat(sources, ignore_index=True), pd.concat(forced, ignore_index=True)


def test_bulk_load_reads_back_and_marks_every_pair(db):
    objects, sources, forced = _history()
    markers = pd.DataFrame({"visit": [1, 2, 3, 3], "detector": [5, 5, 5, 6]})
    result = db.bulk_load(objects, sources, forced, markers=markers)
    assert (result.n_objects, result.n_sources, result.n_forced_sources) == (20, 60, 60)
    assert result.n_markers == 4
    got = db.get_objects(Circle(10.0, 10.0, 0.2))
    assert sorted(got["diaObjectId"]) == objects["diaObjectId"].tolist()
    assert got["validityEndMjdTai"].isna().all()
    assert (got["validityStartMjdTai"] == 60003.0).all()
    src = db.get_sources(objects["diaObjectId"], 60002.0).sort_values("diaSourceId")
    want = sources[sources["midpointMjdTai"] >= 60002.0].sort_values("diaSourceId")
    np.testing.assert_array_equal(src["diaSourceId"], want["diaSourceId"])
    np.testing.assert_allclose(src["psfFlux"], want["psfFlux"])
    assert len(db.get_forced_sources(objects["diaObjectId"], None)) == 60
    # detector 6 of visit 3 wrote nothing but is marked; a later store of it writes nothing
    assert db.done_detectors(3) == {5, 6}
    summary = db.visit_summary(3).set_index("detector")
    assert summary.loc[5, "nDiaSources"] == 20 and summary.loc[6, "nDiaSources"] == 0
    assert store_detector(db, 3, 6, [999], 10.0, 10.0, 60003.0).already_stored
    assert db.row_counts()["DiaObject"] == 20


def test_bulk_load_then_store_updates_an_object(db):
    objects, sources, forced = _history(n_objects=3, visits=(1,))
    db.bulk_load(objects, sources, forced)
    assert db.done_detectors(1) == {5}
    result = store_detector(db, 4, 5, [100], 10.0, 10.0, 60004.0)
    assert result.n_objects_updated == 1
    versions = db.get_object_history([100])
    assert len(versions) == 2 and versions["validityEndMjdTai"].isna().sum() == 1


@pytest.mark.parametrize(
    ("table", "change", "match"),
    [
        ("objects", lambda f: f.drop(columns="validityStartMjdTai"), r"validityStartMjdTai"),
        ("objects", lambda f: f.drop(columns="ra"), r"DiaObject: required column 'ra'"),
        ("sources", lambda f: f.drop(columns="midpointMjdTai"), r"'midpointMjdTai' is missing"),
        (
            "sources",
            lambda f: f.assign(psfFlux="bright"),
            r"DiaSource\.psfFlux: cannot convert str to float32",
        ),
        (
            "sources",
            lambda f: f.assign(band=1.5),
            r"DiaSource\.band: cannot convert float64 to text",
        ),
        ("forced", lambda f: f.assign(visit=f["visit"] + 0.5), r"DiaForcedSource\.visit"),
        (
            "forced",
            lambda f: f.assign(detector="x"),
            r"DiaForcedSource\.detector: cannot convert str to int16",
        ),
    ],
    ids=["no-validity", "no-ra", "no-time", "text-flux", "numeric-band", "fractional", "text-det"],
)
def test_bad_frames_are_refused_naming_the_column(db, table, change, match):
    frames = dict(zip(("objects", "sources", "forced"), _history(), strict=True))
    frames[table] = change(frames[table])
    with pytest.raises(InputError, match=match):
        db.bulk_load(frames["objects"], frames["sources"], frames["forced"])
    assert sum(db.row_counts().values()) - db.row_counts()["metadata"] == 0


def test_markers_must_cover_the_rows(db):
    objects, sources, forced = _history()
    with pytest.raises(InputError, match=r"visit 3, detector 5\) are loaded but"):
        db.bulk_load(
            objects, sources, forced, markers=pd.DataFrame({"visit": [1, 2], "detector": [5, 5]})
        )
    with pytest.raises(InputError, match=r"ApdbVisitDetector: required column 'detector'"):
        db.bulk_load(objects, sources, forced, markers=pd.DataFrame({"visit": [1]}))


def test_conflict_with_stored_rows_writes_nothing(db):
    store_detector(db, 2, 5, [7], 10.0, 10.0, 60002.0)
    before = db.row_counts()
    objects, sources, forced = _history()
    with pytest.raises(ApdbError, match="bulk load"):
        db.bulk_load(objects, sources, forced)
    assert db.row_counts() == before
