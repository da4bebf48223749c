"""A refused or failing scheduler command never ends a workflow and never floods the server.

Workflows run on the fake PBS and on a real OpenPBS server. Where PBS must misbehave for longer
than it does by itself, small stand-in commands first on PATH answer as PBS does when it refuses
(`qsub: would exceed queue generic's per-user limit`, exit 38) or cannot be reached (`qstat`
exit 255 with only the JSON header), and log every call so the tests count them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clusters import fake_cluster, wait_for
from conftest import no_leftovers

pytestmark = [pytest.mark.slow, pytest.mark.needs("mpi")]
SITE = {"fake": "local", "real": "pbs"}
# Observed for this long, a backoff of 2 s doubling to 60 s calls PBS at 0, 2, 6, 14 and 30 s:
# 5 calls, where ten a minute would allow 6 (Parsl 2025.1.13 calls on every 0.05 s tick).
WINDOW = 40
MOST = 10 * WINDOW // 60

FLOW = """
import json, sys, time
import parsl
from parsl import python_app
import site_configs
from parsl_aurora.errors import run_main

args = json.loads(sys.argv[1])

@python_app
def work(i, seconds, marks):
    import time
    from pathlib import Path
    time.sleep(seconds)
    Path(marks, f"end-{i}").touch()
    return i * i

def main():
    with parsl.load(site_configs.load(args["site"], "multi_job", **args["options"])):
        futures = [work(i, args["seconds"], args["marks"]) for i in range(args["tasks"])]
        if args.get("progress"):  # progress lines on stderr, as a log file would get them
            from parsl_aurora import progress
            progress.wait(futures, every=args["progress"], file=sys.stderr)
        print(json.dumps([f.result() for f in futures]))
    return 0

if __name__ == "__main__":
    sys.exit(run_main(main))
"""


def driver_python(cluster, request) -> str:
    """The tests' interpreter on the fake, the test user's venv (made now) on real PBS."""
    if cluster.kind == "fake":
        return sys.executable
    return str(request.getfixturevalue("user_venv") / "bin" / "python")


def flow(cluster, request, tasks: int, seconds: float, *, path_head: str = "",
         progress: float = 0, **options):
    """Start the workflow as the cluster's user; (folder, process)."""
    d = cluster.workdir("flow")
    (d / "marks").mkdir()
    if cluster.runas:
        import shutil

        shutil.chown(d / "marks", cluster.user, cluster.user)
    cluster.write(d / "flow.py", FLOW)
    exe = driver_python(cluster, request)
    args = {"site": SITE[cluster.kind], "tasks": tasks, "seconds": seconds, "progress": progress,
            "marks": str(d / "marks"), "options": {"run_dir": str(d / "runinfo"), **options}}
    env = {**cluster.env, "PATH": f"{path_head}{Path(exe).parent}:{cluster.env['PATH']}"}
    argv = [*cluster.runas, "env", "-i", *(f"{k}={v}" for k, v in env.items()),
            exe, "flow.py", json.dumps(args)]
    return d, subprocess.Popen(argv, cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)


def stand_ins(folder: Path, real_bin: Path) -> Path:
    """qsub and qstat that log their calls, and misbehave as PBS does when told to."""
    bin_dir = folder / "standins"
    bin_dir.mkdir()
    header = ('printf \'{\\n\\t"timestamp":\\t%s,\\n\\t"pbs_version":\\t"23.06.06",\\n\\t'
              '"pbs_server":\\t"aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"\\n}\\n\' '
              '"$(date +%s)"')
    scripts = {
        "qsub": f"""
if [ -e {folder}/refuse ]; then
    echo "qsub: would exceed queue generic's per-user limit" >&2
    exit 38
fi
if [ -e {folder}/route-rejected ]; then
    echo "qsub: Job rejected by all possible destinations" >&2
    exit 191
fi
if [ -e {folder}/dropped ]; then  # accepted, then routed away: PBS no longer knows it
    echo "$((9000 + $(wc -l < {folder}/calls))).aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"
    exit 0
fi
exec {real_bin}/qsub "$@"
""",
        "qstat": f"""
if [ -e {folder}/unreachable ]; then
    {header}
    echo "qstat: cannot connect to server aurora-pbs-0001 (errno=15010)" >&2
    exit 255
fi
if [ -e {folder}/garbage ]; then
    echo "<html><body>502 Bad Gateway</body></html>"
    exit 0
fi
exec {real_bin}/qstat "$@"
""",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\necho \"$(date +%s.%N) {name}\" >> {folder}/calls\n{body}")
        path.chmod(0o755)
    return bin_dir


