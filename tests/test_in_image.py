"""Workers and drivers in the image, the way Aurora runs them: the host's GPU and MPI stack
bound in, the fake cluster inside with nothing bound, and PBS reached through the bridge.

The host's stack is stood in for by real programs built here with gcc: a "driver" library in a
host lib folder (Aurora's /usr/lib64), a library and a program in a programming-environment
tree (Aurora's /opt/aurora/<PE>), which the image cannot run without the host's binds and
library path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.needs("apptainer", "mpi")]

STANDIN = {
    "usr/lib64/libdriver.c": "int driver_answer(void) { return 42; }\n",
    "opt/aurora/pe/lib/libstandin.c": (
        "#include <stdio.h>\nint driver_answer(void);\n"
        "const char *standin(void) { static char b[64];\n"
        "  snprintf(b, sizeof b, \"standin sees driver %d\", driver_answer()); return b; }\n"),
    "opt/aurora/pe/bin/standin.c": (
        "#include <stdio.h>\nconst char *standin(void);\n"
        "int main(void) { puts(standin()); return 0; }\n"),
}


@pytest.fixture(scope="session")
def host_tree(tmp_path_factory) -> Path:
    """An Aurora-like host tree: usr/lib64/libdriver.so, opt/aurora/pe/{lib,bin} (no rpath:
    the program finds its libraries only through LD_LIBRARY_PATH, as module-loaded ones do)."""
    tree = tmp_path_factory.mktemp("host")
    for rel, text in STANDIN.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    lib64, pe = tree / "usr" / "lib64", tree / "opt" / "aurora" / "pe"
    for cmd in (["gcc", "-shared", "-fPIC", "-o", lib64 / "libdriver.so", lib64 / "libdriver.c"],
                ["gcc", "-shared", "-fPIC", "-o", pe / "lib" / "libstandin.so",
                 pe / "lib" / "libstandin.c", f"-L{lib64}", "-ldriver"],
                ["gcc", "-o", pe / "bin" / "standin", pe / "bin" / "standin.c",
                 f"-L{pe / 'lib'}", "-lstandin", f"-L{lib64}", "-ldriver"]):
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
    return tree


HOST_STACK_FLOW = """
import dataclasses, json, sys
import parsl
from parsl import bash_app
from parsl_aurora import modes
from parsl_aurora.container import HostStack
from site_configs import local

tree, image = sys.argv[1], sys.argv[2]

@bash_app
def program(stdout="program.out"):
    return "/opt/aurora/pe/bin/standin"

@bash_app
def mpi_task(parsl_resource_specification, stdout="mpi.out"):
    return 'command -v mpiexec; $PARSL_MPI_PREFIX printenv PALS_RANKID APPTAINER_CONTAINER'

if __name__ == "__main__":
    node = local.fake_node()
    base = local.site(node)
    # What Aurora's site binds, stood in for by the tree: the PE at /opt/aurora, the host's
    # lib folder beside the image's own (/host/lib64), the fake's variables for the image.
    site = dataclasses.replace(base, container_host=HostStack(
        binds=(f"{tree}/opt/aurora:/opt/aurora", f"{tree}/usr/lib64:/host/lib64"),
        library_dirs=("/host/lib64",), env=base.container_host.env))
    # `module load` of the PE puts its libraries on LD_LIBRARY_PATH, under /opt/aurora.
    init = "export LD_LIBRARY_PATH=/opt/aurora/pe/lib"
    with parsl.load(modes.build("multi_job", site, node, account="fake", container=image,
                                worker_init=init)):
        program().result()
    parsl.clear()
    with parsl.load(modes.build("mpi_ensemble", site, node, account="fake", container=image,
                                nodes_per_job=2,
                                run_dir="runinfo-mpi")):
        mpi_task(parsl_resource_specification={"num_nodes": 2, "ranks_per_node": 2,
                                               "num_ranks": 4}).result()
