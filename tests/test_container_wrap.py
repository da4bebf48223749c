"""Workers in the image: the commands and block lines Parsl will run, checked whole, and the
block lines run for real in bash on a host tree (no apptainer needed here; the image itself is
exercised in test_image.py)."""

from __future__ import annotations

import subprocess

from conftest import ROOT
from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

from parsl_aurora.container import (
    AURORA_BINDS,
    AURORA_STACK,
    HostStack,
    apptainer_prefix,
    block_setup,
    mismatch,
    same_version,
    stage_command,
    staged_path,
    wrap_launch_cmd,
)

# The keyword arguments HTEX.initialize_scaling passes to launch_cmd.format (Parsl 2025.1.13).
HTEX_FIELDS = {
    "debug": "--debug", "prefetch_capacity": 0, "address_probe_timeout_string": "",
    "addresses": "10.0.0.1", "task_port": 54001, "result_port": 54002, "cores_per_worker": 1.0,
    "mem_per_worker": None, "max_workers_per_node": 12, "nodes_per_block": 2,
    "heartbeat_period": 30, "heartbeat_threshold": 120, "drain_period": None, "poll_period": 10,
    "cert_dir": None, "logdir": "/home/u/runinfo/000/htex", "cpu_affinity": "block",
    "enable_mpi_mode": "", "mpi_launcher": "mpiexec", "accelerators": "0.0 0.1",
}
WORKER = ("process_worker_pool.py --debug 12 -a 10.0.0.1 -p 0 -c 1.0 -m None --poll 10 "
          "--task_port=54001 --result_port=54002 --cert_dir None "
          "--logdir=/home/u/runinfo/000/htex --block_id=3 --hb_period=30  --hb_threshold=120 "
          "--drain_period=None --cpu-affinity block  --mpi-launcher=mpiexec "
          "--available-accelerators 0.0 0.1")


def as_parsl_runs_it(launch_cmd: str, block_id: int = 3) -> str:
    """What HTEX does: format with its fields at start, then with block_id for each block."""
    return launch_cmd.format(**HTEX_FIELDS).format(block_id=block_id)


def test_prefix_golden():
    assert apptainer_prefix("/lus/flare/projects/p/aurora.sif", ["/a", "/b:/c"], ["--cleanenv"]) \
        == "apptainer exec --bind /a --bind /b:/c --cleanenv /lus/flare/projects/p/aurora.sif"
    assert apptainer_prefix("/home/u/my images/aurora.sif", ["/home/u/a b"]) \
        == "apptainer exec --bind '/home/u/a b' '/home/u/my images/aurora.sif'"


def test_default_launch_cmd_survives_both_formats():
    wrapped = wrap_launch_cmd(DEFAULT_LAUNCH_CMD, "/lus/flare/p/aurora.sif")
    assert as_parsl_runs_it(wrapped) == "apptainer exec /lus/flare/p/aurora.sif " + WORKER
    assert "--block_id=7 " in as_parsl_runs_it(wrapped, 7)


def test_literal_braces_in_paths_survive_both_formats():
    wrapped = wrap_launch_cmd(DEFAULT_LAUNCH_CMD, "/lus/flare/{proj}/aurora.sif",
                              ["/data/{x}:/data"])
    assert as_parsl_runs_it(wrapped) == (
        "apptainer exec --bind '/data/{x}:/data' '/lus/flare/{proj}/aurora.sif' " + WORKER)


FLARE_SIF = "/lus/flare/projects/P/aurora.sif"


def test_stage_image_golden():
    """stage_image=: the node's copy is named by the image's path, size and time."""
    staged = staged_path(FLARE_SIF, "/tmp/", 1000, 1736812800 * 10**9)
    assert staged == "/tmp/aurora-7243e16cee8c.sif"
    assert staged_path(FLARE_SIF, "/tmp", 1001, 1736812800 * 10**9) != staged
    assert stage_command(FLARE_SIF, staged) == (
        "{ [ -f /tmp/aurora-7243e16cee8c.sif ] || { mkdir -p /tmp && "
        "cp /lus/flare/projects/P/aurora.sif /tmp/aurora-7243e16cee8c.sif.part.$$ && "
        "mv -f /tmp/aurora-7243e16cee8c.sif.part.$$ /tmp/aurora-7243e16cee8c.sif; }; } &&")


