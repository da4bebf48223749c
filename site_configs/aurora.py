"""ALCF Aurora: the node model, the queue table and the three modes as factories.

Each factory returns a fresh Parsl Config; nothing is built at import time.
"""

from __future__ import annotations

from parsl_aurora import container, modes
from parsl_aurora.modes import Queue, Site
from parsl_aurora.topology import AURORA, Node

# Published limits (ALCF "Running jobs on Aurora"); None = not published, so not checked.
QUEUES = {
    q.name: q
    for q in (
        Queue("debug", min_nodes=1, max_nodes=2, max_walltime="1:00:00"),
        Queue("debug-scaling", min_nodes=2, max_nodes=256),
        Queue("prod", min_nodes=256),
        Queue("capacity", min_nodes=1, max_nodes=16, max_walltime="168:00:00"),
    )
}

SITE = Site(
    name="aurora",
    node=AURORA,
    queues=QUEUES,
    cores_per_worker=8,
    # mpiexec lengthens TMPDIR past the AF_UNIX path limit on ALCF systems (Parsl #3947).
    worker_init="export TMPDIR=/tmp",
    binds=container.AURORA_BINDS,
    # Compute nodes have apptainer only as a module.
    container_init="module load apptainer",
    # A pool killed with its job (walltime, node failure) gives its tasks back within a minute,
    # not Parsl's two; ten-second heartbeats are noise for one interchange even at 10,000 nodes.
    heartbeat=(10, 60),
    # One qstat for all of the workflow's jobs every 30 s: the next job is asked for soon after
    # one ends, at a load on the PBS server of a user watching `qstat` by hand.
    qstat_interval=30,
)


def multi_job(*, account: str, node: Node = AURORA, **kwargs):
    """Single-tile tasks spread over many PBS jobs (HighThroughputExecutor + PBSProProvider)."""
    return modes.multi_job(SITE, node, account=account, **kwargs)


def mpi_ensemble(*, account: str, node: Node = AURORA, **kwargs):
    """Multi-node MPI tasks over one or more PBS jobs (MPIExecutor + PBSProProvider)."""
    return modes.mpi_ensemble(SITE, node, account=account, **kwargs)


def in_job(*, node: Node = AURORA, **kwargs):
    """Everything inside the current PBS job (HighThroughputExecutor + LocalProvider)."""
    return modes.in_job(SITE, node, **kwargs)
