"""ALCF Aurora: the node model, the queue table and the three modes as factories.

Each factory returns a fresh Parsl Config; nothing is built at import time.
"""

from __future__ import annotations

from parsl_aurora import container, modes
from parsl_aurora.modes import Queue, Site
from parsl_aurora.topology import AURORA, Node

# Published limits (ALCF "Running jobs on Aurora", ../shared/reference/aurora-facts.md,
# "Scheduler limits"); None = not published, so not checked.
# Every queue takes jobs of 5 minutes or more.
QUEUES = {
    q.name: q
    for q in (
        Queue("debug", min_nodes=1, max_nodes=2, min_walltime="0:05:00", max_walltime="1:00:00",
              max_user_queued=1),
        Queue("debug-scaling", min_nodes=2, max_nodes=256, min_walltime="0:05:00",
              max_walltime="1:00:00", max_user_queued=1),
        # A routing queue to small (256-1024 nodes, 12 h), medium (1025-1999, 18 h) and large
        # (2000+, 24 h), which refuse direct submission; its limits are per project.
        Queue("prod", min_nodes=256, min_walltime="0:05:00", max_walltime="12:00:00",
              walltime_by_nodes=((1025, "18:00:00"), (2000, "24:00:00")),
              max_project_queued=100, max_project_running=10),
        # 512 nodes across all jobs of the queue, everybody's (since 2026-06-26).
        Queue("capacity", min_nodes=1, max_nodes=16, min_walltime="0:05:00",
              max_walltime="168:00:00", max_user_queued=5, max_user_running=2,
              max_queue_nodes=512),
    )
}

SITE = Site(
    name="aurora",
    queues=QUEUES,
    cores_per_worker=8,
    # mpiexec lengthens TMPDIR past the AF_UNIX path limit on ALCF systems (Parsl #3947).
    worker_init="export TMPDIR=/tmp",
    container_host=container.AURORA_STACK,
    # Compute nodes have apptainer only as a module.
    container_init="module load apptainer",
    # Workers connect over the Slingshot network (ALCF's page, since 2026-07).
    interface="hsn0",
    # A pool killed with its job (walltime, node failure) gives its tasks back within a minute,
    # not Parsl's two. Measured (docs/scale.md, `nox -s scale`, 2 loaded cores): at 4,096 pools
    # ten-second heartbeats take 29% of a core of one interchange, whose heartbeat work grows
    # with the square of the pools (it scans them all for every message); in a first run at
    # 9,000 it fell behind and expired live pools ("Too many heartbeats missed"). Above 4,096
    # pools per interchange modes.heartbeat slows both figures with that square.
    heartbeat=(10, 60),
    # One qstat for all of the workflow's jobs every 30 s: the next job is asked for soon after
    # one ends, at a load on the PBS server of a user watching `qstat` by hand.
    qstat_interval=30,
)


def multi_job(*, node: Node = AURORA, **kwargs):
    """Single-tile tasks spread over many PBS jobs (HighThroughputExecutor + PBSProProvider)."""
    return modes.build("multi_job", SITE, node, **kwargs)


def mpi_ensemble(*, node: Node = AURORA, **kwargs):
    """Multi-node MPI tasks over one or more PBS jobs (MPIExecutor + PBSProProvider)."""
    return modes.build("mpi_ensemble", SITE, node, **kwargs)


def in_job(*, node: Node = AURORA, **kwargs):
    """Everything inside the current PBS job (HighThroughputExecutor + LocalProvider)."""
    return modes.build("in_job", SITE, node, **kwargs)


def machine() -> tuple[Site, Node]:
    return SITE, AURORA