def test_staged_pool_command_as_parsl_runs_it(tmp_path):
    """The pool's command with stage_image=: the copy, then the pool in the copy, through
    Parsl's two formats; a config without stage_image keeps the command it had."""
    import os

    from parsl_aurora import modes

    image = tmp_path / "aurora.sif"
    image.write_bytes(b"x" * 1000)
    os.utime(image, ns=(1736812800 * 10**9,) * 2)
    staged = staged_path(str(image), "/tmp", 1000, 1736812800 * 10**9)
    cmd = modes._in_image(DEFAULT_LAUNCH_CMD, str(image), "/tmp")
    assert as_parsl_runs_it(cmd) == (stage_command(str(image), staged) + " apptainer exec "
                                     + staged + " " + WORKER)
    assert modes._in_image(DEFAULT_LAUNCH_CMD, str(image), None) == wrap_launch_cmd(
        DEFAULT_LAUNCH_CMD, str(image))


def test_stage_command_copies_once_per_node_and_again_when_rebuilt(tmp_path):
    image, node = tmp_path / "shared" / "aurora.sif", tmp_path / "node-tmp"
    image.parent.mkdir()
    image.write_text("v1")
    run = tmp_path / "ran"

    def start_pool(gone: bool = False) -> str:
        st = image.stat()
        staged = staged_path(str(image), str(node), st.st_size, st.st_mtime_ns)
        if gone:  # the shared file system is not read: the image may as well not be there
            image.rename(tmp_path / "away")
        subprocess.run(["bash", "-c", f"{stage_command(str(image), staged)} cat {staged} > {run}"],
                       check=True)
        if gone:
            (tmp_path / "away").rename(image)
        return staged

    first = start_pool()
    assert run.read_text() == "v1" and sorted(p.name for p in node.iterdir()) == [
        first.rsplit("/", 1)[1]]  # no partial copy left behind
    # The second pool on the node finds the copy and does not read the shared image again.
    assert start_pool(gone=True) == first and run.read_text() == "v1"
    image.write_text("v2, rebuilt")
    second = start_pool()
    assert second != first and run.read_text() == "v2, rebuilt"


def test_stage_image_needs_an_image_and_an_absolute_folder(tmp_path):
    import pytest

    import site_configs
    from parsl_aurora import modes
    from parsl_aurora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stage_image='/tmp' is not valid: expected a "
                                          r"node-local folder, with container="):
        site_configs.load("local", "in_job", stage_image="/tmp")
    (tmp_path / "a.sif").write_text("x")
    with pytest.raises(ConfigError, match=r"stage_image='tmp' is not valid: expected an "
                                          r"absolute node-local folder. Fix: pass "
                                          r"stage_image='/tmp'"):
        modes._in_image("cmd", str(tmp_path / "a.sif"), "tmp")


def test_aurora_block_setup_golden():
    assert block_setup(AURORA_STACK, ["/home/u/run"]) == r"""PARSL_AURORA_BINDS="${APPTAINER_BIND:-}"
for b in /var/spool/pbs /var/run/palsd /opt/cray /opt/aurora /soft /usr/lib64:/host/lib64 /home /lus/flare /flare /home/u/run; do
    [ -e "${b%%:*}" ] && PARSL_AURORA_BINDS="${PARSL_AURORA_BINDS:+$PARSL_AURORA_BINDS,}$b"
done
if PARSL_AURORA_MPIEXEC=$(command -v mpiexec); then
    PARSL_AURORA_BINDS="${PARSL_AURORA_BINDS:+$PARSL_AURORA_BINDS,}${PARSL_AURORA_MPIEXEC%/*}"
    export APPTAINERENV_PREPEND_PATH="${PARSL_AURORA_MPIEXEC%/*}"
fi
export APPTAINER_BIND="$PARSL_AURORA_BINDS"
export APPTAINERENV_LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/host/lib64""" + '"'


