"""Write the layout-1.0.0 fixtures of tests/apdb/test_migrate.py (not run by the tests).

Usage, from the repository root::

    git show 1bd0c70:apdb/sql.py > sql_1bd0c70.py
    python tests/apdb/data/make_layout_1_0_0.py sql_1bd0c70.py

``apdb/sql.py`` of main at commit 1bd0c70 (layout ``version:ApdbSql`` 1.0.0)
is loaded as a module (its one import of the then ``tasks.errors`` pointed at
``core.errors``, the interface's later abstract methods waived), and writes:

- ``layout-1.0.0.sqlite3``: an APDB made and filled by that code, with the
  detectors :func:`fill` stores;
- ``layout-1.0.0-postgresql.sql``: that code's PostgreSQL DDL, one statement
  a line, with its metadata rows; the test fills it from the SQLite file.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[2]))


def load_old(path: str):
    text = Path(path).read_text().replace("from tasks.errors import", "from core.errors import")
    spec = importlib.util.spec_from_loader("apdb_sql_1bd0c70", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(text, path, "exec"), module.__dict__)
    # methods the interface gained since then are not needed to write the fixture
    module.ApdbSql.__abstractmethods__ = frozenset()
    return module


def fill(db) -> None:
    """The fixture's content: see tests/apdb/test_migrate.py::EXPECTED."""
    from tests.apdb.test_migrate import store_fixture

    store_fixture(db)


def write_fixtures(old, version: str) -> None:
    """``layout-<version>.sqlite3`` and ``layout-<version>-postgresql.sql`` from module ``old``."""
    from sqlalchemy.schema import CreateIndex, CreateTable

    from apdb.config import ApdbConfig

    target = HERE / f"layout-{version}.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(str(target) + suffix).unlink(missing_ok=True)
    db = old.ApdbSql(ApdbConfig(url=str(target)))
    assert db.metadata["version:ApdbSql"] == version, db.metadata
    fill(db)
    meta = dict(db.metadata)
    with db._connection("checkpoint") as conn:
        conn.execute("PRAGMA journal_mode = DELETE")
    db.close()
    from sqlalchemy.dialects.postgresql import psycopg as pg_dialect

    dialect = pg_dialect.dialect()
    lines = []
    for table in old.build_metadata().sorted_tables:
        lines.append(str(CreateTable(table).compile(dialect=dialect)).replace("\n", " ").strip())
        for index in table.indexes:
            lines.append(str(CreateIndex(index).compile(dialect=dialect)).replace("\n", " "))
    for name, value in sorted(meta.items()):
        lines.append(f'INSERT INTO "metadata" ("name", "value") VALUES (\'{name}\', \'{value}\')')
    (HERE / f"layout-{version}-postgresql.sql").write_text("\n".join(lines) + "\n")


def main(path: str) -> None:
    write_fixtures(load_old(path), "1.0.0")


if __name__ == "__main__":
    main(sys.argv[1])
