"""Summary statistics of the DiaObjects a detector touched (docs/design.md §4.4).

Every DiaObject that took a new DiaSource (matched or new) is recomputed from
its full loaded history (12 months of DiaSources) plus the new sources, per
band, vectorised over all objects at once: rows are sorted by (object, band,
time) and every statistic is a weighted sum (``numpy.bincount``), a segment
reduction (``numpy.*.reduceat``) or an order statistic read off the sorted
segments. There is no Python loop over objects.

Default statistics (SDM ``DiaObject`` columns), per band ``b`` in
``valid_bands``, over the rows with a finite ``psfFlux``:

``{b}_psfFluxMean``, ``{b}_psfFluxMeanErr``
    Inverse-variance weighted mean ``Σ(f/σ²)/Σ(1/σ²)`` and its error
    ``1/sqrt(Σ 1/σ²)`` (nJy) over rows with a finite, positive error; both
    NaN (null) for a band without such a row.
``{b}_psfFluxNdata``
    Number of finite ``psfFlux`` values.
``{b}_psfFluxSigma``
    Standard deviation, ddof = 1 (NaN below 2 points).
``{b}_psfFluxMin``, ``{b}_psfFluxMax``
    Extremes.
``{b}_psfFluxMaxSlope``
    Largest ``Δf/Δt`` between time-consecutive points (nJy/d, signed, as
    Rubin's ``MaxSlope`` plugin; pairs with Δt = 0 skipped; NaN below 2).
``{b}_psfFluxErrMean``
    Mean of the finite ``psfFluxErr``.
``{b}_scienceFluxMean``, ``{b}_scienceFluxMeanErr``
    As ``psfFluxMean`` on ``scienceFlux``.
``{b}_fpFluxMean``, ``{b}_fpFluxMeanErr``
    As ``psfFluxMean`` on the forced ``psfFlux`` when forced sources are
    given; otherwise the values of the loaded object are kept.

Per object: ``ra``, ``dec`` the normalised mean of the unit vectors (exact at
RA wrap and poles); ``raErr``, ``decErr`` = ``sqrt(Σσ²)/n`` over the rows with
a finite error (error of the unweighted mean; ``raErr`` on α·cos δ);
``ra_dec_Cov`` = ``Σcov/n²``; ``nDiaSources``; ``firstDiaSourceMjdTai``,
``lastDiaSourceMjdTai``; ``validityStartMjdTai = time_mjd``.

Optional plugins (extra columns, off by default because the SDM lacks them;
names follow Rubin's earlier DiaObject schema):

``{b}_psfFluxPercentile{NN}``
    Linear-interpolation percentiles (numpy's default method).
``{b}_psfFluxMAD``
    Median absolute deviation from the median, unscaled.
``{b}_psfFluxSkew``
    Adjusted Fisher–Pearson skewness G1 (pandas ``skew``; NaN below 3).
``{b}_psfFluxChi2``
    ``Σ((f − psfFluxMean)/σ)²`` about the weighted mean.
``{b}_psfFluxLinearSlope``, ``{b}_psfFluxLinearIntercept``
    Weighted least-squares line ``f = slope·t + intercept`` (t in MJD, so the
    intercept is at MJD 0, as Rubin's ``LinearFit``; NaN below 2 distinct times).
``{b}_psfFluxStetsonJ``
    Stetson (1996) J with single-point pairs:
    ``δ = sqrt(n/(n−1))·(f − mean)/σ``, ``J = Σ sign(δ²−1)·sqrt|δ²−1| / n``.
``{b}_psfFluxLombScarglePeriod``, ``{b}_psfFluxLombScarglePower``
    Peak of the floating-mean, error-weighted Lomb–Scargle periodogram
    (standard normalisation, as ``astropy.timeseries.LombScargle``) on a
    frequency grid uniform in frequency.

A statistic with too few points is NaN, never an exception; NaN fluxes and
errors are skipped. No statistic is ever ±inf: every undefined value is NaN,
which the APDB stores as NULL and alerts carry as null (Rubin writes null for
the same fields).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, field_validator

from apdb import sdm
from core.bundle import BANDS
from core.frames import column_to_numpy, column_values
from tasks.calibrate import float_column, require_columns

__all__ = ["SummaryConfig", "summarise"]

DEG = np.pi / 180.0


class SummaryConfig(BaseModel, frozen=True, extra="forbid"):
    """Configuration of :func:`summarise`."""

    valid_bands: tuple[str, ...] = Field(
        BANDS,
        description="Bands that have DiaObject columns; sources in other bands count in "
        "nDiaSources only. Rubin: DiaCalculationTask / DiaPipelineTask.validBands.",
    )
    percentiles: bool = Field(False, description="Compute {b}_psfFluxPercentileNN (plugin).")
    percentile_levels: tuple[int, ...] = Field(
        (5, 25, 50, 75, 95), description="Percentile levels (0–100) of the percentile plugin."
    )
    chi2: bool = Field(False, description="Compute {b}_psfFluxChi2 (plugin).")
    mad: bool = Field(False, description="Compute {b}_psfFluxMAD (plugin).")
    skew: bool = Field(False, description="Compute {b}_psfFluxSkew (plugin).")
    linear_fit: bool = Field(
        False, description="Compute {b}_psfFluxLinearSlope/Intercept (plugin)."
    )
    stetson_j: bool = Field(False, description="Compute {b}_psfFluxStetsonJ (plugin).")
    lomb_scargle: bool = Field(
        False, description="Compute {b}_psfFluxLombScarglePeriod/Power (plugin)."
    )
    lomb_scargle_min_points: int = Field(
        5, ge=3, description="Fewest points for a Lomb–Scargle period (else NaN)."
    )
    lomb_scargle_min_period_days: float = Field(
        0.1, gt=0, description="Shortest period of the Lomb–Scargle grid (days)."
    )
    lomb_scargle_max_period_days: float = Field(
        100.0, gt=0, description="Longest period of the Lomb–Scargle grid (days)."
    )
    lomb_scargle_n_frequencies: int = Field(
        1000, ge=10, le=100_000, description="Frequencies in the Lomb–Scargle grid."
    )

    @field_validator("valid_bands")
    @classmethod
    def _known_bands(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [b for b in v if b not in BANDS]
        if bad:
            raise ValueError(f"valid_bands: unknown band(s) {bad}; DiaObject has {BANDS}")
        return v

    @field_validator("percentile_levels")
    @classmethod
    def _levels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 0 <= q <= 100 for q in v):
            raise ValueError(f"percentile_levels must lie in 0..100, got {v}")
        return v


_NO_ID = np.iinfo(np.int64).min  # stands for a null diaObjectId


def _num(df: pd.DataFrame, name: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Column ``name`` (at positions ``rows``) as float64; NaN for nulls and a missing column."""
    values = float_column(df, name, rows, table="DiaSource")
    if values is None:
        return np.full(len(df) if rows is None else rows.size, np.nan)
    return values


