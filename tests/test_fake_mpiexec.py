"""The fake PALS mpiexec: PALS's options, hydra underneath, PALS's variables per rank."""

import os
import subprocess

import pytest

from parsl_aurora import fake
from parsl_aurora.fake import mpiexec
from parsl_aurora.fake.mpiexec import Request, UsageError


@pytest.fixture
def env(tmp_path):
    return {**os.environ, **fake.environment(tmp_path)}


def run(env, *cmd):
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=False)


def test_parsl_mpi_prefix_is_understood():
    req = mpiexec.parse(
        ["-n", "24", "-ppn", "12", "-hosts", "a,b", "--cpu-bind", "depth", "--depth=8", "app", "x"],
        {},
    )
    assert (req.ranks, req.ppn, req.hosts, req.cpu_bind, req.depth, req.command) == (
        24,
        12,
        ["a", "b"],
        "depth",
        8,
        ["app", "x"],
    )


def test_mpiexec_launcher_line_is_understood(tmp_path):
    hostfile = tmp_path / "h"
    hostfile.write_text("n1\nn1\nn2\n")
    args = f"--cpu-bind none --ppn 1 -n 2 --hostfile {hostfile} /usr/bin/sh cmd.sh".split()
    req = mpiexec.parse(args, {})
    assert (req.ranks, req.ppn, req.hosts) == (2, 1, ["n1", "n2"])


def test_hostfile_defaults_to_pbs_nodefile(tmp_path):
    nodes = tmp_path / "nodes"
    nodes.write_text("x1\nx2\nx3\n")
    req = mpiexec.parse(["-ppn", "2", "hostname"], {"PBS_NODEFILE": str(nodes)})
    assert (req.ranks, req.ppn, req.hosts) == (6, 2, ["x1", "x2", "x3"])


def test_without_ppn_ranks_pack_the_first_node():
    # Why Parsl's MpiExecLauncher needs overrides="--ppn 1" on Aurora.
    req = mpiexec.parse(["-n", "2", "--hosts", "a,b", "true"], {})
    assert (req.ranks, req.ppn) == (2, 2)
    assert mpiexec.parse(["-n", "2", "--depth", "104", "--hosts", "a,b", "true"], {}).ppn == 2
    assert mpiexec.parse(["-n", "4", "--depth", "104", "--hosts", "a,b", "true"], {}).ppn == 2


def test_parsl_derived_float_ppn_is_read_as_pals_reads_it():
    req = mpiexec.parse(["-n", "24", "-ppn", "12.0", "-hosts", "a,b", "true"], {})
    assert req.ppn == 12
    with pytest.raises(UsageError, match="invalid value '1.5' for -ppn"):
        mpiexec.parse(["-n", "3", "-ppn", "1.5", "-hosts", "a,b", "true"], {})


def test_cpu_bind_equals_form_and_env_forms():
    req = mpiexec.parse(
        [
            "--cpu-bind=list:1-8:9-16",
            "-env",
            "A",
            "1",
            "--env",
            "B=2",
            "--envall",
            "-l",
            "--no-vni",
            "--hosts",
            "a",
            "-n",
            "2",
            "x",
        ],
        {},
    )
    assert (req.cpu_bind, req.env, req.command) == ("list:1-8:9-16", {"A": "1", "B": "2"}, ["x"])


@pytest.mark.parametrize("option", ["--bind-to", "--map-by", "-bind-to"])
def test_options_pals_rejects(option, env):
    r = run(env, "mpiexec", option, "core", "-n", "1", "true")
    assert r.returncode != 0 and f"unrecognized option '{option}'" in r.stderr
    assert r.stdout == ""


def test_parsl_mpiexec_launcher_script_runs_one_worker_per_node(tmp_path):
    """The script Parsl's MpiExecLauncher writes, as a fake PBS job on two nodes."""
    from clusters import fake_cluster
    from parsl.launchers import MpiExecLauncher

    cluster = fake_cluster(tmp_path)
    d = cluster.workdir()
    launcher = MpiExecLauncher(bind_cmd="--cpu-bind", overrides="--ppn 1")
    # The launcher writes cmd_$JOBNAME.sh through an unquoted here-document: escape the $.
    body = launcher(r'echo "worker \$PALS_RANKID on \$PARSL_AURORA_HOST"', 1, 2)
    job_id = cluster.submit(d, f"export JOBNAME=block-0\n{body}\n", "-o", str(d / "out"),
                            directives=("-l select=2:ncpus=208", "-l walltime=0:05:00"))
    assert cluster.wait_state(job_id, "F")["Exit_status"] == 0
    nodes = fake.nodefile_lines(2).split()
    workers = [x for x in (d / "out").read_text().splitlines() if x.startswith("worker")]
    assert sorted(workers) == [f"worker {r} on {nodes[r]}" for r in range(2)]
    # PBS starts the job in $HOME: the launcher's files land there.
    assert (cluster.home / "cmd_block-0.sh").exists()
    assert (cluster.home / "block-0.nodes").read_text().split() == nodes


