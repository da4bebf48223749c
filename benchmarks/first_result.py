"""Time from `parsl.load` to the first result: each mode beside hand-tuned Parsl on the fake cluster.

    python benchmarks/first_result.py [--runs 7] [--cases in_job,tuned_local]

Each run is a fresh process in a fresh folder, the cases interleaved run by run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import harness
from configs import CONFIGS, LABELS, MPI_CASES, same_provider
from harness import Target

RUNS = 7
# The site configs may cost at most 5% over the hand-tuned config of the same provider kind.
OVER_TUNED = 1.05
ABOUT = """
`python benchmarks/first_result.py`: seconds from `parsl.load` to the first result of a no-op
`python_app` (a `$PARSL_MPI_PREFIX true` `bash_app` on 2 nodes for the MPI cases), each run a
fresh process in a fresh folder. Every mode is held to the config a skilled user would write by
hand for the same provider kind: ALCF's config from its "Parsl on Aurora" page with the site
configs' strategy tick (`parsl_aurora.modes.STRATEGY_PERIOD`), 12 workers per node (one per
tile; HTEX only), `encrypted=True`, `retries=1`, and the site configs' quiet per-tick loggers
(`parsl_aurora.modes.quiet_tick_logs`, the same call), on the same fake cluster
(`benchmarks/configs.py`). Parsl's plain default (LocalProvider) is the second reference,
shown beside the LocalProvider cases only: no ratio divides runs of two provider kinds. The
PBS cases submit through the fake `qsub` and start the pool through the fake `mpiexec`;
`in_job` uses LocalProvider over a node file.
"""


def noop() -> int:
    return 1


def mpi_noop(parsl_resource_specification=None) -> str:
    return "$PARSL_MPI_PREFIX true"


def one(case: str) -> float:
    """Seconds from parsl.load to the first result, in this process."""
    import parsl

    config = CONFIGS[case]()
    if case in MPI_CASES:
        app = partial(parsl.bash_app(mpi_noop), parsl_resource_specification={
            "num_nodes": 2, "ranks_per_node": 1, "num_ranks": 2})
    else:
        app = parsl.python_app(noop)
    start = time.perf_counter()
    with parsl.load(config):
        app().result()
        return time.perf_counter() - start


def groups(cases) -> list[dict]:
    """Each mode's table: its hand-tuned baseline, Parsl's default where its provider is the
    baseline's (LocalProvider: inside one job), the mode, its targets."""
    out = []
    for title, base, mode, extra in (
            ("Inside one job", "tuned_local", "in_job", []),
            ("Many PBS jobs", "tuned_pbs", "multi_job", []),
            ("MPI ensembles", "tuned_mpi", "mpi_ensemble", [Target(1.5)])):
        if base not in cases or mode not in cases:
            continue
        out.append(same_provider({
            "title": title, "unit": "s", "baseline": base,
            "cases": [c for c in ("default", base, mode) if c in cases], "labels": LABELS,
            "targets": {mode: [t.as_dict() for t in [Target(OVER_TUNED, of=base), *extra]]}}))
    return out


def measure(runs: int = RUNS, cases=tuple(CONFIGS)) -> dict:
    env = harness.python_env()
    values = harness.interleave(
        {c: partial(harness.fresh, [sys.executable, __file__, "--one", c], env) for c in cases},
        runs, "first result")
    return {"about": ABOUT, "runs": runs, "values": values, "groups": groups(cases)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=RUNS)
    p.add_argument("--cases", default=",".join(CONFIGS), help="comma-separated")
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one)))
        return 0
    print(harness.report("Time from `parsl.load` to the first result",
                         measure(a.runs, a.cases.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
