"""Rubin's production source filters: reliability cut, trailed sources, good DiaObjects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.errors import InputError
from tasks.sourcefilters import SourceFilterConfig, filter_sources, good_dia_object_ids


def _src(rel, trail) -> pd.DataFrame:
    n = len(rel)
    return pd.DataFrame(
        {
            "diaSourceId": np.arange(n, dtype=np.int64),
            "reliability": pd.array(rel, dtype="Float32"),
            "trailLength": np.asarray(trail, np.float32),
        }
    )


def test_reliability_cut_keeps_nulls_and_trails_go_apart():
    # 30 s exposure: 10°/day × 30 s = 12.5″
    src = _src([0.9, 0.49, None, 0.7, 0.2, 0.5], [1.0, 1.0, 1.0, 12.6, 20.0, 12.5])
    out = filter_sources(src, 30.0)
    assert out.sources["diaSourceId"].tolist() == [0, 2, 5]
    assert out.unreliable["diaSourceId"].tolist() == [1, 4]  # 4 is trailed too: counted once
    assert out.trailed["diaSourceId"].tolist() == [3]
    assert (out.n_unreliable, out.n_trailed) == (2, 1)
    off = filter_sources(src, 30.0, SourceFilterConfig(do_trailed_source_filter=False))
    assert off.n_trailed == 0 and off.sources["diaSourceId"].tolist() == [0, 2, 3, 5]
    # a shorter exposure tightens the trail cut: 15 s → 6.25″
    assert filter_sources(_src([0.9], [7.0]), 15.0).n_trailed == 1


def test_absent_columns_drop_nothing_and_bad_input():
    src = pd.DataFrame({"diaSourceId": np.arange(3, dtype=np.int64)})
    out = filter_sources(src, 30.0)
    assert len(out.sources) == 3 and out.n_unreliable == out.n_trailed == 0
    with pytest.raises(InputError, match="exposureTime must be > 0"):
        filter_sources(src, 0.0)


def test_good_dia_objects_as_rubin_select_good_dia_objects():
    hist = pd.DataFrame(
        {
            "diaObjectId": pd.array([1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 0, 0, None], dtype="Int64"),
            "reliability": [0.9, 0.6, 0.9, 0.4, 0.9, 0.9, 0.9, 0.9, 0.9, np.nan, 0.9, 0.9, 0.9],
            "trailLength": [0.1, 1.4, 0.1, 0.1, 0.1, 1.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
            "glint_trail": [False] * 6 + [True, False] + [False] * 5,
            "isDipole": [False] * 7 + [True] + [False] * 5,
        }
    )
    # 1: two good; 2: one unreliable; 3: one too trailed; 4: glint and dipole;
    # 5: null reliability counts as good; 0 / null: solar-system or no object
    assert good_dia_object_ids(hist).tolist() == [1, 5]
    assert good_dia_object_ids(hist, SourceFilterConfig(min_good_sources=1)).tolist() == [
        1,
        2,
        3,
        5,
    ]
    with pytest.raises(InputError, match="diaObjectId"):
        good_dia_object_ids(hist.drop(columns="diaObjectId"))