"""


def test_a_host_built_program_and_the_hosts_mpiexec_in_the_image(built_image, host_tree,
                                                                   tmp_path):
    """A bash app in the image runs a host-built program whose libraries the host lends; an MPI
    task in the image starts its ranks with the host's mpiexec (the fake PALS), not a copy."""
    from parsl_aurora import fake

    (tmp_path / "flow.py").write_text(HOST_STACK_FLOW)
    out = subprocess.run([sys.executable, "flow.py", str(host_tree), str(built_image)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "program.out").read_text() == "standin sees driver 42\n"
    lines = (tmp_path / "mpi.out").read_text().splitlines()
    assert lines[0] == str(fake.bin_dir() / "mpiexec")
    ranks = sorted(lines[1:][0::2]), set(lines[1:][1::2])
    assert ranks == (["0", "1", "2", "3"], {str(built_image)}), lines


def test_without_the_host_stack_the_program_cannot_run_in_the_image(built_image, host_tree):
    """The control: the same program in the image without the binds and library path."""
    out = subprocess.run(["apptainer", "exec", "--bind", f"{host_tree}/opt/aurora:/opt/aurora",
                          str(built_image), "/opt/aurora/pe/bin/standin"],
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "libstandin.so" in out.stderr


@pytest.mark.needs("fuse")
@pytest.mark.parametrize("script,mode", [("workflow.py", "multi_job"),
                                         ("mpi_workflow.py", "mpi_ensemble")])
def test_the_fake_cluster_inside_the_image_with_nothing_bound(image_for_nobody, script, mode):
    """`apptainer exec aurora.sif python examples/...` with PARSL_SITE=local, as an unprivileged
    user: the fake PBS and PALS run inside the image (PALS without MPICH's hydra)."""
    folder = image_for_nobody.parent / f"fake-inside-{mode}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    shutil.copy(ROOT / "examples" / script, folder / script)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(folder), "LANG": "C.UTF-8",
           "PARSL_SITE": "local", "PARSL_MODE": mode}
    user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    out = subprocess.run([*user, "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                          "apptainer", "exec", str(image_for_nobody), "python", script],
                         cwd=folder, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    if mode == "multi_job":
        assert "12 python tasks on 12 distinct tiles" in out.stdout
    else:
        for task in (folder / "mpi_output").iterdir():
            lines = (task / "hello.stdout").read_text().splitlines()
            assert len(lines) == 24 and len({x.split()[0] for x in lines}) == 2


# ---------------------------------------------------------------- PBS from the image
def test_the_images_pbs_commands_reach_the_hosts_through_the_bridge(built_image, tmp_path):
    """In the image, qsub and qstat are shims; `parsl-aurora pbs-bridge` runs the host's (here
    the fake's) for them, in the same folder, and passes their output and exit codes back."""
    from clusters import fake_cluster

    cluster = fake_cluster(tmp_path)
    d = cluster.workdir()
    cluster.write(d / "job.sh", "#PBS -l walltime=0:01:00\necho ran in $PBS_O_WORKDIR\n")
    bridge = [str(Path(sys.executable).parent / "parsl-aurora"), "pbs-bridge", "--"]
    shim = ["apptainer", "exec", str(built_image), "python", "-m", "parsl_aurora.bridge"]
    sub = cluster.run(*bridge, *shim, "qsub", "job.sh", cwd=d)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    cluster.wait_state(job_id, "F")
    assert (d / f"job.sh.o{job_id.split('.')[0]}").read_text() == f"ran in {d}\n"
    stat = cluster.run(*bridge, *shim, "qstat", "-f", "-F", "json", job_id, cwd=d)
    assert stat.returncode == 35 and "Job has finished" in stat.stderr  # PBS's, passed back
    assert "Jobs" not in json.loads(stat.stdout)
    refused = cluster.run(*bridge, *shim, "qsub", "-q", "nosuchq", "job.sh", cwd=d)
    assert (refused.returncode, refused.stderr) == (170, "qsub: Unknown queue\n")
    other = cluster.run(*bridge, *shim, "pbsnodes", "-a", cwd=d)
    assert other.returncode == 2 and "only qsub, qstat, qdel" in other.stderr


@pytest.mark.needs("pbs", "fuse")
def test_the_driver_in_the_image_runs_on_real_pbs_through_the_bridge(image_for_nobody,
                                                                     real_pbs, user_venv):
    """The mission's command on a login node, as an unprivileged user of a real PBS:
    `parsl-aurora pbs-bridge -- apptainer exec aurora.sif python workflow.py`. The workers
    run in the same image on the PBS jobs' nodes."""
    d = real_pbs.workdir("bridge")
    real_pbs.write(d / "workflow.py", (ROOT / "examples" / "workflow.py").read_text())
    pals = next(user_venv.glob("lib/python3*/site-packages/parsl_aurora/fake/bin"))
    env = {"PARSL_SITE": "pbs", "PARSL_MODE": "multi_job",
           # The host's fake PALS, which the driver in the image cannot see for itself.
           "PARSL_AURORA_PALS_BIN": str(pals),
           "PARSL_AURORA_PYTHON": str(user_venv / "bin" / "python"),
           "PARSL_AURORA_HYDRA": str(user_venv / "bin" / "mpiexec.hydra")}
    out = real_pbs.run(str(user_venv / "bin" / "parsl-aurora"), "pbs-bridge", "--",
                       "apptainer", "exec", str(image_for_nobody), "python", "workflow.py",
                       cwd=d, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "12 python tasks on 12 distinct tiles" in out.stdout
    scripts = list((d / "runinfo").glob("*/submit_scripts/*[0-9]"))
    assert scripts and f"apptainer exec {image_for_nobody} " in scripts[0].read_text()


def test_without_the_bridge_the_image_says_how_to_reach_pbs(built_image, tmp_path):
    """PARSL_SITE=aurora in the image with no bridge: one line before anything is submitted."""
    shutil.copy(ROOT / "examples" / "workflow.py", tmp_path)
    out = subprocess.run(["apptainer", "exec", str(built_image), "python", "workflow.py"],
                         cwd=tmp_path,
                         env={**os.environ, "PARSL_SITE": "aurora", "PARSL_MODE": "multi_job",
                              "PARSL_ACCOUNT": "MyProject"},
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "pbs-bridge -- apptainer exec aurora.sif python workflow.py" in out.stderr
    assert not (tmp_path / "runinfo").exists()


@pytest.mark.needs("fuse")
def test_in_job_pbs_runs_the_driver_in_the_image(image_for_nobody, tmp_path):
    """examples/in_job.pbs as written, given the image: through the fake's qsub, the job runs
    the driver in the image (apptainer comes from a `module load` where there is one)."""
    from clusters import fake_cluster

    cluster = fake_cluster(tmp_path)
    d = cluster.workdir("injob")
    shutil.copytree(ROOT / "examples", d / "examples")
    job = cluster.run("qsub", "-A", "fake", "-v",
                      f"PARSL_SITE=local,PARSL_AURORA_IMAGE={image_for_nobody}",
                      "examples/in_job.pbs", cwd=d)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip()
    record = cluster.wait_state(job_id, "F", limit=600)
    seq = job_id.split(".")[0]
    out, err = (d / f"parsl_in_job.o{seq}").read_text(), (d / f"parsl_in_job.e{seq}").read_text()
    assert record["Exit_status"] == 0, out[-2000:] + err[-2000:]
    assert "12 python tasks on 12 distinct tiles" in out


ROUTE_B = """
import json, sys, time
from pathlib import Path
import parsl, site_configs
from parsl import python_app

@python_app
def where(i, marks, tasks):
    import os, sys, time
    from pathlib import Path
    Path(marks, str(i)).touch()
    # Every task running at once: 24 tasks need both nodes' 12 workers.
    for _ in range(3000):
        if len(os.listdir(marks)) >= tasks:
            break
        time.sleep(0.1)
    return (os.environ.get("PARSL_AURORA_HOST", ""), os.environ.get("APPTAINER_CONTAINER", ""),
            "%d.%d" % sys.version_info[:2])

args = json.loads(sys.argv[1])
with parsl.load(site_configs.load(args["site"], "multi_job", container=args["image"],
                                  nodes_per_job=2, queue="debug")):
    futures = [where(i, args["marks"], 24) for i in range(24)]
    print(json.dumps([f.result() for f in futures]))
"""


def test_route_b_a_venv_driver_with_workers_in_the_image_on_two_nodes(cluster, request,
                                                                      image_for_nobody):
    """The login-node route with the image: the driver runs from a venv whose Python is the
    image's, its workers in the image on both nodes of a 2-node job."""
    d = cluster.workdir("routeb")
    marks = d / "marks"
    marks.mkdir()
    if cluster.runas:
        shutil.chown(marks, cluster.user, cluster.user)
    cluster.write(d / "flow.py", ROUTE_B)
    exe = (sys.executable if cluster.kind == "fake"
           else str(request.getfixturevalue("user_venv") / "bin" / "python"))
    site = {"fake": "local", "real": "pbs"}[cluster.kind]
    out = cluster.run(exe, "flow.py", json.dumps({"site": site, "image": str(image_for_nobody),
                                                  "marks": str(marks)}),
                      cwd=d, env={"PATH": f"{Path(exe).parent}:{cluster.env['PATH']}"})
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.splitlines()[-1])
    assert len(found) == 24 and len({host for host, _, _ in found}) == 2, found
    python = "{}.{}".format(*sys.version_info[:2]) if cluster.kind == "fake" else None
    assert {(image, py) for _, image, py in found} == {
        (str(image_for_nobody), python or found[0][2])}, found


def test_the_bridge_refuses_an_image_that_does_not_run_here(tmp_path):
    """Route (d) is opt-in: before serving PBS to `apptainer exec IMAGE ...` the bridge checks
    that the image runs on this node, and refuses in one line before the command runs."""
    bogus = tmp_path / "aurora.sif"
    bogus.write_text("not an image\n")
    ran = tmp_path / "ran"
    out = subprocess.run([str(Path(sys.executable).parent / "parsl-aurora"), "pbs-bridge", "--",
                          "apptainer", "exec", str(bogus), "touch", str(ran)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and not ran.exists(), out
    assert len(out.stderr.strip().splitlines()) == 1
    assert "expected an image that runs on this node" in out.stderr


# ---------------------------------------------------------------- in_job: blocks on the host
HOST_CLIENT = """
import os, sys, time
from pathlib import Path
from parsl.launchers import SimpleLauncher
from parsl_aurora import bridge

folder = bridge.host_channel()
provider = bridge.host_local_provider(folder, launcher=SimpleLauncher())
provider.script_dir = os.getcwd()
# Apptainer sets APPTAINER_CONTAINER in the container: the block says where it runs.
job = provider.submit("echo ${APPTAINER_CONTAINER:-host} > where.txt; exec sleep 300", 1)
while not Path("where.txt").exists():
    time.sleep(0.05)
alive_while_running = provider._is_alive(provider.resources[job])
provider.cancel([job])
end = time.monotonic() + 120  # only stops a hang when the cancel does not land
while provider.status([job])[0].state.name == "RUNNING" and time.monotonic() < end:
    time.sleep(0.05)
foreign = bridge.host_request(folder, "cancel", "1")
missing = bridge.host_request(folder, "submit", "/nonexistent/block.sh")
theirs = bridge.host_request(folder, "submit", sys.argv[1]) if len(sys.argv) > 1 else "-"
modes = [oct(os.stat(p).st_mode & 0o777) for p in (folder, folder + "/requests")]
print(alive_while_running, provider._is_alive(provider.resources[job]),
      provider.status([job])[0].state.name, os.environ["APPTAINER_CONTAINER"], foreign, missing,
      theirs, " ".join(modes), sep="\\n")
"""


def test_in_job_blocks_from_a_driver_in_the_image_start_on_the_host(built_image, tmp_path):
    """The job host's launcher (carried by the image, run by bash on the host) starts the block
    a driver in the image hands it outside the container, says whether it runs, cancels it,
    and refuses a missing script, another user's script and a process it did not start. Its
    channel is private: a folder only the user may enter, a FIFO only the user may write."""
    host = tmp_path / "host.sh"
    with host.open("w") as f:
        subprocess.run(["apptainer", "exec", str(built_image), "parsl-aurora", "host-launcher"],
                       stdout=f, check=True)
    (tmp_path / "client.py").write_text(HOST_CLIENT)
    theirs = []
    if os.geteuid() == 0:  # a script someone else owns, in a folder the user can write
        (tmp_path / "theirs.sh").write_text("touch ran-theirs\n")
        shutil.chown(tmp_path / "theirs.sh", "nobody")
        theirs = [str(tmp_path / "theirs.sh")]
    out = subprocess.run(["bash", str(host), str(built_image), "python3", "client.py", *theirs],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    alive, after, state, driver_in, foreign, missing, other, modes = out.stdout.splitlines()
    assert (alive, after, state) == ("True", "False", "CANCELLED")
    assert modes == "0o700 0o600"
    assert driver_in == str(built_image)  # the driver ran in the image, its block outside
    assert (tmp_path / "where.txt").read_text() == "host\n"
    assert foreign == "error: no block 1 started here"
    assert missing == "error: not a block script of this user: /nonexistent/block.sh"
    if theirs:
        assert other == f"error: not a block script of this user: {theirs[0]}"
        assert not (tmp_path / "ran-theirs").exists()
    # The host wrote the block's files beside its script, as Parsl's LocalProvider does.
    assert [p.read_text() for p in tmp_path.glob("*.sh.ec")] == ["-\n"]


def test_an_in_job_driver_in_the_image_without_the_host_launcher_is_refused(built_image,
                                                                            tmp_path):
    """PARSL_SITE=pbs (a real PBS) in_job in the image, outside in_job.pbs's launcher: one line
    naming the launcher before any block starts."""
    shutil.copy(ROOT / "examples" / "workflow.py", tmp_path)
    (tmp_path / "nodes").write_text("x4102c0s0b0n0\n")
    out = subprocess.run(["apptainer", "exec", str(built_image), "python", "workflow.py"],
                         cwd=tmp_path,
                         env={**os.environ, "PARSL_SITE": "pbs", "PARSL_MODE": "in_job",
                              "PBS_NODEFILE": str(tmp_path / "nodes")},
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "PARSL_AURORA_HOST_LAUNCH=None is not valid" in out.stderr
    assert "parsl-aurora host-launcher" in out.stderr
    assert not (tmp_path / "runinfo").exists()


# In place of examples/workflow.py: 24 tasks, each held until all 24 run, so every worker of
# both nodes' pools (12 each) runs one; each says its fake node and whether it is in the image.
BOTH_NODES_FLOW = """
from pathlib import Path
import parsl
from parsl import python_app
import site_configs

@python_app
def where(meeting, n):
    import os, time
    from pathlib import Path
    Path(meeting, str(os.getpid())).touch()
    while len(os.listdir(meeting)) < n:
        time.sleep(0.05)
    return os.environ["PARSL_AURORA_HOST"], os.path.isdir("/.singularity.d")

if __name__ == "__main__":
    meeting = Path.cwd() / "meeting"
    meeting.mkdir()
    with parsl.load(site_configs.load()):
        done = [f.result() for f in [where(str(meeting), 24) for _ in range(24)]]
    print(len(done), "tasks on", sorted(set(done)))
"""


@pytest.mark.needs("pbs", "fuse")
def test_in_job_pbs_with_the_image_on_real_pbs_starts_pools_on_the_host(image_for_nobody,
                                                                        real_pbs, user_venv):
    """Route (c) on the real-PBS look-alike as its unprivileged user: `qsub -v
    PARSL_AURORA_IMAGE=... examples/in_job.pbs` runs the driver in the image, the job's host
    starts the block (the host's PALS, here the fake one outside the image, one pool per node,
    each in the image), and all tasks complete, on both nodes."""
    d = real_pbs.workdir("injob-image")
    shutil.copytree(ROOT / "examples", d / "examples")
    real_pbs.write(d / "examples" / "workflow.py", BOTH_NODES_FLOW)
    shutil.chown(d / "examples", real_pbs.user, real_pbs.user)
    pals = next(user_venv.glob("lib/python3*/site-packages/parsl_aurora/fake/bin"))
    # The host's PALS: the fake one in the test user's venv, which the image cannot see.
    env = {"PARSL_SITE": "pbs", "PARSL_AURORA_IMAGE": str(image_for_nobody),
           "PARSL_AURORA_PALS_BIN": str(pals),
           "PARSL_AURORA_PYTHON": str(user_venv / "bin" / "python"),
           "PARSL_AURORA_HYDRA": str(user_venv / "bin" / "mpiexec.hydra")}
    job = real_pbs.run("qsub", "-A", "fake", "-v", ",".join(f"{k}={v}" for k, v in env.items()),
                       "examples/in_job.pbs", cwd=d)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip()
    record = real_pbs.wait_state(job_id, "F", limit=600)
    seq = job_id.split(".")[0]
    out, err = (d / f"parsl_in_job.o{seq}").read_text(), (d / f"parsl_in_job.e{seq}").read_text()
    assert record["Exit_status"] == 0, out[-2000:] + err[-2000:]
    nodes = [(f"{h}.hostmgmt2102.cm.aurora.alcf.anl.gov", True) for h in ("x4102c0s0b0n0",
                                                                         "x4102c0s1b0n0")]
    assert f"24 tasks on {nodes}" in out, out
    # One block, started on the host by its launcher (its files beside the script), whose
    # mpiexec started a pool on each of the job's two nodes, in the image.
    script = next((d / "runinfo").glob("*/submit_scripts/parsl.htex_tiles.block-0.*.sh"))
    assert f"apptainer exec {image_for_nobody} " in script.read_text()
    assert Path(f"{script}.ec").read_text() == "-\n"  # cancelled by the driver at its end
    nodes = next((d / "runinfo").glob("*.nodes")).read_text().split()
    assert len(nodes) == 2 and len(set(nodes)) == 2
    log = next((d / "runinfo").glob("*/htex_tiles/interchange.log")).read_text()
    assert len(set(re.findall(r"Registration info for manager b?'([0-9a-f]+)'", log))) == 2


# ---------------------------------------------------------------- MPI from workers in the image
MPI_FROM_IMAGE_FLOW = """
import sys
import parsl
from parsl import bash_app
import site_configs

@bash_app
def ranks(parsl_resource_specification, wrap, stdout):
    # probe.py is in the driver's folder, where the workers start.
    return "$PARSL_MPI_PREFIX " + ("$PARSL_AURORA_IMAGE_EXEC " if wrap else "") + "python3 probe.py"

if __name__ == "__main__":
    spec = {"num_nodes": 2, "ranks_per_node": 2, "num_ranks": 4}
    with parsl.load(site_configs.load(container=sys.argv[1], nodes_per_job=2)):
        ranks(parsl_resource_specification=spec, wrap=True, stdout="wrapped.out").result()
        ranks(parsl_resource_specification=spec, wrap=False, stdout="bare.out").result()
"""


@pytest.mark.needs("fuse")
def test_mpi_ranks_from_a_worker_in_the_image_start_on_the_host(cluster, request,
                                                                image_for_nobody):
    """A worker in the image calls `mpiexec` (the host's, bound in): as with Aurora's PALS the
    ranks start on the host, outside the container (no /.singularity.d); wrapped in
    `$PARSL_AURORA_IMAGE_EXEC` they run the image's Python. On the fake PBS and, as its
    unprivileged user, on the real one."""
    d = cluster.workdir("mpi-image")
    cluster.write(d / "flow.py", MPI_FROM_IMAGE_FLOW)
    cluster.write(d / "probe.py", 'import os, sys\nprint(os.environ["PMI_RANK"], sys.prefix, '
                                  'os.path.isdir("/.singularity.d"))\n')
    exe = (sys.executable if cluster.kind == "fake"
           else str(request.getfixturevalue("user_venv") / "bin" / "python"))
    env = {"PARSL_SITE": {"fake": "local", "real": "pbs"}[cluster.kind],
           "PARSL_MODE": "mpi_ensemble", "PATH": f"{Path(exe).parent}:{cluster.env['PATH']}"}
    out = cluster.run(exe, "flow.py", str(image_for_nobody), cwd=d, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    image_prefix = subprocess.run(
        ["apptainer", "exec", str(image_for_nobody), "python3", "-c",
         "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    wrapped = sorted(x.split() for x in (d / "wrapped.out").read_text().splitlines())
    assert wrapped == [[str(r), image_prefix, "True"] for r in range(4)]
    bare = sorted(x.split() for x in (d / "bare.out").read_text().splitlines())
    assert [r for r, _, inside in bare] == ["0", "1", "2", "3"]
    assert {(prefix == image_prefix, inside) for _, prefix, inside in bare} == {(False, "False")}