def _ids(df: pd.DataFrame) -> np.ndarray:
    """``diaObjectId`` as int64, nulls as ``_NO_ID``."""
    return column_to_numpy(df, "diaObjectId", np.int64, na_value=_NO_ID)


def _int64(values) -> np.ndarray:
    """Column values (numpy or extension array) as int64; an error on nulls."""
    if isinstance(values, np.ndarray):
        return np.asarray(values, dtype=np.int64)
    return values.to_numpy(dtype=np.int64)


def _rows_of(ids: np.ndarray, touched: np.ndarray) -> np.ndarray:
    """Positions (ascending) of the rows whose ID is in the sorted ``touched``."""
    if ids.size == 0 or touched.size == 0:
        return np.empty(0, dtype=np.int64)
    if (ids[1:] >= ids[:-1]).all():  # sorted by object (as loaded): one range per object
        lo = np.searchsorted(ids, touched, side="left")
        hi = np.searchsorted(ids, touched, side="right")
        counts = hi - lo
        starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
        return starts + np.arange(counts.sum())
    pos = np.minimum(np.searchsorted(touched, ids), touched.size - 1)
    return np.flatnonzero(touched[pos] == ids)


def _band_codes(values, bands: list[str]) -> np.ndarray:
    """Index of each value in ``bands``; -1 for other bands and nulls.

    The distinct values are found first (a hash table: a column holds a
    handful of bands) and only they are compared as text.
    """
    codes, distinct = pd.factorize(np.asarray(values, dtype=object))  # nulls: code -1
    return np.append(_distinct_band_codes(np.asarray(distinct, dtype=object), bands), -1)[codes]


