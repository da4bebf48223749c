"""ALCF's MPI ensemble: ten 2-node tasks of 24 ranks, each rank pinned to one GPU tile.

Needs an MPI-ensemble config: PARSL_MODE=mpi_ensemble with PARSL_SITE=aurora (or local for the
fake cluster). Each task's output lands in ./mpi_output/<task>/.
"""

import sys
from pathlib import Path

import parsl
from parsl import bash_app

import site_configs
from parsl_aurora import progress
from parsl_aurora.errors import run_main

# 12 ranks per node, one per tile; set_affinity_gpu_aurora.sh turns the local rank into a tile.
SPEC = {"num_nodes": 2, "ranks_per_node": 12, "num_ranks": 24}


# cache=True lets a config's resume=True skip tasks a killed earlier run finished (else no-op).
@bash_app(cache=True)
def mpi_hello_affinity(parsl_resource_specification, stdout=None, stderr=None):
    # $PARSL_MPI_PREFIX is `mpiexec -n 24 -ppn 12 -hosts <this task's two nodes>`;
    # $PARSL_AURORA_CPU_BIND (set by the site config, from its node model) gives each of the 12
    # ranks on a node its own 8 cores beside its tile, skipping the cores Aurora reserves.
    return ("$PARSL_MPI_PREFIX --cpu-bind $PARSL_AURORA_CPU_BIND "
            "set_affinity_gpu_aurora.sh hello-affinity")


def main(tasks: int = 10) -> int:
    out = Path.cwd() / "mpi_output"
    with parsl.load(site_configs.load(mode="mpi_ensemble")):
        futures = []
        for i in range(tasks):
            (out / str(i)).mkdir(parents=True, exist_ok=True)
            futures.append(mpi_hello_affinity(parsl_resource_specification=SPEC,
                                              stdout=str(out / str(i) / "hello.stdout"),
                                              stderr=str(out / str(i) / "hello.stderr")))
        print(f"{len(futures)} tasks of {SPEC['num_ranks']} ranks on {SPEC['num_nodes']} nodes")
        # A bar on a terminal, a line every $PARSL_AURORA_PROGRESS_EVERY s in a log.
        codes = progress.wait(futures, "MPI tasks")
    for i in range(tasks):
        lines = (out / str(i) / "hello.stdout").read_text().splitlines()
        hosts = {w.split("=", 1)[1] for line in lines for w in line.split() if w.startswith("host=")}
        print(f"task {i}: {len(lines)} ranks on {len(hosts)} nodes: {', '.join(sorted(hosts))}")
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    # A bad config or image is one line on stderr and exit status 2, as with parsl-aurora.
    sys.exit(run_main(main))
