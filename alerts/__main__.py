"""``python -m alerts COMMAND``: command-line tools for alert files and dead letters.

Commands
--------
replay SRC
    Re-send the dead letters under SRC (a directory or ``s3://`` URL) to
    Kafka; remove those acknowledged, keep the rest. An unreadable file is
    reported and kept; the others are replayed. Exit status 0 when every dead
    letter was delivered, 1 otherwise; 2 for a mistake on the command line
    (e.g. SRC is not a directory).
list SRC
    List the alert files under SRC with their alert counts; a file that cannot
    be read, or whose bytes differ from the SHA-256 in its receipt, gets an
    ``error:`` line and the others are listed (exit status 1 then).
show FILE [--id DIASOURCEID] [--png OUT]
    Print a summary of one alert of an alert file (default: the first); with
    ``--png``, also draw its three stamps and light curve there. Reads
    diapipe's files and Rubin's (broker-redistributed) packets alike.

get DIASOURCEID [--store DIR] [--out FILE]
    Find one alert in the alert store through its index (no scan of the
    alert files); print its summary, or write it to FILE as a one-alert Avro
    file. Exit status 1 when no alert has that id.
night NIGHT [--store DIR]
    Print the night's manifest (the night's ``day_obs``, ``YYYY-MM-DD`` or
    ``YYYYMMDD``: the observing day rolls over at 12:00 TAI) as JSON: visits,
    alerts per band, acknowledged and dead-lettered, new DiaObjects,
    solar-system alerts, failed detectors, latency.
replay-night NIGHT --to SERVERS --topic T [--store DIR] [--cadence S] [--speed X]
    Re-publish a night's alerts from the store, visit by visit, at the
    survey's cadence (the gaps between visit midpoints) or every S seconds,
    X times faster. What Kafka does not acknowledge goes to the replay's
    dead-letter store and is sent first by the next run; files fully handed
    over are marked done and not sent again. Exit status 1 for a night with
    no alerts or when alerts are still not acknowledged.
registry serve [--host H] [--port P]
    Serve the alert schemas as a read-only Confluent Schema Registry.
registry sync URL
    Register the alert schemas with Rubin's ids and subjects into the
    Confluent-compatible registry at URL (IMPORT mode).

Kafka credentials come from the environment (``DIAPIPE_KAFKA_USERNAME``,
``DIAPIPE_KAFKA_PASSWORD``); S3 credentials from the usual AWS variables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from alerts.kafka import KafkaConfig, replay_dead_letters
from alerts.store import DeadLetterStore, check_against_receipt
from core.errors import InputError

_NIGHT_HELP = (
    "the night's day_obs, YYYY-MM-DD or YYYYMMDD (exposure start in TAI minus 12 h; "
    "an LSSTCam visit id's first eight digits)"
)


class _UsageError(Exception):
    """A mistake on the command line: one ``error:`` line, exit status 2."""


def _storage_options(args) -> dict:
    try:
        opts = json.loads(args.storage_options) if args.storage_options else {}
    except ValueError as exc:
        raise _UsageError(f"--storage-options is not JSON: {exc}") from None
    if not isinstance(opts, dict):
        raise _UsageError("--storage-options must be a JSON object")
    if args.endpoint_url:
        opts.setdefault("client_kwargs", {})["endpoint_url"] = args.endpoint_url
    return opts


def _directory(args) -> DeadLetterStore:
    """The store at ``args.src``, which must be an existing directory (or S3 prefix)."""
    import fsspec

    opts = _storage_options(args)
    fs, path = fsspec.core.url_to_fs(args.src, **opts)
    if not fs.exists(path):
        raise _UsageError(f"{args.src}: no such directory")
    if not fs.isdir(path):
        raise _UsageError(f"{args.src}: not a directory")
    return DeadLetterStore(args.src, opts)


def _replay(args) -> int:
    try:
        extra = dict(kv.split("=", 1) for kv in args.option)
    except ValueError:
        raise _UsageError(f"-X takes KEY=VALUE, got {args.option}") from None
    config = KafkaConfig(
        servers=args.servers,
        topic=args.topic,
        security_protocol=args.security_protocol,
        flush_timeout_s=args.timeout,
        delivery_timeout_ms=int(args.timeout * 1000),
        extra=extra,
    )
    store = _directory(args)
    result = replay_dead_letters(store, config)
    for url, why in result.corrupt.items():
        print(f"error: {url}: skipped (kept in place): {why}", file=sys.stderr)
    print(
        f"replayed {result.n_files - len(result.corrupt)} file(s): {result.n_delivered} of "
        f"{result.n_sent} alert(s) delivered, {result.n_failed} still failing, "
        f"{result.n_files_removed} file(s) removed, {len(result.corrupt)} unreadable file(s)"
    )
    return 0 if result.n_failed == 0 and not result.corrupt else 1


def _list(args) -> int:
    import fsspec

    store = _directory(args)
    bad = 0
    for url in store.list():
        try:
            with fsspec.open(url, "rb", **store.storage_options) as f:
                data = f.read()
            batch = store.read(url)
        except (InputError, OSError) as exc:
            print(f"error: {url}: {exc}", file=sys.stderr)
            bad += 1
            continue
        mismatch = check_against_receipt(url, data, store.storage_options)
        if mismatch:
            print(f"error: {url}: {mismatch}", file=sys.stderr)
            bad += 1
        print(f"{len(batch):8d}  {url}")
    if bad:
        print(f"{bad} file(s) with errors", file=sys.stderr)
    return 1 if bad else 0


def _show(args) -> int:
    from alerts.viewer import show_alert

    try:
        print(show_alert(args.file, args.id, args.png, _storage_options(args)))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except IsADirectoryError:
        raise _UsageError(f"{args.file}: is a directory, not an alert file") from None
    except OSError as exc:
        where = exc.filename or args.file
        raise _UsageError(f"{where}: {exc.strerror or exc}") from None
    return 0


def _get(args) -> int:
    from alerts.stream import get_alert

    return get_alert(args.id, args.store, args.out, _storage_options(args))


def _night(args) -> int:
    from alerts.manifest import read_night
    from core.errors import InputError

    try:
        summary = read_night(args.store, args.night, _storage_options(args))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 0 if summary["visits"] else 1


def _replay_night(args) -> int:
    from alerts.stream import replay_night

    extra = dict(kv.split("=", 1) for kv in args.option)
    config = KafkaConfig(
        servers=args.to,
        topic=args.topic,
        security_protocol=args.security_protocol,
        flush_timeout_s=args.timeout,
        delivery_timeout_ms=int(args.timeout * 1000),
        extra=extra,
    )
    return replay_night(
        args.night, args.store, config, args.cadence, args.speed, _storage_options(args)
    )


def _registry_serve(args) -> int:
    from alerts.registry import serve

    server = serve(args.host, args.port)
    host, port = server.server_address[:2]
    print(f"schema registry on http://{host}:{port} (read-only; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _registry_sync(args) -> int:
    from alerts.registry import _safe, sync_registry
    from core.errors import ConfigError

    try:
        result = sync_registry(args.url)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{_safe(args.url)}: {result.registered} schema version(s) registered, "
        f"{result.unchanged} already there, {len(result.errors)} refused"
    )
    for what, err in result.errors.items():
        print(f"error: {what}: {err}", file=sys.stderr)
    return 0 if not result.errors else 1


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m alerts`` argument parser: one sub-command per operation."""
    parser = argparse.ArgumentParser(prog="python -m alerts", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("src", help="directory or s3:// URL")
        p.add_argument("--endpoint-url", help="S3 endpoint (e.g. a local S3 server)")
        p.add_argument("--storage-options", help="fsspec options as JSON")

    def kafka_options(p):
        p.add_argument(
            "--security-protocol",
            default="PLAINTEXT",
            choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"],
        )
        p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for delivery")
        p.add_argument(
            "-X",
            dest="option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="extra librdkafka option (repeatable)",
        )

    p = sub.add_parser("replay", help="re-send dead letters to Kafka")
    common(p)
    p.add_argument("--servers", default="localhost:9092", help="Kafka bootstrap servers")
    p.add_argument("--topic", default="alerts", help="Kafka topic")
    kafka_options(p)
    p.set_defaults(func=_replay)

    p = sub.add_parser("list", help="list alert or dead-letter files with their alert counts")
    common(p)
    p.set_defaults(func=_list)

    p = sub.add_parser("show", help="summarise one alert of a file; draw stamps + light curve")
    p.add_argument("file", help="Avro alert file (local path or s3:// URL)")
    p.add_argument("--id", type=int, metavar="DIASOURCEID", help="which alert (default: the first)")
    p.add_argument("--png", metavar="OUT", help="also draw the stamps and light curve to this PNG")
    p.add_argument("--endpoint-url", help="S3 endpoint (e.g. a local S3 server)")
    p.add_argument("--storage-options", help="fsspec options as JSON")
    p.set_defaults(func=_show)

    def store(p):
        p.add_argument("--store", default="./alerts", help="alert store (directory or s3:// URL)")
        p.add_argument("--endpoint-url", help="S3 endpoint (e.g. a local S3 server)")
        p.add_argument("--storage-options", help="fsspec options as JSON")

    p = sub.add_parser("get", help="find one alert by diaSourceId through the store's index")
    p.add_argument("id", type=int, metavar="DIASOURCEID")
    p.add_argument("--out", metavar="FILE", help="write the alert there as a one-alert Avro file")
    store(p)
    p.set_defaults(func=_get)

    p = sub.add_parser("night", help="print a night's manifest (alerts, Kafka, failures) as JSON")
    p.add_argument("night", metavar="NIGHT", help=_NIGHT_HELP)
    store(p)
    p.set_defaults(func=_night)

    p = sub.add_parser("replay-night", help="re-publish a night's alerts visit by visit")
    p.add_argument("night", metavar="NIGHT", help=_NIGHT_HELP)
    p.add_argument("--to", required=True, metavar="SERVERS", help="Kafka bootstrap servers")
    p.add_argument("--topic", required=True, help="topic ({major}/{minor} filled from the schema)")
    p.add_argument(
        "--cadence", type=float, metavar="S", help="seconds between visits (default: the survey's)"
    )
    p.add_argument("--speed", type=float, default=1.0, metavar="X", help="X times faster")
    kafka_options(p)
    store(p)
    p.set_defaults(func=_replay_night)

    p = sub.add_parser("registry", help="the alert schemas as a Confluent Schema Registry")
    reg = p.add_subparsers(dest="registry_command", required=True)
    q = reg.add_parser("serve", help="serve the schemas read-only over HTTP")
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    q.add_argument("--port", type=int, default=8081, help="port (default 8081; 0: any free)")
    q.set_defaults(func=_registry_serve)
    q = reg.add_parser("sync", help="register the schemas into an existing registry")
    q.add_argument("url", help="registry URL (user:password@ in it for basic auth)")
    q.set_defaults(func=_registry_sync)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m alerts`` with ``argv`` (default: the command line); the exit status."""
    from pydantic import ValidationError

    from core.errors import one_line

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (_UsageError, ValidationError) as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
