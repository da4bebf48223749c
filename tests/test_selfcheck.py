"""`parsl-aurora check` on the fake and the real-PBS sites: it passes where the machine holds
what the bundle assumes, and each check fails once when its assumption is broken."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from clusters import wait_for
from conftest import module_environment, tiny_sif

from parsl_aurora import fake, modes, selfcheck
from site_configs import local, pbs

SITE = {"fake": "local", "real": "pbs"}


def parsl_aurora(cluster, request) -> str:
    if cluster.kind == "fake":
        return str(Path(sys.executable).parent / "parsl-aurora")
    return str(request.getfixturevalue("user_venv") / "bin" / "parsl-aurora")


def lines(text: str) -> dict[str, str]:
    """A report's check and route lines by name: {"pals": "ok ...", "(c)": "works"}."""
    out = {}
    for line in text.splitlines():
        words = line.split()
        if line.startswith("  (") and ":" in line:
            out[words[0]] = line.split(": ", 1)[1]
        elif line.startswith("  ") and words[0] in ("ok", "FAIL", "--"):
            name = line[8:25].strip()
            out[name] = words[0]
    return out


@pytest.mark.needs("apptainer")
def test_in_a_one_node_job_every_check_passes_and_in_job_with_the_image_works(
        cluster, request, image_for_nobody):
    """The command as a user runs it in a one-node job: PALS takes the launcher's lines, the
    image runs unprivileged, and route (c) works there."""
    d = cluster.workdir("check")
    exe = parsl_aurora(cluster, request)
    job = cluster.submit(d, f"{exe} check --site {SITE[cluster.kind]} --in-job "
                            f"--image {image_for_nobody}\necho exit=$?\n", "-A", "fake",
                         directives=("-l select=1:ncpus=208", "-l walltime=0:05:00",
                                     "-q debug", "-N check"))
    cluster.wait_state(job, "F")
    out = wait_for(lambda: next(d.glob("check.o*"), None), "the job's output").read_text()
    got = lines(out)
    assert "exit=0" in out, out
    for name in ("apptainer", "image runs", "python vs image", "pals", "interface",
                 "open files", "modules", "queues"):
        assert got[name] == "ok", out
    assert got["(c)"] == "works", out


def test_on_a_login_node_the_queue_table_matches_the_server(cluster, request):
    d = cluster.workdir("check")
    exe = parsl_aurora(cluster, request)
    out = cluster.run(exe, "check", "--site", SITE[cluster.kind], cwd=d)
    got = lines(out.stdout)
    assert got["queues"] == "ok" and got["pals"] == "--", out.stdout + out.stderr
    assert got["(a)"] == "works", out.stdout
    assert got["(c)"].startswith("not checked here"), out.stdout


def test_a_queue_table_the_server_does_not_hold_fails(cluster):
    """The site's table allowing more than PBS does (or a queue PBS lacks) fails the check."""
    site = pbs.machine()[0] if cluster.kind == "real" else local.machine()[0]
    env = {**os.environ, **cluster.env}
    if cluster.runas:  # qstat -Qf as the test user
        env = None
    longer = site.queues | {"debug": replace(site.queues["debug"], max_walltime="2:00:00"),
                            "nosuch": modes.Queue("nosuch")}
    out = cluster.run("qstat", "-Qf", cwd=cluster.home)
    server = selfcheck.parse_qstat_Qf(out.stdout)
    assert selfcheck.queue_differences(site.queues, server) == []
    problems = selfcheck.queue_differences(longer, server)
    assert problems == [("debug: the server takes at most 1:00:00 of walltime, the site's "
                         "table 2:00:00"), "nosuch: no such queue on this server"]
    if env is not None:
        check = selfcheck.queues(replace(site, queues=longer), env)
        assert check.ok is False and "nosuch" in check.detail


