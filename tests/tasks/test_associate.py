"""Associate: gate, Gaussian cost, global assignment, wrap/poles, quality cut, guard."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apdb import sdm
from core.errors import InputError, TooManyNewObjectsError
from tasks.associate import AssociationConfig, associate, pair_costs, unmatched_cost

AS = 1.0 / 3600.0
CFG = AssociationConfig()


def objects(ra, dec, err_arcsec=0.1, ids=None):
    ra, dec = np.atleast_1d(ra).astype(float), np.atleast_1d(dec).astype(float)
    n = ra.size
    return pd.DataFrame(
        {
            "diaObjectId": np.arange(1, n + 1, dtype=np.int64) * 10 if ids is None else ids,
            "ra": ra,
            "dec": dec,
            "raErr": np.full(n, err_arcsec * AS, np.float32),
            "decErr": np.full(n, err_arcsec * AS, np.float32),
        }
    )


def sources(ra, dec, err_arcsec=0.1, first_id=1000, **cols):
    ra, dec = np.atleast_1d(ra).astype(float), np.atleast_1d(dec).astype(float)
    n = ra.size
    df = pd.DataFrame(
        {
            "diaSourceId": np.arange(first_id, first_id + n, dtype=np.int64),
            "ra": ra,
            "dec": dec,
            "raErr": np.full(n, err_arcsec * AS, np.float32),
            "decErr": np.full(n, err_arcsec * AS, np.float32),
        }
    )
    for k, v in cols.items():
        df[k] = v
    return df


def ids_of(result):
    return dict(zip(result.sources["diaSourceId"], result.sources["diaObjectId"], strict=True))


def test_each_source_joins_its_object():
    rng = np.random.default_rng(1)
    n = 200
    ra = rng.uniform(150, 150.1, n)
    dec = rng.uniform(2, 2.1, n)
    obj = objects(ra, dec)
    src = sources(
        ra + rng.normal(0, 0.1, n) * AS / np.cos(np.radians(dec)), dec + rng.normal(0, 0.1, n) * AS
    )
    res = associate(src, obj, CFG)
    assert res.n_matched == n and res.n_new == 0 and res.n_rejected == 0
    np.testing.assert_array_equal(res.sources["diaObjectId"], obj["diaObjectId"])
    np.testing.assert_array_equal(res.matched_object_ids, obj["diaObjectId"])


def test_cost_closed_form_with_systematic_term_and_detection_prior():
    cfg = AssociationConfig()
    sys2 = cfg.sigma_systematic_arcsec**2
    # source 0.3" east, 0.4" north of the object at the equator
    sig_s = (np.array([0.2]), np.array([0.01]))
    sig_o = (np.array([0.0]), np.array([0.01]))
    args = (np.array([0.3 * AS]), np.array([0.4 * AS]), sig_s, np.array([0.0]), np.array([0.0]))
    for n, prior in ((None, 0.0), (np.array([4.0]), np.log(4.0)), (np.array([np.nan]), 0.0)):
        i, j, cost, sep = pair_costs(*args, sig_o, cfg, obj_n=n)
        k = 1.0 if n is None or not np.isfinite(n[0]) else n[0]
        sa2 = 0.2**2 + sys2 * (1 + 1 / k)
        sd2 = 2 * 0.01**2 + sys2 * (1 + 1 / k)
        assert (i[0], j[0]) == (0, 0)
        assert sep[0] == pytest.approx(0.5, rel=1e-6)
        assert cost[0] == pytest.approx(
            0.5 * (0.09 / sa2 + 0.16 / sd2) + 0.5 * np.log(sa2 * sd2) - prior, rel=1e-6
        )
    # without the systematic term the 0.05" floor holds the dec σ
    flat = AssociationConfig(sigma_systematic_arcsec=0.0, detection_prior=False)
    _, _, cost, _ = pair_costs(*args, sig_o, flat, obj_n=np.array([4.0]))
    sa2, sd2 = 0.2**2, 0.05**2
    assert cost[0] == pytest.approx(0.5 * (0.09 / sa2 + 0.16 / sd2) + 0.5 * np.log(sa2 * sd2))


@pytest.mark.parametrize(
    ("ra0", "dec0"),
    [(150.0, 2.0), (0.0, -30.0), (45.0, 89.999), (200.0, -89.9995)],
    ids=["equator", "ra-wrap", "north-pole", "south-pole"],
)
def test_candidates_are_every_pair_within_the_chord(ra0, dec0):
    """The one-tree ball search finds the pairs of a two-tree search and of brute force."""
    from scipy.spatial import cKDTree

    from tasks.calibrate import unit_vectors

    rng = np.random.default_rng(11)
    n_o, n_s = 3000, 300
    # a dense 20″ patch: many pairs near the 1″ gate edge
    ora = (ra0 + rng.uniform(-10, 10, n_o) * AS / np.cos(np.radians(dec0))) % 360.0
    odec = np.clip(dec0 + rng.uniform(-10, 10, n_o) * AS, -90, 90)
    pick = rng.integers(0, n_o, n_s)
    sra = (ora[pick] + rng.normal(0, 0.6, n_s) * AS / np.cos(np.radians(odec[pick]))) % 360.0
    sdec = np.clip(odec[pick] + rng.normal(0, 0.6, n_s) * AS, -90, 90)
    sig = (np.full(n_s, 0.1), np.full(n_s, 0.1))
    osig = (np.full(n_o, 0.1), np.full(n_o, 0.1))
    i, j, _, sep = pair_costs(sra, sdec, sig, ora, odec, osig, CFG)
    chord = 2.0 * np.sin(np.radians(AS) / 2.0)
    tree = cKDTree(unit_vectors(sra, sdec)).sparse_distance_matrix(
        cKDTree(unit_vectors(ora, odec)), chord, output_type="ndarray"
    )
    want = sorted(zip(tree["i"].tolist(), tree["j"].tolist(), strict=True))
    assert len(want) > n_s
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == want
    assert (sep <= 1.0 + 1e-9).all()
    d = unit_vectors(sra, sdec)[:, None, :] - unit_vectors(ora, odec)[None, :, :]
    dist = np.sqrt((d * d).sum(axis=-1))
    clear = np.abs(dist - chord) > 1e-9 * chord  # leave rounding at the gate edge aside
    brute = set(zip(*np.nonzero((dist <= chord) & clear), strict=True))
    got = set(zip(i.tolist(), j.tolist(), strict=True))
    assert brute == {p for p in got if clear[p]}


def test_unmatched_cost_is_k_sigma_at_the_reference_sigma():
    assert unmatched_cost(CFG) == pytest.approx(0.5 * 100 + 2 * np.log(0.07))
    cfg = AssociationConfig(unmatched_sigma=3.0, sigma_floor_arcsec=0.1)
    assert unmatched_cost(cfg) == pytest.approx(4.5 + 2 * np.log(0.1))


def _acceptance_radius(err_arcsec: float, n: float) -> float:
    """Offset (arcsec) where an isolated pair's cost reaches U (round σ, closed form)."""
    s2 = 2 * err_arcsec**2 + CFG.sigma_systematic_arcsec**2 * (1 + 1 / n)
    return float(np.sqrt(2 * s2 * (unmatched_cost(CFG) - np.log(s2) + np.log(n))))


