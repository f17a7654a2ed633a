"""Daytime de-duplication: which DiaObjects are one astrophysical object split in two.

Alert production makes a new DiaObject whenever a DiaSource falls outside the
association gate of every known one, so one source can end up split between
two DiaObjects a little more than a gate apart (the position of a faint
source scatters; a moving centroid drifts). Such a split has a tell-tale sign:
the pieces were never detected in the same visit, since one object gives at
most one DiaSource per visit. Two DiaObjects that both have a DiaSource of the
same visit are two objects, however close; they are never merged.

:func:`find_groups` forms the groups (pure, no I/O): DiaObjects closer than
``max_distance_arcsec`` are joined pair by pair, closest pair first (ties by
ID), into groups in which every two members are within the distance of each
other (complete linkage) and no two share a visit. With ``max_sigma`` a pair
must also agree within its errors: the separation at most ``max_sigma`` times
``sqrt(σ₁² + σ₂²)``, σ each object's per-axis position error (the mean of
``raErr²`` and ``decErr²``, plus ``astrometric_floor_arcsec`` in quadrature).
Pieces of one object scatter by their errors; two distinct objects an
arcsecond apart, each measured to 0.05″, are twenty standard deviations apart. Each group merges into its
oldest member: the smallest first-detection time (the earliest
``midpointMjdTai`` of its DiaSources; ``firstDiaSourceMjdTai`` when it has
none), then the smallest ``diaObjectId``. Rubin's ``ap_association``
(``DeduplicateDiaObjectsTask``, ``DeduplicateAllSkyDiaObjectsTask``) also keeps
the oldest object of a spatial cluster, with a 1.5″ clustering distance
(``maxClusteringDistance``), half again the 1.0″ association gate
(``AssociationTask.maxDistArcSeconds``); it clusters on position alone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from scipy.spatial import cKDTree

from core.errors import InputError
from tasks.calibrate import require_columns

__all__ = ["GROUP_COLUMNS", "DedupConfig", "find_groups", "first_detection"]

#: Columns of the frame :func:`find_groups` returns.
GROUP_COLUMNS = ("diaObjectId", "survivorId", "separationArcsec")


class DedupConfig(BaseModel, frozen=True, extra="forbid"):
    """Configuration of the daytime de-duplication (:mod:`flows.dedup`)."""

    max_distance_arcsec: float = Field(
        1.5,
        gt=0,
        le=60,
        description=(
            "DiaObjects closer than this (arcsec) that never shared a visit are merged. "
            "Rubin: DeduplicateDiaObjectsConfig.maxClusteringDistance (1.5)."
        ),
    )
    max_sigma: float | None = Field(
        5.0,
        gt=0,
        description=(
            "Also require the separation to be within this many standard deviations of "
            "the two positions' combined error (raErr, decErr and the floor below): pieces "
            "of one object agree within their errors, two objects an arcsecond apart with "
            "0.05 arcsec errors do not. None: position only, as Rubin's ap_association."
        ),
    )
    astrometric_floor_arcsec: float = Field(
        0.05,
        ge=0,
        description=(
            "Per-axis error (arcsec) added in quadrature to each DiaObject's raErr/decErr "
            "in the max_sigma test: astrometric systematics that do not average down."
        ),
    )
    region_order: int = Field(
        8,
        ge=0,
        le=12,
        description=(
            "HEALPix order of the sky regions merged one transaction each (order 8: "
            "0.23 deg pixels, about one LSSTCam detector)."
        ),
    )
    max_passes: int = Field(
        5,
        ge=1,
        description=(
            "Grouping passes per region: a merged object's new position can bring it "
            "within the distance of another piece; passes repeat until none is found."
        ),
    )


def first_detection(objects: pd.DataFrame, sources: pd.DataFrame) -> np.ndarray:
    """First-detection time (MJD) of each row of ``objects``.

    The earliest ``midpointMjdTai`` of the object's ``sources``; for an object
    without sources its ``firstDiaSourceMjdTai`` (NaN when that is missing too,
    which sorts last).
    """
    ids = objects["diaObjectId"].to_numpy(dtype=np.int64)
    first = pd.Series(np.nan, index=ids)
    if len(sources):
        t = pd.Series(
            sources["midpointMjdTai"].to_numpy(dtype=np.float64),
            index=sources["diaObjectId"].to_numpy(dtype=np.int64),
        )
        seen = t.groupby(level=0).min()
        first = first.fillna(seen.reindex(ids))
    if "firstDiaSourceMjdTai" in objects.columns:
        first = first.fillna(
            pd.Series(objects["firstDiaSourceMjdTai"].to_numpy(dtype=np.float64), index=ids)
        )
    return first.to_numpy()


def _unit(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    ra_r, dec_r = np.radians(ra), np.radians(dec)
    return np.stack(
        [np.cos(dec_r) * np.cos(ra_r), np.cos(dec_r) * np.sin(ra_r), np.sin(dec_r)], axis=1
    )


def _separation_arcsec(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    chord = np.linalg.norm(u - v, axis=-1)
    return np.degrees(2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))) * 3600.0


def _sigma2(objects: pd.DataFrame, config: DedupConfig) -> np.ndarray:
    """Per-axis position variance (arcsec²) of each object: its errors plus the floor.

    ``raErr``/``decErr`` (deg; ``raErr`` on α·cos δ) missing or null count as
    zero, leaving the floor alone.
    """
    var = np.zeros(len(objects))
    for name in ("raErr", "decErr"):
        if name in objects.columns:
            err = objects[name].to_numpy(dtype=np.float64, na_value=np.nan) * 3600.0
            var += np.where(np.isfinite(err), err * err, 0.0) / 2.0
    return var + config.astrometric_floor_arcsec**2


def _close(sep: np.ndarray, var_sum: np.ndarray, config: DedupConfig) -> np.ndarray:
    """Pairs within the distance and, with ``max_sigma``, consistent within their errors."""
    ok = sep < config.max_distance_arcsec
    if config.max_sigma is not None:
        ok &= sep <= config.max_sigma * np.sqrt(var_sum)
    return ok


def find_groups(objects: pd.DataFrame, sources: pd.DataFrame, config: DedupConfig) -> pd.DataFrame:
    """The merges to make among ``objects``: each merged-away object and its survivor.

    Parameters
    ----------
    objects : pandas.DataFrame
        Current DiaObjects: ``diaObjectId``, ``ra``, ``dec`` (deg), optionally
        ``raErr``, ``decErr`` (deg) and ``firstDiaSourceMjdTai``. IDs must be unique.
    sources : pandas.DataFrame
        DiaSources of (at least) every object that has a neighbour within the
        distance: ``diaObjectId``, ``visit``, ``midpointMjdTai``. Rows of other
        objects are ignored.
    config : DedupConfig

    Returns
    -------
    pandas.DataFrame
        :data:`GROUP_COLUMNS`: one row per merged-away DiaObject with the
        ``survivorId`` of its group and its separation from the survivor
        (arcsec), sorted by (``survivorId``, ``diaObjectId``). Survivors get no
        row; no candidates give an empty frame with these columns.

    Raises
    ------
    InputError
        A required column is missing, a position is not finite or an ID repeats.
    """
    require_columns(objects, ["diaObjectId", "ra", "dec"], "DiaObject")
    require_columns(sources, ["diaObjectId", "visit", "midpointMjdTai"], "DiaSource")
    empty = pd.DataFrame(
        {
            "diaObjectId": np.empty(0, np.int64),
            "survivorId": np.empty(0, np.int64),
            "separationArcsec": np.empty(0, np.float64),
        }
    )
    if len(objects) < 2:
        return empty
    ids = objects["diaObjectId"].to_numpy(dtype=np.int64)
    if np.unique(ids).size != ids.size:
        raise InputError("DiaObject: diaObjectId values repeat in the de-duplication input")
    ra = objects["ra"].to_numpy(dtype=np.float64)
    dec = objects["dec"].to_numpy(dtype=np.float64)
    if not (np.isfinite(ra).all() and np.isfinite(dec).all()):
        raise InputError("DiaObject: ra/dec must be finite for de-duplication")
    u = _unit(ra, dec)
    sigma2 = _sigma2(objects, config)
    chord = 2.0 * np.sin(np.radians(config.max_distance_arcsec / 3600.0) / 2.0)
    pairs = cKDTree(u).query_pairs(chord, output_type="ndarray")
    if len(pairs) == 0:
        return empty
    i, j = pairs[:, 0], pairs[:, 1]
    sep = _separation_arcsec(u[i], u[j])
    keep = _close(sep, sigma2[i] + sigma2[j], config)
    i, j, sep = i[keep], j[keep], sep[keep]
    if i.size == 0:
        return empty

    # visits of each candidate object (rows index into objects)
    cand = np.unique(np.concatenate([i, j]))
    src_ids = sources["diaObjectId"].to_numpy(dtype=np.int64)
    row_of = pd.Series(np.arange(ids.size), index=ids)
    in_cand = np.isin(src_ids, ids[cand])
    sv = pd.DataFrame(
        {
            "row": row_of.reindex(src_ids[in_cand]).to_numpy(),
            "visit": sources["visit"].to_numpy(dtype=np.int64)[in_cand],
        }
    ).drop_duplicates()
    visits = {int(r): set(g.tolist()) for r, g in sv.groupby("row")["visit"]}
    first = first_detection(objects, sources)

    # closest pair first, then by the IDs: the result does not depend on row order
    lo, hi = np.minimum(ids[i], ids[j]), np.maximum(ids[i], ids[j])
    order = np.lexsort((hi, lo, sep))
    group = {int(r): [int(r)] for r in cand}  # row -> members (shared list per group)
    seen = {int(r): set(visits.get(int(r), ())) for r in cand}
    for k in order:
        a, b = group[int(i[k])], group[int(j[k])]
        if a is b:
            continue
        va, vb = seen[a[0]], seen[b[0]]
        if not va.isdisjoint(vb):
            continue
        cross = _separation_arcsec(u[a][:, None, :], u[b][None, :, :])
        if not _close(cross, sigma2[a][:, None] + sigma2[b][None, :], config).all():
            continue
        merged = a + b
        union = va | vb
        for r in merged:
            group[r] = merged
            seen[r] = union

    out = []
    done: set[int] = set()
    for members in group.values():
        if len(members) < 2 or members[0] in done:
            continue
        done.update(members)
        rows = np.array(members)
        key = np.lexsort((ids[rows], np.where(np.isnan(first[rows]), np.inf, first[rows])))
        survivor = rows[key[0]]
        others = rows[key[1:]]
        out.append(
            pd.DataFrame(
                {
                    "diaObjectId": ids[others],
                    "survivorId": np.full(others.size, ids[survivor], dtype=np.int64),
                    "separationArcsec": _separation_arcsec(u[others], u[survivor][None, :]),
                }
            )
        )
    if not out:
        return empty
    return (
        pd.concat(out, ignore_index=True)
        .sort_values(["survivorId", "diaObjectId"], ignore_index=True)
        .astype({"diaObjectId": np.int64, "survivorId": np.int64})
    )