def call_times(folder: Path, name: str) -> list[float]:
    """When the stand-in NAME was called, in order."""
    log = folder / "calls"
    lines = log.read_text().splitlines() if log.exists() else []
    return [float(line.split()[0]) for line in lines if line.endswith(f" {name}")]


def calls(folder: Path, name: str, since: float = 0.0) -> int:
    return sum(1 for t in call_times(folder, name) if t >= since)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err


@pytest.fixture
def fake(tmp_path):
    c = fake_cluster(tmp_path)
    yield c
    c.cleanup()


def test_a_refusing_qsub_is_asked_again_with_backoff_and_the_run_goes_on(fake, request):
    from parsl_aurora import fake as fake_pkg

    folder = fake.workdir("standins")
    (folder / "refuse").touch()
    head = f"{stand_ins(folder, fake_pkg.bin_dir())}:{fake_pkg.bin_dir()}:"
    d, proc = flow(fake, request, 1, 0.1, path_head=head)
    start = time.time()
    try:
        # The window opens at the first refusal: the driver's start-up (imports, the
        # interchange) is no part of the backoff, and takes longer the busier the machine.
        first = wait_for(lambda: call_times(folder, "qsub")[:1] or proc.poll() is not None,
                         "the first qsub call")
        assert proc.poll() is None, finish(proc)[2][-2000:]
        time.sleep(max(0.0, first[0] + WINDOW - time.time()))
        assert proc.poll() is None, finish(proc)[2][-2000:]  # a refusal never ends the run
        asked = sum(1 for t in call_times(folder, "qsub") if t < first[0] + WINDOW)
        assert 3 <= asked <= MOST, f"{asked} qsub calls in {WINDOW} s from the first"
        # PBS takes jobs again: the run gets its block and finishes.
        (folder / "refuse").unlink()
        code, out, err = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1]) == [0]
    print(f"qsub calls while refusing: {asked} in {WINDOW} s; run took {time.time() - start:.0f} s")
    assert no_leftovers(d) == []


@pytest.mark.parametrize("failure", ["unreachable", "garbage"])
def test_a_failing_qstat_keeps_the_last_states_and_backs_off(fake, request, failure):
    """qstat fails once the block runs: the block is not taken for gone (no second block is
    asked for), qstat is asked again with backoff, and the tasks finish in the block they have.
    """
    from parsl_aurora import fake as fake_pkg

    folder = fake.workdir("standins")
    head = f"{stand_ins(folder, fake_pkg.bin_dir())}:{fake_pkg.bin_dir()}:"
    d, proc = flow(fake, request, 12, WINDOW, path_head=head)
    try:
        wait_for(lambda: list((d / "runinfo").glob("*/htex_tiles/block-0/*/manager.log")),
                 "the first block's worker pool")
        failing_since = time.time()
        (folder / failure).touch()
        code, out, err = finish(proc)
        failed_for = time.time() - failing_since
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1]) == [i * i for i in range(12)]
    assert calls(folder, "qsub") == 1  # the running block was never taken for ended
    asked = calls(folder, "qstat", since=failing_since)
    assert asked <= 10 * failed_for / 60 + 1, f"{asked} qstat calls in {failed_for:.0f} s"
    assert no_leftovers(d) == []


