"""The APDB interface every backend implements (:class:`Apdb`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from apdb.config import ApdbConfig
from apdb.region import Region

__all__ = ["Apdb", "BulkLoadResult", "MergeResult", "RegionGuard", "StoreResult"]


@dataclass(frozen=True)
class StoreResult:
    """What :meth:`Apdb.store` did for one (visit, detector).

    Attributes
    ----------
    visit, detector : int
        The marker written (or found).
    already_stored : bool
        True when the (visit, detector) had been stored before: nothing was
        written and the counts are zero.
    n_objects : int
        DiaObject versions written (new objects plus new versions of old ones).
    n_objects_updated : int
        Of those, objects that already had a version, now closed
        (``validityEndMjdTai`` set).
    n_sources, n_forced_sources : int
        DiaSource and DiaForcedSource rows written.
    """

    visit: int
    detector: int
    already_stored: bool
    n_objects: int = 0
    n_objects_updated: int = 0
    n_sources: int = 0
    n_forced_sources: int = 0


@dataclass(frozen=True, eq=False)
class RegionGuard:
    """What a store requires: the DiaObjects of a region as they were when it was read.

    A detector's association is valid only against the DiaObjects it loaded.
    If another visit stored DiaObjects into the same footprint between this
    detector's load and its store (two overlapping visits processed at the
    same time), storing the association would create a second DiaObject for
    every source both visits saw there. :meth:`Apdb.store` with a guard checks,
    under a lock on the region's sky pixels and in the store's transaction,
    that the region still holds exactly these DiaObject versions; otherwise it
    writes nothing and raises :class:`core.errors.StaleLoadError`.

    Versions whose ``validityStartMjdTai`` equals the store's ``time_mjd`` are
    not a conflict: they were written by the same visit run (another detector
    of it, whose footprint touches this one at an edge), which the
    association of one visit never sees anyway.

    Attributes
    ----------
    region : apdb.region.Region
        The sky region the DiaObjects were read from (the detector footprint).
    object_ids : numpy.ndarray
        int64 ``diaObjectId`` of every DiaObject :meth:`Apdb.get_objects` returned.
    validity_starts : numpy.ndarray
        float64 ``validityStartMjdTai`` of those versions, same order.
    """

    region: Region
    object_ids: np.ndarray
    validity_starts: np.ndarray

    @classmethod
    def of(cls, region: Region, objects: pd.DataFrame) -> RegionGuard:
        """The guard for ``objects``, the frame :meth:`Apdb.get_objects` returned for ``region``."""
        return cls(
            region=region,
            object_ids=objects["diaObjectId"].to_numpy(dtype=np.int64).copy(),
            validity_starts=pd.to_numeric(objects["validityStartMjdTai"], errors="coerce")
            .to_numpy(dtype=np.float64)
            .copy(),
        )


@dataclass(frozen=True)
class BulkLoadResult:
    """What :meth:`Apdb.bulk_load` wrote: rows per table and (visit, detector) markers."""

    n_objects: int
    n_sources: int
    n_forced_sources: int
    n_markers: int


@dataclass(frozen=True)
class MergeResult:
    """What :meth:`Apdb.merge_objects` wrote.

    Attributes
    ----------
    n_survivors : int
        DiaObjects kept, each with a new version.
    n_merged : int
        DiaObjects merged away: their open version closed, gone from the latest table.
    n_sources : int
        DiaSources reassigned to a survivor.
    n_forced_sources : int
        DiaForcedSources reassigned to a survivor.
    n_forced_dropped : int
        DiaForcedSources of merged-away objects deleted because their survivor
        already has forced photometry of the same (visit, detector).
    """

    n_survivors: int
    n_merged: int
    n_sources: int
    n_forced_sources: int
    n_forced_dropped: int


class Apdb(ABC):
    """The Alert Production Database: DiaObjects, DiaSources, DiaForcedSources.

    Frames returned carry exactly the columns of the SDM table
    (:mod:`apdb.sdm`), in schema order and dtype; an empty result is an empty
    frame with those columns. Row order is not defined.
    """

    config: ApdbConfig

    def history_start(self, visit_mjd: float) -> float:
        """Earliest ``midpointMjdTai`` (MJD TAI) loaded for a visit at ``visit_mjd``."""
        return float(visit_mjd) - self.config.history_days

    @abstractmethod
    def get_objects(self, region: Region) -> pd.DataFrame:
        """The latest version of every DiaObject inside ``region``.

        Parameters
        ----------
        region : apdb.region.Region
            Sky region; rows come from its pixel cover, then are filtered exactly.

        Returns
        -------
        pandas.DataFrame
            All SDM ``DiaObject`` columns; positions in deg.
        """

    @abstractmethod
    def get_sources(
        self, object_ids: Iterable[int] | np.ndarray, since_mjd: float | None
    ) -> pd.DataFrame:
        """DiaSources of the given DiaObjects with ``midpointMjdTai >= since_mjd``.

        ``since_mjd`` None reads the whole history. Returns all SDM
        ``DiaSource`` columns; no IDs gives an empty frame.
        """

    @abstractmethod
    def get_forced_sources(
        self, object_ids: Iterable[int] | np.ndarray, since_mjd: float | None
    ) -> pd.DataFrame:
        """DiaForcedSources of the given DiaObjects with ``midpointMjdTai >= since_mjd``."""

    @abstractmethod
    def get_object_history(self, object_ids: Iterable[int] | np.ndarray) -> pd.DataFrame:
        """Every stored version of the given DiaObjects (all SDM ``DiaObject`` columns).

        A version is the row a store wrote: ``validityStartMjdTai`` is that
        store's time (also in its marker, :meth:`visit_summary`), and
        ``validityEndMjdTai`` is set when a later store replaced it.
        """

    @abstractmethod
    def store(
        self,
        visit: int,
        detector: int,
        objects: pd.DataFrame,
        sources: pd.DataFrame,
        forced_sources: pd.DataFrame,
        *,
        time_mjd: float | None = None,
        ss_sources: pd.DataFrame | None = None,
        guard: RegionGuard | None = None,
    ) -> StoreResult:
        """Store one detector's results in one transaction, with its marker.

        Parameters
        ----------
        visit, detector : int
            The (visit, detector) marker written in the same transaction.
        objects : pandas.DataFrame
            New DiaObjects and new versions of existing ones (SDM ``DiaObject``
            columns; ``validityStartMjdTai``/``validityEndMjdTai`` are set here).
        sources, forced_sources : pandas.DataFrame
            New DiaSources and DiaForcedSources of this (visit, detector).
        time_mjd : float, optional
            Validity start (MJD TAI) of the new object versions; default the
            first ``midpointMjdTai`` of ``sources`` or ``forced_sources``.
        ss_sources : pandas.DataFrame, optional
            SDM ``SSSource`` rows of the solar-system DiaSources among ``sources``.
        guard : RegionGuard, optional
            The DiaObjects the association was made against; checked under a
            lock on the region's sky pixels, in the transaction (see
            :class:`RegionGuard`). A (visit, detector) stored before is
            reported as ``already_stored`` whatever the guard says.

        Returns
        -------
        StoreResult
            ``already_stored`` is True, and nothing is written, when the
            (visit, detector) was stored before.

        Raises
        ------
        core.errors.StaleLoadError
            With ``guard``: another store changed the region's DiaObjects
            since they were read; nothing was written.
        """

    @abstractmethod
    def bulk_load(
        self,
        objects: pd.DataFrame,
        sources: pd.DataFrame,
        forced_sources: pd.DataFrame,
        markers: pd.DataFrame | None = None,
    ) -> BulkLoadResult:
        """Fill the database with history in one transaction (the supported way to seed it).

        Parameters
        ----------
        objects : pandas.DataFrame
            The latest version of each DiaObject (SDM ``DiaObject`` columns,
            ``validityStartMjdTai`` required; ``validityEndMjdTai`` is written
            null). One row per ``diaObjectId``; no ID may already be stored.
        sources, forced_sources : pandas.DataFrame
            DiaSources and DiaForcedSources of any number of (visit, detector).
        markers : pandas.DataFrame, optional
            ``visit``, ``detector`` of every (visit, detector) the history
            covers, including those that wrote no row; default the pairs seen
            in ``sources`` and ``forced_sources``. Each gets an
            ``ApdbVisitDetector`` marker with its row counts, so a later
            :meth:`store` of the same pair writes nothing.

        Returns
        -------
        BulkLoadResult

        Raises
        ------
        core.errors.InputError
            A frame lacks a required SDM column, or a column does not hold
            values of its SDM type (the message names table and column);
            checked before anything is written.
        core.errors.ApdbError
            A marker or a row is already stored; nothing is written.
        """

    @abstractmethod
    def object_pixels(self, order: int) -> np.ndarray:
        """HEALPix nest pixels at ``order`` that hold the position of a current DiaObject.

        Parameters
        ----------
        order : int
            HEALPix order, at most the database's ``config:healpix_order``.

        Returns
        -------
        numpy.ndarray
            Sorted unique int64 pixel numbers (empty for an empty database).
        """

    @abstractmethod
    def merge_objects(
        self,
        merges: pd.DataFrame,
        survivors: pd.DataFrame,
        *,
        time_mjd: float,
        expected: pd.DataFrame,
    ) -> MergeResult:
        """Merge DiaObjects into survivors in one transaction (daytime de-duplication).

        The DiaSources of every merged-away object are reassigned to its
        survivor (``diaObjectId`` updated, as Rubin's
        ``reassignDiaSourcesToDiaObjects``); its DiaForcedSources are
        reassigned too, except those of a (visit, detector) where the survivor
        (or an earlier merged-away object of the same survivor, by
        ``diaForcedSourceId``) already has one, which are deleted; its open
        version is closed at ``time_mjd`` (Rubin's ``setValidityEnd``) and it
        leaves the latest-version table. Each survivor gets the new version
        given in ``survivors``, closing its previous one.

        Parameters
        ----------
        merges : pandas.DataFrame
            ``diaObjectId`` (merged away) and ``survivorId``; one row per
            merged-away object, never a survivor itself.
        survivors : pandas.DataFrame
            The new version of each survivor (SDM ``DiaObject`` columns, one row
            per ``survivorId``); ``validityStartMjdTai`` is set to ``time_mjd``.
        time_mjd : float
            Validity end of the closed versions and start of the new ones (MJD TAI).
        expected : pandas.DataFrame
            ``diaObjectId``, ``validityStartMjdTai`` of the current version of
            every object involved, as read before the merge was computed.

        Returns
        -------
        MergeResult

        Raises
        ------
        core.errors.InputError
            Malformed frames, a survivor that is also merged away, or
            ``time_mjd`` not later than a current version's validity start;
            nothing is written.
        core.errors.ApdbError
            An object involved is no longer current or has a newer version than
            ``expected`` (a store or another merge ran in between); nothing is
            written.
        """

    @abstractmethod
    def is_done(self, visit: int, detector: int) -> bool:
        """Whether (visit, detector) has been stored."""

    @abstractmethod
    def done_detectors(self, visit: int) -> set[int]:
        """Detectors of ``visit`` that have been stored."""

    @abstractmethod
    def visit_summary(self, visit: int) -> pd.DataFrame:
        """Per stored detector of ``visit``: row counts written and store time."""

    @abstractmethod
    def row_counts(self) -> dict[str, int]:
        """Number of rows in each APDB table."""

    @abstractmethod
    def close(self) -> None:
        """Release the connections."""

    def __enter__(self) -> Apdb:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
