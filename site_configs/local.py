"""The fake Aurora on this machine: Aurora's modes and queues, a node read from the host.

PBS and PALS are replaced by the fake's qsub/qstat/qdel/mpiexec (parsl_aurora.fake); Parsl, its
providers, launchers and executors run for real.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from parsl_aurora import fake, modes, topology
from parsl_aurora.modes import Site
from parsl_aurora.topology import Node
from site_configs.aurora import QUEUES


def fake_node() -> Node:
    """This machine's CPUs carrying Aurora's 6 GPUs x 2 tiles, so every mode sees 12 tiles."""
    return topology.local(gpus=6, tiles_per_gpu=2)


def _cores_per_worker(n: Node) -> int | None:
    # Parsl's pool asserts >= 1 CPU per worker for any pinning, so a machine with fewer cores
    # than tiles pins nothing; the fake mpiexec still maps Aurora CPU ids (docs/fake-cluster.md).
    per_socket = n.tiles // n.sockets
    free = n.cores_per_socket - len(n.reserved_cores) // n.sockets
    fit = min(8, free // per_socket) if per_socket else 0
    return fit or None


def site(n: Node) -> Site:
    return Site(
        name="local",
        node=n,
        queues=QUEUES,
        cores_per_worker=_cores_per_worker(n),
        # Blocks start from a login-like shell, as on PBS: put this interpreter's tools on PATH,
        # behind the fake's commands (the mpich wheel's own mpiexec lives beside python).
        worker_init=f"export PATH={fake.bin_dir()}:{Path(sys.executable).parent}:$PATH",
        prepare=fake.environment,
        # The fake's qstat and heartbeats are cheap and local: notice lost pools and ended jobs
        # within seconds, so walltime and crash tests finish in about a minute.
        heartbeat=(1, 5),
        qstat_interval=1,
    )


def multi_job(*, account: str = "fake_project", node: Node | None = None, **kwargs):
    """Single-tile tasks over many fake PBS jobs (real PBSProProvider, fake qsub)."""
    n = node or fake_node()
    return modes.multi_job(site(n), n, account=account, **kwargs)


def mpi_ensemble(*, account: str = "fake_project", node: Node | None = None, **kwargs):
    """Multi-node MPI tasks on fake nodes; ranks really communicate through MPICH."""
    n = node or fake_node()
    return modes.mpi_ensemble(site(n), n, account=account, **kwargs)


def in_job(*, node: Node | None = None, nodefile: str | None = None, nodes: int = 1,
           run_dir: str = "runinfo", **kwargs):
    """Everything in one (fake) job; outside a job, a node file of `nodes` fake hosts is made."""
    n = node or fake_node()
    if nodefile is None and not os.environ.get("PBS_NODEFILE"):
        path = Path(run_dir, "fake", "nodefile")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(h + "\n" for h in fake.host_names(nodes)))
        nodefile = str(path)
    return modes.in_job(site(n), n, nodefile=nodefile, run_dir=run_dir,
                        **kwargs)