def test_too_many_ranks_refused():
    with pytest.raises(UsageError, match="5 ranks do not fit 2 nodes at 2 per node"):
        mpiexec.parse(["-n", "5", "-ppn", "2", "-hosts", "a,b", "true"], {})


def test_hydra_command_golden():
    req = Request(
        command=["app"], ranks=4, ppn=2, hosts=["a", "b"], cpu_bind="list:1-8:9-16", env={"K": "V"}
    )
    assert mpiexec.hydra_command(req, "/h/mpiexec.hydra", [0, 1]) == [
        "/h/mpiexec.hydra",
        "-launcher",
        "fork",
        "-hosts",
        "a,b",
        "-ppn",
        "2",
        "-n",
        "4",
        "-genv",
        "K",
        "V",
        "-genv",
        "PARSL_AURORA_HOSTS",
        "a b",
        "-genv",
        "PARSL_AURORA_BIND",
        "0,1 0,1",
        str(fake.bin_dir() / "fake-rank"),
        "app",
    ]


@pytest.mark.parametrize(
    "bind,depth,host_cpus,expected",
    [
        ("list:1:2:3", 1, [0, 1], ["1", "0", "1"]),  # Aurora id % host CPUs
        ("depth", 2, list(range(8)), ["0,1", "2,3", "4,5"]),
        ("core", 1, [4, 5], ["4", "5", "4"]),
        ("verbose,list:9-10:11", 1, list(range(4)), ["1,2", "3", "1,2"]),
        ("none", 1, [0, 1], []),
    ],
)
def test_cpu_binding_rule(bind, depth, host_cpus, expected):
    req = Request(command=["x"], ppn=3, cpu_bind=bind, depth=depth)
    assert mpiexec.host_cpu_sets(req, host_cpus) == expected


def test_unknown_binding_names_choices():
    with pytest.raises(UsageError, match="none, depth, core, list"):
        mpiexec.host_cpu_sets(Request(command=["x"], ppn=1, cpu_bind="socket"), [0])


def test_each_rank_gets_pals_variables(env):
    fmt = (
        "$PALS_RANKID $PALS_LOCAL_RANKID $PALS_NODEID $PMI_RANK $PMI_SIZE "
        "$PMI_LOCAL_RANK $PMI_LOCAL_SIZE $PARSL_AURORA_HOST"
    )
    r = run(
        env,
        "mpiexec",
        "-n",
        "24",
        "-ppn",
        "12",
        "--hosts",
        "x1,x2",
        "--no-vni",
        "--env",
        "GREETING=hi",
        "sh",
        "-c",
        f"echo {fmt} $GREETING",
    )
    assert r.returncode == 0, r.stderr
    rows = sorted((line.split() for line in r.stdout.splitlines()), key=lambda x: int(x[0]))
    assert len(rows) == 24
    for rank, row in enumerate(rows):
        node, local = divmod(rank, 12)
        assert row == [
            str(rank),
            str(local),
            str(node),
            str(rank),
            "24",
            str(local),
            "12",
            f"x{node + 1}",
            "hi",
        ]


def test_cpu_binding_is_applied(env):
    cpus = sorted(os.sched_getaffinity(0))
    r = run(
        env,
        "mpiexec",
        "-n",
        "1",
        "--hosts",
        "a",
        "--cpu-bind",
        f"list:{cpus[-1]}",
        "python3",
        "-c",
        "import os; print(sorted(os.sched_getaffinity(0)))",
    )
    assert r.stdout.strip() == str([cpus[-1]])


def test_depth_binding_wraps_onto_this_machine(env):
    cpus = sorted(os.sched_getaffinity(0))
    r = run(
        env,
        "mpiexec",
        "-n",
        "4",
        "-ppn",
        "4",
        "--hosts",
        "a",
        "--depth",
        "1",
        "--cpu-bind",
        "depth",
        "sh",
        "-c",
        "echo $PALS_LOCAL_RANKID $(taskset -pc $$ | cut -d: -f2)",
    )
    assert r.returncode == 0, r.stderr
    got = dict(line.split() for line in r.stdout.splitlines())
    assert got == {str(i): str(cpus[i % len(cpus)]) for i in range(4)}


def test_mpi4py_allreduce_across_two_fake_nodes(env):
    # Every rank must call allreduce; only rank 0 prints.
    code = (
        "from mpi4py import MPI; c = MPI.COMM_WORLD; total = c.allreduce(c.rank); "
        "print(total, c.size) if c.rank == 0 else None"
    )
    r = run(
        env,
        "mpiexec",
        "-n",
        "24",
        "-ppn",
        "12",
        "-hosts",
        "x1,x2",
        env["PARSL_AURORA_PYTHON"],
        "-c",
        code,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(sum(range(24))), "24"]