@pytest.mark.parametrize(
    ("err_arcsec", "n", "offset", "matched"),
    [
        (0.01, 1, 0.95, True),
        (0.01, 1, 1.02, False),
        (0.01, 1000, 0.98, True),
        (0.01, 1000, 1.02, False),
        (0.3, 1, 0.95, True),
        (0.3, 1, 1.02, False),
    ],
    ids=[
        "new-object-inside-gate",
        "new-object-outside-gate",
        "well-measured-inside-k-sigma",
        "well-measured-beyond-k-sigma",
        "loose-inside-gate",
        "loose-outside-gate",
    ],
)
def test_acceptance_is_k_sigma_or_the_gate(err_arcsec, n, offset, matched):
    """An isolated pair is matched out to k σ_eff or the 1″ gate, whichever is smaller.

    σ_eff includes the systematic term, so a freshly created object accepts
    over the whole gate however small the quoted errors; an object with
    1,000 detections and 0.01″ errors accepts out to its k-σ radius (0.76″).
    """
    radius = min(_acceptance_radius(err_arcsec, n), 1.0)
    if n == 1000:
        assert 0.7 < radius < 0.8
    src = sources([0.0], [offset * radius * AS], err_arcsec=err_arcsec)
    obj = objects([0.0], [0.0], err_arcsec=err_arcsec).assign(nDiaSources=np.int32(n))
    res = associate(src, obj, CFG)
    assert res.n_matched == int(matched) and res.n_new == int(not matched)


