"""The fake PALS mpiexec: PALS's options, hydra underneath, PALS's variables per rank."""

import os
import re
import subprocess
import sys

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


def test_hostfile_defaults_to_pbs_nodefile_and_ranks_to_one(tmp_path):
    # PALS's front end: -n defaults to 1 (PALS_NRANKS), the hosts to $PBS_NODEFILE.
    nodes = tmp_path / "nodes"
    nodes.write_text("x1\nx2\nx3\n")
    req = mpiexec.parse(["-ppn", "2", "hostname"], {"PBS_NODEFILE": str(nodes)})
    assert (req.ranks, req.ppn, req.hosts) == (1, 2, ["x1", "x2", "x3"])
    req = mpiexec.parse(["hostname"], {"PBS_NODEFILE": str(nodes), "PALS_NRANKS": "6",
                                       "PALS_PPN": "2"})
    assert (req.ranks, req.ppn) == (6, 2)


def test_without_ppn_ranks_pack_the_first_node():
    # Why Parsl's MpiExecLauncher needs overrides="--ppn 1" on Aurora.
    req = mpiexec.parse(["-n", "2", "--hosts", "a,b", "true"], {})
    assert (req.ranks, req.ppn) == (2, 2)
    assert mpiexec.parse(["-n", "2", "--depth", "104", "--hosts", "a,b", "true"], {}).ppn == 2
    assert mpiexec.parse(["-n", "4", "--depth", "104", "--hosts", "a,b", "true"], {}).ppn == 2


@pytest.mark.parametrize("value", ["12.0", "1.5", "twelve"])
def test_ppn_is_an_integer_as_pals_declares_it(value):
    # Parsl writes "12.0" when it derives ranks_per_node; PALS's front end refuses it.
    with pytest.raises(UsageError, match=f"Invalid value for '-ppn': '{value}' is not a valid"):
        mpiexec.parse(["-n", "24", "-ppn", value, "-hosts", "a,b", "true"], {})
    with pytest.raises(UsageError, match="Invalid value for '-n': 0 is not in the range x>=1"):
        mpiexec.parse(["-n", "0", "true"], {})
    assert mpiexec.parse(["--ppn=0", "-n", "2", "-hosts", "a,b", "true"], {}).ppn == 2


@pytest.mark.parametrize("spec,ppn", [
    ({"num_nodes": 2, "num_ranks": 24}, 12),
    ({"num_nodes": 2, "ranks_per_node": 3}, 3),
    ({"num_nodes": 2, "num_ranks": 6, "ranks_per_node": 3}, 3),
])
def test_the_mpi_prefix_of_a_task_is_one_pals_takes(spec, ppn):
    """Parsl's own composer, after the bundle's executor has seen the spec, writes a prefix
    the fake PALS (integers only, as PALS) reads."""
    from parsl.executors.high_throughput.mpi_prefix_composer import (
        compose_mpiexec_launch_cmd,
        validate_resource_spec,
    )

    from parsl_aurora.executors import whole_ranks_per_node

    whole_ranks_per_node(spec)
    validate_resource_spec(spec)
    _, prefix = compose_mpiexec_launch_cmd(spec, ["x1", "x2"])
    assert prefix.split()[0] == "mpiexec"
    req = mpiexec.parse([*prefix.split()[1:], "app"], {})
    assert (req.ppn, req.ranks, req.hosts) == (ppn, 2 * ppn, ["x1", "x2"])
    assert req.abort_on_failure  # an MPI task whose rank fails ends, as PALS's default has it


def test_uneven_ranks_are_refused_before_the_task_runs():
    from parsl.executors.errors import InvalidResourceSpecification

    from parsl_aurora.executors import whole_ranks_per_node

    with pytest.raises(InvalidResourceSpecification, match="num_ranks=5 does not divide"):
        whole_ranks_per_node({"num_nodes": 2, "num_ranks": 5})


