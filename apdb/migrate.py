"""Upgrades of an existing APDB to the current table layout (``python -m apdb migrate``).

Each :class:`Step` takes the layout from one ``version:ApdbSql`` to the next;
:func:`plan` chains the steps from what a database records to
:data:`apdb.sql.IMPLEMENTATION_VERSION`, and :func:`migrate` runs them all and
rewrites the version in **one transaction** (DDL is transactional on SQLite
and PostgreSQL), so a failure or an interruption leaves the database as it was.
On PostgreSQL a ``VACUUM (ANALYZE)`` of the tables whose indexes a step rebuilt
follows the commit (:attr:`Step.vacuum`).

Refused, with nothing changed (:class:`core.errors.ApdbError` or
:class:`core.errors.SchemaVersionError`):

- a database with no APDB ``metadata`` table or without ``version:ApdbSql``
  (not an APDB);
- a layout newer than this code knows, or a version no step starts from;
- a half-migrated database: an object a step would create already exists
  while the version says it has not run;
- a locked database: another connection holds a lock the upgrade needs
  (SQLite's write lock, a PostgreSQL table lock) for longer than
  ``lock_timeout_s``.

Rubin's ``dax_apdb`` does the same with Alembic scripts
(``dax_apdb_migrate``); diapipe's steps are few and are plain SQL.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import Callable

import sqlalchemy as sa

from apdb import sql as apdb_sql
from apdb.config import ApdbConfig
from core.errors import ApdbError, SchemaVersionError

__all__ = ["Plan", "Step", "STEPS", "migrate", "plan"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One layout upgrade.

    Attributes
    ----------
    source, target : str
        ``version:ApdbSql`` before and after.
    description : str
        What it changes and why (printed by the dry run).
    creates : tuple of str
        Indexes the step makes; finding one already there means the database
        is half-migrated.
    statements : callable
        ``dialect name → list of SQL statements``.
    vacuum : tuple of str
        Tables a PostgreSQL ``VACUUM (ANALYZE)`` runs on after the migration
        has committed (VACUUM cannot run inside a transaction); their
        visibility map is what lets an index-only scan skip the table.
    """

    source: str
    target: str
    description: str
    creates: tuple[str, ...]
    statements: Callable[[str], list[str]]
    vacuum: tuple[str, ...] = ()


def _forced_time_index(dialect: str) -> list[str]:
    return [
        'CREATE INDEX "IDX_DiaForcedSource_diaObjectId" ON "DiaForcedSource" '
        '("diaObjectId", "midpointMjdTai")'
    ]


def _dialect(name: str) -> sa.Dialect:
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.dialect() if name == "postgresql" else sqlite.dialect()


def _ss_source_table(dialect: str) -> list[str]:
    """The SDM ``SSSource`` table and its index, as the current layout defines them."""
    from sqlalchemy.schema import CreateIndex, CreateTable

    d = _dialect(dialect)
    table = apdb_sql.build_metadata(dialect).tables["SSSource"]
    return [str(CreateTable(table).compile(dialect=d)).strip()] + [
        str(CreateIndex(ix).compile(dialect=d)).strip() for ix in sorted(table.indexes, key=str)
    ]


def _layout_2_0_0(dialect: str) -> list[str]:
    return _forced_time_index(dialect) + _ss_source_table(dialect)


#: The (diaObjectId, midpointMjdTai) and pixelId indexes of layout 2.0.0, which the
#: covering indexes of 2.1.0 replace (same leading key columns).
_REPLACED_2_1_0 = {
    apdb_sql.LAST_TABLE: "IDX_DiaObjectLast_pixelId",
    "DiaSource": "IDX_DiaSource_diaObjectId",
    "DiaForcedSource": "IDX_DiaForcedSource_diaObjectId",
}