def test_a_job_of_ours_holding_the_debug_slot_only_delays_the_run(cluster, request):
    """Aurora's debug queue takes one job per user: a job already there makes the run's qsub
    refused (exit 38) until it ends; the run backs off, then gets its block and completes. The
    holder ends only once a refusal is recorded, so no race decides what the test sees."""
    from parsl_aurora import runs

    holder_dir = cluster.workdir("holder")
    # The holder ends when the test says so: once PBS has refused the run's block.
    holder = cluster.submit(holder_dir, f"until [ -e {holder_dir}/go ]; do sleep 0.2; done\n",
                            "-q", "debug",
                            directives=("-l select=1:ncpus=208", "-l walltime=0:10:00"))
    cluster.wait_state(holder, "R")
    d, proc = flow(cluster, request, 30, 0.2, queue="debug", max_jobs=1, progress=0.5)
    try:
        wait_for(lambda: any(e.kind == "refused" for f in (d / "runinfo").glob(
            f"*/{runs.EVENTS}") for e in runs.read_events(f.read_text())),
            "the run's block refused while the holder has the slot")
        cluster.write(holder_dir / "go", "")
        code, out, err = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1]) == [i * i for i in range(30)]
    log = next((d / "runinfo").glob("*/parsl.log")).read_text()
    assert "qsub refused a block (qsub: would exceed queue generic's per-user limit)" in log
    # The progress lines count refusals as PBS's answers, not as blocks that failed.
    lines = [line for line in err.splitlines() if "blocks:" in line]
    assert any("; PBS: " in line and " refused" in line for line in lines), lines
    assert all(", 0 failed" in line.split("blocks:")[1] for line in lines), lines
    assert no_leftovers(d) == []


def test_a_queue_pbs_does_not_have_ends_the_run_in_one_line(cluster, request):
    d, proc = flow(cluster, request, 1, 0.1, queue="nosuchq", allow_unlisted_queue=True)
    code, _, err = finish(proc)
    assert code == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "`qsub: Unknown queue` (qsub exit 170)" in err and "Fix: pick a queue" in err
    assert no_leftovers(d) == []


def test_blocks_that_cannot_start_workers_end_the_run_naming_why(cluster, request):
    """A block whose job cannot find Parsl's worker pool (nothing activates the driver's
    environment: jobs start from a login environment) fails; three in a row end the run with
    the block's own complaint, not Parsl's "did not return a job ID"."""
    d, proc = flow(cluster, request, 1, 0.1, activate=False)
    code, _, err = finish(proc)
    assert code == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "3 blocks in a row ended before any of their workers connected" in err
    assert "worker_pool_guard.sh: not found" in err or "command not found" in err, err
    assert no_leftovers(d) == []


def test_blocks_pbs_holds_are_deleted_and_three_in_a_row_end_the_run(cluster, request):
    """A job that fails to start is held by PBS (on the look-alike: a MoM prologue fails jobs of
    the account fail-start, and run_count=20 leaves one attempt). The run deletes each held
    block, asks for another after the backoff, and ends after three in a row, in one line."""
    from parsl_aurora import runs

    d, proc = flow(cluster, request, 1, 0.1, account="fail-start",
                   scheduler_options="#PBS -W run_count=20")
    code, _, err = finish(proc)
    assert code == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "3 blocks in a row were held by PBS without running" in err, err
    assert "job held, too many failed attempts to run" in err
    run_dir = next((d / "runinfo").glob("[0-9]*"))
    events = runs.read_events((run_dir / runs.EVENTS).read_text())
    assert [e.kind for e in events] == ["held"] * 3
    for e in events:  # deleted by the run, not left in the queue
        assert cluster.wait_state(e.job_id, "F")
    assert no_leftovers(d) == []


@pytest.mark.parametrize("answer,words", [
    ("route-rejected", ["`qsub: Job rejected by all possible destinations` (qsub exit 191)",
                        "Fix: ask for a node count and walltime one of the routing queue's"]),
    ("dropped", ["PBS dropped job 90", "without running it",
                 "the routing queue's destinations all rejected it", "Fix: ask for a node count"]),
])
def test_a_route_no_destination_takes_ends_the_run_in_one_line(fake, request, answer, words):
    """Rejected by every destination of a routing queue: at qsub (exit 191), or after qsub
    returned, when the job is simply gone. Neither is "not now", nor "completed"."""
    from parsl_aurora import fake as fake_pkg

    folder = fake.workdir("standins")
    (folder / answer).touch()
    head = f"{stand_ins(folder, fake_pkg.bin_dir())}:{fake_pkg.bin_dir()}:"
    d, proc = flow(fake, request, 1, 0.1, path_head=head)
    code, _, err = finish(proc)
    assert code == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    for w in words:
        assert w in err, err
    assert no_leftovers(d) == []
