"""Fake PBS Pro: `qsub`, `qstat` and `qdel` over one JSON file per job in $PARSL_AURORA_FAKE_DIR.

Held to a real OpenPBS server by tests/test_pbs_conformance.py; what it does and where it
deliberately differs: docs/fake-cluster.md. Modules by role: `cli` (command lines and `main`),
`store` (the server: queues, job state files, submission), `supervisor` (running one job),
`render` (what `qstat` prints).
"""

from __future__ import annotations

from dataclasses import dataclass

# The server as Aurora's clients see it (and as ../shared/tools/install-openpbs.sh names its
# look-alike): job ids are <seq>.<SERVER>, nodes x4102c0s<i>b0n0 in NODE_DOMAIN.
SERVER = "aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"
NODE_DOMAIN = "hostmgmt2102.cm.aurora.alcf.anl.gov"
PBS_VERSION = "23.06.06"
CPUS_PER_NODE = 208  # an Aurora node's logical CPUs
DEFAULT_QUEUE = "workq"

# Exit_status of a job ended by walltime (JOB_EXEC_KILL_WALLTIME), and by qdel (PBS reports a job
# killed by signal N as 256 + N; qdel sends SIGTERM).
EXIT_WALLTIME = -29
EXIT_DELETED = 271
# Exit codes of the commands, as OpenPBS 23.06 returns them.
RC_FINISHED = 35         # qstat/qdel of a finished job
RC_ILLEGAL = 166         # qsub with a malformed resource value
RC_PER_USER_LIMIT = 38   # qsub over a queue's per-user limit
RC_UNKNOWN_JOB = 153
RC_UNKNOWN_QUEUE = 170
RC_OVER_LIMITS = 188     # qsub asking for more than the queue allows (walltime)
RC_QUEUE_DENIED = 174    # qsub to a queue that takes jobs only from its routing queue
# A job whose start failed this many times is held (OpenPBS: run_count above 2 x
# PBS_MAX_HOPCOUNT, server_limits.h; users may set run_count with `qsub -W run_count=N`).
MAX_RUN_COUNT = 20
HELD_COMMENT = "job held, too many failed attempts to run"
EXIT_RETRY = -3  # Exit_status of a job whose start failed (JOB_EXEC_RETRY)
# Jobs of this account fail to start, on the fake as on the real look-alike (whose MoM
# prologue fails them: .ci/install-openpbs.sh).
FAIL_ACCOUNT = "fail-start"


@dataclass(frozen=True)
class ServerQueue:
    """One queue of the fake server: what qsub checks at submission (None: no limit)."""

    max_walltime: int | None = None   # seconds (qmgr resources_max.walltime)
    max_user_queued: int | None = None  # queued-or-running jobs per user (max_queued [u:...])
    min_nodes: int | None = None  # resources_min.nodect
    max_nodes: int | None = None  # resources_max.nodect
    from_route_only: bool = False
    # A routing queue's destinations, tried in order; the first that takes the job gets it.
    routes_to: tuple[str, ...] = ()


# The queues of .ci/install-openpbs.sh's look-alike, which copy Aurora's limits (prod scaled to
# its two nodes), in the order it creates them (`qstat -Q` lists them so).
QUEUES = {
    "workq": ServerQueue(),
    "debug": ServerQueue(max_walltime=3600, max_user_queued=1),
    "debug-scaling": ServerQueue(max_walltime=3600, max_user_queued=1),
    "small": ServerQueue(max_walltime=12 * 3600, min_nodes=1, max_nodes=1,
                         from_route_only=True),
    "medium": ServerQueue(max_walltime=18 * 3600, min_nodes=2, max_nodes=2,
                          from_route_only=True),
    "capacity": ServerQueue(max_walltime=168 * 3600, max_user_queued=5),
    "prod": ServerQueue(max_walltime=24 * 3600, routes_to=("small", "medium")),
}


class PBSError(Exception):
    """A refusal, printed on stderr as PBS prints it; `code` is the command's exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code
