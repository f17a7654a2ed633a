"""Deterministic 64-bit IDs (docs/design.md §3).

``ccdVisitId = visit * n_detectors + detector`` packed in ``ccd_exposure_id_bits``
bits; ``diaSourceId = (ccdVisitId << counter_bits) | row`` with
``counter_bits = 63 - ccd_exposure_id_bits`` so every ID is a non-negative
signed 64-bit integer. DiaForcedSource IDs use the same layout in their own
ID space (their own table), so the same packing is reused for them.

Every field is range-checked; an overflow raises :class:`IdOverflowError`
instead of wrapping.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from core.errors import IdOverflowError

__all__ = ["IdConfig", "IdPacker"]


class IdConfig(BaseModel, frozen=True, extra="forbid"):
    """How IDs are packed."""

    ccd_exposure_id_bits: int = Field(
        43,
        ge=1,
        le=62,
        description="Bits holding the packed (visit, detector) ccdVisitId; the rest of the 63 "
        "usable bits count rows. Rubin: ``ccdExposureIdBits`` of the instrument's ID packer.",
    )
    n_detectors: int = Field(
        256,
        ge=1,
        description="Detector numbers run 0..n_detectors-1 (LSSTCam: 189 science detectors, "
        "numbered below 205).",
    )


class IdPacker:
    """Pack and unpack DiaSource / DiaForcedSource IDs.

    Parameters
    ----------
    config : IdConfig
        Bit layout.
    """

    def __init__(self, config: IdConfig | None = None) -> None:
        self.config = config or IdConfig()
        self.ccd_bits = self.config.ccd_exposure_id_bits
        self.counter_bits = 63 - self.ccd_bits
        self.max_ccd_visit_id = (1 << self.ccd_bits) - 1
        self.max_row = (1 << self.counter_bits) - 1
        self.max_visit = (self.max_ccd_visit_id - (self.config.n_detectors - 1)) // (
            self.config.n_detectors
        )

    def ccd_visit_id(self, visit: int, detector: int) -> int:
        """Pack (visit, detector) into a ccdVisitId, checking both fields."""
        visit, detector = int(visit), int(detector)
        if not 0 <= detector < self.config.n_detectors:
            raise IdOverflowError(f"detector {detector} outside 0..{self.config.n_detectors - 1}")
        if not 0 <= visit <= self.max_visit:
            raise IdOverflowError(
                f"visit {visit} outside 0..{self.max_visit} "
                f"({self.ccd_bits} ccdExposureIdBits, {self.config.n_detectors} detectors)"
            )
        return visit * self.config.n_detectors + detector

    def pack(self, visit: int, detector: int, rows: np.ndarray | int) -> np.ndarray:
        """IDs for ``rows`` (0-based counters) of one (visit, detector), as int64.

        Raises
        ------
        IdOverflowError
            If visit, detector or any row does not fit its field.
        """
        ccd = self.ccd_visit_id(visit, detector)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() > self.max_row):
            raise IdOverflowError(
                f"row counter outside 0..{self.max_row} ({self.counter_bits} counter bits): "
                f"got {int(rows.min())}..{int(rows.max())}"
            )
        return (np.int64(ccd) << np.int64(self.counter_bits)) | rows

    def unpack(self, ids: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inverse of :meth:`pack`: (visit, detector, row) arrays."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and ids.min() < 0:
            raise IdOverflowError(f"negative ID {int(ids.min())} was not made by this packer")
        ccd = ids >> np.int64(self.counter_bits)
        rows = ids & np.int64(self.max_row)
        return ccd // self.config.n_detectors, ccd % self.config.n_detectors, rows
