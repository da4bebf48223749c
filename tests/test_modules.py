"""Modules in a block, with real Lmod and the fake cluster's `frameworks`: the driver's replayed
before its venv, the GPU hierarchy and device selector as the block ends up with them, and every
mode end to end with workers that see the module, on the fake PBS and on real OpenPBS.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LMOD_PKG, module_environment
from test_site_configs import AT

from parsl_aurora import fake, lmod
from parsl_aurora.errors import ConfigError
from site_configs import aurora

pytestmark = pytest.mark.needs("lmod")
FRAMEWORKS = "frameworks/2025.3.1"
FLAT = [str(i) for i in range(12)]
TILES = [f"{g}.{t}" for g in range(6) for t in range(2)]
# The look-alike frameworks' own Python.
PYTHON = fake.modulefiles().parent / "frameworks" / "bin" / "python3"
MODULEFILES = "from parsl_aurora import fake; print(fake.modulefiles())"


def login(*commands: str) -> dict[str, str]:
    """A login shell's environment with Lmod, the fake's module tree, and `commands` run."""
    base = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    return module_environment(base, f"module use {fake.modulefiles()}", *commands)


@pytest.fixture
def driver(monkeypatch):
    """Make this process the driver of a shell that ran `commands` (its venv kept first)."""
    def become(*commands: str) -> dict[str, str]:
        env = login(*commands)
        for k in list(os.environ):
            if k not in env and k.startswith(("LMOD", "MODULE", "_ModuleTable", "__LMOD")):
                monkeypatch.delenv(k)
        for k, v in env.items():
            if k != "PATH":
                monkeypatch.setenv(k, v)
        return env
    return become


def block(**kwargs) -> tuple[list[str], list[str]]:
    ex = aurora.multi_job(account="P", **AT, **kwargs).executors[0]
    return ex.provider.worker_init.splitlines(), ex.available_accelerators


def test_the_drivers_modules_come_first_then_its_venv(driver, tmp_path):
    env = driver("module load frameworks")
    lines, masks = block()
    assert lines == [
        "type module >/dev/null 2>&1 || source /usr/share/lmod/lmod/init/bash",
        f"export MODULEPATH={env['MODULEPATH']}", f"module load {FRAMEWORKS} || exit 1",
        f"source {sys.prefix}/bin/activate", "export TMPDIR=/tmp", f"cd {tmp_path}/runinfo",
        "export ZE_FLAT_DEVICE_HIERARCHY=FLAT", "export ONEAPI_DEVICE_SELECTOR=level_zero:gpu"]
    assert masks == FLAT
    # Not the driver's environment: no modules either (workers in an image bring their own).
    quiet = block(activate=False)[0]
    assert quiet[0] == "export TMPDIR=/tmp" and not any("module " in line for line in quiet)


def test_a_driver_in_the_image_replays_no_module(driver, monkeypatch):
    """Apptainer hands the host's module variables to a driver in the image, whose blocks (on
    the fake site, in the same image) have no Lmod: they load nothing."""
    from parsl_aurora import modes
    from site_configs import local

    driver("module load frameworks")
    monkeypatch.setenv("APPTAINER_CONTAINER", "/x/aurora.sif")
    node = local.fake_node()
    b = modes._block(local.site(node), node, "multi_job", worker_init="", run_dir="runinfo",
                     container=None, binds=(), interface=None, address=None, hierarchy=None,
                     activate=True)
    assert not any("module" in line.split()[:3] for line in b.worker_init.splitlines())
    assert b.worker_init.startswith(f"source {sys.prefix}/bin/activate\n")


def test_the_replayed_lines_load_the_module_in_a_shell_without_one(driver, tmp_path):
    """The block's first lines, run by a bash that has no `module` (the fake's jobs): Lmod's
    init is sourced, the module loads; where it cannot, the block ends."""
    driver("module load frameworks")
    first = "\n".join(block()[0][:3])
    probe = ('echo "$LOADEDMODULES $ZE_FLAT_DEVICE_HIERARCHY $(command -v python3) '
             '$ONEAPI_DEVICE_SELECTOR"')
    clean = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["bash", "-c", f"{first}\n{probe}"], env=clean, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [FRAMEWORKS, "FLAT", str(PYTHON), "opencl:gpu;level_zero:gpu"]
    gone = first.replace(f"MODULEPATH={fake.modulefiles()}", f"MODULEPATH={tmp_path}")
    out = subprocess.run(["bash", "-c", f"{gone}\necho still here"], env=clean,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 1 and "still here" not in out.stdout, out.stdout


@pytest.mark.parametrize("init", ["module load frameworks", "ml frameworks",
                                  "if true; then module -q load frameworks; fi"])
def test_a_module_worker_init_loads_sets_the_hierarchy(driver, init):
    driver()
    lines, masks = block(worker_init=init)
    assert masks == FLAT
    assert lines[-3:] == [init, "export ZE_FLAT_DEVICE_HIERARCHY=FLAT",
                          "export ONEAPI_DEVICE_SELECTOR=level_zero:gpu"]
    # `module` made available for it, and the driver's MODULEPATH, though no module is loaded.
    assert lines[:2] == ["type module >/dev/null 2>&1 || source /usr/share/lmod/lmod/init/bash",
                         f"export MODULEPATH={fake.modulefiles()}"]


def test_hierarchy_against_what_worker_init_sets_is_refused(driver):
    driver()
    with pytest.raises(ConfigError) as e:
        block(worker_init="module load frameworks", hierarchy="COMPOSITE")
    assert str(e.value).startswith("hierarchy='COMPOSITE' is not valid: expected 'FLAT', what "
                                   "worker_init sets (`module load frameworks` sets ZE_FLAT")
    assert "Fix: drop hierarchy=, or end worker_init with `export ZE_FLAT_DEVICE_HIERARCHY=" \
        "COMPOSITE`" in str(e.value)
    with pytest.raises(ConfigError, match="hierarchy='FLAT'.*'COMPOSITE', what worker_init"):
        block(worker_init="export ZE_FLAT_DEVICE_HIERARCHY=COMPOSITE", hierarchy="FLAT")
    # Agreeing, or overridden by the user's own line after the module: accepted.
    assert block(worker_init="module load frameworks", hierarchy="FLAT")[1] == FLAT
    init = "module load frameworks\nexport ZE_FLAT_DEVICE_HIERARCHY=COMPOSITE"
    assert block(worker_init=init, hierarchy="COMPOSITE")[1] == TILES
    assert block(worker_init=init)[1] == TILES


def test_a_module_lmod_cannot_load_is_refused_unless_the_hierarchy_is_given(driver):
    driver()
    with pytest.raises(ConfigError, match=r"worker_init='module load framewerks'.*Lmod refused "
                                          r"`module load framewerks`.*Fix: pass hierarchy="):
        block(worker_init="module load framewerks")
    assert block(worker_init="module load framewerks", hierarchy="COMPOSITE")[1] == TILES


def test_without_lmod_a_module_worker_init_needs_the_hierarchy(monkeypatch):
    for k in ("LMOD_CMD", "LMOD_PKG", "MODULESHOME", "LMOD_DIR"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="Lmod is not set up where the config is built"):
        block(worker_init="module load frameworks")
    assert block(worker_init="module load frameworks", hierarchy="FLAT")[1] == FLAT


@pytest.mark.parametrize("commands,init,last", [
    # frameworks' own "opencl:gpu;level_zero:gpu" is overridden, as ALCF advises ...
    ((), "", "export ONEAPI_DEVICE_SELECTOR=level_zero:gpu"),
    (("module load frameworks",), "", "export ONEAPI_DEVICE_SELECTOR=level_zero:gpu"),
    ((), "module load frameworks", "export ONEAPI_DEVICE_SELECTOR=level_zero:gpu"),
    # ... the user's own stands: exported in the driver's shell (carried) or in worker_init.
    (("module load frameworks", "export ONEAPI_DEVICE_SELECTOR=level_zero:0"), "",
     "export ONEAPI_DEVICE_SELECTOR=level_zero:0"),
    ((), "module load frameworks; export ONEAPI_DEVICE_SELECTOR='opencl:gpu'",
     "export ZE_FLAT_DEVICE_HIERARCHY=FLAT"),
])
def test_the_device_selector_is_level_zero_unless_the_user_set_it(driver, commands, init, last):
    driver(*commands)
    lines, _ = block(worker_init=init)
    assert lines[-1] == last
    assert sum("ONEAPI_DEVICE_SELECTOR" in line for line in lines) == 1


def test_worker_init_is_read_command_by_command():
    script = ("export A=1 ZE_FLAT_DEVICE_HIERARCHY=FLAT # a comment; module load x\n"
              "if [ -d /x ]; then\n  ml -q foo && unset ONEAPI_DEVICE_SELECTOR\nfi\n"
              "B=2 module \\\n  load y")
    assert lmod._commands(script) == [
        ["export", "A=1", "ZE_FLAT_DEVICE_HIERARCHY=FLAT"], ["[", "-d", "/x", "]"],
        ["ml", "-q", "foo"], ["unset", "ONEAPI_DEVICE_SELECTOR"], ["fi"],
        ["B=2", "module", "load", "y"]]
    assert lmod.uses_modules(script) and not lmod.uses_modules("export X=1; echo module")


# ---------------------------------------------------------------- every mode, end to end
SEEN = r"""echo "modules=$LOADEDMODULES hierarchy=$ZE_FLAT_DEVICE_HIERARCHY mask=$ZE_AFFINITY_MASK \
selector=$ONEAPI_DEVICE_SELECTOR"
IFS=:
for d in $PATH; do [ -x "$d/python3" ] && echo "python3=$d/python3"; done
true
"""
WORKFLOW = """
import sys
import parsl
from parsl import bash_app
import site_configs