def test_block_setup_binds_what_the_node_has(tmp_path):
    """Run on a host tree where only some of the site's paths exist: those are bound, the
    host's mpiexec goes first on the image's PATH, host libraries after the node's own; apps
    get the host's apptainer (by its full path) with the same binds around the image."""
    (tmp_path / "opt" / "aurora").mkdir(parents=True)
    (tmp_path / "lib64").mkdir()
    pals = tmp_path / "pals" / "bin"
    pals.mkdir(parents=True)
    for program in ("mpiexec", "apptainer"):  # found on PATH, never run
        (pals / program).write_text("#!/bin/sh\n")
        (pals / program).chmod(0o755)
    stack = HostStack(binds=(f"{tmp_path}/opt/aurora", f"{tmp_path}/missing",
                             f"{tmp_path}/lib64:/host/lib64"), library_dirs=("/host/lib64",),
                      env=(("ZE_FLAT_DEVICE_HIERARCHY", "FLAT"),))
    script = (block_setup(stack, [str(tmp_path / "run")], "/images/a.sif") + "\n" +
              'printf "%s\\n" "$APPTAINER_BIND" "$APPTAINERENV_PREPEND_PATH" '
              '"$APPTAINERENV_LD_LIBRARY_PATH" "$APPTAINERENV_ZE_FLAT_DEVICE_HIERARCHY" '
              '"$APPTAINERENV_PARSL_AURORA_IMAGE_EXEC"\n')
    env = {"PATH": f"{pals}:/usr/bin:/bin", "LD_LIBRARY_PATH": "/opt/aurora/oneapi/lib",
           "APPTAINER_BIND": "/scratch"}  # the user's own bind, kept
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    binds = f"/scratch,{tmp_path}/opt/aurora,{tmp_path}/lib64:/host/lib64,{pals}"
    assert out == [binds, str(pals), "/opt/aurora/oneapi/lib:/host/lib64", "FLAT",
                   f"{pals}/apptainer exec --bind {binds} /images/a.sif"]


def test_docs_image_md_names_every_bind():
    doc = (ROOT / "docs" / "image.md").read_text()
    listed = doc.split("`AURORA_BINDS`: ", 1)[1].split("each block binds", 1)[0]
    for bind in AURORA_BINDS:
        source, _, target = bind.partition(":")
        assert (f"`{source}` at `{target}`" if target else f"`{source}`") in listed, bind
    assert listed.count("`/") == len(AURORA_BINDS) + 1  # + the one target


def test_versions_must_match():
    assert mismatch("a.sif", ("2025.1.13", "3.11"), ("2025.01.13", "3.11")) is None
    parsl = mismatch("a.sif", ("2024.12.2", "3.11"), ("2025.1.13", "3.11"))
    assert (parsl.field, parsl.value) == ("container", "a.sif")
    assert "this driver's Parsl (2025.1.13); it holds parsl 2024.12.2" in str(parsl)
    python = mismatch("a.sif", ("2025.1.13", "3.11"), ("2025.1.13", "3.12"))
    assert (python.field, python.value) == ("container", "a.sif")
    assert "this driver's Python (3.12); it holds Python 3.11" in python.choices
    assert python.fix.startswith("make the driver's environment with Python 3.11 (a venv")
    assert "Fix: rebuild the image" in str(parsl)


def test_same_version():
    assert same_version("2025.01.13", "2025.1.13")
    assert not same_version("2025.1.13", "2024.12.2")
    assert not same_version("2025.1.13.dev0", "2025.1.13")
