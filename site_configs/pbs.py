"""A real OpenPBS server on this machine (../shared/tools/install-openpbs.sh's Aurora look-alike:
two 208-CPU nodes, Aurora's queues) with the fake PALS mpiexec: the three modes through real
`qsub`, `qstat` and `qdel`, run as an unprivileged user (PBS refuses root).

Jobs start as on Aurora, in $HOME from a login environment; the site's lines put the fake PALS
on their PATH, which on Aurora is the system's.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import replace

from parsl_aurora import fake, modes
from parsl_aurora.modes import Site
from parsl_aurora.topology import AURORA, Node
from site_configs.local import FAKE_STACK, QUEUES, _cores_per_worker, fake_node

# The look-alike's MoMs keep their job files (a job's $PBS_NODEFILE, which MPI mode reads in
# the pool) here (.ci/install-openpbs.sh's MOM_HOME_BASE), where Aurora's are in /var/spool/pbs.
MOM_HOMES = "/var/spool/pbs-moms"
STACK = replace(FAKE_STACK, binds=(MOM_HOMES,))


def site(n: Node) -> Site:
    # Where the fake PALS lives on the host: this environment's, unless the environment says
    # otherwise (a driver inside the image names the host's, which it cannot see).
    pals = {"PARSL_AURORA_PYTHON": os.environ.get("PARSL_AURORA_PYTHON") or sys.executable,
            "PARSL_AURORA_HYDRA": os.environ.get("PARSL_AURORA_HYDRA") or fake.hydra()}
    pals_bin = os.environ.get("PARSL_AURORA_PALS_BIN") or str(fake.bin_dir())
    return Site(
        name="pbs",
        queues=QUEUES,
        cores_per_worker=_cores_per_worker(n),
        # The look-alike's nodes are Aurora's to PBS (208 CPUs) and to the fake PALS.
        pals_node=AURORA,
        # PBS's per-job TMPDIR is too long for the pool's AF_UNIX sockets (Parsl #3947).
        worker_init="\n".join(["export TMPDIR=/tmp", f"export PATH={shlex.quote(pals_bin)}:$PATH",
                               *(f"export {k}={shlex.quote(v)}" for k, v in pals.items())]),
        container_host=STACK,
        interface="lo",
        real_pbs=True,
        # Real PBS notices walltime every 1-5 s here and qstat is cheap on one machine.
        heartbeat=(2, 15),
        qstat_interval=1,
    )


def multi_job(*, account: str = "fake_project", node: Node | None = None, **kwargs):
    """Single-tile tasks over real PBS jobs on the look-alike's two nodes."""
    n = node or fake_node()
    return modes.build("multi_job", site(n), n, account=account, **kwargs)


def mpi_ensemble(*, account: str = "fake_project", node: Node | None = None, **kwargs):
    """Multi-node MPI tasks in one real PBS job of the look-alike's two nodes."""
    n = node or fake_node()
    kwargs.setdefault("nodes_per_job", 2)  # the look-alike has two nodes
    return modes.build("mpi_ensemble", site(n), n, account=account, **kwargs)


def in_job(*, node: Node | None = None, **kwargs):
    """Everything inside the current real PBS job (run from examples/in_job.pbs)."""
    n = node or fake_node()
    return modes.build("in_job", site(n), n, **kwargs)


def machine() -> tuple[Site, Node]:
    n = fake_node()
    return site(n), n