def _layout_2_1_0(dialect: str) -> list[str]:
    """The covering indexes of the packed reads, in place of the plain ones."""
    from sqlalchemy.schema import CreateIndex

    d = _dialect(dialect)
    statements = []
    for table, old in _REPLACED_2_1_0.items():
        # the index of layout 2.1.0, bound to a stand-in table of the columns it names
        # (a later layout may declare the table differently)
        new = apdb_sql.covering_index(table, dialect)
        names = [str(c) for c in new.expressions] + list(
            new.dialect_options["postgresql"]["include"] or ()
        )
        sa.Table(table, sa.MetaData(), *(sa.Column(n, sa.Text) for n in names), new)
        statements.append(str(CreateIndex(new).compile(dialect=d)).strip())
        statements.append(f'DROP INDEX "{old}"')
    if dialect == "sqlite":
        statements.append("ANALYZE")
    return statements


def _layout_2_2_0(dialect: str) -> list[str]:
    """SQLite: DiaForcedSource rebuilt keyed (diaObjectId, midpointMjdTai, visit, detector).

    The rows are copied in key order into a new ``WITHOUT ROWID`` table, the
    old table (and its covering index) dropped, the new one renamed and its
    indexes made. PostgreSQL keeps its layout (a heap and an ``INCLUDE``
    index: the index-only scan already reads one object's rows together).
    """
    if dialect != "sqlite":
        return []
    from sqlalchemy.schema import CreateIndex, CreateTable

    d = _dialect(dialect)
    temp = "DiaForcedSource_2_2_0"
    copy = apdb_sql.forced_source_table(sa.MetaData(), dialect, name=temp)
    table = apdb_sql.forced_source_table(sa.MetaData(), dialect)
    cols = ", ".join(f'"{c.name}"' for c in table.columns)
    key = ", ".join(f'"{c}"' for c in apdb_sql.SQLITE_FORCED_KEY)
    return [
        str(CreateTable(copy).compile(dialect=d)).strip(),
        f'INSERT INTO "{temp}" ({cols}) SELECT {cols} FROM "DiaForcedSource" ORDER BY {key}',
        'DROP TABLE "DiaForcedSource"',
        f'ALTER TABLE "{temp}" RENAME TO "DiaForcedSource"',
        *(str(CreateIndex(ix).compile(dialect=d)).strip() for ix in sorted(table.indexes, key=str)),
        "ANALYZE",
    ]


