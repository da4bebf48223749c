"""Throughput of no-op python_app tasks: the fake cluster's modes beside Parsl's default.

Each run is a fresh process in a fresh folder (Parsl configs are single-use). In each run a
warm-up task completes first, so start-up is excluded; the clock then runs from submitting the
first of --tasks no-op tasks to the last result. Prints tasks/s medians and the ratio to the
default HighThroughputExecutor on LocalProvider. A benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from first_result import ENV
from first_result import config_for as _config_for

CASES = ("default", "multi_job", "in_job")
# Diagnostics, not run by default: Parsl's default with the modes' 12 workers per node.
EXTRA = ("default_12w",)
TASKS = 5000


def config_for(case: str):
    if case == "default_12w":
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor

        return Config(executors=[HighThroughputExecutor(max_workers_per_node=12)])
    return _config_for(case)


def noop() -> int:
    return 1


def one(case: str, tasks: int) -> float:
    """Tasks per second in this process, warm-up excluded."""
    import parsl

    app = parsl.python_app(noop)
    with parsl.load(config_for(case)):
        app().result()  # warm-up: the pool is up and a worker has answered
        start = time.perf_counter()
        futures = [app() for _ in range(tasks)]
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - start
    return tasks / elapsed


def measure(case: str, tasks: int, attempts: int = 2) -> float:
    """One run in a fresh process and folder; a failed run is reported and retried once.

    (Seen once on the busy host: Parsl's default pool "Failed to find a viable address to
    connect to interchange", i.e. its address probe timed out.)
    """
    for attempt in range(1, attempts + 1):
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
            r = subprocess.run([sys.executable, __file__, "--one", case, "--tasks", str(tasks)],
                               cwd=tmp, env=ENV, capture_output=True, text=True, check=False)
        if not r.returncode:
            return json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{case} run failed (attempt {attempt}):\n{r.stderr[-1500:]}", file=sys.stderr)
    raise SystemExit(f"{case} failed {attempts} times")


def run(runs: int = 5, tasks: int = TASKS, cases=CASES) -> dict[str, list[float]]:
    """Cases interleaved run by run, so drifting load on a shared machine hits each alike."""
    rates: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(runs):
        for c in cases:
            rates[c].append(measure(c, tasks))
    return rates


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tasks", type=int, default=TASKS)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.tasks)))
        return 0
    rates = run(args.runs, args.tasks, args.cases.split(","))
    base = statistics.median(rates["default"]) if "default" in rates else None
    print(f"{'case':<12}{'median tasks/s':>16}{'runs':>40}{'ratio':>8}")
    for c, rs in rates.items():
        med = statistics.median(rs)
        ratio = f"{med / base:.2f}" if base else "-"
        print(f"{c:<12}{med:>16.0f}{' '.join(f'{r:.0f}' for r in rs):>40}{ratio:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
