"""Every mode end to end on the fake cluster, through Parsl's real providers and executors."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, no_leftovers

pytestmark = pytest.mark.slow


def run_example(script: str, site: str, mode: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PARSL_SITE": site, "PARSL_MODE": mode, **env}
    return subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=600, check=False)


def tiles_in(stdout: str) -> int:
    return int(re.search(r"python tasks on (\d+) distinct tiles", stdout).group(1))


@pytest.mark.parametrize("mode", ["multi_job", "in_job"])
def test_workflow_uses_all_12_tiles(mode, tmp_path):
    r = run_example("workflow.py", "local", mode, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tiles_in(r.stdout) == 12
    hellos = sorted((tmp_path / "output").glob("hello_*.stdout"))
    assert len(hellos) == 12
    masks = {re.search(r"ze_affinity_mask=(\S+)", p.read_text()).group(1) for p in hellos}
    assert masks <= {f"{g}.{t}" for g in range(6) for t in range(2)}
    assert no_leftovers(tmp_path) == []


def test_mpi_workflow_two_fake_nodes_per_task(tmp_path):
    r = run_example("mpi_workflow.py", "local", "mpi_ensemble", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for i in range(10):
        lines = (tmp_path / "mpi_output" / str(i) / "hello.stdout").read_text().splitlines()
        assert len(lines) == 24
        hosts = {re.search(r"host=(\S+)", x).group(1) for x in lines}
        assert len(hosts) == 2
        # set_affinity_gpu_aurora.sh gave each local rank its own tile on each node
        for h in hosts:
            masks = [re.search(r"ze_affinity_mask=(\S+)", x).group(1) for x in lines
                     if f"host={h} " in x]
            assert sorted(masks) == sorted(f"{g}.{t}" for g in range(6) for t in range(2))
    assert no_leftovers(tmp_path) == []


ALLREDUCE = """
import os, parsl, sys
from parsl import bash_app
import site_configs

@bash_app
def allreduce(parsl_resource_specification, python=sys.executable, stdout=None):
    return ("$PARSL_MPI_PREFIX " + python +
            " -c 'from mpi4py import MPI; c = MPI.COMM_WORLD; s = c.allreduce(c.rank); "
            "print(s, c.size, MPI.Get_processor_name()) if c.rank == 0 else None'")

spec = {"num_nodes": 2, "ranks_per_node": 12, "num_ranks": 24}
# One 2-node slot: the tasks run one after the other, 24 ranks at a time on 2 cores.
with parsl.load(site_configs.load("local", "mpi_ensemble", nodes_per_job=2)):
    fs = [allreduce(parsl_resource_specification=spec, stdout=f"{os.getcwd()}/allreduce_{i}.out") for i in range(2)]
    print([f.result() for f in fs])
"""


def test_mpi4py_allreduce_over_24_ranks(tmp_path):
    r = subprocess.run([sys.executable, "-c", ALLREDUCE], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    for i in range(2):
        total, size, _ = (tmp_path / f"allreduce_{i}.out").read_text().split()
        assert (int(total), int(size)) == (sum(range(24)), 24)


def test_in_job_pbs_script_through_fake_qsub(tmp_path):
    """examples/in_job.pbs submitted to the fake qsub: in_job mode reads the job's node file."""
    from parsl_aurora import fake

    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the script runs examples/workflow.py
    env = {**os.environ, **fake.environment(tmp_path / "fake")}
    env["PARSL_SITE"] = "local"
    job = subprocess.run(["qsub", "-A", "fake", "-V", str(ROOT / "examples" / "in_job.pbs")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    job_id = job.stdout.strip()
    for _ in range(600):
        q = subprocess.run(["qstat", "-x", "-f", "-F", "json", job_id], env=env,
                           capture_output=True, text=True, check=False)
        if '"job_state": "F"' in q.stdout or '"job_state":"F"' in q.stdout:
            break
        time.sleep(0.5)
    out = next(tmp_path.glob("parsl_in_job.o*")).read_text()
    assert "python tasks on 12 distinct tiles" in out, out[-3000:]
    # MpiExecLauncher started one pool per node of the job's 2-node file
    block_nodes = next(tmp_path.glob("parsl.htex_tiles.block-0.*.nodes")).read_text().split()
    assert block_nodes == fake.host_names(2)
    assert '"Exit_status": 0' in q.stdout.replace('"Exit_status":0', '"Exit_status": 0')
