"""The fake Aurora on this machine: Aurora's modes and queues, a node read from the host.

PBS and PALS are replaced by the fake's qsub/qstat/qdel/mpiexec (parsl_aurora.fake); Parsl, its
providers, launchers and executors run for real.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from parsl_aurora import fake, modes, topology
from parsl_aurora.container import HostStack
from parsl_aurora.modes import Site
from parsl_aurora.topology import AURORA, Node
from site_configs import aurora

# The look-alikes' queues (the fake PBS, and the real OpenPBS of .ci/install-openpbs.sh):
# Aurora's, with two differences. No 5-minute minimum, so tests run jobs of seconds; and prod,
# scaled to the real look-alike's two nodes, routes 1-node jobs to small (12 h) and 2-node jobs
# to medium (18 h).
QUEUES = {
    name: replace(q, min_walltime=None) for name, q in aurora.QUEUES.items()
} | {"prod": replace(aurora.QUEUES["prod"], min_nodes=1, max_nodes=2, min_walltime=None,
                     walltime_by_nodes=((2, "18:00:00"),))}


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


# Workers in the image on the fake cluster: the fake PALS found on the host runs there with
# the image's Python and hands each launch to a fake PALS daemon the block starts on the host,
# which starts the ranks there, outside the image, as Aurora's PALS does.
FAKE_PALSD = (
    'export APPTAINERENV_PARSL_AURORA_PALSD="@parsl-aurora-palsd.$(mktemp -u XXXXXXXXXX)"\n'
    '"${PARSL_AURORA_PYTHON:-python3}" -m parsl_aurora.fake.palsd '
    '"$APPTAINERENV_PARSL_AURORA_PALSD" &')
FAKE_STACK = HostStack(env=(("PARSL_AURORA_PYTHON", "python3"), ("PARSL_AURORA_HYDRA", "")),
                       init=FAKE_PALSD)


def site(n: Node) -> Site:
    return Site(
        name="local",
        queues=QUEUES,
        cores_per_worker=_cores_per_worker(n),
        # The fake PALS maps Aurora's CPU ids onto this machine: jobs are Aurora nodes to it.
        pals_node=AURORA,
        # The fake PALS mpiexec ahead of the one the mpich wheel puts beside python, which the
        # driver's activated environment brings.
        # mpiexec lengthens TMPDIR past the AF_UNIX path limit, as on Aurora (Parsl #3947).
        worker_init=f"export TMPDIR=/tmp\nexport PATH={fake.bin_dir()}:$PATH",
        prepare=fake.environment,
        container_host=FAKE_STACK,
        interface="lo",
        real_pbs=False,
        # The fake's qstat and heartbeats are cheap and local: notice lost pools and ended jobs
        # within seconds, so walltime and crash tests finish in about a minute.
        heartbeat=(2, 15),
        qstat_interval=1,
    )


def multi_job(*, account: str = "fake_project", node: Node | None = None, **kwargs):
    """Single-tile tasks over many fake PBS jobs (real PBSProProvider, fake qsub)."""
    n = node or fake_node()
    return modes.build("multi_job", site(n), n, account=account, **kwargs)


def mpi_ensemble(*, account: str = "fake_project", node: Node | None = None, **kwargs):
    """Multi-node MPI tasks on fake nodes; ranks really communicate through MPICH."""
    n = node or fake_node()
    return modes.build("mpi_ensemble", site(n), n, account=account, **kwargs)


def in_job(*, node: Node | None = None, nodefile: str | None = None, nodes: int = 1,
           run_dir: str = "runinfo", **kwargs):
    """Everything in one (fake) job; outside a job, a node file of `nodes` fake hosts is made."""
    n = node or fake_node()
    if nodefile is None and not os.environ.get("PBS_NODEFILE"):
        path = Path(run_dir, "fake", "nodefile")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fake.nodefile_lines(nodes))
        nodefile = str(path)
    return modes.build("in_job", site(n), n, nodefile=nodefile, run_dir=run_dir, **kwargs)


def machine() -> tuple[Site, Node]:
    n = fake_node()
    return site(n), n
