"""Golden tests for worker-in-image wrapping: the exact commands Parsl will run, no apptainer needed."""

from __future__ import annotations

import subprocess

import pytest
from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

from parsl_aurora import container
from parsl_aurora.container import (
    AURORA_BINDS,
    apptainer_prefix,
    check_image_parsl,
    wrap_launch_cmd,
)
from parsl_aurora.errors import ImageError

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


def test_binds_cover_pbs_pals_and_filesystems():
    assert AURORA_BINDS == ("/var/spool/pbs", "/var/run/palsd", "/opt/cray/pe/pals", "/home",
                            "/lus/flare")


def test_prefix_golden():
    assert apptainer_prefix("/lus/flare/projects/p/aurora.sif", AURORA_BINDS[:2], ["--cleanenv"]) \
        == ("apptainer exec --bind /var/spool/pbs --bind /var/run/palsd --cleanenv "
            "/lus/flare/projects/p/aurora.sif")


def test_prefix_without_binds_or_options():
    assert apptainer_prefix("aurora.sif") == "apptainer exec aurora.sif"


def test_prefix_quotes_paths_for_the_shell():
    assert apptainer_prefix("/home/u/my images/aurora.sif", ["/home/u/a b"]) \
        == "apptainer exec --bind '/home/u/a b' '/home/u/my images/aurora.sif'"


def test_default_launch_cmd_survives_both_formats():
    wrapped = wrap_launch_cmd(DEFAULT_LAUNCH_CMD, "/lus/flare/p/aurora.sif", AURORA_BINDS)
    assert as_parsl_runs_it(wrapped) == (
        "apptainer exec --bind /var/spool/pbs --bind /var/run/palsd --bind /opt/cray/pe/pals "
        "--bind /home --bind /lus/flare /lus/flare/p/aurora.sif " + WORKER)


def test_literal_braces_in_paths_survive_both_formats():
    wrapped = wrap_launch_cmd(DEFAULT_LAUNCH_CMD, "/lus/flare/{proj}/aurora.sif",
                              ["/data/{x}:/data"])
    assert as_parsl_runs_it(wrapped) == (
        "apptainer exec --bind '/data/{x}:/data' '/lus/flare/{proj}/aurora.sif' " + WORKER)


def test_each_block_gets_its_own_id():
    once = wrap_launch_cmd(DEFAULT_LAUNCH_CMD, "aurora.sif").format(**HTEX_FIELDS)
    assert "--block_id=0 " in once.format(block_id=0)
    assert "--block_id=7 " in once.format(block_id=7)


def fake_run(stdout: str, returncode: int = 0):
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr="boom")
    return run


def patch_inspect_labels(monkeypatch, labels):
    import json
    stdout = json.dumps({"data": {"attributes": {"labels": labels}}, "type": "container"})
    monkeypatch.setattr(container.subprocess, "run", fake_run(stdout))


@pytest.mark.parametrize("key", container.PARSL_LABELS)
def test_image_parsl_version_from_label(monkeypatch, key):
    patch_inspect_labels(monkeypatch, {key: "2025.1.13"})
    assert container.image_parsl_version("aurora.sif") == "2025.1.13"


def test_check_image_parsl_names_both_versions_and_the_fix(monkeypatch):
    patch_inspect_labels(monkeypatch, {container.PARSL_LABELS[0]: "2024.12.2"})
    with pytest.raises(ImageError) as err:
        check_image_parsl("aurora.sif", "2025.1.13")
    assert "2024.12.2" in str(err.value) and "2025.1.13" in str(err.value)
    assert "nox -s image" in str(err.value)


@pytest.mark.parametrize("driver", ["2025.1.13", "2025.01.13"])
def test_check_image_parsl_accepts_a_match(monkeypatch, driver):
    # parsl.__version__ is "2025.01.13"; the label and pip say "2025.1.13": the same release.
    patch_inspect_labels(monkeypatch, {container.PARSL_LABELS[0]: "2025.1.13"})
    check_image_parsl("aurora.sif", driver)


def test_same_version():
    assert container.same_version("2025.01.13", "2025.1.13")
    assert not container.same_version("2025.1.13", "2024.12.2")
    assert not container.same_version("2025.1.13.dev0", "2025.1.13")


def test_unreadable_image_is_an_image_error(monkeypatch):
    monkeypatch.setattr(container.subprocess, "run", fake_run("", returncode=255))
    with pytest.raises(ImageError, match="missing.sif"):
        container.image_parsl_version("missing.sif")


def test_check_image_parsl_defaults_to_the_workflows_parsl(monkeypatch):
    patch_inspect_labels(monkeypatch, {container.PARSL_LABELS[0]: "2024.12.2"})
    with pytest.raises(ImageError, match="2024.12.2.*2025.1.13"):
        check_image_parsl("aurora.sif")


def test_default_binds_are_aurora_binds():
    assert container.DEFAULT_BINDS == AURORA_BINDS
