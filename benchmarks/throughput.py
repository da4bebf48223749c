"""Throughput of no-op tasks: each HTEX mode beside hand-tuned Parsl on the fake cluster.

    python benchmarks/throughput.py [--runs 5] [--tasks 5000]

Each run is a fresh process in a fresh folder, the cases interleaved run by run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import harness
from configs import CONFIGS, LABELS, same_provider
from harness import Target

RUNS = 5
TASKS = 5000
CASES = ("default", "tuned_local", "in_job", "tuned_pbs", "multi_job")
# The site configs may cost at most 5% of the hand-tuned config's rate.
OF_TUNED = 0.95
ABOUT = """
`python benchmarks/throughput.py`: no-op `python_app` tasks per second, clocked from submitting
the first of {tasks} tasks to the last result, after a warm-up task has completed (start-up
excluded); each run a fresh process in a fresh folder. Baselines as for the first result: the
hand-tuned config of the same provider kind, and Parsl's plain default (LocalProvider, so
beside the LocalProvider cases only).
"""


def noop() -> int:
    return 1


def one(case: str, tasks: int) -> float:
    """Tasks per second in this process, warm-up excluded."""
    import parsl

    app = parsl.python_app(noop)
    with parsl.load(CONFIGS[case]()):
        app().result()  # the pool is up and a worker has answered
        start = time.perf_counter()
        futures = [app() for _ in range(tasks)]
        for f in futures:
            f.result()
        return tasks / (time.perf_counter() - start)


def groups(cases) -> list[dict]:
    out = []
    for title, base, mode in (("Inside one job", "tuned_local", "in_job"),
                              ("Many PBS jobs", "tuned_pbs", "multi_job")):
        if base in cases and mode in cases:
            out.append(same_provider({
                "title": title, "unit": "tasks/s", "fmt": "{:.0f}", "baseline": base,
                "cases": [c for c in ("default", base, mode) if c in cases], "labels": LABELS,
                "targets": {mode: [Target(OF_TUNED, of=base, better="higher").as_dict()]}}))
    return out


def measure(runs: int = RUNS, tasks: int = TASKS, cases=CASES) -> dict:
    env = harness.python_env()
    cmd = [sys.executable, __file__, "--tasks", str(tasks), "--one"]
    values = harness.interleave({c: partial(harness.fresh, [*cmd, c], env) for c in cases},
                                runs, "throughput")
    return {"about": ABOUT.format(tasks=tasks), "runs": runs, "values": values,
            "groups": groups(cases)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=RUNS)
    p.add_argument("--tasks", type=int, default=TASKS)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated")
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.tasks)))
        return 0
    print(harness.report("Throughput of no-op tasks",
                         measure(a.runs, a.tasks, a.cases.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
