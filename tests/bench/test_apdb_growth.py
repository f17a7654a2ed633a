"""The growth benchmark's cases: a bigger table, the same rows for the measured footprints.

The benchmark's ratio means "the cost of the table's size" only if a measured
footprint loads the same objects and the same number of history rows from the
1x, 4x-time and 16x-sky databases while the tables hold 4x / 16x the rows.
"""

from __future__ import annotations

import numpy as np
import pytest

from apdb.config import ApdbConfig
from apdb.sql import ApdbSql
from bench import apdb_growth as g


def _built(tmp_path, case: str, n: int = 20):
    db = ApdbSql.create(ApdbConfig(url=f"sqlite:///{tmp_path / case}.sqlite3"), drop=True)
    built = g.build(db, case, n, seed=3)
    return db, built


def _loads(db: ApdbSql) -> list[tuple]:
    out = []
    for cell in g.CASES["1x"]["cells"]:
        objs = db.get_objects(g.cell_polygon(*cell))
        ids = np.sort(objs["diaObjectId"].to_numpy())
        since = db.history_start(g.T_NOW)
        srcs = db.get_sources(ids, since)
        fsrcs = db.get_forced_sources(ids, since)
        out.append(
            (
                tuple(ids),
                tuple(sorted(zip(srcs["diaObjectId"], srcs["visit"], strict=True))),
                tuple(sorted(zip(fsrcs["diaObjectId"], fsrcs["visit"], strict=True))),
            )
        )
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("growth")
    out = {}
    for case in g.CASES:
        db, built = _built(tmp, case)
        out[case] = (built, _loads(db), db.row_counts())
        db.close()
    return out


def test_the_grown_tables_hold_4x_and_16x_the_rows(cases):
    base = cases["1x"][0]
    time4, sky16 = cases["4x-time"][0], cases["16x-sky"][0]
    assert time4["objects"] == base["objects"]
    assert sky16["objects"] == 16 * base["objects"]
    for key in ("sources", "forced"):
        assert 3.5 < time4[key] / base[key] < 4.5
        assert 14 < sky16[key] / base[key] < 18
    assert cases["16x-sky"][2]["DiaSource"] == sky16["sources"]


def test_every_measured_footprint_loads_the_same_rows_in_all_cases(cases):
    base = cases["1x"][1]
    assert all(len(objs) == 20 for objs, _, _ in base)
    assert sum(len(src) for _, src, _ in base) > 0
    assert cases["4x-time"][1] == base
    assert cases["16x-sky"][1] == base


def test_a_measurement_stores_each_footprint_as_a_new_visit(tmp_path):
    db, _ = _built(tmp_path, "1x", n=10)
    try:
        figures = g.measure(db, passes=2, seed=3)
        assert figures["samples"] == 9
        assert figures["loaded_objects"] == 10
        # the first pass's stores added one (visit, detector) per footprint and N_NEW sources
        assert len(db.done_detectors(10**6)) == 1
        assert db.row_counts()["DiaSource"] > 0
    finally:
        db.close()
