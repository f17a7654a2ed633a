"""Associate a detector's DiaSources with known solar-system objects (SPEC §6b).

The equivalent of Rubin's ``ap_association.SolarSystemAssociationTask``, run
before DIA association as Rubin's ``DiaPipelineTask`` does:

1. Candidates: the rows of the visit's ephemeris table (Rubin: MPSky) whose
   predicted position falls on the detector, its pixel bbox padded by
   ``min(max_pixel_margin, largest prediction uncertainty in pixels)``
   (Rubin: ``maxPixelMargin``, 100 px).
2. Pairs: every (source, object) pair closer than ``max_dist_arc_seconds``
   (Rubin: ``maxDistArcSeconds``, 1″), from a kd-tree on unit vectors (RA
   wrap-around and the poles need no special case).
3. One-to-one assignment: the most pairs, and among those the smallest sum
   of squared offsets (:func:`scipy.optimize.linear_sum_assignment` over the
   pairs' sources and objects). Rubin takes pairs greedily from the closest;
   the optimum equals it whenever no two predictions compete for a source.
4. A matched source gets the object's ``ssObjectId`` (and ``diaObjectId`` 0,
   as Rubin's solar-system DiaSources) and one ``SSSource`` row: what the
   ephemeris gives, the ecliptic and Galactic coordinates of the *observed*
   position, the measured offsets ``ephOffset*`` (arcsec; along-track is the
   direction of the predicted motion) and ``diaDistanceRank`` (1 when the
   source is the nearest one to the prediction). Matched sources create no
   DiaObject and get no forced photometry; the rest go on to DIA association.

No ephemeris table (``None``) makes the stage a no-op. A malformed table — a
missing column, a non-finite predicted position, a duplicate ``ssObjectId`` —
is an :class:`~core.errors.InputError` naming the file and the problem.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from apdb import sdm
from core.errors import InputError
from core.frames import column_to_numpy, take_rows
from tasks.calibrate import east_north, require_columns, unit_vectors

__all__ = [
    "EPHEMERIS_REQUIRED",
    "SsoAssociation",
    "SsoAssociationConfig",
    "associate_solar_system",
]

DEG = np.pi / 180.0
ARCSEC = DEG / 3600.0
#: Columns an ephemeris table must have.
EPHEMERIS_REQUIRED = ("ssObjectId", "ephRa", "ephDec")
#: Obliquity of the J2000 ecliptic (IAU 1976), radians.
_OBLIQUITY = 84381.448 / 3600.0 * DEG


class SsoAssociationConfig(BaseModel, frozen=True, extra="forbid"):
    """Configuration of :func:`associate_solar_system`."""

    do_solar_system_association: bool = Field(
        True,
        description="Associate known solar-system objects before DiaObjects when an ephemeris "
        "table is given. Rubin: DiaPipelineTask.doSolarSystemAssociation.",
    )
    max_dist_arc_seconds: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="Largest source–prediction distance (arcsec) of a match. Rubin: "
        "SolarSystemAssociationTask.maxDistArcSeconds.",
    )
    max_pixel_margin: int = Field(
        100,
        ge=0,
        description="Most padding (pixels) of the detector bbox when selecting predictions on "
        "it; the padding is the smaller of this and the largest prediction uncertainty. "
        "Rubin: SolarSystemAssociationTask.maxPixelMargin.",
    )
    pixel_scale_arcsec: float = Field(
        0.2, gt=0, description="Pixel scale (arcsec) to turn the uncertainty into a pixel margin."
    )


@dataclass
class SsoAssociation:
    """Result of :func:`associate_solar_system`.

    Attributes
    ----------
    sources : pandas.DataFrame
        The sources not matched to a solar-system object (input columns, input order):
        these go on to DIA association.
    sso_sources : pandas.DataFrame
        The matched sources with ``ssObjectId`` set and ``diaObjectId`` 0.
    ss_sources : pandas.DataFrame
        One SDM ``SSSource`` row per matched source, in ``sso_sources`` order.
    orbits : pandas.DataFrame
        The ephemeris rows (orbit record included) of the matched objects, in
        ``sso_sources`` order, for the alerts' ``mpc_orbits``.
    n_candidates : int
        Predictions on the (padded) detector.
    n_associated : int
        Sources matched to a solar-system object.
    """

    sources: pd.DataFrame
    sso_sources: pd.DataFrame
    ss_sources: pd.DataFrame
    orbits: pd.DataFrame
    n_candidates: int = 0
    n_associated: int = 0


def _check_ephemerides(eph: pd.DataFrame, where: str) -> None:
    require_columns(eph, EPHEMERIS_REQUIRED, where)
    for col in ("ephRa", "ephDec"):
        v = column_to_numpy(eph, col, np.float64, na_value=np.nan)
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            ids = column_to_numpy(eph, "ssObjectId", np.float64, na_value=np.nan)[bad[:3]]
            raise InputError(
                f"{where}: {col} is not finite in {bad.size} row(s) (ssObjectId "
                f"{', '.join(str(int(i)) if np.isfinite(i) else 'null' for i in ids)})"
            )
    ids = eph["ssObjectId"]
    if ids.isna().any():
        raise InputError(f"{where}: ssObjectId is null in {int(ids.isna().sum())} row(s)")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise InputError(
            f"{where}: duplicate ssObjectId {', '.join(str(int(i)) for i in dup.unique()[:3])}"
        )


@functools.cache
def _galactic_matrix() -> np.ndarray:
    """ICRS → Galactic rotation (rows: Galactic x, y, z in ICRS axes), from astropy."""
    from astropy.coordinates import ICRS, Galactic, SkyCoord

    basis = SkyCoord(
        x=[1.0, 0.0, 0.0],
        y=[0.0, 1.0, 0.0],
        z=[0.0, 0.0, 1.0],
        frame=ICRS(),
        representation_type="cartesian",
    ).transform_to(Galactic())
    return basis.cartesian.xyz.value  # column k is ICRS axis k in Galactic coordinates


def _lonlat(vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lon = np.degrees(np.arctan2(vec[:, 1], vec[:, 0])) % 360.0
    lat = np.degrees(np.arcsin(np.clip(vec[:, 2], -1.0, 1.0)))
    return lon, lat


def _on_detector(eph: pd.DataFrame, wcs, shape: tuple[int, int], config) -> np.ndarray:
    """Rows of ``eph`` predicted inside the detector bbox padded by Rubin's margin."""
    ny, nx = shape
    err = 0.0
    for col in ("ephRaErr", "ephDecErr"):
        if col in eph.columns and len(eph):
            e = column_to_numpy(eph, col, np.float64, na_value=np.nan)
            if np.isfinite(e).any():
                err = max(err, float(np.nanmax(e)))
    margin = min(float(config.max_pixel_margin), err / config.pixel_scale_arcsec)
    ra = column_to_numpy(eph, "ephRa", np.float64)
    dec = column_to_numpy(eph, "ephDec", np.float64)
    x, y = wcs.world_to_pixel_values(ra, dec)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    lo = -0.5 - margin
    return np.flatnonzero((x >= lo) & (x < nx - 0.5 + margin) & (y >= lo) & (y < ny - 0.5 + margin))