@pytest.mark.parametrize("args", [
    # ALCF's Aurora pages, as written there (sources in docs/fake-cluster.md).
    "-np 16 -ppn 8 --cpu-bind list:4:56 --no-vni -envall -genvall dcp x",
    "--genvall --rlimit CORE ./mpi_abort",
    "-n 4 --ppn 2 --gpu-bind=list:0.0:0.1 --depth=8 --cpu-bind depth --env OMP_PLACES=cores x",
    "-genv I_MPI_FABRICS ofi -genv FI_PROVIDER tcp -n 2 x",
    "--pmi=pmix --envall -n 2 --ppn 2 -l --line-buffer x",
    "-l --no-transfer --line-buffer --np 16 -ppn 4 --cpu-bind core x",
    # PALS's own spellings (craycli).
    "-n 2 --no-abort-on-failure --mem-bind none --umask 022 -wdir /tmp --exclusive x",
    ("-soft 2 -arch x86_64 -path /bin -file f -envlist A,B --include-tasks 0 --exclude-tasks 1 "
     "--procinfo-file p --rlimits CORE -envnone --transfer --label --no-label --shared "
     "--sstartup -n 2 x"),
])
def test_options_from_pals_and_alcfs_pages_are_accepted(args):
    req = mpiexec.parse(args.split(), {"PALS_HOSTLIST": "a,b,c,d"})
    assert req.command[0] in ("x", "dcp", "./mpi_abort")


@pytest.mark.parametrize("option", ["--oversubscribe", "-bootstrap", "--bind-to", "-genvlist"])
def test_options_pals_does_not_have_are_refused(option):
    with pytest.raises(UsageError, match=f"unrecognized option '{option}'"):
        mpiexec.parse([option, "x", "-n", "1", "true"], {})


@pytest.mark.parametrize("args,words", [
    (["--cpu-bind", "numa", "x"], "unsupported --cpu-bind 'numa'"),
    (["--cpu-bind", "socket", "x"], "unsupported --cpu-bind 'socket'"),
    (["--cpu-bind", "thread", "x"], "unsupported --cpu-bind 'thread'"),
    (["--cpu-bind", "mask:0x1", "x"], "unsupported --cpu-bind 'mask:0x1'"),
    (["-n", "1", "a", ":", "-n", "1", "b"], "MPMD (':' between commands) is PALS's"),
    (["-configfile", "f"], "unrecognized option '-configfile'"),
])
def test_pals_options_the_fake_does_not_do_are_refused(args, words):
    with pytest.raises(UsageError, match=re.escape(words)):
        mpiexec.aurora_cpus(mpiexec.parse(args, {}), 0)
    # --gpu-bind is taken, and not applied.
    assert mpiexec.parse(["--gpu-bind=list:0.0:0.1", "x"], {}).command == ["x"]


def test_abort_on_failure_is_the_default():
    assert mpiexec.parse(["true"], {}).abort_on_failure is True
    assert mpiexec.parse(["--no-abort-on-failure", "true"], {}).abort_on_failure is False
    assert mpiexec.parse(["true"], {"PALS_ABORT_ON_FAILURE": "0"}).abort_on_failure is False


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
            "-genv",
            "C",
            "3",
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
    assert (req.cpu_bind, req.env, req.command) == (
        "list:1-8:9-16", {"A": "1", "B": "2", "C": "3"}, ["x"])


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
        "-genv",
        "PARSL_AURORA_PALS_STATUS",
        "",
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


# One rank exits 3 at once; the others would sleep a minute. PALS ends them all unless told not
# to. Each rank prints its rank when it starts and "done" when it finishes normally.
ONE_FAILS = 'echo "start $PALS_RANKID"; [ "$PALS_RANKID" = 1 ] && exit 3; sleep {s}; echo done'


def launching(env: dict, with_hydra: bool) -> dict:
    """ENV for the fake mpiexec with MPICH's hydra, or without it (as inside the image)."""
    if with_hydra:
        return env
    path = [p for p in env["PATH"].split(os.pathsep)
            if not (p and os.path.exists(f"{p}/mpiexec.hydra"))]
    return {**env, "PARSL_AURORA_HYDRA": "", "PATH": os.pathsep.join(path)}


