"""``python -m bench orchestration``: what Prefect costs on a 189-detector visit.

The case and the machinery are those of ``python -m bench visit`` (the same
cached steady-state survey, see :mod:`bench.history`; ``--prior-visits``
chooses a smaller history). The visit runs once with plain function calls
(:func:`flows.visit.run_visit_plain`: the same stages, grouping and thread
pool, no Prefect) and once through the Prefect flow for each
``--detectors-per-task`` value, each run on a fresh copy of the APDB:

``overhead_fraction = (wall_prefect − wall_plain) / wall_prefect``.

The ephemeral API server is started by a warm-up flow before any timing. On
a shared machine the wall times move with the load; the runs therefore also
report the CPU seconds they used (this process and its children, which
includes the Prefect server) and the load average.
"""

from __future__ import annotations

from bench import visit as V
from flows.stages import PIPELINE

__all__ = ["main"]


def main(argv: list[str]) -> dict:
    p = V.parser("python -m bench orchestration")
    p.add_argument(
        "--group-sizes",
        default="",
        help="comma-separated detectors_per_task values for the Prefect runs "
        "(default: the configured default)",
    )
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.group_sizes.split(",") if s] or [args.detectors_per_task or 0]
    spec = V.HistorySpec(seed=args.seed, prior_visits=args.prior_visits, n_detectors=args.detectors)
    prepared = V.prepare(spec, args.apdb, cache_root=args.cache_root, rebuild=args.rebuild)
    V.warm_files(prepared.bundle_root)
    warm = V.warm_prefect()
    rows = []
    plains = []
    for size in sizes:
        args.detectors_per_task = size or None
        # paired runs with the same grouping: without Prefect, then with it
        plain = V.timed_run(prepared, args.apdb, args, "plain")
        pref = V.timed_run(prepared, args.apdb, args, "prefect")
        for r in (plain, pref):
            r.pop("_alerting_objects", None)
            r.pop("_table", None)
        plains.append(plain)
        group = size or V.default_group_size()
        rows.append(
            {
                "detectors_per_task": group,
                # per group: the group task run and one nested task run per stage
                "task_runs": (1 + len(PIPELINE)) * -(-spec.n_detectors // group),
                "plain_wall_s": plain["wall_s"],
                "plain_cpu_s": plain["cpu_s"],
                "prefect_wall_s": pref["wall_s"],
                "prefect_cpu_s": pref["cpu_s"],
                "alerts": pref["alerts"],
                "overhead_fraction": (pref["wall_s"] - plain["wall_s"]) / pref["wall_s"],
                "cpu_overhead_fraction": (pref["cpu_s"] - plain["cpu_s"]) / pref["cpu_s"],
                "load_avg_1min": pref["load_avg_1min"],
                "state": pref["state"],
                "failed": pref["detectors_failed"],
            }
        )
    print()
    print(
        f"{'dets/task':>9} {'task runs':>9} {'plain s':>8} {'prefect s':>9} {'overhead':>8} "
        f"{'plain CPU':>9} {'prefect CPU':>11} {'load':>5}"
    )
    for r in rows:
        print(
            f"{r['detectors_per_task']:9d} {r['task_runs']:9d} {r['plain_wall_s']:8.2f} "
            f"{r['prefect_wall_s']:9.2f} {100 * r['overhead_fraction']:7.1f}% "
            f"{r['plain_cpu_s']:9.1f} {r['prefect_cpu_s']:11.1f} {r['load_avg_1min']:5.1f}"
        )
    best = rows[0]
    return {
        "spec": spec.__dict__,
        "apdb": args.apdb,
        "runner": args.runner,
        "prefect_warmup_s": warm,
        "plain": plains,
        "prefect": rows,
        "headline": {
            "overhead_fraction": round(best["overhead_fraction"], 4),
            "cpu_overhead_fraction": round(best["cpu_overhead_fraction"], 4),
            "detectors_per_task": best["detectors_per_task"],
            "prefect_wall_s": round(best["prefect_wall_s"], 2),
            "plain_wall_s": round(best["plain_wall_s"], 2),
        },
    }
