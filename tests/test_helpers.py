"""The GPU-affinity script and hello-affinity, alone and under the fake mpiexec."""

import os
import shutil
import subprocess

import pytest
from conftest import ROOT

from parsl_aurora import fake, hello

SCRIPT = ROOT / "container" / "scripts" / "set_affinity_gpu_aurora.sh"


def mask(rank, **env):
    show = "echo $ZE_AFFINITY_MASK $ZE_ENABLE_PCI_ID_DEVICE_ORDER"
    r = subprocess.run([str(SCRIPT), "sh", "-c", show],
                       env={"PATH": os.environ["PATH"], "PALS_LOCAL_RANKID": str(rank), **env},
                       capture_output=True, text=True, check=True)
    return r.stdout.split()


@pytest.mark.parametrize("rank,composite,flat", [
    (0, "0.0", "0"), (1, "0.1", "1"), (5, "2.1", "5"), (11, "5.1", "11"), (13, "0.1", "1")])
def test_script_matches_the_node_model(rank, composite, flat):
    from parsl_aurora.topology import AURORA, ze_affinity_mask

    assert mask(rank) == [composite, "1"] == [ze_affinity_mask(AURORA, rank), "1"]
    assert mask(rank, ZE_FLAT_DEVICE_HIERARCHY="FLAT")[0] == flat == \
        ze_affinity_mask(AURORA, rank, "FLAT")


def test_script_sets_for_the_command_what_alcfs_does():
    """ALCF's set_affinity_gpu.sh: no implicit scaling, PCI device order, the mask, core dumps
    off, and the command's own exit status."""
    import resource

    def cores_allowed():  # as large as this user may make it, so "0" is the script's doing
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))

    show = 'echo "${EnableWalkerPartition-unset} $ZE_ENABLE_PCI_ID_DEVICE_ORDER $(ulimit -c)"; exit 7'
    env = {"PATH": os.environ["PATH"], "PALS_LOCAL_RANKID": "2", "EnableWalkerPartition": "1"}
    before = subprocess.run(["sh", "-c", "ulimit -c"], env=env, preexec_fn=cores_allowed,
                            capture_output=True, text=True, check=True).stdout.strip()
    r = subprocess.run([str(SCRIPT), "sh", "-c", show], env=env, preexec_fn=cores_allowed,
                       capture_output=True, text=True, check=False)
    assert (r.returncode, r.stdout) == (7, "unset 1 0\n")
    # Where this user may allow core dumps (root, CI), the 0 above is the script's doing.
    assert before != "0" or os.geteuid() != 0


def test_script_needs_a_command():
    r = subprocess.run([str(SCRIPT)], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "usage" in r.stderr


def test_hello_line_is_stable():
    env = {"PARSL_AURORA_HOST": "x1", "PALS_RANKID": "3", "PALS_LOCAL_RANKID": "1",
           "ZE_AFFINITY_MASK": "0.1"}
    assert hello.line(env, [0, 1, 2, 5], "vm") == \
        "host=x1 rank=3 local_rank=1 cpus=0-2,5 ze_affinity_mask=0.1"
    assert hello.line({}, [0], "vm") == "host=vm rank=0 local_rank=0 cpus=0 ze_affinity_mask=unset"


@pytest.mark.parametrize("hierarchy,expected", [
    ("COMPOSITE", [f"{g}.{t}" for g in range(6) for t in range(2)]),
    ("FLAT", [str(d) for d in range(12)]),
])
def test_twelve_ranks_get_twelve_tiles(tmp_path, hierarchy, expected):
    env = {**os.environ, **fake.environment(tmp_path), "ZE_FLAT_DEVICE_HIERARCHY": hierarchy}
    helper = shutil.which("set_affinity_gpu_aurora.sh", path=env["PATH"]) or str(SCRIPT)
    r = subprocess.run(["mpiexec", "-n", "24", "-ppn", "12", "--hosts", "x1,x2",
                        "--cpu-bind", "list:0:1", helper, "hello-affinity"],
                       env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    rows = [dict(w.split("=", 1) for w in line.split()) for line in r.stdout.splitlines()]
    assert sorted(int(row["rank"]) for row in rows) == list(range(24))
    for host in ("x1", "x2"):
        mine = [row for row in rows if row["host"] == host]
        assert sorted(int(row["local_rank"]) for row in mine) == list(range(12))
        assert sorted(row["ze_affinity_mask"] for row in mine) == sorted(expected)
    # list:0:1 binds even local ranks to Aurora CPU 0 and odd ones to CPU 1, which the fake maps
    # to this machine's first and second CPUs: on any machine of 2 CPUs or more they differ.
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2
    for row in rows:
        assert row["cpus"] == str(cpus[int(row["local_rank"]) % 2]), row
