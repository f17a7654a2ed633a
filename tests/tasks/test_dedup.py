"""Which DiaObjects :func:`tasks.dedup.find_groups` merges, and into which."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.errors import InputError
from tasks.dedup import GROUP_COLUMNS, DedupConfig, find_groups, first_detection

ARCSEC = 1 / 3600.0


def _objects(ids, offsets_arcsec, ra0=150.0, dec0=0.0, err_arcsec=0.3):
    """Objects along a line of RA; position errors large enough not to matter by default."""
    off = np.asarray(offsets_arcsec, dtype=float)
    return pd.DataFrame(
        {
            "diaObjectId": np.asarray(ids, dtype=np.int64),
            "ra": (ra0 + off * ARCSEC) % 360.0,
            "dec": np.full(len(ids), dec0),
            "raErr": np.full(len(ids), err_arcsec * ARCSEC, dtype=np.float32),
            "decErr": np.full(len(ids), err_arcsec * ARCSEC, dtype=np.float32),
        }
    )


def _sources(visits_of: dict[int, list[int]]):
    rows = [(oid, v, 60000.0 + v) for oid, vs in visits_of.items() for v in vs]
    return pd.DataFrame(rows, columns=["diaObjectId", "visit", "midpointMjdTai"])


def _pairs(groups):
    return sorted(zip(groups["diaObjectId"].tolist(), groups["survivorId"].tolist(), strict=True))


def test_pieces_that_never_shared_a_visit_merge_into_the_first_detected():
    objects = _objects([7, 3], [0.0, 0.8])
    groups = find_groups(objects, _sources({7: [1, 2], 3: [5, 6]}), DedupConfig())
    assert list(groups.columns) == list(GROUP_COLUMNS)
    # 7 was detected first (visit 1), so it survives although its ID is larger
    assert _pairs(groups) == [(3, 7)]
    assert groups["separationArcsec"].iloc[0] == pytest.approx(0.8, rel=1e-6)


def test_objects_with_a_common_visit_never_merge():
    objects = _objects([1, 2], [0.0, 0.3])
    assert len(find_groups(objects, _sources({1: [1, 2, 3], 2: [3, 4]}), DedupConfig())) == 0


def test_beyond_the_distance_nothing_merges():
    objects = _objects([1, 2], [0.0, 1.6])
    assert len(find_groups(objects, _sources({1: [1], 2: [2]}), DedupConfig())) == 0
    wider = DedupConfig(max_distance_arcsec=2.0)
    assert _pairs(find_groups(objects, _sources({1: [1], 2: [2]}), wider)) == [(2, 1)]


def test_positions_that_disagree_beyond_their_errors_do_not_merge():
    sources = _sources({1: [1], 2: [2]})
    # 1.0" apart, each measured to 0.02" (+0.05" floor): ~13 sigma, two objects
    sharp = _objects([1, 2], [0.0, 1.0], err_arcsec=0.02)
    assert len(find_groups(sharp, sources, DedupConfig())) == 0
    assert _pairs(find_groups(sharp, sources, DedupConfig(max_sigma=None))) == [(2, 1)]
    # the same separation with 0.3" errors is 2.3 sigma: one object
    assert _pairs(find_groups(_objects([1, 2], [0.0, 1.0]), sources, DedupConfig())) == [(2, 1)]
    # no errors at all: the floor alone (0.05" per axis) decides
    bare = sharp.drop(columns=["raErr", "decErr"])
    assert len(find_groups(bare, sources, DedupConfig())) == 0
    close = _objects([1, 2], [0.0, 0.3]).drop(columns=["raErr", "decErr"])
    assert _pairs(find_groups(close, sources, DedupConfig())) == [(2, 1)]


def test_equal_first_detection_keeps_the_smallest_id():
    objects = _objects([20, 10], [0.0, 0.5])
    sources = pd.DataFrame(
        {"diaObjectId": [20, 10], "visit": [1, 2], "midpointMjdTai": [60000.0, 60000.0]}
    )
    assert _pairs(find_groups(objects, sources, DedupConfig())) == [(20, 10)]


def test_three_pieces_merge_into_one_but_a_chain_longer_than_the_distance_does_not():
    three = _objects([1, 2, 3], [0.0, 0.6, 1.2])
    sources = _sources({1: [1], 2: [2], 3: [3]})
    assert _pairs(find_groups(three, sources, DedupConfig())) == [(2, 1), (3, 1)]
    # 1-2 and 2-3 are 1.0" apart but 1-3 is 2.0": the closest pair (2, 3 at 0.9") wins
    chain = _objects([1, 2, 3], [0.0, 1.1, 2.0])
    assert _pairs(find_groups(chain, sources, DedupConfig())) == [(3, 2)]


def test_a_group_never_gets_two_members_of_one_visit():
    # 2 joins 1 first (closest); 3 shares visit 1 with object 1, so it stays apart
    objects = _objects([1, 2, 3], [0.0, 0.2, 0.5])
    sources = _sources({1: [1, 2], 2: [3], 3: [1, 4]})
    assert _pairs(find_groups(objects, sources, DedupConfig())) == [(2, 1)]


def test_result_does_not_depend_on_row_order():
    rng = np.random.default_rng(3)
    n = 400
    objects = pd.DataFrame(
        {
            "diaObjectId": np.arange(1, n + 1, dtype=np.int64),
            "ra": 10.0 + rng.uniform(0, 60, n) * ARCSEC,
            "dec": rng.uniform(0, 60, n) * ARCSEC,
            "raErr": np.full(n, 0.3 * ARCSEC),
            "decErr": np.full(n, 0.3 * ARCSEC),
        }
    )
    visits = {int(i): rng.choice(50, 3, replace=False).tolist() for i in objects["diaObjectId"]}
    sources = _sources(visits)
    want = find_groups(objects, sources, DedupConfig())
    assert len(want) > 10
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(n)
        got = find_groups(
            objects.iloc[perm], sources.sample(frac=1, random_state=seed), DedupConfig()
        )
        pd.testing.assert_frame_equal(got, want)


def test_ra_wrap_is_no_boundary():
    objects = _objects([1, 2], [-0.4, 0.4], ra0=0.0)
    assert objects["ra"].iloc[0] > 359.0
    assert _pairs(find_groups(objects, _sources({1: [1], 2: [2]}), DedupConfig())) == [(2, 1)]


def test_empty_and_lonely_inputs_give_empty_groups():
    for objects in (_objects([], []), _objects([1], [0.0])):
        groups = find_groups(objects, _sources({}), DedupConfig())
        assert list(groups.columns) == list(GROUP_COLUMNS) and len(groups) == 0


def test_bad_input_is_named():
    with pytest.raises(InputError, match="visit"):
        find_groups(_objects([1, 2], [0, 1]), pd.DataFrame({"diaObjectId": [1]}), DedupConfig())
    with pytest.raises(InputError, match="repeat"):
        find_groups(_objects([1, 1], [0, 1]), _sources({1: [1]}), DedupConfig())
    bad = _objects([1, 2], [0, 1]).assign(ra=[np.nan, 1.0])
    with pytest.raises(InputError, match="finite"):
        find_groups(bad, _sources({1: [1]}), DedupConfig())


def test_first_detection_falls_back_to_the_object_column():
    objects = _objects([1, 2], [0, 1]).assign(firstDiaSourceMjdTai=[59000.0, 59001.0])
    np.testing.assert_array_equal(first_detection(objects, _sources({1: [4]})), [60004.0, 59001.0])
