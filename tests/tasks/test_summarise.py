"""Summarise: closed-form values of every statistic, NaN and too-few-point rules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.timeseries import LombScargle

from apdb import sdm
from core.errors import InputError
from tasks.summarise import SummaryConfig, summarise

ALL_PLUGINS = SummaryConfig(
    percentiles=True,
    chi2=True,
    mad=True,
    skew=True,
    linear_fit=True,
    stetson_j=True,
    lomb_scargle=True,
)
EMPTY_OBJ = sdm.empty_frame("DiaObject")
EMPTY_SRC = sdm.empty_frame("DiaSource")


def dia_sources(obj, flux, err, t, band="r", first_id=1, ra=10.0, dec=-5.0, **cols):
    n = len(flux)
    df = pd.DataFrame(
        {
            "diaSourceId": np.arange(first_id, first_id + n, dtype=np.int64),
            "diaObjectId": pd.array(np.broadcast_to(obj, n), dtype="Int64"),
            "ra": np.broadcast_to(ra, n).astype(float),
            "dec": np.broadcast_to(dec, n).astype(float),
            "band": np.broadcast_to(band, n).astype(object),
            "midpointMjdTai": np.asarray(t, float),
            "psfFlux": np.asarray(flux, float),
            "psfFluxErr": np.asarray(err, float),
        }
    )
    for k, v in cols.items():
        df[k] = v
    return df


def one(df, **kw):
    return summarise(
        EMPTY_OBJ,
        EMPTY_SRC,
        df,
        kw.pop("config", SummaryConfig()),
        time_mjd=kw.pop("time_mjd", 60100.0),
        **kw,
    )


def test_default_statistics_closed_form():
    f, e, t = [10.0, 20.0, 40.0], [1.0, 2.0, 4.0], [60000.0, 60002.0, 60003.0]
    src = dia_sources(5, f, e, t, scienceFlux=[100.0, 100.0, 130.0], scienceFluxErr=[1.0, 1.0, 2.0])
    out = one(src)
    row = out.iloc[0]
    w = np.array([1.0, 0.25, 0.0625])
    assert row["diaObjectId"] == 5
    assert row["r_psfFluxMean"] == pytest.approx((10 + 5 + 2.5) / w.sum(), rel=1e-6)
    assert row["r_psfFluxMeanErr"] == pytest.approx(1 / np.sqrt(w.sum()), rel=1e-6)
    assert row["r_psfFluxNdata"] == 3
    assert row["r_psfFluxSigma"] == pytest.approx(np.std(f, ddof=1), rel=1e-6)
    assert (row["r_psfFluxMin"], row["r_psfFluxMax"]) == (10.0, 40.0)
    assert row["r_psfFluxMaxSlope"] == pytest.approx(20.0)  # slopes 5 and 20 nJy/d
    assert row["r_psfFluxErrMean"] == pytest.approx(7 / 3, rel=1e-6)
    ws = np.array([1.0, 1.0, 0.25])
    assert row["r_scienceFluxMean"] == pytest.approx((200 + 32.5) / ws.sum(), rel=1e-6)
    assert row["r_scienceFluxMeanErr"] == pytest.approx(1 / np.sqrt(ws.sum()), rel=1e-6)
    assert row["nDiaSources"] == 3
    assert row["firstDiaSourceMjdTai"] == 60000.0 and row["lastDiaSourceMjdTai"] == 60003.0
    assert row["validityStartMjdTai"] == 60100.0
    # other bands: no data
    assert row["g_psfFluxNdata"] == 0 and np.isnan(row["g_psfFluxMean"])
    assert {c: str(t) for c, t in out.dtypes.items()} == sdm.dtypes("DiaObject")


def test_order_of_rows_does_not_matter():
    src = dia_sources(5, [10.0, 20.0, 40.0], [1.0, 2.0, 4.0], [60003.0, 60000.0, 60002.0])
    row = one(src).iloc[0]
    # time order: 20 (t=0), 40 (t=2), 10 (t=3): slopes 10, -30
    assert row["r_psfFluxMaxSlope"] == pytest.approx(10.0)


def test_nans_are_skipped_and_single_point_gives_nan_spread():
    src = dia_sources(1, [np.nan, 7.0, 9.0], [1.0, 2.0, np.nan], [1.0, 2.0, 3.0])
    row = one(src).iloc[0]
    assert row["r_psfFluxNdata"] == 2
    assert row["r_psfFluxMean"] == pytest.approx(7.0)  # only the row with a usable error
    assert row["r_psfFluxErrMean"] == pytest.approx(1.5)
    assert row["r_psfFluxSigma"] == pytest.approx(np.std([7.0, 9.0], ddof=1))
    single = one(dia_sources(1, [7.0], [2.0], [1.0])).iloc[0]
    assert single["r_psfFluxMean"] == 7.0 and single["r_psfFluxMeanErr"] == 2.0
    for col in ("r_psfFluxSigma", "r_psfFluxMaxSlope"):
        assert np.isnan(single[col]), col


def test_bands_are_separate_and_invalid_band_counts_only_in_n():
    src = pd.concat(
        [
            dia_sources(1, [1.0, 3.0], [1.0, 1.0], [1.0, 2.0], band="g"),
            dia_sources(1, [10.0], [1.0], [3.0], band="i", first_id=10),
            dia_sources(1, [99.0], [1.0], [4.0], band="y", first_id=20),
        ]
    )
    row = one(src, config=SummaryConfig(valid_bands=("g", "i"))).iloc[0]
    assert row["g_psfFluxMean"] == 2.0 and row["i_psfFluxMean"] == 10.0
    assert row["y_psfFluxNdata"] == 0 and np.isnan(row["y_psfFluxMean"])
    assert row["nDiaSources"] == 4


def test_unknown_valid_band_is_a_config_error():
    with pytest.raises(ValueError, match="unknown band"):
        SummaryConfig(valid_bands=("r", "q"))


@pytest.mark.parametrize(
    ("ras", "decs", "ra", "dec"),
    [
        ([359.9999, 0.0001], [0.0, 0.0], 0.0, 0.0),
        ([10.0, 190.0], [89.9999, 89.9999], None, 90.0),
        ([45.0, 45.0], [-30.0, -30.0002], 45.0, -30.0001),
    ],
    ids=["ra-wrap", "north-pole", "plain"],
)
def test_mean_position_on_the_sphere(ras, decs, ra, dec):
    src = dia_sources(1, [1.0, 1.0], [1.0, 1.0], [1.0, 2.0], ra=np.array(ras), dec=np.array(decs))
    row = one(src).iloc[0]
    if ra is not None:
        assert min(abs(row["ra"] - ra), abs(row["ra"] - ra - 360)) < 1e-9
    assert row["dec"] == pytest.approx(dec, abs=1e-9)


def test_position_errors_are_errors_of_the_mean():
    src = dia_sources(
        1,
        [1.0, 1.0],
        [1.0, 1.0],
        [1.0, 2.0],
        raErr=[3e-5, 4e-5],
        decErr=[1e-5, np.nan],
        ra_dec_Cov=[1e-10, 3e-10],
    )
    row = one(src).iloc[0]
    assert row["raErr"] == pytest.approx(5e-5 / 2, rel=1e-6)
    assert row["decErr"] == pytest.approx(1e-5, rel=1e-6)
    assert row["ra_dec_Cov"] == pytest.approx(4e-10 / 4, rel=1e-5)


def test_history_is_merged_and_untouched_objects_ignored():
    history = pd.concat(
        [
            dia_sources(1, [1.0, 2.0], [1.0, 1.0], [1.0, 2.0]),
            dia_sources(2, [50.0], [1.0], [1.0], first_id=100),  # not touched
            dia_sources(1, [999.0], [1.0], [3.0], first_id=7),  # same id as a new row
        ]
    )
    new = dia_sources(1, [3.0], [1.0], [3.0], first_id=7)
    out = summarise(EMPTY_OBJ, history, new, SummaryConfig(), time_mjd=5.0)
    assert list(out["diaObjectId"]) == [1]
    row = out.iloc[0]
    assert row["nDiaSources"] == 3 and row["r_psfFluxMean"] == pytest.approx(2.0)
    assert row["r_psfFluxMax"] == 3.0


def test_history_sorted_or_shuffled_gives_the_same_objects():
    """The rows of touched objects are found alike in sorted and unsorted history."""
    rng = np.random.default_rng(5)
    n = 600
    history = dia_sources(
        np.sort(rng.integers(1, 60, n)),
        rng.normal(100, 10, n),
        rng.uniform(1, 3, n),
        rng.uniform(60000, 60300, n),
        band=rng.choice(list("ugrizy"), n),
    )
    history.loc[[3, 300], "diaObjectId"] = pd.NA  # nulls sort first and are never touched
    history = history.sort_values("diaObjectId", na_position="first", ignore_index=True)
    forced = history[["diaObjectId", "band", "psfFlux", "psfFluxErr"]].dropna()
    new = dia_sources(
        np.array([2, 7, 7, 59, 500]), [1.0] * 5, [1.0] * 5, [60400.0] * 5, first_id=9000
    )
    kw = {"time_mjd": 60401.0}
    ordered = summarise(EMPTY_OBJ, history, new, ALL_PLUGINS, forced_sources=forced, **kw)
    shuffle = rng.permutation(n)
    mixed = summarise(
        EMPTY_OBJ,
        history.iloc[shuffle],
        new,
        ALL_PLUGINS,
        forced_sources=forced.sample(frac=1.0, random_state=3),
        **kw,
    )
    assert list(ordered["diaObjectId"]) == [2, 7, 59, 500]
    want = history["diaObjectId"].value_counts().reindex([2, 7, 59], fill_value=0)
    assert list(ordered["nDiaSources"]) == [want[2] + 1, want[7] + 2, want[59] + 1, 1]
    pd.testing.assert_frame_equal(ordered, mixed, rtol=1e-9)


def test_forced_sources_fill_fp_columns_else_previous_values_are_kept():
    new = dia_sources(1, [1.0], [1.0], [1.0])
    forced = pd.DataFrame(
        {
            "diaObjectId": [1, 1, 2],
            "band": ["r", "r", "r"],
            "psfFlux": [4.0, 8.0, 100.0],
            "psfFluxErr": [1.0, 1.0, 1.0],
        }
    )
    row = one(new, forced_sources=forced).iloc[0]
    assert row["r_fpFluxMean"] == pytest.approx(6.0)
    assert row["r_fpFluxMeanErr"] == pytest.approx(1 / np.sqrt(2))
    prev = sdm.conform(
        pd.DataFrame(
            {
                "diaObjectId": [1],
                "validityStartMjdTai": [0.0],
                "ra": [10.0],
                "dec": [-5.0],
                "r_fpFluxMean": [3.5],
                "r_fpFluxMeanErr": [0.5],
                "nDiaSources": [1],
                **{f"{b}_psfFluxNdata": [0] for b in "ugrizy"},
            }
        ),
        "DiaObject",
    )
    kept = summarise(prev, EMPTY_SRC, new, SummaryConfig(), time_mjd=1.0).iloc[0]
    assert kept["r_fpFluxMean"] == pytest.approx(3.5) and kept["r_fpFluxMeanErr"] == 0.5


def test_empty_new_sources_give_empty_frame_with_plugin_columns():
    out = summarise(EMPTY_OBJ, EMPTY_SRC, EMPTY_SRC, ALL_PLUGINS, time_mjd=1.0)
    assert len(out) == 0
    assert list(out.columns[: len(sdm.dtypes("DiaObject"))]) == list(sdm.dtypes("DiaObject"))
    assert "r_psfFluxStetsonJ" in out.columns and "u_psfFluxPercentile95" in out.columns


def test_plugins_closed_form():
    rng = np.random.default_rng(7)
    n = 12
    t = np.sort(rng.uniform(60000, 60050, n))
    f = rng.normal(100, 20, n)
    e = rng.uniform(2, 5, n)
    row = one(dia_sources(3, f, e, t), config=ALL_PLUGINS).iloc[0]
    for q in (5, 25, 50, 75, 95):
        assert row[f"r_psfFluxPercentile{q:02d}"] == pytest.approx(np.percentile(f, q))
    assert row["r_psfFluxMAD"] == pytest.approx(np.median(np.abs(f - np.median(f))))
    assert row["r_psfFluxSkew"] == pytest.approx(pd.Series(f).skew(), rel=1e-9)
    w = 1 / e**2
    mean = (w * f).sum() / w.sum()
    assert row["r_psfFluxChi2"] == pytest.approx((((f - mean) / e) ** 2).sum(), rel=1e-9)
    slope, icept = np.polyfit(t, f, 1, w=1 / e)
    assert row["r_psfFluxLinearSlope"] == pytest.approx(slope, rel=1e-6)
    assert row["r_psfFluxLinearIntercept"] == pytest.approx(icept, rel=1e-6)
    delta = np.sqrt(n / (n - 1)) * (f - mean) / e
    p = delta**2 - 1
    assert row["r_psfFluxStetsonJ"] == pytest.approx(
        (np.sign(p) * np.sqrt(np.abs(p))).sum() / n, rel=1e-9
    )


def test_plugins_too_few_points_are_nan():
    row = one(dia_sources(3, [5.0, 6.0], [1.0, 1.0], [1.0, 1.0]), config=ALL_PLUGINS).iloc[0]
    assert np.isnan(row["r_psfFluxSkew"])  # needs 3
    assert np.isnan(row["r_psfFluxLinearSlope"])  # two points at one time
    assert np.isnan(row["r_psfFluxLombScarglePeriod"])  # needs 5
    assert row["r_psfFluxPercentile50"] == 5.5
    assert np.isnan(row["g_psfFluxChi2"]) and np.isnan(row["g_psfFluxPercentile50"])


def test_lomb_scargle_matches_astropy_and_finds_the_period():
    rng = np.random.default_rng(3)
    cfg = SummaryConfig(
        lomb_scargle=True,
        lomb_scargle_min_period_days=0.5,
        lomb_scargle_max_period_days=20.0,
        lomb_scargle_n_frequencies=4000,
    )
    frames = []
    periods = [1.7, 3.3, 7.9]
    for k, period in enumerate(periods):
        t = np.sort(rng.uniform(60000, 60120, 60))
        e = rng.uniform(1, 3, 60)
        f = 50 + 20 * np.sin(2 * np.pi * t / period + k) + rng.normal(0, e)
        frames.append(dia_sources(k + 1, f, e, t, first_id=1000 * k))
    out = one(pd.concat(frames), config=cfg)
    freq = np.linspace(1 / 20.0, 1 / 0.5, 4000)
    for k, period in enumerate(periods):
        src = frames[k]
        power = LombScargle(src["midpointMjdTai"], src["psfFlux"], src["psfFluxErr"]).power(freq)
        best = np.argmax(power)
        assert out["r_psfFluxLombScarglePeriod"].iloc[k] == pytest.approx(1 / freq[best])
        assert out["r_psfFluxLombScarglePower"].iloc[k] == pytest.approx(power[best], rel=1e-6)
        assert out["r_psfFluxLombScarglePeriod"].iloc[k] == pytest.approx(period, rel=0.01)


def test_vectorised_result_equals_per_object_reference():
    """Many objects at once give what a plain pandas group-by per object gives."""
    rng = np.random.default_rng(11)
    n = 3000
    df = dia_sources(
        rng.integers(0, 300, n),
        rng.normal(0, 50, n),
        rng.uniform(1, 9, n),
        rng.uniform(60000, 60300, n),
        band=rng.choice(list("ugrizy"), n),
    )
    df.loc[rng.uniform(0, 1, n) < 0.05, "psfFlux"] = np.nan
    out = one(df).set_index("diaObjectId")
    ok = df.dropna(subset=["psfFlux"])
    ref = ok.assign(w=1 / ok["psfFluxErr"] ** 2, wf=ok["psfFlux"] / ok["psfFluxErr"] ** 2)
    grp = ref.groupby([ref["diaObjectId"].astype(int), "band"])
    mean = grp["wf"].sum() / grp["w"].sum()
    sigma = grp["psfFlux"].std(ddof=1)
    for (obj, band), value in mean.items():
        assert out.loc[obj, f"{band}_psfFluxMean"] == pytest.approx(value, rel=1e-5)
    for (obj, band), value in sigma.items():
        got = out.loc[obj, f"{band}_psfFluxSigma"]
        assert (np.isnan(value) and np.isnan(got)) or got == pytest.approx(value, rel=1e-5)
    counts = df.groupby(df["diaObjectId"].astype(int)).size()
    np.testing.assert_array_equal(out.loc[counts.index, "nDiaSources"], counts.to_numpy())


def test_inputs_not_mutated_and_missing_column_errors():
    src = dia_sources(1, [1.0, 2.0], [1.0, 1.0], [1.0, 2.0])
    before = src.copy(deep=True)
    one(src, config=ALL_PLUGINS)
    pd.testing.assert_frame_equal(src, before)
    with pytest.raises(InputError, match="DiaSource: missing required column.*psfFluxErr"):
        one(src.drop(columns="psfFluxErr"))


@pytest.mark.parametrize(
    "values",
    [
        np.array(["r", None, np.nan, "x", "g", pd.NA, np.str_("i"), "r", ""], dtype=object),
        pd.array(["r", None, "x", "g", "i", "r", ""], dtype="str"),
        np.array([], dtype=object),
    ],
    ids=["object-with-nulls", "str-dtype", "empty"],
)
def test_band_codes_text_match_nulls_and_unknown_bands(values):
    from tasks.summarise import _band_codes

    bands = ["g", "r", "i"]
    want = [bands.index(v) if isinstance(v, str) and v in bands else -1 for v in values]
    got = _band_codes(values, bands)
    assert got.dtype == np.int64
    assert got.tolist() == want
    assert _band_codes(values, []).tolist() == [-1] * len(values)


def test_bands_without_usable_data_have_null_means_and_errors_never_inf():
    """Rubin writes null there; 1/sqrt(Σw) over no row would be +inf."""
    src = dia_sources(5, [10.0, 12.0], [0.0, np.nan], [60000.0, 60001.0])  # no usable error
    forced = pd.DataFrame(
        {
            "diaObjectId": pd.array([5], dtype="Int64"),
            "band": np.array(["r"], dtype=object),
            "psfFlux": [3.0],
            "psfFluxErr": [np.nan],
        }
    )
    row = one(src, forced_sources=forced).iloc[0]
    for b in "ugrizy":
        for name in ("psfFluxMean", "psfFluxMeanErr", "scienceFluxMean", "scienceFluxMeanErr"):
            assert np.isnan(row[f"{b}_{name}"]), (b, name)
        assert np.isnan(row[f"{b}_fpFluxMean"]) and np.isnan(row[f"{b}_fpFluxMeanErr"]), b
    assert row["r_psfFluxNdata"] == 2