@functools.cache
def _no_ss_sources() -> pd.DataFrame:
    # building the 40-column empty SSSource frame costs ~5 ms of CPU; most detectors
    # have no match, so it is built once per process and handed out as shallow copies
    return sdm.empty_frame("SSSource")


def _empty(sources: pd.DataFrame, eph: pd.DataFrame | None) -> SsoAssociation:
    orbits = eph.iloc[:0] if eph is not None else pd.DataFrame()
    none = sources.iloc[:0]
    if "ssObjectId" not in none.columns:
        none = none.assign(ssObjectId=np.zeros(0, np.int64))
    return SsoAssociation(
        sources=sources,
        sso_sources=none,
        ss_sources=_no_ss_sources().copy(deep=False),
        orbits=orbits,
    )


def associate_solar_system(
    sources: pd.DataFrame,
    ephemerides: pd.DataFrame | None,
    wcs,
    shape: tuple[int, int],
    config: SsoAssociationConfig | None = None,
    *,
    ephemeris_file: str = "ephemerides.parquet",
) -> SsoAssociation:
    """Match ``sources`` to the known solar-system objects predicted on the detector.

    Parameters
    ----------
    sources : pandas.DataFrame
        Calibrated DiaSources: ``diaSourceId``, ``ra``, ``dec`` (deg). Rows
        with a non-finite position are never matched (they go on unmatched).
    ephemerides : pandas.DataFrame or None
        The visit's ephemeris table (:data:`EPHEMERIS_REQUIRED` plus any of
        the ``SSSource`` columns and the orbit record); ``None``: no-op.
    wcs : astropy.wcs.WCS
        The detector's WCS (0-based pixels), to keep predictions on the detector.
    shape : (int, int)
        Detector image shape ``(ny, nx)``.
    config : SsoAssociationConfig
    ephemeris_file : str
        Name of the ephemeris file, for error messages.

    Returns
    -------
    SsoAssociation

    Raises
    ------
    InputError
        The ephemeris table lacks a required column, has a non-finite
        predicted position or a duplicate ``ssObjectId``; or ``sources``
        lacks ``diaSourceId``, ``ra`` or ``dec``.
    """
    config = config or SsoAssociationConfig()
    if ephemerides is None or not config.do_solar_system_association:
        return _empty(sources, ephemerides)
    _check_ephemerides(ephemerides, ephemeris_file)
    require_columns(sources, ["diaSourceId", "ra", "dec"], "DiaSource")
    if len(ephemerides) == 0 or len(sources) == 0:
        return _empty(sources, ephemerides)
    rows = _on_detector(ephemerides, wcs, shape, config)
    eph = take_rows(ephemerides, rows)
    n_cand = len(eph)
    s_ra = column_to_numpy(sources, "ra", np.float64, na_value=np.nan)
    s_dec = column_to_numpy(sources, "dec", np.float64, na_value=np.nan)
    finite = np.flatnonzero(np.isfinite(s_ra) & np.isfinite(s_dec))
    if n_cand == 0 or finite.size == 0:
        out = _empty(sources, ephemerides)
        out.n_candidates = n_cand
        return out
    e_ra = column_to_numpy(eph, "ephRa", np.float64)
    e_dec = column_to_numpy(eph, "ephDec", np.float64)
    vs = unit_vectors(s_ra[finite], s_dec[finite])
    ve = unit_vectors(e_ra, e_dec)
    chord = 2.0 * np.sin(config.max_dist_arc_seconds * ARCSEC / 2.0)
    pairs = cKDTree(ve).sparse_distance_matrix(cKDTree(vs), chord, output_type="coo_matrix")
    if pairs.nnz == 0:
        out = _empty(sources, ephemerides)
        out.n_candidates = n_cand
        return out
    obj, src, dist = pairs.row, pairs.col, pairs.data
    # one-to-one: the most pairs, then the smallest sum of squared offsets
    uo, oi = np.unique(obj, return_inverse=True)
    us, si = np.unique(src, return_inverse=True)
    big = 1.0 + len(dist) * chord**2 * 10.0
    cost = np.full((len(uo), len(us)), big)
    cost[oi, si] = dist**2
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] < big
    m_obj, m_src = uo[r[ok]], us[c[ok]]
    # rank of each pair among its prediction's pairs by distance (1 = nearest source)
    by = np.lexsort((dist, obj))
    first = np.searchsorted(obj[by], obj[by], side="left")
    pair_rank = np.empty(len(dist), dtype=np.int16)
    pair_rank[by] = np.arange(len(dist)) - first + 1
    pair_key = obj.astype(np.int64) * len(finite) + src
    at = np.argsort(pair_key)
    found = at[np.searchsorted(pair_key[at], m_obj.astype(np.int64) * len(finite) + m_src)]
    rank = pair_rank[found]
    order = np.argsort(finite[m_src], kind="stable")
    m_obj, m_src, rank = m_obj[order], m_src[order], rank[order]
    src_rows = finite[m_src]
    return _result(sources, eph, src_rows, m_obj, rank, n_cand)


