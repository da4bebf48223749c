"""A fake Aurora at the process boundary: PBS's qsub/qstat/qdel and PALS's mpiexec.

Only the scheduler and the launcher are faked; Parsl and MPI (MPICH's hydra) run for real.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SERVER = "aurora-pbs-fake"


def bin_dir() -> Path:
    """The folder holding the fake qsub, qstat, qdel and mpiexec."""
    return Path(__file__).resolve().parent / "bin"


def host_names(n: int) -> list[str]:
    """Aurora-style node names (cabinet x4102, slot i), one per fake node."""
    return [f"x4102c0s{i}b0n0" for i in range(n)]


def hydra() -> str:
    """MPICH's mpiexec (from the `mpich` wheel) that really launches the ranks."""
    found = os.environ.get("PARSL_AURORA_HYDRA")
    if found:
        return found
    beside = Path(sys.executable).parent / "mpiexec.hydra"
    if beside.exists():
        return str(beside)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(p).resolve() != bin_dir())
    return shutil.which("mpiexec.hydra", path=path) or shutil.which("mpiexec", path=path) or ""


def environment(run_dir: os.PathLike | str) -> dict[str, str]:
    """Variables that put the fake first: its commands on PATH, its state under run_dir/fake."""
    state = Path(run_dir).resolve() / "fake"
    state.mkdir(parents=True, exist_ok=True)
    # Parsl starts interchange.py from PATH, so this interpreter's scripts come right after the
    # fake's commands (which must shadow the mpich wheel's own mpiexec there).
    head = [str(bin_dir()), str(Path(sys.executable).parent)]
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p not in head]
    path = os.pathsep.join(head + rest)
    return {
        "PATH": path,
        "PARSL_AURORA_FAKE_DIR": str(state),
        "PARSL_AURORA_PYTHON": sys.executable,
        "PARSL_AURORA_HYDRA": hydra(),
    }