def _distinct_band_codes(values: np.ndarray, bands: list[str]) -> np.ndarray:
    """Index in ``bands`` of each (distinct, so few) value's text; -1 for any other.

    Nulls would read "None", "nan", "<NA>": no band.
    """
    index = {b: k for k, b in enumerate(bands)}
    return np.fromiter((index.get(str(v), -1) for v in values), dtype=np.int64, count=len(values))


def _weighted_mean(g, f, e, n_groups):
    """Inverse-variance mean and error per group; both NaN (null) where no usable row.

    A group without a usable row (a band with no data) has no mean and no
    error: both are NaN, written as null in the APDB and in alerts, as Rubin
    writes them. ``1/sqrt(Σw)`` would be +inf there.
    """
    ok = np.isfinite(f) & np.isfinite(e) & (e > 0)
    w = np.where(ok, 1.0 / np.where(ok, e, 1.0) ** 2, 0.0)
    sw = np.bincount(g, w, minlength=n_groups)
    swf = np.bincount(g, w * np.where(ok, f, 0.0), minlength=n_groups)
    sw = np.where(sw > 0, sw, np.nan)
    return swf / sw, 1.0 / np.sqrt(sw)


def _segment_starts(keys_sorted: np.ndarray) -> np.ndarray:
    if keys_sorted.size == 0:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], keys_sorted[1:] != keys_sorted[:-1])))


def _quantile_sorted(values, starts, counts, q):
    """Linear-interpolation quantile ``q`` (0..1) of each sorted segment."""
    pos = starts + q * (counts - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, starts + counts - 1)
    frac = pos - lo
    return values[lo] + (values[hi] - values[lo]) * frac


def _lomb_scargle(g, t, f, e, n_groups, config):
    """Peak period and power per group of the floating-mean weighted LS periodogram."""
    period = np.full(n_groups, np.nan)
    power = np.full(n_groups, np.nan)
    counts = np.bincount(g, minlength=n_groups)
    use = counts[g] >= config.lomb_scargle_min_points
    if not use.any():
        return period, power
    g, t, f, e = g[use], t[use], f[use], e[use]
    order = np.argsort(g, kind="stable")
    g, t, f, e = g[order], t[order], f[order], e[order]
    starts = _segment_starts(g)
    groups = g[starts]
    w = 1.0 / e**2
    w = w / np.add.reduceat(w, starts)[np.searchsorted(groups, g)]
    fmin = 1.0 / config.lomb_scargle_max_period_days
    fmax = 1.0 / config.lomb_scargle_min_period_days
    freq = np.linspace(fmin, fmax, config.lomb_scargle_n_frequencies)
    phase = 2 * np.pi * np.outer(t - t.min(), freq)
    cos, sin = np.cos(phase), np.sin(phase)
    wc = w[:, None]

    def s(a):
        return np.add.reduceat(a, starts, axis=0)

    y_mean = s(w * f)
    yy = s(w * f * f) - y_mean**2
    c = s(wc * cos)
    sn = s(wc * sin)
    yc = s(wc * f[:, None] * cos) - y_mean[:, None] * c
    ys = s(wc * f[:, None] * sin) - y_mean[:, None] * sn
    cc = s(wc * cos * cos) - c * c
    ss = s(wc * sin * sin) - sn * sn
    cs = s(wc * cos * sin) - c * sn
    d = cc * ss - cs * cs
    with np.errstate(invalid="ignore", divide="ignore"):
        p = (ss * yc**2 + cc * ys**2 - 2 * cs * yc * ys) / (yy[:, None] * d)
    p = np.where(np.isfinite(p), p, -np.inf)
    best = np.argmax(p, axis=1)
    best_p = p[np.arange(len(groups)), best]
    good = np.isfinite(best_p)
    period[groups[good]] = 1.0 / freq[best[good]]
    power[groups[good]] = best_p[good]
    return period, power


