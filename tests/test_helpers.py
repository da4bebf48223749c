"""The GPU-affinity script and hello-affinity, alone and under the fake mpiexec."""

import os
import shutil
import subprocess
from pathlib import Path

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
                        "--cpu-bind", "list:1-8:9-16", helper, "hello-affinity"],
                       env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    rows = [dict(w.split("=", 1) for w in line.split()) for line in r.stdout.splitlines()]
    assert sorted(int(row["rank"]) for row in rows) == list(range(24))
    for host in ("x1", "x2"):
        mine = [row for row in rows if row["host"] == host]
        assert sorted(int(row["local_rank"]) for row in mine) == list(range(12))
        assert sorted(row["ze_affinity_mask"] for row in mine) == sorted(expected)
    cpus = sorted(os.sched_getaffinity(0))
    # list:1-8:9-16 on this machine: Aurora CPU c -> cpus[c % len(cpus)], all of them here.
    assert {row["cpus"] for row in rows} == {hello_ranges(cpus)}
    assert Path(helper).exists()


def hello_ranges(cpus):
    from parsl_aurora.topology import ranges

    return ranges(cpus)
