"""Deterministic 64-bit IDs (docs/design.md §3).

``diaSourceId = (ccdVisitId << counter_bits) | row`` with ``counter_bits = 63 -
ccd_exposure_id_bits``, so every ID is a non-negative signed 64-bit integer;
``ccdVisitId`` packs (visit, detector) in ``ccd_exposure_id_bits`` bits.
DiaForcedSource IDs use the same layout in their own ID space (their own
table), so the same packing is reused for them. Two ways to pack the visit:

``visit_packing = "lsstcam"`` (the default)
    LSSTCam visit and exposure ids are ``day_obs·10⁵ + seq_num`` (``day_obs``
    the observing night as YYYYMMDD, ``seq_num`` the exposure's number in the
    night), e.g. ``2026030500055``. As a number that needs 41 bits, 49 with the
    detector, leaving too few for the rows of a crowded detector; but most of
    those numbers are not dates. So, like Rubin's ``RubinDimensionPacker``
    (obs_lsst ``_packer.py``, which replaced the ``LsstCamExposureIdPacker`` /
    ``_computeDetectorExposureId`` packing: ``detector + n_detectors·(seq_num
    + n_seq_nums·(day ordinal − ordinal(day_obs_begin) + …))``, with
    ``day_obs_begin = 20100101`` and 40 bits for visit + detector), the night
    is turned into a day count::

        ccdVisitId = detector + n_detectors · (seq_num + 10⁵ · day)
        day = 1 + (days from 2010-01-01 to day_obs), or 0 when day_obs = 0

    With the defaults (256 detectors, LSSTCam's 189 science detectors are
    numbered below 205; 40 bits, as Rubin's packer) that holds every night from
    2010-01-01 to 2127 and every ``seq_num < 10⁵``, and leaves 23 bits, 8.4
    million rows, for the DiaSources of one detector. It is reversible
    (:meth:`IdPacker.unpack` gives back the visit id) and deterministic.
    Visit numbers below 10⁵ (``day_obs = 0``: simulations, test data) take
    day 0, so they pack too.
``visit_packing = "linear"``
    ``ccdVisitId = visit · n_detectors + detector``: for instruments whose visit
    numbers are plain counters (ZTF exposure ids, DECam exposure numbers).

Every field is range-checked; an overflow or an impossible date raises
:class:`IdOverflowError` naming the field instead of wrapping.

:func:`day_obs_of` gives an exposure's ``day_obs`` from its time: the date of
its start in TAI minus 12 h (obs_lsst ``LsstBaseTranslator._ROLLOVER_TIME =
TimeDelta(12*60*60, scale="tai")``, LSE-400, SITCOMTN-032), so one night in
Chile (UTC−3/−4, about 23:00 to 11:00 UTC) keeps one ``day_obs``.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from core.errors import IdOverflowError, InputError

__all__ = [
    "DAY_OBS_BEGIN",
    "DAY_OBS_ROLLOVER_DAYS",
    "SEQ_NUM_RADIX",
    "IdConfig",
    "IdPacker",
    "day_obs_date",
    "day_obs_of",
]

#: ``seq_num`` runs 0..10⁵ − 1 in an LSSTCam visit id ``day_obs·10⁵ + seq_num``.
SEQ_NUM_RADIX = 100_000
#: The first night ``day_obs`` may name (Rubin's ``day_obs_begin``).
DAY_OBS_BEGIN = dt.date(2010, 1, 1)
_EPOCH = np.datetime64(DAY_OBS_BEGIN.isoformat(), "D")
#: ``day_obs`` rolls over at 12:00 TAI, in days (see the module docstring).
DAY_OBS_ROLLOVER_DAYS = 0.5
_MJD_EPOCH = dt.date(1858, 11, 17)  # MJD 0


def day_obs_date(mjd_tai: float, exposure_time_s: float = 0.0) -> dt.date:
    """The ``day_obs`` of an exposure as a date: its start in TAI, minus 12 h.

    Parameters
    ----------
    mjd_tai : float
        The exposure's midpoint (``midpointMjdTai``).
    exposure_time_s : float
        Its exposure time (s); the start is the midpoint minus half of it.

    Raises
    ------
    InputError
        If the time is not finite.
    """
    start = float(mjd_tai) - float(exposure_time_s) / 2 / 86400.0
    if not math.isfinite(start):
        raise InputError(
            f"visit midpointMjdTai {mjd_tai!r}, exposureTime {exposure_time_s!r}: "
            "no observing night for a non-finite time"
        )
    return _MJD_EPOCH + dt.timedelta(days=math.floor(start - DAY_OBS_ROLLOVER_DAYS))


def day_obs_of(mjd_tai: float, exposure_time_s: float = 0.0) -> int:
    """Rubin's ``day_obs`` (``YYYYMMDD``) of an exposure: :func:`day_obs_date` as a number."""
    d = day_obs_date(mjd_tai, exposure_time_s)
    return (d.year * 100 + d.month) * 100 + d.day


