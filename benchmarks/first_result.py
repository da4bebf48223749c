"""Time from `parsl.load` to the first result: the fake cluster's modes beside Parsl's default.

Each run is a fresh process in a fresh folder; prints medians of --runs and the ratio to the
default HighThroughputExecutor on LocalProvider. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("default", "multi_job", "in_job", "mpi_ensemble")
# Parsl starts interchange.py and process_worker_pool.py from PATH: use this interpreter's.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def config_for(case: str):
    if case == "default":
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor

        return Config(executors=[HighThroughputExecutor()])
    import site_configs

    kwargs = {"nodes_per_job": 2} if case == "mpi_ensemble" else {}
    return site_configs.load("local", case, **kwargs)


def noop() -> int:
    return 1


def mpi_noop(parsl_resource_specification=None) -> str:
    return "$PARSL_MPI_PREFIX true"


def one(case: str) -> float:
    """Seconds from parsl.load to the first result, in this process."""
    import parsl

    config = config_for(case)
    if case == "mpi_ensemble":
        app = parsl.bash_app(mpi_noop)
        kwargs = {"parsl_resource_specification":
                  {"num_nodes": 2, "ranks_per_node": 1, "num_ranks": 2}}
    else:
        app = parsl.python_app(noop)
        kwargs = {}
    start = time.perf_counter()
    with parsl.load(config):
        app(**kwargs).result()
        elapsed = time.perf_counter() - start
    return elapsed


def measure(case: str, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        # A fake job's supervisor may still be writing its end state as the folder goes.
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
            r = subprocess.run([sys.executable, __file__, "--one", case], cwd=tmp, env=ENV,
                               capture_output=True, text=True, check=False)
            if r.returncode:
                raise SystemExit(f"{case} failed:\n{r.stderr[-2000:]}")
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return 0
    cases = args.cases.split(",")
    # Interleave cases run by run, so drifting load on a shared machine hits each alike.
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(args.runs):
        for c in cases:
            times[c] += measure(c, 1)
    base = statistics.median(times["default"]) if "default" in times else None
    print(f"{'case':<14}{'median s':>10}{'runs':>40}{'ratio':>8}")
    for c in cases:
        med = statistics.median(times[c])
        ratio = f"{med / base:.2f}" if base else "-"
        runs = " ".join(f"{t:.2f}" for t in times[c])
        print(f"{c:<14}{med:>10.2f}{runs:>40}{ratio:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