def test_unmatched_inside_the_gate_only_in_the_documented_cases():
    """A source inside an object's gate ends unmatched only when (1) the object
    takes a better source of the same visit, or (2) the pair lies beyond the
    k-σ acceptance of a well-measured object; never for an isolated pair."""
    ra0 = 150.0
    rng = np.random.default_rng(3)
    # isolated pairs at random offsets up to the gate, tiny quoted errors, new objects
    n = 200
    odec = np.arange(n) * 10 * AS
    off = rng.uniform(0, 0.97, n)  # acceptance of a fresh object: 0.98″ (k σ_eff)
    ang = rng.uniform(0, 2 * np.pi, n)
    src = sources(ra0 + off * np.cos(ang) * AS, odec + off * np.sin(ang) * AS, err_arcsec=0.002)
    res = associate(src, objects(np.full(n, ra0), odec, err_arcsec=0.002), CFG)
    assert res.n_matched == n
    # (1) two sources inside one object's gate: the nearer one joins, the other is new
    src = sources([ra0, ra0], [0.2 * AS, 0.6 * AS], err_arcsec=0.05)
    res = associate(src, objects([ra0], [0.0]), CFG)
    assert res.n_matched == 1 and res.n_new == 1
    assert res.sources["diaObjectId"].tolist() == [10, int(src["diaSourceId"][1])]
    # (2) well-measured object (1,000 detections, 0.01″): 0.9″ is inside the gate, beyond k σ
    obj = objects([ra0], [0.0], err_arcsec=0.01).assign(nDiaSources=np.int32(1000))
    res = associate(sources([ra0], [0.9 * AS], err_arcsec=0.01), obj, CFG)
    assert res.n_matched == 0 and res.n_new == 1


def test_detection_prior_keeps_the_object_with_the_longer_history():
    """Two objects at one position (a same-visit duplicate made a twin): the
    next source joins the object with more detections, even slightly farther."""
    obj = objects([0.0, 0.0], [0.0, 0.1 * AS], err_arcsec=0.01).assign(
        nDiaSources=np.array([50, 1], np.int32)
    )
    src = sources([0.0], [0.12 * AS], err_arcsec=0.01)
    assert associate(src, obj, CFG).sources["diaObjectId"].tolist() == [10]
    flat = CFG.model_copy(update={"detection_prior": False})
    assert associate(src, obj, flat).sources["diaObjectId"].tolist() == [20]


def test_missing_errors_fall_back_to_0p2_arcsec():
    obj = objects([0.0], [0.0]).assign(raErr=np.nan, decErr=0.0)
    src = sources([0.3 * AS], [0.0]).assign(raErr=np.nan, decErr=np.nan)
    res = associate(src, obj, CFG)
    assert res.n_matched == 1
    sig = (np.array([0.2]), np.array([0.2]))
    _, _, cost, _ = pair_costs(
        np.array([0.3 * AS]), np.array([0.0]), sig, np.array([0.0]), np.array([0.0]), sig, CFG
    )
    s2 = 0.08 + 2 * CFG.sigma_systematic_arcsec**2
    assert cost[0] == pytest.approx(0.5 * 0.09 / s2 + 0.5 * np.log(s2 * s2), rel=1e-6)


def test_global_assignment_beats_greedy():
    """S1 is nearest O1 but O2 is also in reach; S2 can only take O1.

    Greedy nearest-neighbour gives S1→O1 and leaves S2 unmatched; the global
    minimum is S1→O2, S2→O1. With σ² = 0.02 arcsec² per axis and
    ln σ² = −3.91: costs −0.85 + 0.09 = −0.76 against −1.66 + U (U = 44.0).
    """
    obj = objects([0.0, 0.65 * AS], [0.0, 0.0])
    src = sources([0.30 * AS, -0.40 * AS], [0.0, 0.0])
    res = associate(src, obj, CFG)
    assert ids_of(res) == {1000: 20, 1001: 10}
    assert res.n_matched == 2 and res.n_new == 0


def test_one_source_per_object_closer_wins_other_is_new():
    obj = objects([0.0], [0.0])
    src = sources([0.5 * AS, 0.1 * AS], [0.0, 0.0])
    res = associate(src, obj, CFG)
    assert ids_of(res) == {1000: 1000, 1001: 10}
    assert res.n_matched == 1 and res.n_new == 1
    np.testing.assert_array_equal(res.new_object_ids, [1000])


@pytest.mark.parametrize(
    ("sep_arcsec", "matched"), [(0.95, True), (1.05, False)], ids=["inside", "outside"]
)
def test_gate_radius(sep_arcsec, matched):
    src = sources([0.0], [sep_arcsec * AS], err_arcsec=0.5)
    res = associate(src, objects([0.0], [0.0], err_arcsec=0.5), CFG)
    assert res.n_matched == int(matched) and res.n_new == int(not matched)


@pytest.mark.parametrize(
    ("obj_pos", "src_pos"),
    [
        ((359.99995, 10.0), (0.00005, 10.0)),
        ((0.00001, -5.0), (359.99992, -5.0)),
        ((0.0, 89.9999), (180.0, 89.99995)),
        ((123.0, -89.99998), (303.0, -89.99999)),
    ],
    ids=["ra-wrap-360-to-0", "ra-wrap-0-to-360", "north-pole", "south-pole"],
)
def test_wrap_and_poles_match_true_neighbours(obj_pos, src_pos):
    obj = objects([obj_pos[0]], [obj_pos[1]])
    src = sources([src_pos[0]], [src_pos[1]])
    res = associate(src, obj, CFG)
    assert res.n_matched == 1, res.counts


