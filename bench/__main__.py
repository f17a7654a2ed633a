"""``python -m bench SCENARIO [--json PATH] [scenario options]``.

Each scenario is a module ``bench/<scenario>.py`` with a function
``main(argv: list[str]) -> dict``: it parses its own options, runs, prints a
human-readable table, and returns every figure it measured plus a top-level
``"headline"`` dict holding the scenario's headline numbers. With ``--json``
the returned dict (with machine and date added) is written to PATH.

Benchmarks are not tests: nothing here asserts on time. Results are recorded
in ``bench/RESULTS.md`` with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import pkgutil
import platform
import sys
from pathlib import Path

import bench


def scenarios() -> list[str]:
    """Names of the scenarios: the modules of this package, ``_`` written as ``-``."""
    return sorted(
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules(bench.__path__)
        if not m.name.startswith("_") and m.name not in ("common",)
    )


def machine() -> dict:
    """Where and when a benchmark ran."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=scenarios())
    parser.add_argument("--json", type=Path, help="write all figures (with 'headline') here")
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(f"bench.{args.scenario.replace('-', '_')}")
    result = module.main(rest)
    if "headline" not in result:
        raise SystemExit(f"bench {args.scenario}: main() returned no 'headline'")
    result = {"scenario": args.scenario, "machine": machine(), **result}
    print("headline:", json.dumps(result["headline"], default=float))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