@bash_app
def seen(mpi, stdout, parsl_resource_specification={}):
    # MPI: a rank on each node, through ALCF's affinity helper (its mask from the hierarchy).
    return ("$PARSL_MPI_PREFIX set_affinity_gpu_aurora.sh " if mpi else "") + "bash seen.sh"

if __name__ == "__main__":  # workers start in this folder and may import this file
    mpi = sys.argv[1] == "mpi_ensemble"
    spec = {"num_nodes": 2, "num_ranks": 2} if mpi else {}
    with parsl.load(site_configs.load(mode=sys.argv[1], **({"nodes_per_job": 2} if mpi else {}))):
        seen(mpi, stdout="seen.out", parsl_resource_specification=spec).result()
"""


@pytest.mark.slow
@pytest.mark.needs("mpi", "lmod")
@pytest.mark.parametrize("mode", ["multi_job", "mpi_ensemble", "in_job"])
def test_a_driver_on_frameworks_has_workers_on_frameworks(cluster, request, mode):
    """ALCF's route: `module load frameworks`, then the venv, then the driver (in_job: all in
    the job). A task sees the module loaded, the venv first on PATH and frameworks' Python
    next, FLAT masks, and the device selector ALCF advises over the module's."""
    from test_e2e import SITE, python

    d = cluster.workdir("modules")
    cluster.write(d / "seen.py", WORKFLOW)
    cluster.write(d / "seen.sh", SEEN)
    exe = python(cluster, request)
    venv_bin = exe.rsplit("/", 1)[0]
    # The driver's shell, in ALCF's order: module, then the venv (its bin first on PATH).
    shell = (f"type module >/dev/null 2>&1 || source {LMOD_PKG}/init/bash\n"
             f"module use \"$({exe} -c '{MODULEFILES}')\"\n"
             f"module load frameworks\nexport PATH={venv_bin}:$PATH\n"
             f"export PARSL_SITE={SITE[cluster.kind]}\ncd {d}\n{exe} seen.py {mode}\n")
    if mode == "in_job":
        job = cluster.submit(d, shell, "-A", "fake", directives=(
            "-q debug", "-l select=1", "-l walltime=0:10:00", "-N modules"))
        record = cluster.wait_state(job, "F", limit=600)
        log = "".join(p.read_text()[-3000:] for p in d.glob("modules.[oe]*"))
        assert record["Exit_status"] == 0, log
    else:
        out = cluster.run("bash", "-c", shell, cwd=d)
        assert out.returncode == 0, out.stderr[-3000:]
    lines = (d / "seen.out").read_text().splitlines()
    firsts = [x for x in lines if x.startswith("modules=")]
    assert len(firsts) == (2 if mode == "mpi_ensemble" else 1), lines
    for line in firsts:
        got = dict(w.split("=", 1) for w in line.split())
        assert got["modules"] == FRAMEWORKS and got["hierarchy"] == "FLAT", line
        assert got["selector"] == "level_zero:gpu", line
        assert re.fullmatch(r"\d+", got["mask"]), line  # FLAT's form (COMPOSITE's is g.t)
    pythons = [x.split("=", 1)[1] for x in lines if x.startswith("python3=")]
    assert pythons[:2] == [f"{venv_bin}/python3", str(framework_python(exe))], pythons


def framework_python(exe: str):
    """The frameworks look-alike's Python in the installation `exe` runs from."""
    out = subprocess.run([exe, "-c", MODULEFILES], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()).parent / "frameworks" / "bin" / "python3"