def _result(sources, eph, src_rows, obj_rows, rank, n_cand) -> SsoAssociation:
    n = len(src_rows)
    keep = np.ones(len(sources), dtype=bool)
    keep[src_rows] = False
    rest = take_rows(sources, np.flatnonzero(keep))
    matched = take_rows(sources, src_rows).copy()
    ss_ids = column_to_numpy(eph, "ssObjectId", np.int64)[obj_rows]
    matched["ssObjectId"] = (
        pd.array(ss_ids, dtype=matched["ssObjectId"].dtype)
        if ("ssObjectId" in matched.columns and str(matched["ssObjectId"].dtype) != "object")
        else ss_ids
    )
    if "diaObjectId" in matched.columns:
        matched["diaObjectId"] = pd.array(np.zeros(n, np.int64), dtype=matched["diaObjectId"].dtype)
    orbits = take_rows(eph, obj_rows)
    s_ra = column_to_numpy(matched, "ra", np.float64)
    s_dec = column_to_numpy(matched, "dec", np.float64)
    e_ra = column_to_numpy(orbits, "ephRa", np.float64)
    e_dec = column_to_numpy(orbits, "ephDec", np.float64)
    east, north = east_north(e_ra, e_dec)
    v = unit_vectors(s_ra, s_dec)
    off_ra = np.einsum("ij,ij->i", v, east) / ARCSEC  # arcsec, cos δ included
    off_dec = np.einsum("ij,ij->i", v, north) / ARCSEC
    data: dict[str, np.ndarray] = {}
    for col in sdm.dtypes("SSSource"):
        if col in orbits.columns:
            data[col] = orbits[col].to_numpy()
    if "ephRateRa" in orbits.columns and "ephRateDec" in orbits.columns:
        rr = column_to_numpy(orbits, "ephRateRa", np.float64, na_value=np.nan)
        rd = column_to_numpy(orbits, "ephRateDec", np.float64, na_value=np.nan)
        rate = np.hypot(rr, rd)
        with np.errstate(invalid="ignore", divide="ignore"):
            ur, ud = np.where(rate > 0, rr / rate, np.nan), np.where(rate > 0, rd / rate, np.nan)
        data["ephOffsetAlongTrack"] = off_ra * ur + off_dec * ud
        data["ephOffsetCrossTrack"] = -off_ra * ud + off_dec * ur
    ecl = _ecliptic_matrix()
    data["eclLambda"], data["eclBeta"] = _lonlat(v @ ecl.T)
    data["galLon"], data["galLat"] = _lonlat(v @ _galactic_matrix().T)
    data["diaSourceId"] = column_to_numpy(matched, "diaSourceId", np.int64)
    data["ssObjectId"] = ss_ids
    data["ephOffsetRa"] = off_ra
    data["ephOffsetDec"] = off_dec
    data["ephOffset"] = np.hypot(off_ra, off_dec)
    data["diaDistanceRank"] = rank
    ss = sdm.frame(data, "SSSource", n)
    return SsoAssociation(
        sources=rest,
        sso_sources=matched,
        ss_sources=ss,
        orbits=orbits.reset_index(drop=True),
        n_candidates=n_cand,
        n_associated=n,
    )


def _ecliptic_matrix() -> np.ndarray:
    """ICRS → J2000 ecliptic rotation (rows: ecliptic axes in ICRS)."""
    c, s = np.cos(_OBLIQUITY), np.sin(_OBLIQUITY)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])
