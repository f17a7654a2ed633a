"""The inspection commands (``info``, ``visits``, ``visit``, ``cone``) only read the APDB.

A SQLite APDB in a file or directory the user cannot write is opened with
SQLite's read-only URI mode: the commands print what they print for a
writable file, and nothing is created, repaired, migrated or switched to WAL.
The writing commands keep their read-only error.

The tests run as root, which ignores file modes: a read-only file and
directory are made with ``chattr +i`` (immutable, which binds root too) where
the file system has it, else with ``chmod`` (which binds other users).
Besides, read-only is checked through SQLite itself: a write through the
read-only engine fails with SQLite's own "readonly database" error, and the
file's bytes and mtime stay as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from apdb.__main__ import main as apdb_main
from apdb.config import ApdbConfig
from apdb.sql import ApdbSql
from core.errors import ApdbError
from tests.apdb.conftest import fresh_pg_database, store_detector


def _apdb_with_a_visit(path: Path) -> str:
    with ApdbSql.create(ApdbConfig(url=str(path))) as db:
        store_detector(db, 7, 3, [11, 12], [10.0, 10.001], [0.0, 0.0], 61000.0)
    return str(path)


def _state(path: Path) -> tuple[str, int, list[str]]:
    """The file's SHA-256, its mtime (ns) and the names in its directory."""
    return (
        hashlib.sha256(path.read_bytes()).hexdigest(),
        path.stat().st_mtime_ns,
        sorted(p.name for p in path.parent.iterdir()),
    )


