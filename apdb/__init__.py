"""The Alert Production Database (APDB): DiaObjects, DiaSources, DiaForcedSources.

``make_apdb(config_or_url)`` opens one; :class:`Apdb` is the interface,
:class:`ApdbSql` the SQLite/PostgreSQL backend, :mod:`apdb.region` the sky
regions it is queried with, :mod:`apdb.sdm` the SDM schema the tables follow.
``python -m apdb --help`` lists the operator commands.
"""

from __future__ import annotations

from apdb.config import ApdbConfig
from apdb.interface import Apdb, BulkLoadResult, MergeResult, RegionGuard, StoreResult
from apdb.region import Circle, Polygon, Region

__all__ = [
    "Apdb",
    "ApdbConfig",
    "ApdbSql",
    "BulkLoadResult",
    "Circle",
    "MergeResult",
    "Polygon",
    "Region",
    "RegionGuard",
    "StoreResult",
    "make_apdb",
]


def make_apdb(config_or_url: ApdbConfig | str) -> Apdb:
    """Open the APDB described by a config or a URL (SQLite path or URL, PostgreSQL URL).

    The backend is chosen by the URL; both are served by :class:`ApdbSql`.
    """
    from apdb.sql import ApdbSql

    config = (
        config_or_url if isinstance(config_or_url, ApdbConfig) else ApdbConfig(url=config_or_url)
    )
    return ApdbSql(config)


def __getattr__(name: str):
    if name == "ApdbSql":
        from apdb.sql import ApdbSql

        return ApdbSql
    raise AttributeError(f"module 'apdb' has no attribute {name!r}")
