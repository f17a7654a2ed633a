"""Rubin's production source filters, as pure functions (SPEC §8).

- :func:`filter_sources`: before association, drop sources whose
  ``reliability`` is below ``min_reliability`` (Rubin production: 0.5; a null
  reliability is kept), and set aside long-trailed sources — trail longer than
  ``max_trail_deg_per_day`` × exposure time (Rubin's ``TrailedSourceFilterTask``:
  10°/day, from DMTN-199) — as a separate output.
- :func:`good_dia_object_ids`: the DiaObjects eligible for forced photometry,
  those with at least ``min_good_sources`` *good* DiaSources (reliability ≥
  ``good_min_reliability``, trail ≤ ``good_max_trail_arcsec``, no
  ``glint_trail``, not ``isDipole``), as Rubin's
  ``DiaPipelineTask._selectGoodDiaObjects``.

``trailLength`` is in arcsec (the calibrated DiaSource column). Rows dropped
are returned and counted, never only logged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from core.errors import InputError
from core.frames import column_to_numpy, take_rows

__all__ = ["FilteredSources", "SourceFilterConfig", "filter_sources", "good_dia_object_ids"]


class SourceFilterConfig(BaseModel, frozen=True, extra="forbid"):
    """Configuration of :func:`filter_sources` and :func:`good_dia_object_ids`."""

    min_reliability: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Sources with reliability below this are dropped before association "
        "(null reliability is kept). Rubin: DiaPipelineTask minReliability (production 0.5).",
    )
    do_trailed_source_filter: bool = Field(
        True,
        description="Set aside sources trailed longer than max_trail_deg_per_day × exposure "
        "time. Rubin: DiaPipelineTask.doTrailedSourceFilter.",
    )
    max_trail_deg_per_day: float = Field(
        10.0,
        gt=0,
        description="Longest trail rate kept (deg/day). Rubin: TrailedSourceFilterTask, "
        "DMTN-199 (10°/day ≈ 0.417″/s).",
    )
    do_select_good_dia_objects: bool = Field(
        True,
        description="Forced photometry only for DiaObjects with at least min_good_sources good "
        "DiaSources (off: every DiaObject forced photometry would measure). Rubin: "
        "DiaPipelineTask._selectGoodDiaObjects.",
    )
    min_good_sources: int = Field(
        2,
        ge=0,
        description="Good DiaSources a DiaObject needs for forced photometry. Rubin: "
        "DiaPipelineTask._selectGoodDiaObjects.",
    )
    good_min_reliability: float = Field(
        0.5, ge=0, le=1, description="A good DiaSource has reliability ≥ this."
    )
    good_max_trail_arcsec: float = Field(
        1.4, ge=0, description="A good DiaSource has trailLength ≤ this (arcsec)."
    )


@dataclass
class FilteredSources:
    """Result of :func:`filter_sources`: kept, unreliable and long-trailed sources."""

    sources: pd.DataFrame
    unreliable: pd.DataFrame
    trailed: pd.DataFrame

    @property
    def n_unreliable(self) -> int:
        """How many sources the reliability cut dropped."""
        return len(self.unreliable)

    @property
    def n_trailed(self) -> int:
        """How many sources the long-trail cut dropped."""
        return len(self.trailed)


def _float(df: pd.DataFrame, name: str, fill: float) -> np.ndarray:
    if name not in df.columns:
        return np.full(len(df), fill)
    try:
        return column_to_numpy(df, name, np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise InputError(f"DiaSource.{name}: not numeric ({exc})") from exc


def _flag(df: pd.DataFrame, name: str) -> np.ndarray:
    if name not in df.columns:
        return np.zeros(len(df), dtype=bool)
    return column_to_numpy(df, name, bool, na_value=False)


def filter_sources(
    sources: pd.DataFrame, exposure_time: float, config: SourceFilterConfig | None = None
) -> FilteredSources:
    """Split calibrated DiaSources into kept, unreliable and long-trailed ones.

    Parameters
    ----------
    sources : pandas.DataFrame
        Calibrated DiaSources; ``reliability`` and ``trailLength`` (arcsec) are
        optional (absent: nothing is dropped for that reason).
    exposure_time : float
        Exposure time (s).
    config : SourceFilterConfig

    Returns
    -------
    FilteredSources
        Row order kept within each part. A source both unreliable and trailed
        counts as unreliable.
    """
    config = config or SourceFilterConfig()
    if not exposure_time > 0:
        raise InputError(f"exposureTime must be > 0 s, got {exposure_time!r}")
    rel = _float(sources, "reliability", np.nan)
    unreliable = rel < config.min_reliability  # NaN compares False: null kept
    trail = _float(sources, "trailLength", np.nan)
    limit = config.max_trail_deg_per_day * 3600.0 * exposure_time / 86400.0
    trailed = ~unreliable & (trail > limit)
    if not config.do_trailed_source_filter:
        trailed[:] = False
    keep = ~(unreliable | trailed)
    return FilteredSources(
        sources=take_rows(sources, np.flatnonzero(keep)),
        unreliable=take_rows(sources, np.flatnonzero(unreliable)),
        trailed=take_rows(sources, np.flatnonzero(trailed)),
    )


def good_dia_object_ids(
    history: pd.DataFrame, config: SourceFilterConfig | None = None
) -> np.ndarray:
    """Sorted ids of the DiaObjects with at least ``min_good_sources`` good DiaSources.

    ``history`` holds every DiaSource to count (loaded history plus this
    visit's associated sources) with ``diaObjectId``; rows with a null or 0
    ``diaObjectId`` (solar-system sources) count for no object. A null
    reliability does not make a source bad (as the reliability cut keeps it).
    """
    config = config or SourceFilterConfig()
    if "diaObjectId" not in history.columns:
        raise InputError("DiaSource history: missing required column diaObjectId")
    oid = column_to_numpy(history, "diaObjectId", np.int64, na_value=0)
    rel = _float(history, "reliability", np.nan)
    trail = _float(history, "trailLength", 0.0)
    good = (
        (oid != 0)
        & ~(rel < config.good_min_reliability)
        & ~(trail > config.good_max_trail_arcsec)
        & ~_flag(history, "glint_trail")
        & ~_flag(history, "isDipole")
    )
    ids, counts = np.unique(oid[good], return_counts=True)
    return ids[counts >= config.min_good_sources]