def test_each_check_fails_when_its_assumption_breaks(tmp_path, monkeypatch):
    site, _ = local.machine()
    # apptainer: neither on PATH nor a module.
    monkeypatch.setenv("PATH", "/nonexistent")
    found, exe = selfcheck.apptainer(selfcheck.LOGIN)
    assert (found.ok, exe) == (False, None)
    assert selfcheck.image_mounts(str(tmp_path / "a.sif"), None, selfcheck.LOGIN).ok is False
    # image build: no subuid entry and no fakeroot command; then with an entry.
    subuid = tmp_path / "subuid"
    subuid.write_text("someone:100000:65536\n")
    assert selfcheck.image_build("me", subuid).ok is False
    subuid.write_text("me:100000:65536\n")
    assert selfcheck.image_build("me", subuid).ok is True
    monkeypatch.undo()
    # image runs: a file that is no image.
    bogus = tmp_path / "bogus.sif"
    bogus.write_text("not an image\n")
    assert selfcheck.image_mounts(str(bogus), "apptainer", selfcheck.LOGIN).ok is False
    assert selfcheck.python_vs_image(str(bogus)).ok is False
    # interface: Aurora's hsn0 is not on this machine.
    assert selfcheck.interface(replace(site, interface="hsn0")).ok is False
    assert selfcheck.interface(site).ok is True
    # modules: one no module system can load.
    assert selfcheck.modules({**os.environ, "LOADEDMODULES": "nosuch/1.0",
                              "LMOD_PKG": "/usr/share/lmod/lmod"}).ok is False
    assert selfcheck.modules({**os.environ, "LOADEDMODULES": ""}).ok is True


@pytest.mark.needs("apptainer")
def test_an_image_of_another_python_fails_against_this_driver(tmp_path):
    other = "3.10" if sys.version_info[:2] != (3, 10) else "3.12"
    sif = tiny_sif(tmp_path, {"org.parsl-project.parsl.version": "2025.1.13",
                              "parsl-aurora.python": other})
    check = selfcheck.python_vs_image(str(sif))
    assert check.ok is False and f"it holds Python {other}" in check.detail


def test_too_few_open_files_fail():
    limit = subprocess.run(
        ["prlimit", "--nofile=1024:1024", sys.executable, "-c",
         ("from parsl_aurora import selfcheck; c = selfcheck.open_files(2048); "
          "print(c.ok, c.detail)")], capture_output=True, text=True, check=True).stdout
    assert limit.startswith("False hard limit 1024: at most 462 worker pools"), limit
    assert selfcheck.open_files(2048).ok is (modes.open_file_limit() is None
                                             or (modes.open_file_limit() - 100) // 2 >= 2048)


@pytest.mark.needs("mpi")
def test_pals_check_runs_the_launchers_lines_and_fails_on_an_option_pals_refuses(
        tmp_path, monkeypatch):
    site, node = local.machine()
    nodefile = tmp_path / "nodefile"
    nodefile.write_text(fake.nodefile_lines(2))
    env = {**os.environ, **site.prepare(tmp_path / "fake"), "PBS_NODEFILE": str(nodefile)}
    assert selfcheck.pals(site, node, env).ok is True
    # Open MPI's spelling, which PALS refuses.
    monkeypatch.setattr(modes, "POOL_MPIEXEC", {**modes.POOL_MPIEXEC, "bind_cmd": "--bind-to"})
    broken = selfcheck.pals(site, node, env)
    assert broken.ok is False and "failed" in broken.detail, broken
    no_job = {k: v for k, v in env.items() if k != "PBS_NODEFILE"}
    assert selfcheck.pals(site, node, no_job).ok is None


def test_routes_follow_the_checks():
    def checks(**failed):
        return [selfcheck.Check(n, not failed.get(n.replace(" ", "_"), False), "", "",
                                selfcheck.COMPUTE if n in ("pals",) else selfcheck.ANY)
                for n in ("apptainer", "image runs", "python vs image", "interface",
                          "open files", "modules", "queues", "pals")]
    login = selfcheck.verdicts(checks(), selfcheck.LOGIN)
    assert login["a"][1] == "works" and login["d"][1] == "works"
    assert login["c"][1].startswith("not checked here")
    bad = selfcheck.verdicts(checks(python_vs_image=True), selfcheck.LOGIN)
    assert bad["b"][1] == "fails: python vs image" and bad["a"][1] == "works"


@pytest.mark.needs("lmod")
def test_a_module_whose_parsl_shadows_the_bundles_fails(tmp_path):
    """A module that puts another Parsl on PYTHONPATH (as the PE's py-parsl would) shadows the
    bundle's in every block: Lmod loads it for real and the check says so."""
    shadow = tmp_path / "pe" / "parsl"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("__version__ = '2024.1.1'\n")
    modulefiles = tmp_path / "modulefiles" / "py-parsl"
    modulefiles.mkdir(parents=True)
    (modulefiles / "2024.1.1.lua").write_text(
        f'prepend_path("PYTHONPATH", "{shadow.parent}")\n')
    env = module_environment({**os.environ, "MODULEPATH": str(modulefiles.parent)})
    assert selfcheck.modules(env).ok is True
    check = selfcheck.modules(module_environment(env, "module load py-parsl/2024.1.1"))
    assert check.ok is False and "imports parsl 2024.1.1" in check.detail, check
