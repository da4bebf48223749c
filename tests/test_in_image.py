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