#: Every upgrade, oldest first.
STEPS: tuple[Step, ...] = (
    Step(
        "1.0.0",
        "2.0.0",
        "DiaForcedSource: index (diaObjectId, midpointMjdTai), so the history read "
        "seeks to the window start instead of reading every year of each object; "
        "the SDM SSSource table (solar-system sources, stored with their DiaSources)",
        ("IDX_DiaForcedSource_diaObjectId", "SSSource", "IDX_SSSource_ssObjectId"),
        _layout_2_0_0,
    ),
    Step(
        "2.0.0",
        "2.1.0",
        "DiaObjectLast, DiaSource, DiaForcedSource: covering indexes on pixelId and "
        "(diaObjectId, midpointMjdTai) that also hold the payload and string columns "
        "(PostgreSQL INCLUDE), replacing the plain ones, so a detector's load reads "
        "one object's history contiguously from the index instead of one table row at "
        "a time; on PostgreSQL a VACUUM (ANALYZE) follows the commit, so that "
        "index-only scans need not visit the table",
        tuple(name for name, _ in apdb_sql.COVERING_INDEXES.values()),
        _layout_2_1_0,
        vacuum=(apdb_sql.LAST_TABLE, "DiaSource", "DiaForcedSource"),
    ),
    Step(
        "2.1.0",
        "2.2.0",
        "SQLite: DiaForcedSource keyed (diaObjectId, midpointMjdTai, visit, detector) "
        "in a WITHOUT ROWID table, so the history read seeks in the table itself and "
        "its covering index (a second copy of every row) is dropped; a small unique "
        "index keeps the SDM key (diaObjectId, visit, detector). PostgreSQL: unchanged",
        (apdb_sql.SQLITE_FORCED_SDM_KEY,),
        _layout_2_2_0,
    ),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`migrate` will do to one database."""

    url: str
    dialect: str
    current: str
    target: str
    steps: tuple[Step, ...]

    def describe(self) -> str:
        """The plan as text: one line per step with its SQL."""
        if not self.steps:
            return f"APDB {self.url}: layout {self.current} is current; nothing to do"
        lines = [
            f"APDB {self.url} ({self.dialect}): layout {self.current} -> {self.target} "
            f"in one transaction:"
        ]
        for step in self.steps:
            lines.append(f"  {step.source} -> {step.target}: {step.description}")
            lines.extend(f"    {stmt};" for stmt in step.statements(self.dialect))
        lines.append(
            f"    UPDATE metadata SET value = '{self.target}' WHERE name = 'version:ApdbSql';"
        )
        if self.vacuum:
            lines.append("  then, committed, outside the transaction:")
            lines.extend(f'    VACUUM (ANALYZE) "{table}";' for table in self.vacuum)
        return "\n".join(lines)

    @property
    def vacuum(self) -> tuple[str, ...]:
        """Tables vacuumed after the commit (PostgreSQL only; see :attr:`Step.vacuum`)."""
        if self.dialect != "postgresql":
            return ()
        return tuple(dict.fromkeys(t for step in self.steps for t in step.vacuum))


def _version(text: str) -> tuple[int, ...]:
    return apdb_sql._version_tuple(text)


def _engine(config: ApdbConfig) -> sa.Engine:
    url = config.sqlalchemy_url()
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not os.path.exists(url.database):
            raise ApdbError(f"APDB {config.safe_url()}: no such SQLite file; nothing changed")
    return apdb_sql.ApdbSql._make_engine(config)


def plan(config: ApdbConfig | str) -> Plan:
    """What :func:`migrate` would do (read only)."""
    config = config if isinstance(config, ApdbConfig) else ApdbConfig(url=config)
    engine = _engine(config)
    try:
        with apdb_sql._mapped_errors("plan migration", config.safe_url()):
            proxy = engine.raw_connection()
            try:
                dbapi = apdb_sql.driver_connection(proxy)
                try:
                    return _plan_on(dbapi, engine, config.safe_url())
                finally:
                    dbapi.rollback()
            finally:
                proxy.close()
    finally:
        engine.dispose()


def migrate(config: ApdbConfig | str, *, lock_timeout_s: float = 5.0) -> Plan:
    """Upgrade the database to the current layout, in one transaction; returns what was done.

    Raises
    ------
    ApdbError
        Not an APDB, half-migrated, or locked by another connection.
    SchemaVersionError
        A layout newer than this code, or one no step starts from.
    """
    config = config if isinstance(config, ApdbConfig) else ApdbConfig(url=config)
    url = config.safe_url()
    config = config.model_copy(update={"sqlite_busy_timeout_ms": int(lock_timeout_s * 1000)})
    engine = _engine(config)
    try:
        try:
            proxy = engine.raw_connection()
        except (sa.exc.OperationalError, sqlite3.OperationalError) as exc:
            if "locked" not in str(exc).lower():
                raise ApdbError(f"APDB {url}: cannot connect: {exc}") from exc
            raise ApdbError(
                f"APDB {url}: locked by another connection (waited {lock_timeout_s} s); "
                f"nothing changed"
            ) from exc
        try:
            dbapi = apdb_sql.driver_connection(proxy)
            try:
                if engine.dialect.name == "sqlite":
                    dbapi.execute(f"PRAGMA busy_timeout = {int(lock_timeout_s * 1000)}")
                    dbapi.execute("BEGIN IMMEDIATE")
                else:
                    dbapi.execute(f"SET lock_timeout = {int(lock_timeout_s * 1000)}")
                    # an index build over years of history may take longer than the
                    # configured statement_timeout; the lock_timeout still applies
                    dbapi.execute("SET statement_timeout = 0")
                    dbapi.execute(
                        'LOCK TABLE "metadata", "DiaObjectLast", "DiaSource", "DiaForcedSource" '
                        "IN SHARE ROW EXCLUSIVE MODE"
                    )
            except apdb_sql.psycopg_errors("UndefinedTable") as exc:
                dbapi.rollback()
                raise ApdbError(f"APDB {url}: not an APDB ({exc}); nothing changed") from exc
            except apdb_sql.psycopg_errors("LockNotAvailable", "OperationalError") as exc:
                dbapi.rollback()
                raise ApdbError(
                    f"APDB {url}: locked by another connection (waited {lock_timeout_s} s): "
                    f"{str(exc).strip()}; nothing changed"
                ) from exc
            except Exception as exc:
                if "locked" in str(exc).lower():
                    dbapi.rollback()
                    raise ApdbError(
                        f"APDB {url}: locked by another connection (waited {lock_timeout_s} s); "
                        f"nothing changed"
                    ) from exc
                raise
            try:
                with apdb_sql._mapped_errors("migrate", url):
                    the_plan = _plan_on(dbapi, engine, url)
                    cur = dbapi.cursor()
                    for step in the_plan.steps:
                        for stmt in step.statements(the_plan.dialect):
                            cur.execute(stmt)
                    if the_plan.steps:
                        ph = "?" if the_plan.dialect == "sqlite" else "%s"
                        cur.execute(
                            f'UPDATE "metadata" SET "value" = {ph} WHERE "name" = {ph}',
                            [the_plan.target, "version:ApdbSql"],
                        )
                dbapi.commit()
            except BaseException:
                dbapi.rollback()
                raise
            if the_plan.vacuum:
                with apdb_sql._mapped_errors("vacuum after migration", url):
                    dbapi.autocommit = True
                    for table in the_plan.vacuum:
                        dbapi.execute(f'VACUUM (ANALYZE) "{table}"')
        finally:
            proxy.close()
    finally:
        engine.dispose()
    return the_plan


def _plan_on(dbapi, engine: sa.Engine, url: str) -> Plan:
    """The plan read inside the migration's own transaction (on its DB-API connection)."""
    cur = dbapi.cursor()
    dialect = engine.dialect.name
    if dialect == "sqlite":
        names = {r[0] for r in cur.execute("SELECT name FROM sqlite_master").fetchall()}
    else:
        cur.execute(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema()"
        )
        names = {r[0] for r in cur.fetchall()}
    if "metadata" not in names:
        raise ApdbError(f"APDB {url}: not an APDB (no 'metadata' table); nothing changed")
    cur.execute('SELECT "name", "value" FROM "metadata"')
    meta = dict(cur.fetchall())
    current = meta.get("version:ApdbSql")
    if current is None:
        raise ApdbError(
            f"APDB {url}: not an APDB made by diapipe (metadata has no version:ApdbSql); "
            f"nothing changed"
        )
    return _check(url, dialect, current, names)


def _check(url: str, dialect: str, current: str, existing: set[str]) -> Plan:
    target = apdb_sql.IMPLEMENTATION_VERSION
    if not _version(current) or _version(current) > _version(target):
        raise SchemaVersionError(
            f"APDB {url}: layout version:ApdbSql {current!r} is newer than this code knows "
            f"({target}); upgrade diapipe instead; nothing changed"
        )
    steps: list[Step] = []
    version = current
    while _version(version) < _version(target):
        step = next((s for s in STEPS if s.source == version), None)
        if step is None:
            raise SchemaVersionError(
                f"APDB {url}: no migration starts from layout {version!r}; nothing changed"
            )
        steps.append(step)
        version = step.target
    for step in steps:
        found = sorted(set(step.creates) & existing)
        if found:
            raise ApdbError(
                f"APDB {url}: half-migrated: metadata says layout {current} but "
                f"{', '.join(found)} of layout {step.target} already exists; "
                f"nothing changed (repair it by hand or restore a backup)"
            )
    return Plan(url, dialect, current, target, tuple(steps))
