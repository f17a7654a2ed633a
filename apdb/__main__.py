"""Operator commands for the APDB: ``python -m apdb COMMAND URL ...``.

Commands
--------
create URL [--drop] [--healpix-order N]
    Make the tables (keeps an existing compatible APDB unless ``--drop``).
migrate URL [--dry-run]
    Upgrade a database made by an earlier layout of diapipe to the current
    one, in one transaction; ``--dry-run`` prints the plan and changes nothing.
info URL
    Schema and layout versions, HEALPix order, row counts, size on disk.
    This and the commands below only read: a SQLite file is opened read-only
    (it may be in a read-only file or directory) and nothing is created,
    repaired or migrated.
visits URL
    Every stored visit: detectors and rows written.
visit URL VISIT
    Per stored detector of VISIT: rows written and when.
cone URL RA DEC RADIUS_DEG
    Number of DiaObjects (latest versions) in a cone, with a few of them.

URL is a SQLite file path, a ``sqlite:///`` URL or a ``postgresql://`` URL; a
PostgreSQL password comes from ``DIAPIPE_APDB_PASSWORD``, never the command
line. Exit status is 0 on success, 1 on an APDB error, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd
from pydantic import ValidationError

from apdb.config import ApdbConfig
from apdb.region import Circle
from core.errors import PipelineError, one_line


def _open(url: str):
    """The APDB at ``url`` for the inspection commands: read-only, never created or changed."""
    from apdb.sql import ApdbSql

    return ApdbSql(ApdbConfig(url=url, auto_create=False), read_only=True)


def _cmd_create(args) -> None:
    from apdb.sql import ApdbSql

    db = ApdbSql.create(ApdbConfig(url=args.url, healpix_order=args.healpix_order), drop=args.drop)
    with db:
        print(
            f"APDB ready at {db.config.safe_url()} (SDM schema {db.metadata['version:schema']}, "
            f"HEALPix order {db.order})"
        )


def _cmd_migrate(args) -> None:
    from apdb import migrate

    config = ApdbConfig(url=args.url, auto_create=False)
    if args.dry_run:
        print(migrate.plan(config).describe())
        print("dry run: nothing changed")
        return
    done = migrate.migrate(config, lock_timeout_s=args.lock_timeout)
    print(done.describe())
    if done.steps:
        print(f"migrated to layout {done.target}")


def _cmd_info(args) -> None:
    with _open(args.url) as db:
        print(f"{'url':32s} {db.config.safe_url()}")
        print(f"{'backend':32s} {db.dialect}")
        for key in sorted(db.metadata):
            print(f"{key:32s} {db.metadata[key]}")
        print(f"{'size':32s} {db.size_bytes() / 2**20:.1f} MiB")
        print("rows:")
        for table, n in db.row_counts().items():
            print(f"  {table:18s} {n:>12d}")


def _print_frame(df: pd.DataFrame, empty: str) -> None:
    if df.empty:
        print(empty)
    else:
        print(df.to_string(index=False))


def _cmd_visits(args) -> None:
    with _open(args.url) as db:
        _print_frame(db.visits(), "no visits stored")


def _cmd_visit(args) -> None:
    with _open(args.url) as db:
        summary = db.visit_summary(args.visit)
        _print_frame(summary, f"visit {args.visit}: no detector stored")
        if not summary.empty:
            print(
                f"visit {args.visit}: {len(summary)} detector(s), "
                f"{int(summary['nDiaSources'].sum())} DiaSources, "
                f"{int(summary['nDiaObjects'].sum())} DiaObjects, "
                f"{int(summary['nDiaForcedSources'].sum())} DiaForcedSources"
            )


def _cmd_cone(args) -> None:
    with _open(args.url) as db:
        objects = db.get_objects(Circle(args.ra, args.dec, args.radius))
        print(f"{len(objects)} DiaObject(s) within {args.radius} deg of ({args.ra}, {args.dec})")
        cols = ["diaObjectId", "ra", "dec", "nDiaSources", "lastDiaSourceMjdTai"]
        if len(objects):
            print(objects[cols].head(args.limit).to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m apdb`` with ``argv`` (default: the command line); the exit status."""
    parser = argparse.ArgumentParser(prog="python -m apdb", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create", help="create the APDB tables")
    p.add_argument("url")
    p.add_argument("--drop", action="store_true", help="drop existing APDB tables first")
    p.add_argument("--healpix-order", type=int, default=ApdbConfig().healpix_order)
    p.set_defaults(func=_cmd_create)
    p = sub.add_parser("migrate", help="upgrade to the current layout (one transaction)")
    p.add_argument("url")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument(
        "--lock-timeout", type=float, default=5.0, help="seconds to wait for locks held by others"
    )
    p.set_defaults(func=_cmd_migrate)
    p = sub.add_parser("info", help="versions, row counts, size")
    p.add_argument("url")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("visits", help="stored visits")
    p.add_argument("url")
    p.set_defaults(func=_cmd_visits)
    p = sub.add_parser("visit", help="per-detector rows stored for one visit")
    p.add_argument("url")
    p.add_argument("visit", type=int)
    p.set_defaults(func=_cmd_visit)
    p = sub.add_parser("cone", help="DiaObjects in a cone")
    p.add_argument("url")
    p.add_argument("ra", type=float)
    p.add_argument("dec", type=float)
    p.add_argument("radius", type=float, help="deg")
    p.add_argument("--limit", type=int, default=10)
    p.set_defaults(func=_cmd_cone)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValidationError as exc:  # a URL or option that cannot work: a usage error
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
