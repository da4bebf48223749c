"""Shared fixtures: every test runs in its own folder; Parsl's tools come from this interpreter."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Parsl starts interchange.py and process_worker_pool.py from PATH.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for var in ("PARSL_SITE", "PARSL_MODE", "PARSL_ACCOUNT", "PBS_NODEFILE"):
        monkeypatch.delenv(var, raising=False)
