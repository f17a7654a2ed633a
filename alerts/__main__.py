"""``python -m alerts COMMAND``: command-line tools for alert files and dead letters.

Commands
--------
replay SRC
    Re-send the dead letters under SRC (a directory or ``s3://`` URL) to
    Kafka; remove those acknowledged, keep the rest. Exit status 0 when every
    dead letter was delivered, 1 otherwise.
list SRC
    List the alert files under SRC with their alert counts.
show FILE [--id DIASOURCEID] [--png OUT]
    Print a summary of one alert of an alert file (default: the first); with
    ``--png``, also draw its three stamps and light curve there. Reads
    diapipe's files and Rubin's (broker-redistributed) packets alike.

Kafka credentials come from the environment (``DIAPIPE_KAFKA_USERNAME``,
``DIAPIPE_KAFKA_PASSWORD``); S3 credentials from the usual AWS variables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from alerts.kafka import KafkaConfig, replay_dead_letters
from alerts.store import DeadLetterStore


def _storage_options(args) -> dict:
    opts = json.loads(args.storage_options) if args.storage_options else {}
    if args.endpoint_url:
        opts.setdefault("client_kwargs", {})["endpoint_url"] = args.endpoint_url
    return opts


def _replay(args) -> int:
    extra = dict(kv.split("=", 1) for kv in args.option)
    config = KafkaConfig(
        servers=args.servers,
        topic=args.topic,
        security_protocol=args.security_protocol,
        flush_timeout_s=args.timeout,
        delivery_timeout_ms=int(args.timeout * 1000),
        extra=extra,
    )
    store = DeadLetterStore(args.src, _storage_options(args))
    result = replay_dead_letters(store, config)
    print(
        f"replayed {result.n_files} file(s): {result.n_delivered} of {result.n_sent} "
        f"alert(s) delivered, {result.n_failed} still failing, "
        f"{result.n_files_removed} file(s) removed"
    )
    return 0 if result.n_failed == 0 else 1


def _list(args) -> int:
    store = DeadLetterStore(args.src, _storage_options(args))
    for url in store.list():
        print(f"{len(store.read(url)):8d}  {url}")
    return 0


def _show(args) -> int:
    from alerts.viewer import show_alert
    from core.errors import InputError

    try:
        print(show_alert(args.file, args.id, args.png, _storage_options(args)))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alerts", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("src", help="directory or s3:// URL")
        p.add_argument("--endpoint-url", help="S3 endpoint (e.g. a local S3 server)")
        p.add_argument("--storage-options", help="fsspec options as JSON")

    p = sub.add_parser("replay", help="re-send dead letters to Kafka")
    common(p)
    p.add_argument("--servers", default="localhost:9092", help="Kafka bootstrap servers")
    p.add_argument("--topic", default="alerts", help="Kafka topic")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
