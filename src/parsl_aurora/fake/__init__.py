"""A fake Aurora at the process boundary: PBS's qsub/qstat/qdel and PALS's mpiexec.

Only the scheduler and the launcher are faked; Parsl and MPI (MPICH's hydra) run for real.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Aurora's management domain: node names in $PBS_NODEFILE carry it (exec_host does not).
NODE_SUFFIX = "hostmgmt2102.cm.aurora.alcf.anl.gov"


def bin_dir() -> Path:
    """The folder holding the fake qsub, qstat, qdel, mpiexec and the per-rank shim."""
    return Path(__file__).resolve().parent / "bin"


def modulefiles() -> Path:
    """The fake's module tree (Lmod), for `module use`: a look-alike of ALCF's `frameworks`."""
    return Path(__file__).resolve().parent / "modulefiles"


def host_names(n: int) -> list[str]:
    """Aurora-style node names (cabinet x4102, slot i), one per fake node."""
    return [f"x4102c0s{i}b0n0" for i in range(n)]


def nodefile_lines(n: int) -> str:
    """A $PBS_NODEFILE for n fake nodes, one fully qualified name per line, as PBS writes it."""
    return "".join(f"{h}.{NODE_SUFFIX}\n" for h in host_names(n))


def hydra() -> str:
    """MPICH's mpiexec (from the `mpich` wheel) that really launches the ranks; "" if none."""
    found = os.environ.get("PARSL_AURORA_HYDRA")
    if found and os.access(found, os.X_OK):  # a host's path may reach into the image
        return found
    beside = Path(sys.executable).parent / "mpiexec.hydra"
    if beside.exists():
        return str(beside)
    # Only hydra's own name: any `mpiexec` may be a fake PALS (this one, or the host's bound
    # into the image), which would call itself.
    return shutil.which("mpiexec.hydra") or ""


def environment(run_dir: os.PathLike | str) -> dict[str, str]:
    """Variables that make a workflow use the fake: the fake cluster already chosen
    ($PARSL_AURORA_FAKE_DIR), else one with its job state in run_dir."""
    state = Path(os.environ.get("PARSL_AURORA_FAKE_DIR") or run_dir).resolve()
    # Parsl starts interchange.py from PATH, so this interpreter's scripts come right after the
    # fake's commands (which must shadow the mpich wheel's own mpiexec there). A PATH that
    # already holds the fake's commands is kept as it is: whoever put them there chose what
    # goes before them (the tests put commands that fail on purpose there).
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    if str(bin_dir()) not in path:
        head = [str(bin_dir()), str(Path(sys.executable).parent)]
        path = head + [p for p in path if p not in head]
    return {
        "PATH": os.pathsep.join(path),
        "PARSL_AURORA_FAKE_DIR": str(state),
        "PARSL_AURORA_PYTHON": sys.executable,
        "PARSL_AURORA_HYDRA": hydra(),
    }