def _band_statistics(g, t, f, e, sf, se, n_groups, config) -> dict[str, np.ndarray]:
    """All per-(object, band) statistics; ``g`` is the group code of each row."""
    out: dict[str, np.ndarray] = {}
    out["psfFluxMean"], out["psfFluxMeanErr"] = _weighted_mean(g, f, e, n_groups)
    out["scienceFluxMean"], out["scienceFluxMeanErr"] = _weighted_mean(g, sf, se, n_groups)
    e_ok = np.isfinite(e)
    n_err = np.bincount(g[e_ok], minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["psfFluxErrMean"] = np.bincount(g[e_ok], e[e_ok], minlength=n_groups) / n_err

    # rows with a finite flux, sorted by (group, time)
    fin = np.isfinite(f)
    gf, tf, ff, ef = g[fin], t[fin], f[fin], e[fin]
    order = np.lexsort((tf, gf))
    gf, tf, ff, ef = gf[order], tf[order], ff[order], ef[order]
    n = np.bincount(gf, minlength=n_groups)
    out["psfFluxNdata"] = n
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_u = np.bincount(gf, ff, minlength=n_groups) / n
        dev = ff - mean_u[gf]
        m2 = np.bincount(gf, dev**2, minlength=n_groups)
        out["psfFluxSigma"] = np.where(n >= 2, np.sqrt(m2 / (n - 1)), np.nan)
    starts = _segment_starts(gf)
    present = gf[starts] if starts.size else np.empty(0, dtype=np.int64)
    fmin = np.full(n_groups, np.nan)
    fmax = np.full(n_groups, np.nan)
    if starts.size:
        fmin[present] = np.minimum.reduceat(ff, starts)
        fmax[present] = np.maximum.reduceat(ff, starts)
    out["psfFluxMin"], out["psfFluxMax"] = fmin, fmax
    slope_max = np.full(n_groups, np.nan)
    if ff.size > 1:
        dt = np.diff(tf)
        same = (gf[1:] == gf[:-1]) & (dt > 0)
        slope = np.diff(ff)[same] / dt[same]
        np.fmax.at(slope_max, gf[1:][same], slope)
    out["psfFluxMaxSlope"] = slope_max

    if config.percentiles or config.mad:
        vorder = np.lexsort((ff, gf))
        fs = ff[vorder]
        cnt = n[present]
        if config.percentiles:
            for q in config.percentile_levels:
                col = np.full(n_groups, np.nan)
                if starts.size:
                    col[present] = _quantile_sorted(fs, starts, cnt, q / 100.0)
                out[f"psfFluxPercentile{q:02d}"] = col
        if config.mad:
            col = np.full(n_groups, np.nan)
            if starts.size:
                med = np.full(n_groups, np.nan)
                med[present] = _quantile_sorted(fs, starts, cnt, 0.5)
                absdev = np.abs(fs - med[gf])
                aorder = np.lexsort((absdev, gf))
                col[present] = _quantile_sorted(absdev[aorder], starts, cnt, 0.5)
            out["psfFluxMAD"] = col
    if config.skew:
        with np.errstate(invalid="ignore", divide="ignore"):
            m3 = np.bincount(gf, dev**3, minlength=n_groups)
            s_ddof1 = np.sqrt(m2 / (n - 1))
            g1 = n / ((n - 1) * (n - 2)) * m3 / s_ddof1**3
        out["psfFluxSkew"] = np.where(n >= 3, g1, np.nan)
    # rows with finite flux and a usable error, for weighted plugins
    ok = np.isfinite(ef) & (ef > 0)
    gw, tw, fw, ew = gf[ok], tf[ok], ff[ok], ef[ok]
    nw = np.bincount(gw, minlength=n_groups)
    w = 1.0 / ew**2
    if config.chi2:
        resid = (fw - out["psfFluxMean"][gw]) / ew
        out["psfFluxChi2"] = np.where(
            nw >= 1, np.bincount(gw, resid**2, minlength=n_groups), np.nan
        )
    if config.linear_fit:
        t0 = np.full(n_groups, np.nan)
        if gw.size:
            st = _segment_starts(gw)
            t0[gw[st]] = tw[st]
        tc = tw - t0[gw]  # centred per group for numerical stability
        sw = np.bincount(gw, w, minlength=n_groups)
        sx = np.bincount(gw, w * tc, minlength=n_groups)
        sy = np.bincount(gw, w * fw, minlength=n_groups)
        sxx = np.bincount(gw, w * tc * tc, minlength=n_groups)
        sxy = np.bincount(gw, w * tc * fw, minlength=n_groups)
        det = sw * sxx - sx * sx
        with np.errstate(invalid="ignore", divide="ignore"):
            good = (nw >= 2) & (det > 1e-12 * np.maximum(sw * sxx, 1e-300))
            slope = np.where(good, (sw * sxy - sx * sy) / det, np.nan)
            icept_c = np.where(good, (sxx * sy - sx * sxy) / det, np.nan)
        out["psfFluxLinearSlope"] = slope
        out["psfFluxLinearIntercept"] = icept_c - slope * t0
    if config.stetson_j:
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.sqrt(nw / (nw - 1.0))
            delta = scale[gw] * (fw - out["psfFluxMean"][gw]) / ew
            p = delta**2 - 1.0
            jsum = np.bincount(gw, np.sign(p) * np.sqrt(np.abs(p)), minlength=n_groups)
            out["psfFluxStetsonJ"] = np.where(nw >= 2, jsum / nw, np.nan)
    if config.lomb_scargle:
        period, power = _lomb_scargle(gw, tw, fw, ew, n_groups, config)
        out["psfFluxLombScarglePeriod"] = period
        out["psfFluxLombScarglePower"] = power
    return out


_HISTORY_COLUMNS = (
    "diaSourceId",
    "diaObjectId",
    "ra",
    "dec",
    "raErr",
    "decErr",
    "ra_dec_Cov",
    "band",
    "midpointMjdTai",
    "psfFlux",
    "psfFluxErr",
    "scienceFlux",
    "scienceFluxErr",
)


def summarise(
    objects: pd.DataFrame,
    history: pd.DataFrame,
    new_sources: pd.DataFrame,
    config: SummaryConfig,
    *,
    time_mjd: float,
    forced_sources: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Recompute every DiaObject touched by ``new_sources``.

    Parameters
    ----------
    objects : pandas.DataFrame
        Loaded latest DiaObjects (SDM columns), may be empty. Used for the
        ``{b}_fpFluxMean/MeanErr`` of objects when ``forced_sources`` is None.
    history : pandas.DataFrame
        Loaded DiaSources (SDM columns, fluxes nJy, ``midpointMjdTai`` MJD) of
        the loaded objects, any order; rows of untouched objects are ignored.
        A row with the same ``diaSourceId`` as a new source is replaced by it.
    new_sources : pandas.DataFrame
        The associated DiaSources (:attr:`tasks.associate.Association.sources`)
        with ``diaObjectId`` set; rows with a null ``diaObjectId`` are ignored.
    config : SummaryConfig
        Bands and plugins.
    time_mjd : float
        ``validityStartMjdTai`` of the new DiaObject versions (MJD, TAI).
    forced_sources : pandas.DataFrame, optional
        DiaForcedSources (``diaObjectId, band, psfFlux, psfFluxErr``, nJy) of
        the touched objects; when given, fill ``{b}_fpFluxMean/MeanErr``.

    Returns
    -------
    pandas.DataFrame
        One row per touched DiaObject, sorted by ``diaObjectId``: all SDM
        ``DiaObject`` columns and dtypes (:func:`apdb.sdm.conform`), then the
        enabled plugin columns. Empty ``new_sources`` give an empty frame with
        these columns.

    Raises
    ------
    InputError
        A required column is missing.
    """
    require_columns(
        new_sources,
        [
            "diaSourceId",
            "diaObjectId",
            "ra",
            "dec",
            "band",
            "midpointMjdTai",
            "psfFlux",
            "psfFluxErr",
        ],
        "DiaSource",
    )
    if len(history):
        require_columns(
            history,
            [
                "diaSourceId",
                "diaObjectId",
                "ra",
                "dec",
                "band",
                "midpointMjdTai",
                "psfFlux",
                "psfFluxErr",
            ],
            "DiaSource history",
        )
    new_ids = _ids(new_sources)
    new_rows = np.flatnonzero(new_ids != _NO_ID)
    touched = np.unique(new_ids[new_rows])
    n_obj = touched.size
    # only the rows of touched objects and the columns used, as arrays: never copy
    # whole SDM frames; history rows first (in their order), then the new ones
    parts = [(new_sources, new_rows, new_ids[new_rows])]
    if len(history):
        hist_ids = _ids(history)
        hist_rows = _rows_of(hist_ids, touched)
        parts.insert(0, (history, hist_rows, hist_ids[hist_rows]))

    def column(name: str) -> np.ndarray:
        return np.concatenate([_num(df, name, r) for df, r, _ in parts])

    # de-duplicate on diaSourceId, the new row winning (it comes last)
    sid = np.concatenate([_int64(column_values(df, "diaSourceId")[r]) for df, r, _ in parts])
    keep: slice | np.ndarray = slice(
        None
    )  # no duplicate (the usual case, one sort tells): every row, in order
    sid_sorted = np.sort(sid)
    if sid.size and not (sid_sorted[1:] != sid_sorted[:-1]).all():
        _, last_first = np.unique(sid[::-1], return_index=True)
        keep = np.sort(len(sid) - 1 - last_first)
    rows = {
        c: column(c)[keep]
        for c in _HISTORY_COLUMNS
        if c not in ("diaSourceId", "diaObjectId", "band")
    }
    band = np.concatenate(
        [np.asarray(column_values(df, "band")[r], dtype=object) for df, r, _ in parts]
    )[keep]
    obj = np.searchsorted(touched, np.concatenate([ids for _, _, ids in parts])[keep])
    t = rows["midpointMjdTai"]
    out: dict[str, object] = {"diaObjectId": touched}
    out["validityStartMjdTai"] = np.full(n_obj, float(time_mjd))
    n_src = np.bincount(obj, minlength=n_obj)
    out["nDiaSources"] = n_src

    ra, dec = rows["ra"], rows["dec"]
    pos_ok = np.isfinite(ra) & np.isfinite(dec)
    # Σ of the unit vectors (as tasks.calibrate.unit_vectors makes them) per object
    ra_rad, dec_rad, pos_obj = ra[pos_ok] * DEG, dec[pos_ok] * DEG, obj[pos_ok]
    cos_dec = np.cos(dec_rad)
    vs = np.stack(
        [
            np.bincount(pos_obj, cos_dec * np.cos(ra_rad), minlength=n_obj),
            np.bincount(pos_obj, cos_dec * np.sin(ra_rad), minlength=n_obj),
            np.bincount(pos_obj, np.sin(dec_rad), minlength=n_obj),
        ],
        1,
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.sqrt((vs**2).sum(1))
        out["ra"] = np.mod(np.arctan2(vs[:, 1], vs[:, 0]) / DEG, 360.0)
        out["dec"] = np.arcsin(np.clip(vs[:, 2] / norm, -1, 1)) / DEG
        for name in ("raErr", "decErr"):
            err = rows[name]
            ok = np.isfinite(err)
            ne = np.bincount(obj[ok], minlength=n_obj)
            out[name] = np.sqrt(np.bincount(obj[ok], err[ok] ** 2, minlength=n_obj)) / ne
        cov = rows["ra_dec_Cov"]
        ok = np.isfinite(cov)
        nc = np.bincount(obj[ok], minlength=n_obj)
        out["ra_dec_Cov"] = np.bincount(obj[ok], cov[ok], minlength=n_obj) / nc.astype(float) ** 2
    t_ok = np.isfinite(t)
    first = np.full(n_obj, np.nan)
    last = np.full(n_obj, np.nan)
    np.fmin.at(first, obj[t_ok], t[t_ok])
    np.fmax.at(last, obj[t_ok], t[t_ok])
    out["firstDiaSourceMjdTai"] = first
    out["lastDiaSourceMjdTai"] = last

    bands = list(config.valid_bands)
    nb = len(bands)
    band_code = _band_codes(band, bands)
    in_band = band_code >= 0
    g = obj[in_band] * nb + band_code[in_band]
    stats = _band_statistics(
        g,
        t[in_band],
        rows["psfFlux"][in_band],
        rows["psfFluxErr"][in_band],
        rows["scienceFlux"][in_band],
        rows["scienceFluxErr"][in_band],
        n_obj * nb,
        config,
    )
    fp_mean = fp_err = None
    if forced_sources is not None and len(forced_sources):
        require_columns(
            forced_sources, ["diaObjectId", "band", "psfFlux", "psfFluxErr"], "DiaForcedSource"
        )
        forced_ids = _ids(forced_sources)
        frows = _rows_of(forced_ids, touched)
        fobj = np.searchsorted(touched, forced_ids[frows])
        fband = _band_codes(column_values(forced_sources, "band")[frows], bands)
        sel = fband >= 0
        fp_mean, fp_err = _weighted_mean(
            fobj[sel] * nb + fband[sel],
            _num(forced_sources, "psfFlux", frows)[sel],
            _num(forced_sources, "psfFluxErr", frows)[sel],
            n_obj * nb,
        )
    elif forced_sources is None and len(objects) and "diaObjectId" in objects.columns:
        # the last loaded version of each touched object (NaN where not loaded)
        ids = _ids(objects)
        order = np.argsort(ids, kind="stable")
        pos = np.searchsorted(ids[order], touched, side="right") - 1
        found = (pos >= 0) & (ids[order][np.maximum(pos, 0)] == touched)
        prev_rows = order[np.maximum(pos, 0)]
        for b in bands:
            for suffix in ("fpFluxMean", "fpFluxMeanErr"):
                name = f"{b}_{suffix}"
                if name in objects.columns:
                    out[name] = np.where(found, _num(objects, name, prev_rows), np.nan)
    for k, b in enumerate(bands):
        for name, values in stats.items():
            out[f"{b}_{name}"] = values[k::nb] if n_obj else values[:0]
        if fp_mean is not None and fp_err is not None:
            out[f"{b}_fpFluxMean"] = fp_mean[k::nb]
            out[f"{b}_fpFluxMeanErr"] = fp_err[k::nb]
    for b in BANDS:
        out.setdefault(f"{b}_psfFluxNdata", np.zeros(n_obj, dtype=np.int64))
    base = sdm.frame(out, "DiaObject", n_obj)
    schema = sdm.dtypes("DiaObject")
    extras = {k: v for k, v in out.items() if k not in schema}
    if not extras:
        return base
    return pd.concat([base, pd.DataFrame(extras, index=base.index)], axis=1)
