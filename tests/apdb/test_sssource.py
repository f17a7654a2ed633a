"""The APDB's SSSource table: stored with its DiaSources in one transaction, on every backend."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apdb import sdm
from core.errors import InputError
from tests.apdb.conftest import make_sources


def _ss_sources(dia_source_ids, ss_object_ids) -> pd.DataFrame:
    n = len(dia_source_ids)
    rng = np.random.default_rng(3)
    return sdm.frame(
        {
            "diaSourceId": np.asarray(dia_source_ids, np.int64),
            "ssObjectId": np.asarray(ss_object_ids, np.int64),
            "designation": np.array([f"2020 A{chr(66 + k)}" for k in range(n)], dtype=object),
            "eclLambda": rng.uniform(0, 360, n),
            "eclBeta": rng.uniform(-30, 30, n),
            "galLon": rng.uniform(0, 360, n),
            "galLat": rng.uniform(-60, 60, n),
            "ephRa": rng.uniform(0, 360, n),
            "ephDec": rng.uniform(-60, 10, n),
            "ephOffset": rng.uniform(0, 1, n).astype(np.float32),
            "helio_vx": rng.normal(0, 20, n).astype(np.float32),
            "topoRange": np.full(n, np.nan, np.float32),  # null stays null
            "diaDistanceRank": np.ones(n, np.int16),
        },
        "SSSource",
        n,
    )


def _sso_sources(ids, visit=4, detector=2):
    # solar-system DiaSources: diaObjectId 0, ssObjectId set (as Rubin's)
    src = make_sources(ids, [0] * len(ids), 30.0, -5.0, visit=visit, detector=detector, mjd=61000.5)
    src["ssObjectId"] = pd.array(np.arange(len(ids), dtype=np.int64) + 70, dtype="Int64")
    return src


def test_sssource_round_trip_in_the_detector_transaction(db):
    ss = _ss_sources([900, 901], [70, 71])
    res = db.store(4, 2, None, _sso_sources([900, 901]), None, time_mjd=61000.5, ss_sources=ss)
    assert res.n_sources == 2 and db.row_counts()["SSSource"] == 2
    got = db.get_ss_sources([901, 900, 5]).sort_values("diaSourceId").reset_index(drop=True)
    assert list(got.columns) == list(sdm.dtypes("SSSource"))
    assert {c: str(t) for c, t in got.dtypes.items()} == sdm.dtypes("SSSource")
    pd.testing.assert_frame_equal(got, ss, check_exact=True)
    assert db.get_ss_sources([]).empty


def test_sssource_store_is_idempotent_by_marker(db):
    ss = _ss_sources([900], [70])
    db.store(4, 2, None, _sso_sources([900]), None, time_mjd=61000.5, ss_sources=ss)
    counts = db.row_counts()
    again = db.store(4, 2, None, _sso_sources([900]), None, time_mjd=61000.5, ss_sources=ss)
    assert again.already_stored and db.row_counts() == counts


def test_sssource_failure_rolls_back_the_detector(db):
    ss = _ss_sources([900], [70])
    db.store(4, 2, None, _sso_sources([900]), None, time_mjd=61000.5, ss_sources=ss)
    counts = db.row_counts()
    # diaSourceId 900 exists: the DiaSource insert fails inside the transaction, and
    # neither the marker nor the SSSource rows of detector 3 stay
    src = _sso_sources([900, 901], detector=3)
    with pytest.raises(InputError, match=r"store\(4, 3\): diaSourceId values collide"):
        db.store(
            4, 3, None, src, None, time_mjd=61000.5, ss_sources=_ss_sources([900, 901], [70, 71])
        )
    assert db.row_counts() == counts and not db.is_done(4, 3)
    assert db.get_ss_sources([901]).empty


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.assign(diaSourceId=np.int64(77)), "SSSource: diaSourceId 77 is not among"),
        (lambda d: d.drop(columns="ssObjectId"), "SSSource: required column 'ssObjectId'"),
        (lambda d: pd.concat([d, d]), "SSSource.diaSourceId"),
    ],
    ids=["orphan", "missing-column", "duplicate"],
)
def test_bad_sssource_is_refused_before_any_write(db, change, match):
    with pytest.raises(InputError, match=match):
        db.store(
            4,
            2,
            None,
            _sso_sources([900]),
            None,
            time_mjd=61000.5,
            ss_sources=change(_ss_sources([900], [70])),
        )
    assert sum(db.row_counts().values()) == db.row_counts()["metadata"]
    assert not db.is_done(4, 2)
