"""`hello-affinity`: where this process runs, the stand-in for ALCF's SYCL hello_affinity.

Prints one line of key=value pairs: host, rank, local rank, bound CPUs and ZE_AFFINITY_MASK.
"""

from __future__ import annotations

import os
import socket

from parsl_aurora.topology import ranges


def line(environ: dict[str, str], cpus: list[int], hostname: str) -> str:
    """The report for one process, from its environment and CPU set."""
    def first(*names: str, default: str = "0") -> str:
        return next((environ[n] for n in names if environ.get(n)), default)

    return " ".join([
        f"host={first('PARSL_AURORA_HOST', default=hostname)}",
        f"rank={first('PALS_RANKID', 'PMI_RANK')}",
        f"local_rank={first('PALS_LOCAL_RANKID', 'PMI_LOCAL_RANK')}",
        f"cpus={ranges(sorted(cpus))}",
        f"ze_affinity_mask={first('ZE_AFFINITY_MASK', default='unset')}",
    ])


def main() -> int:
    text = line(dict(os.environ), sorted(os.sched_getaffinity(0)), socket.gethostname())
    # One write(2) per line: many ranks share mpiexec's output, and a pipe keeps writes under
    # PIPE_BUF whole, whereas print() may write text and newline apart (PYTHONUNBUFFERED=1).
    os.write(1, (text + "\n").encode())
    return 0
