"""The SQLite connection settings that ``ApdbConfig`` controls reach every connection.

``sqlite_mmap_mb`` matters for memory: each page of a memory-mapped APDB that a
worker reads stays in that worker's resident set, so with the whole file
mapped a 189-detector visit on a 2 GB APDB held ~1.7 GiB more (bench/RESULTS.md
"visit"). It is off unless asked for, on writable and read-only connections.
"""

from __future__ import annotations

import pytest

from apdb.config import ApdbConfig
from apdb.sql import ApdbSql


def _mmap_size(apdb: ApdbSql) -> int:
    with apdb._connection("mmap_size") as conn:
        cur = conn.cursor()
        cur.execute("PRAGMA mmap_size")
        return int(cur.fetchone()[0])


@pytest.mark.parametrize("read_only", [False, True])
def test_memory_map_is_off_by_default_and_follows_the_setting(tmp_path, read_only):
    url = str(tmp_path / "apdb.sqlite3")
    ApdbSql.create(ApdbConfig(url=url)).close()
    for settings, expected in (({}, 0), ({"sqlite_mmap_mb": 64}, 64 * 2**20)):
        apdb = ApdbSql(ApdbConfig(url=url, **settings), read_only=read_only)
        try:
            assert _mmap_size(apdb) == expected, settings
        finally:
            apdb.close()


def test_memory_map_size_cannot_be_negative():
    with pytest.raises(ValueError, match="sqlite_mmap_mb"):
        ApdbConfig(url="apdb.sqlite3", sqlite_mmap_mb=-1)


def test_a_replaced_sqlite_file_is_read_after_close_apdbs(tmp_path):
    """A file copied over the APDB's path: the open client reads the old file until closed."""
    import shutil
    import sqlite3

    from flows import detector as D
    from flows.config import PipelineConfig

    path = tmp_path / "apdb.sqlite3"
    ApdbSql.create(ApdbConfig(url=str(path))).close()
    replacement = tmp_path / "replacement.sqlite3"
    ApdbSql.create(ApdbConfig(url=str(replacement))).close()
    conn = sqlite3.connect(replacement)
    with conn:
        conn.execute(
            'INSERT INTO "ApdbVisitDetector" VALUES (7, 3, 61000.0, "2026-01-01", 0, 0, 0, 0)'
        )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # into the file that is copied
    conn.close()
    config = PipelineConfig.model_validate({"apdb": {"url": str(path), "auto_create": False}})
    D.close_apdbs()
    try:
        assert D.get_apdb(config).done_detectors(7) == set()
        path.unlink()
        shutil.copyfile(replacement, path)
        assert D.get_apdb(config).done_detectors(7) == set(), "still the unlinked file"
        D.close_apdbs()
        assert D.get_apdb(config).done_detectors(7) == {3}
    finally:
        D.close_apdbs()
