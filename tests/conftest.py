"""Shared fixtures: every test runs in its own folder; Parsl's tools come from this interpreter."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "aurora.sif"


@pytest.fixture(autouse=True)
def _own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Parsl starts interchange.py and process_worker_pool.py from PATH.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for var in ("PARSL_SITE", "PARSL_MODE", "PARSL_ACCOUNT", "PBS_NODEFILE"):
        monkeypatch.delenv(var, raising=False)


def leftovers(folder: Path) -> list[str]:
    """Processes still running whose command line or working folder is inside `folder`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if int(pid) != os.getpid() and (str(folder) in cmd or cwd.startswith(str(folder))):
            found.append(f"{pid}: {cmd[:120]}")
    return found


def no_leftovers(folder: Path) -> list[str]:
    # Parsl's shutdown cancels blocks asynchronously; give the kills a moment to land.
    for _ in range(50):
        if not (left := leftovers(folder)):
            return []
        time.sleep(0.2)
    return left


# ---------------------------------------------------------------- the real image
_NEEDS_APPTAINER = (
    pytest.mark.apptainer,
    pytest.mark.skipif(shutil.which("apptainer") is None,
                       reason="apptainer is not on PATH (install: bash .ci/install-apptainer)"),
)


def needs_apptainer(test):
    for mark in _NEEDS_APPTAINER:
        test = mark(test)
    return test


@pytest.fixture(scope="session")
def built_image() -> Path:
    """aurora.sif at the repository root, built by the same command users run, or reused."""
    out = subprocess.run([sys.executable, "-m", "parsl_aurora.image", "build"], cwd=ROOT,
                         check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"image build failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert IMAGE.exists()
    return IMAGE