@pytest.mark.parametrize("with_hydra", [True, False], ids=["hydra", "direct"])
def test_one_rank_exiting_non_zero_aborts_every_rank(env, with_hydra):
    env = launching(env, with_hydra)
    r = run(env, "mpiexec", "-n", "3", "-ppn", "3", "--hosts", "a", "sh", "-c",
            ONE_FAILS.format(s=60))
    # The largest exit status (PALS's front end); the ranks it ended count too.
    assert r.returncode in (3, 143), r.stderr
    assert r.stdout.split().count("start") == 3 and "done" not in r.stdout


@pytest.mark.parametrize("with_hydra", [True, False], ids=["hydra", "direct"])
def test_no_abort_on_failure_lets_the_other_ranks_finish(env, with_hydra):
    env = launching(env, with_hydra)
    r = run(env, "mpiexec", "--no-abort-on-failure", "-n", "3", "-ppn", "3", "--hosts", "a",
            "sh", "-c", ONE_FAILS.format(s=1))
    # The largest exit status of the ranks, as PALS's front end reports.
    assert r.returncode == 3, r.stderr
    assert r.stdout.split().count("done") == 2


def test_a_rank_killed_by_a_signal_does_not_abort_without_abort_on_failure(env):
    """hydra alone aborts every rank when one dies by a signal; PALS with
    --no-abort-on-failure does not, so neither does the fake."""
    code = ('echo "start $PALS_RANKID"; [ "$PALS_RANKID" = 1 ] && kill -9 $$; sleep 1; '
            'echo done')
    r = run(env, "mpiexec", "--no-abort-on-failure", "-n", "3", "-ppn", "3", "--hosts", "a",
            "sh", "-c", code)
    assert r.returncode == 137, r.stderr
    assert r.stdout.split().count("done") == 2


# A client of the fake PALS daemon written against the socket alone (the system's Python, as
# another user): the descriptors, then the request, then the reply.
PALSD_CLIENT = """
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
for _ in range(600):  # the daemon is starting
    try:
        s.connect("\\0" + sys.argv[1])
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
try:
    socket.send_fds(s, [b"."], [0, 1, 2])
    s.sendall(json.dumps({"argv": ["-n", "2", "touch", sys.argv[2]], "cwd": "/",
                          "env": {"PATH": "/usr/bin:/bin"}}).encode() + b"\\n")
    reply = s.makefile("rb").readline()
except (BrokenPipeError, ConnectionResetError):  # closed at once: not the daemon's user
    reply = b""  # (a broken pipe or a reset, depending on timing)
print(repr(reply))
"""


@pytest.mark.needs("mpi")
def test_the_pals_daemon_launches_for_its_own_user_only(tmp_path):
    """`mpiexec` in the image hands its launch to the fake PALS daemon on the host: for the
    daemon's user it runs the ranks and answers their exit status; another user's connection
    is closed unanswered and starts nothing."""
    name = f"parsl-aurora-palsd-test-{os.getpid()}"
    daemon = subprocess.Popen([sys.executable, "-m",
                               "parsl_aurora.fake.palsd", f"@{name}"])
    folder = tmp_path / "out"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    try:
        ran = folder / "ran"
        mine = subprocess.run(["/usr/bin/python3", "-c", PALSD_CLIENT, name, str(ran)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert mine.stdout.strip() == "b'0\\n'", mine.stderr
        assert ran.exists()
        if os.geteuid() == 0:
            theirs = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c",
                                     PALSD_CLIENT, name, str(folder / "theirs")],
                                    capture_output=True, text=True, timeout=120, check=False)
            assert theirs.stdout.strip() == "b''", theirs.stderr
            assert not (folder / "theirs").exists()
    finally:
        daemon.terminate()
        daemon.wait()