def test_north_pole_far_pair_is_not_matched():
    # both at dec 89.9999 but 180° apart in RA: 0.72" apart... at dec 89.9997: 2.16"
    obj = objects([0.0], [89.9997])
    res = associate(sources([180.0], [89.9997]), obj, CFG)
    assert res.n_matched == 0 and res.n_new == 1


def test_nan_positions_are_dropped_and_counted():
    src = sources([0.0, np.nan, 0.0], [0.0, 0.0, np.nan])
    res = associate(src, objects([0.0], [0.0]), CFG)
    assert res.n_nan_dropped == 2
    assert res.n_matched == 1
    assert list(res.sources["diaSourceId"]) == [1000]


def test_quality_cut_applies_to_unmatched_only():
    obj = objects([0.0], [0.0])
    src = sources(
        [0.0, 10 * AS, 20 * AS, 30 * AS, 40 * AS],
        [0.0] * 5,
        pixelFlags_bad=pd.array([True, True, False, None, False], dtype="boolean"),
        reliability=np.array([0.01, 0.9, 0.05, np.nan, 0.5], np.float32),
    )
    res = associate(src, obj, CFG)
    # 1000 matched despite flags; 1001 bad pixel; 1002 low reliability; 1003 null → new
    assert ids_of(res) == {1000: 10, 1003: 1003, 1004: 1004}
    assert list(res.rejected["diaSourceId"]) == [1001, 1002]
    assert (res.n_matched, res.n_new, res.n_rejected) == (1, 2, 2)


def test_too_many_new_objects_raises_before_returning():
    src = sources(np.arange(5) * 10 * AS, np.zeros(5))
    with pytest.raises(TooManyNewObjectsError, match="5 new DiaObjects.*maxNewDiaObjects=4"):
        associate(src, objects([], []), AssociationConfig(max_new_dia_objects=4))
    res = associate(src, objects([], []), AssociationConfig(max_new_dia_objects=0))
    assert res.n_new == 5


@pytest.mark.parametrize("which", ["sources", "objects", "both"])
def test_empty_inputs(which):
    src = sources([0.0], [0.0])
    obj = objects([0.0], [0.0])
    if which in ("sources", "both"):
        src = src.iloc[:0]
    if which in ("objects", "both"):
        obj = sdm.empty_frame("DiaObject")
    res = associate(src, obj, CFG)
    assert list(res.sources.columns) == [*src.columns, "diaObjectId"]
    assert list(res.rejected.columns) == list(src.columns)
    assert res.n_matched == 0
    assert res.n_new == len(src)


def test_single_source_single_object():
    res = associate(sources([1.0], [1.0]), objects([1.0], [1.0]), CFG)
    assert ids_of(res) == {1000: 10}


def test_inputs_not_mutated_and_result_keeps_columns():
    src = sources([0.0, 5 * AS], [0.0, 0.0], snr=[5.0, 6.0])
    obj = objects([0.0], [0.0])
    before_s, before_o = src.copy(deep=True), obj.copy(deep=True)
    res = associate(src, obj, CFG)
    pd.testing.assert_frame_equal(src, before_s)
    pd.testing.assert_frame_equal(obj, before_o)
    assert list(res.sources.columns) == [*src.columns, "diaObjectId"]
    assert str(res.sources["diaObjectId"].dtype) == "Int64"


def test_missing_column_is_an_input_error():
    with pytest.raises(InputError, match="DiaSource: missing required column.*diaSourceId"):
        associate(sources([0.0], [0.0]).drop(columns="diaSourceId"), objects([0.0], [0.0]), CFG)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assignment_graph_is_what_scipy_builds_from_triplets(seed):
    from scipy import sparse

    from tasks.associate import _assignment_graph

    rng = np.random.default_rng(seed)
    n_s, n_c = 40, 30
    pairs = np.unique(np.c_[rng.integers(0, n_s, 90), rng.integers(0, n_c, 90)], axis=0)
    i, j = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)  # by row, then column
    w = rng.uniform(1, 50, i.size)
    want = sparse.csr_matrix(
        (np.r_[w, np.full(n_s, 45.0)], (np.r_[i, np.arange(n_s)], np.r_[j, n_c + np.arange(n_s)])),
        shape=(n_s, n_c + n_s),
    )
    got = _assignment_graph(i, j, w, 45.0, n_s, n_c)
    for name in ("indptr", "indices", "data"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
