"""Every mode end to end, through Parsl's real providers and executors, on the fake PBS and on
a real OpenPBS server (as its unprivileged test user), with the fake PALS `mpiexec` on both.

Jobs start in $HOME from a login environment on both: the site config must activate the
driver's environment and come back to the driver's folder itself.
"""

from __future__ import annotations

import re
import shutil
import sys

import pytest
from clusters import wait_for
from conftest import ROOT, no_leftovers

pytestmark = [pytest.mark.slow, pytest.mark.needs("mpi")]
SITE = {"fake": "local", "real": "pbs"}
TILES = sorted(f"{g}.{t}" for g in range(6) for t in range(2))


def python(cluster, request) -> str:
    """The driver's interpreter: the tests' own on the fake, the test user's venv on real PBS."""
    if cluster.kind == "fake":
        return sys.executable
    return str(request.getfixturevalue("user_venv") / "bin" / "python")


def run(cluster, request, script: str, mode: str, *, source: str | None = None, env=None):
    """Run an example (or `source`) as the cluster's user in a fresh folder it owns."""
    d = cluster.workdir("run")
    path = d / script
    cluster.write(path, source if source is not None else (ROOT / "examples" / script)
                  .read_text())
    exe = python(cluster, request)
    # Parsl starts interchange.py from PATH: the driver's environment is activated.
    env = {"PARSL_SITE": SITE[cluster.kind], "PARSL_MODE": mode,
           "PATH": f"{exe.rsplit('/', 1)[0]}:{cluster.env['PATH']}", **(env or {})}
    return d, cluster.run(exe, script, cwd=d, env=env)


def test_single_tile_tasks_use_all_12_tiles_in_multi_job(cluster, request):
    d, out = run(cluster, request, "workflow.py", "multi_job")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "12 python tasks on 12 distinct tiles" in out.stdout, out.stdout[-2000:]
    masks = [re.search(r"ze_affinity_mask=(\S+)", p.read_text()).group(1)
             for p in sorted((d / "output").glob("hello_*.stdout"))]
    assert sorted(masks) == TILES  # twelve hellos, each on its own tile
    # Launcher files went to the run directory, not to the job's $HOME or the driver's folder.
    assert not list(cluster.home.glob("cmd_*.sh")) and not list(d.glob("cmd_*.sh"))
    assert list((d / "runinfo").glob("cmd_*.sh"))
    assert no_leftovers(d) == []


def test_bash_app_relative_output_lands_where_the_driver_runs(cluster, request):
    """Parsl's shared-file-system contract: a bash app's relative stdout= is the driver's."""
    source = """
import os, parsl, site_configs
from parsl import bash_app

@bash_app
def where(stdout="where.txt"):
    return "pwd; echo $ZE_FLAT_DEVICE_HIERARCHY; command -v process_worker_pool.py"

if __name__ == "__main__":  # workers start in this folder and may import this file
    with parsl.load(site_configs.load()):
        where().result()
"""
    d, out = run(cluster, request, "where.py", "multi_job", source=source)
    assert out.returncode == 0, out.stderr[-3000:]
    cwd, hierarchy, pool = (d / "where.txt").read_text().split()
    assert (cwd, hierarchy) == (str(d), "COMPOSITE")
    assert pool.startswith(python(cluster, request).rsplit("/bin/", 1)[0])  # the driver's env


def test_mpi_tasks_span_two_nodes_with_one_tile_per_rank(cluster, request):
    d, out = run(cluster, request, "mpi_workflow.py", "mpi_ensemble")
    assert out.returncode == 0, out.stderr[-3000:]
    tasks = sorted((d / "mpi_output").glob("*/hello.stdout"))
    assert len(tasks) == 10
    for f in tasks:
        lines = f.read_text().splitlines()
        assert len(lines) == 24, f
        hosts = {re.search(r"host=(\S+)", x).group(1) for x in lines}
        assert len(hosts) == 2, hosts
        for h in hosts:
            masks = sorted(re.search(r"ze_affinity_mask=(\S+)", x).group(1) for x in lines
                           if f"host={h} " in x)
            assert masks == TILES, (h, masks)
    # Its output not a terminal, it waits as workflow.py does: the run directory, then lines of
    # counts, the last when all 10 are done.
    from test_progress import LINE

    lines = out.stdout.splitlines()
    first = next((i for i, x in enumerate(lines) if x.startswith("run directory: ")), None)
    assert first is not None and lines[first].startswith(f"run directory: {d / 'runinfo' / '000'} "), lines
    counts = [x for x in lines[first:] if LINE.fullmatch(x)]
    assert counts and " tasks: 10 done, 0 failed, 0 pending " in counts[-1], lines
    assert no_leftovers(d) == []


ALLREDUCE = """
import os, parsl, sys
from parsl import bash_app
import site_configs

@bash_app
def allreduce(parsl_resource_specification, python=sys.executable, stdout=None):
    return ("$PARSL_MPI_PREFIX " + python +
            " -c 'from mpi4py import MPI; c = MPI.COMM_WORLD; s = c.allreduce(c.rank); "
            "print(s, c.size, MPI.Get_processor_name()) if c.rank == 0 else None'")

# No ranks_per_node: Parsl derives "12.0", which PALS refuses; the bundle passes 12.
spec = {"num_nodes": 2, "num_ranks": 24}
if __name__ == "__main__":
    # One 2-node slot: the tasks run one after the other, 24 ranks at a time on 2 cores.
    with parsl.load(site_configs.load(nodes_per_job=2)):
        fs = [allreduce(parsl_resource_specification=spec, stdout=f"allreduce_{i}.out")
              for i in range(2)]
        print([f.result() for f in fs])
"""


def test_mpi4py_allreduce_over_24_ranks_on_two_nodes(cluster, request):
    d, out = run(cluster, request, "allreduce.py", "mpi_ensemble", source=ALLREDUCE)
    assert out.returncode == 0, out.stderr[-3000:]
    for i in range(2):
        total, size, _ = (d / f"allreduce_{i}.out").read_text().split()
        assert (int(total), int(size)) == (sum(range(24)), 24)


def test_in_job_pbs_script_submitted_with_qsub(cluster, request):
    """examples/in_job.pbs as written: it comes back to the submit folder, activates the
    environment it is given and runs examples/workflow.py on the job's two nodes."""
    d = cluster.workdir("injob")
    shutil.copytree(ROOT / "examples", d / "examples")
    if cluster.runas:
        shutil.chown(d / "examples", cluster.user, cluster.user)
    venv = python(cluster, request).rsplit("/bin/", 1)[0]
    job = cluster.run("qsub", "-A", "fake", "-v",
                      f"PARSL_SITE={SITE[cluster.kind]},PARSL_AURORA_VENV={venv}",
                      "examples/in_job.pbs", cwd=d)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip()
    record = cluster.wait_state(job_id, "F", limit=600)
    out = wait_for(lambda: next(d.glob("parsl_in_job.o*"), None), "the job's output file")
    assert record["Exit_status"] == 0, out.read_text()[-3000:] + next(
        d.glob("parsl_in_job.e*")).read_text()[-3000:]
    assert "12 python tasks on 12 distinct tiles" in out.read_text()
    # MpiExecLauncher started one pool per node of the job's 2-node file.
    nodes = next((d / "runinfo").glob("*.nodes")).read_text().split()
    assert len(nodes) == 2 and len(set(nodes)) == 2