class IdConfig(BaseModel, frozen=True, extra="forbid"):
    """How IDs are packed."""

    visit_packing: Literal["lsstcam", "linear"] = Field(
        "lsstcam",
        description="How a visit number enters ccdVisitId: 'lsstcam' reads it as LSSTCam's "
        "day_obs·10⁵ + seq_num and packs (night, seq_num, detector) as Rubin's "
        "RubinDimensionPacker does (obs_lsst); 'linear' packs visit·n_detectors + detector, "
        "for plain visit counters (ZTF, DECam).",
    )
    ccd_exposure_id_bits: int = Field(
        40,
        ge=1,
        le=62,
        description="Bits holding the packed (visit, detector) ccdVisitId; the rest of the 63 "
        "usable bits count rows. Rubin: ``ccdExposureIdBits`` of the instrument's ID packer "
        "(40 for LSSTCam's RubinDimensionPacker).",
    )
    n_detectors: int = Field(
        256,
        ge=1,
        description="Detector numbers run 0..n_detectors-1 (LSSTCam: 189 science detectors, "
        "numbered below 205; Rubin's packer reserves 256).",
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
        n_det = self.config.n_detectors
        #: Largest packed visit index (the visit itself for "linear"; day·10⁵ + seq_num else).
        self.max_visit_index = (self.max_ccd_visit_id - (n_det - 1)) // n_det
        if self.config.visit_packing == "linear":
            self.max_visit = self.max_visit_index
        else:
            last_day = self.max_visit_index // SEQ_NUM_RADIX
            #: The last night a visit id may name (YYYYMMDD).
            self.max_day_obs = _day_obs(last_day) if last_day >= 1 else 0
            if last_day >= 1 and self.max_visit_index % SEQ_NUM_RADIX != SEQ_NUM_RADIX - 1:
                last_day -= 1  # that night's seq_nums do not all fit: stop one night earlier
            self.max_visit = (
                _day_obs(last_day) * SEQ_NUM_RADIX + SEQ_NUM_RADIX - 1
                if last_day >= 1
                else min(self.max_visit_index, SEQ_NUM_RADIX - 1)
            )

    def _visit_index(self, visit: int) -> int:
        """The visit's place in ccdVisitId (before × n_detectors)."""
        if visit < 0:
            raise IdOverflowError(f"visit {visit} outside 0..{self.max_visit}: negative")
        if self.config.visit_packing == "linear":
            index = visit
        else:
            day_obs, seq_num = divmod(visit, SEQ_NUM_RADIX)
            day = 0
            if day_obs:
                try:
                    date = dt.date(day_obs // 10_000, day_obs // 100 % 100, day_obs % 100)
                except ValueError:
                    raise IdOverflowError(
                        f"visit {visit}: day_obs {day_obs} is not a date (YYYYMMDD); LSSTCam "
                        f"visit ids are day_obs·10⁵ + seq_num"
                    ) from None
                if date < DAY_OBS_BEGIN:
                    raise IdOverflowError(
                        f"visit {visit}: day_obs {day_obs} is before "
                        f"{DAY_OBS_BEGIN:%Y%m%d}, the first night the ID layout holds"
                    )
                day = (date - DAY_OBS_BEGIN).days + 1
            index = day * SEQ_NUM_RADIX + seq_num
        if index > self.max_visit_index:
            raise IdOverflowError(
                f"visit {visit} outside 0..{self.max_visit} "
                f"({self.ccd_bits} ccdExposureIdBits, {self.config.n_detectors} detectors)"
            )
        return index

    def ccd_visit_id(self, visit: int, detector: int) -> int:
        """Pack (visit, detector) into a ccdVisitId, checking both fields."""
        visit, detector = int(visit), int(detector)
        if not 0 <= detector < self.config.n_detectors:
            raise IdOverflowError(f"detector {detector} outside 0..{self.config.n_detectors - 1}")
        return self._visit_index(visit) * self.config.n_detectors + detector

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
        """Inverse of :meth:`pack`: (visit, detector, row) arrays (int64)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and ids.min() < 0:
            raise IdOverflowError(f"negative ID {int(ids.min())} was not made by this packer")
        ccd = ids >> np.int64(self.counter_bits)
        rows = ids & np.int64(self.max_row)
        index, detector = np.divmod(ccd, self.config.n_detectors)
        if self.config.visit_packing == "linear":
            return index, detector, rows
        day, seq_num = np.divmod(index, SEQ_NUM_RADIX)
        day_obs = np.where(day > 0, _day_obs(np.maximum(day, 1)), 0)
        return day_obs * SEQ_NUM_RADIX + seq_num, detector, rows


def _day_obs(day):
    """YYYYMMDD of day number ``day`` (1 = 2010-01-01); scalar or array (vectorised)."""
    date = _EPOCH + (np.asarray(day, dtype=np.int64) - 1).astype("timedelta64[D]")
    year = date.astype("datetime64[Y]").astype(np.int64) + 1970
    month_start = date.astype("datetime64[M]")
    month = month_start.astype(np.int64) % 12 + 1
    mday = (date - month_start.astype("datetime64[D]")).astype(np.int64) + 1
    out = (year * 100 + month) * 100 + mday
    return int(out) if np.ndim(out) == 0 else out