def _can_write_in(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return False
    probe.unlink()
    return True


@contextlib.contextmanager
def read_only_file_and_directory(path: Path):
    """Make ``path`` and its directory unwritable for this process, for the block."""
    directory = path.parent
    made = []
    try:
        for target in (path, directory):
            done = subprocess.run(["chattr", "+i", str(target)], capture_output=True)
            if done.returncode == 0:
                made.append(("chattr", target))
            else:
                os.chmod(target, 0o555 if target.is_dir() else 0o444)
                made.append(("chmod", target))
        if _can_write_in(directory):
            pytest.skip("neither chattr +i nor chmod makes a directory read-only here")
        yield
    finally:
        for how, target in reversed(made):
            if how == "chattr":
                subprocess.run(["chattr", "-i", str(target)], check=True)
            else:
                os.chmod(target, 0o755 if target.is_dir() else 0o644)


INSPECTIONS = {
    "info": (["info"], ["backend                          sqlite", "DiaSource", "2"]),
    "visits": (["visits"], ["7"]),
    "visit": (["visit", "URL", "7"], ["visit 7: 1 detector(s), 2 DiaSources"]),
    "cone": (["cone", "URL", "10", "0", "0.1"], ["2 DiaObject(s) within 0.1 deg"]),
}


def _argv(args: list[str], url: str) -> list[str]:
    return [args[0], url, *args[2:]] if "URL" in args else [*args, url]


@pytest.mark.parametrize("command", list(INSPECTIONS))
def test_inspection_reads_a_read_only_file_in_a_read_only_directory(tmp_path, capsys, command):
    folder = tmp_path / "ro"
    folder.mkdir()
    url = _apdb_with_a_visit(folder / "apdb.sqlite3")
    path = Path(url)
    args, expected = INSPECTIONS[command]
    assert apdb_main(_argv(args, url)) == 0  # what a writable file prints
    want = capsys.readouterr().out
    for name in os.listdir(folder):  # the -wal/-shm that a writable open leaves
        if name != path.name:
            os.remove(folder / name)
    before = _state(path)
    with read_only_file_and_directory(path):
        code = apdb_main(_argv(args, url))
        captured = capsys.readouterr()
        assert code == 0, captured.err
        after = _state(path)
    assert captured.out == want
    for text in expected:
        assert text in captured.out
    assert after == before, "file bytes, mtime and directory listing unchanged (no -wal/-shm)"


def test_writing_commands_keep_the_read_only_error(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    url = _apdb_with_a_visit(folder / "apdb.sqlite3")
    for name in os.listdir(folder):
        if name != "apdb.sqlite3":
            os.remove(folder / name)
    with read_only_file_and_directory(Path(url)):
        assert apdb_main(["create", url]) == 1
        assert "read-only" in capsys.readouterr().err


def test_the_read_only_engine_cannot_write(tmp_path):
    url = _apdb_with_a_visit(tmp_path / "apdb.sqlite3")
    path = Path(url)
    before = _state(path)[:2]
    with ApdbSql(ApdbConfig(url=url), read_only=True) as db:
        assert db.row_counts()["DiaSource"] == 2
        with db._engine.connect() as conn, pytest.raises(Exception, match="readonly database"):
            conn.exec_driver_sql('DELETE FROM "DiaSource"')
        with pytest.raises(ApdbError, match="read-only"):
            store_detector(db, 8, 3, [21], [10.0], [0.0], 61003.0)
    assert _state(path)[:2] == before
    with ApdbSql(ApdbConfig(url=url)) as db:
        assert db.row_counts()["DiaSource"] == 2


def test_read_only_open_never_creates_repairs_or_switches_the_journal(tmp_path, capsys):
    empty = tmp_path / "empty.sqlite3"
    sqlite3.connect(empty).close()  # a 0-byte file
    with pytest.raises(ApdbError, match="no APDB tables"):
        ApdbSql(ApdbConfig(url=str(empty), auto_create=True), read_only=True)
    assert empty.stat().st_size == 0

    url = _apdb_with_a_visit(tmp_path / "apdb.sqlite3")
    with sqlite3.connect(url) as conn:
        conn.execute("PRAGMA journal_mode = DELETE")
    assert apdb_main(["info", url]) == 0
    with sqlite3.connect(url) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"

    with sqlite3.connect(url) as conn:
        conn.execute('DROP TABLE "SSSource"')
    capsys.readouterr()
    assert apdb_main(["info", url]) == 1
    assert "SSSource" in capsys.readouterr().err
    with sqlite3.connect(url) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "SSSource" not in names, "a read-only open does not repair"


def test_a_missing_file_is_not_created(tmp_path, capsys):
    missing = tmp_path / "nope.sqlite3"
    assert apdb_main(["info", str(missing)]) == 1
    assert "no such SQLite file" in capsys.readouterr().err
    assert not missing.exists()


def test_uncheckpointed_wal_in_a_read_only_directory_is_refused_not_missed(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    url = _apdb_with_a_visit(folder / "apdb.sqlite3")
    keep = sqlite3.connect(url)  # a reader holding a snapshot stops the checkpoint on close
    keep.execute("BEGIN")
    keep.execute('SELECT count(*) FROM "DiaSource"').fetchone()
    with ApdbSql(ApdbConfig(url=url)) as db:
        store_detector(db, 8, 3, [21], [10.0], [0.0], 61003.0)
    wal = folder / "apdb.sqlite3-wal"
    # the database as another host leaves it mid-run: a -wal with transactions, no -shm
    wal_bytes = wal.read_bytes()
    keep.rollback()
    keep.close()
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "apdb.sqlite3").write_bytes(Path(url).read_bytes())
    (copy / "apdb.sqlite3-wal").write_bytes(wal_bytes)
    assert len(wal_bytes) > 0
    with read_only_file_and_directory(copy / "apdb.sqlite3"):
        assert apdb_main(["info", str(copy / "apdb.sqlite3")]) == 1
        err = capsys.readouterr().err
    assert "not yet checkpointed" in err and "apdb.sqlite3-wal" in err


@pytest.mark.postgresql
def test_read_only_postgresql_session_refuses_writes():
    with fresh_pg_database("diapipe_ro", required=True) as url:
        ApdbSql.create(ApdbConfig(url=url)).close()
        with ApdbSql(ApdbConfig(url=url), read_only=True) as db:
            assert db.row_counts()["DiaSource"] == 0
            with pytest.raises(ApdbError, match="read-only transaction"):
                store_detector(db, 8, 3, [21], [10.0], [0.0], 61003.0)
