"""What one nested Prefect task run costs in a Dask worker: ``python -m bench task-cost``.

``python -m bench task-cost [--json PATH] [--calls N] [--rounds R]``

The visit flow runs each group of detectors as one task run on a Dask worker,
and each stage of the group as a task run nested in it (:mod:`flows.visit`).
This measures the price of that nesting with a trivial stage: a group task run
on each of the local cluster's workers (:func:`flows.visit.local_cluster_kwargs`,
the ephemeral API server of this process) calls a task ``N`` times, either as
a nested task run or as a plain function call, alternated ``R`` times. Per
call: the wall time and the CPU time of the calling thread and of the whole
worker process (``time.process_time``: the worker's Prefect threads too), and
the CPU time of the API server (its process, measured from here, including the
few seconds after the flow in which it records the last events).

Nothing else of the pipeline runs: the figures are Prefect's own. The headline
is the nested call's mean over the rounds.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

# bench.visit sets the Prefect environment of the benchmarks (no analytics, no log
# shipping, a Prefect home of its own) before anything imports Prefect
from bench.visit import PeakRss

__all__ = ["main"]

SETTLE_S = 3.0  # the API server records a flow's last events after the flow returns


def _trivial(i: int) -> int:
    return i


def _thread_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime


def _group(n: int, nested: bool) -> tuple[float, float, float]:
    """``n`` calls of the trivial task; (wall, thread CPU, process CPU) seconds."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    inner = task(_trivial, name="inner", cache_policy=NO_CACHE, persist_result=False)
    t0, c0, p0 = time.perf_counter(), _thread_cpu(), time.process_time()
    for i in range(n):
        inner(i) if nested else inner.fn(i)
    return time.perf_counter() - t0, _thread_cpu() - c0, time.process_time() - p0


def _server_cpu() -> float:
    """CPU seconds so far of this process's Prefect API server."""
    return PeakRss().cpu_by_process().get("Prefect API server", 0.0)


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench task-cost", description=__doc__.split("\n")[0]
    )
    p.add_argument("--calls", type=int, default=40, help="calls per group task run")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (plain, nested)")
    args = p.parse_args(argv)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)

    from distributed import LocalCluster
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect_dask import DaskTaskRunner

    from flows.visit import local_cluster_kwargs

    group = task(_group, name="group", cache_policy=NO_CACHE, persist_result=False)
    cluster = LocalCluster(**local_cluster_kwargs())
    n_workers = len(cluster.workers)

    @flow(name="bench-task-cost", task_runner=DaskTaskRunner(address=cluster.scheduler_address))
    def run(n: int, nested: bool) -> list[tuple[float, float, float]]:
        return [f.result() for f in [group.submit(n, nested) for _ in range(n_workers)]]

    rows = []
    try:
        run(5, True)  # warm-up: the workers' first task runs import the engine
        time.sleep(SETTLE_S)
        for _ in range(args.rounds):
            for nested in (False, True):
                s0 = _server_cpu()
                out = run(args.calls, nested)
                time.sleep(SETTLE_S)
                s1 = _server_cpu()
                calls = args.calls * len(out)
                row = {
                    "nested": nested,
                    "calls": calls,
                    "wall_ms": 1000 * sum(o[0] for o in out) / calls,
                    "thread_cpu_ms": 1000 * sum(o[1] for o in out) / calls,
                    "worker_cpu_ms": 1000 * sum(o[2] for o in out) / calls,
                    "server_cpu_ms": 1000 * (s1 - s0) / calls,
                }
                rows.append(row)
                print(
                    f"{'nested task run' if nested else 'plain call':16s} {calls} calls: per call "
                    f"wall {row['wall_ms']:6.2f} ms, calling thread CPU {row['thread_cpu_ms']:6.2f} "
                    f"ms, worker CPU {row['worker_cpu_ms']:6.2f} ms, API server CPU "
                    f"{row['server_cpu_ms']:6.2f} ms",
                    flush=True,
                )
    finally:
        cluster.close()
    nested_rows = [r for r in rows if r["nested"]]
    headline = {
        k: round(statistics.mean(r[k] for r in nested_rows), 2)
        for k in ("wall_ms", "worker_cpu_ms", "server_cpu_ms")
    }
    return {"rows": rows, "headline": {f"nested_{k}": v for k, v in headline.items()}}
