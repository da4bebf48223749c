"""No task lost: jobs killed at walltime, a worker pool killed with -9, a driver killed and
restarted; and the monitoring database. Every run is a real workflow, on the fake PBS and, for
the PBS modes, on a real OpenPBS server as its test user.

Each execution of a task leaves marker files (start-*, end-*), so the tests count executions
instead of trusting Parsl's own bookkeeping.
"""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clusters import wait_for
from conftest import leftovers, no_leftovers

from parsl_aurora.fake.procs import processes

pytestmark = [pytest.mark.slow, pytest.mark.needs("mpi")]
SITE = {"fake": "local", "real": "pbs"}

FLOW = """
import json, sys
import parsl
from parsl import python_app
import site_configs

args = json.loads(sys.argv[1])

@python_app(cache=True)
def work(i, seconds, marks):
    import os, time
    from pathlib import Path
    # The fake node a worker runs on, where the fake PALS says (PARSL_AURORA_HOST).
    me = f"{i}.{os.getpid()}.{time.time_ns()}.{os.environ.get('PARSL_AURORA_HOST', '')}"
    Path(marks, "start-" + me).touch()
    hold = Path(marks).parent / "hold"  # holds tasks from its number on, while it exists
    while hold.exists() and i >= int(hold.read_text() or 0):
        time.sleep(0.1)
    time.sleep(seconds)
    Path(marks, "end-" + me).touch()
    return i * i

if __name__ == "__main__":
    with parsl.load(site_configs.load(args["site"], args["mode"], **args["options"])):
        futures = [work(i, args["seconds"], args["marks"]) for i in range(args["tasks"])]
        results = [f.result() for f in futures]
    print(json.dumps({"results": results,
                      "retries": sum(f.task_record["fail_count"] for f in futures)}))
"""


class Flow:
    """A workflow of `tasks` sleeping tasks, run as the cluster's user in its own folder."""

    def __init__(self, cluster, request, mode: str, tasks: int, seconds: float, **options):
        self.cluster, self.tasks = cluster, tasks
        self.folder = cluster.workdir("flow")
        self.marks = self.folder / "marks"
        self.marks.mkdir()
        if cluster.runas:
            os.chown(self.marks, *_ids(cluster.user))
        cluster.write(self.folder / "flow.py", FLOW)
        exe = (sys.executable if cluster.kind == "fake"
               else str(request.getfixturevalue("user_venv") / "bin" / "python"))
        self.args = {"site": SITE[cluster.kind], "mode": mode, "tasks": tasks,
                     "seconds": seconds, "marks": str(self.marks), "options": options}
        self.argv = [exe, "flow.py", json.dumps(self.args)]
        self.env = {**cluster.env, "PATH": f"{Path(exe).parent}:{cluster.env['PATH']}"}

    def start(self) -> subprocess.Popen:
        argv = [*self.cluster.runas, "env", "-i",
                *(f"{k}={v}" for k, v in self.env.items()), *self.argv]
        return subprocess.Popen(argv, cwd=self.folder, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def run(self) -> dict:
        return finish(self.start())

    def marked(self, kind: str) -> list[int]:
        """Task numbers with a `kind` marker (start or end), one entry per execution."""
        return sorted(int(p.name.split("-", 1)[1].split(".")[0])
                      for p in self.marks.glob(f"{kind}-*"))

    def jobs(self) -> int:
        """PBS jobs this run submitted (the provider's ledger in the run directory)."""
        return sum(len(p.read_text().splitlines())
                   for p in (self.folder / "runinfo").glob("*/pbs_jobs.txt"))

    def startups(self) -> dict[str, float]:
        """Block -> seconds from its job's start (qstat -x stime, whole seconds) to its worker
        pool's, when Parsl's drain clock starts (the pool logs its drain period and when it
        will drain)."""
        found = {}
        for ledger in (self.folder / "runinfo").glob("*/pbs_jobs.txt"):
            for line in ledger.read_text().splitlines():
                job_id, name = line.split("\t")[:2]
                block = name.split(".")[1]  # the job name: <run>.<block>.<time>
                for log in ledger.parent.glob(f"*/block-{block}/*/manager.log"):
                    text = log.read_text()
                    period = re.search(r"Drain period: (\d+)", text)
                    drain_at = re.search(r"Will request drain at ([0-9.]+)", text)
                    try:  # only shown: a job PBS no longer lists is left out
                        stime = (self.cluster.job(job_id) or {})["stime"]
                        started = time.mktime(time.strptime(stime))  # local time, as ctime
                    except (KeyError, ValueError):
                        continue
                    if period and drain_at:
                        found[block] = round(float(drain_at[1]) - int(period[1]) - started, 1)
        return found


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ walltime
def test_walltime_kills_cost_no_task_and_drain_avoids_them(cluster, request):
    """120 tasks of 3 s, one 26 s job at a time: more than one job's work.

    Without draining, the job that reaches its walltime kills the tasks it runs; they come back
    and run again in the next job. With a 12 s margin the pools stop taking tasks in time and
    none is killed: the margin covers a task (3 s) plus the pool's start-up, which also eats
    into it. Real PBS notices the walltime 1-5 s late (its MoM polls) and the fake on time:
    later kills only widen the drained run's slack.

    No event can stand in for the start-up (Parsl counts the drain from the pool's start, not
    the job's); the test leaves it 9 s. Measured: 0.6 to 2.0 s (stime has whole seconds) in
    three runs beside other test sessions, load average 5 to 24 on 2 cores; the workers' own
    start-up, several seconds then, only delays when tasks begin, never when the last ends.
    The drained run's start-ups are shown with its counts, so a failure says whether it was
    the machine (start-ups near 9 s) or the draining (start-ups well below).
    """
    runs = {}
    walltime = 26
    for name, margin in (("drained", 12), ("undrained", 0)):
        flow = Flow(cluster, request, "multi_job", 120, 3, walltime=f"0:00:{walltime}",
                    max_jobs=1, retries=3, drain_margin=f"0:00:{margin:02d}")
        result = flow.run()
        assert result["results"] == [i * i for i in range(120)]  # none lost, all correct
        assert set(flow.marked("end")) == set(range(120))
        killed = len(flow.marked("start")) - len(flow.marked("end"))
        runs[name] = {"retries": result["retries"], "killed": killed, "jobs": flow.jobs()}
        if name == "drained":  # what the margin has to cover besides a task (shown on failure)
            runs[name]["pool start-up s"] = flow.startups()
        assert no_leftovers(flow.folder) == []
    print("per run:", runs)  # shown with pytest -s
    # Without draining, a job ended at walltime with tasks running, which were run again.
    assert runs["undrained"]["jobs"] >= 2 and runs["undrained"]["killed"] >= 1
    assert runs["undrained"]["retries"] >= runs["undrained"]["killed"]
    # Draining ended jobs before their walltime: more jobs, and no task killed or retried.
    assert runs["drained"]["jobs"] >= 2
    assert (runs["drained"]["killed"], runs["drained"]["retries"]) == (0, 0), runs


# ------------------------------------------------------------------------------ pool crash
def crash_a_pool(flow: Flow) -> dict:
    proc = flow.start()
    try:
        wait_for(lambda: len(flow.marked("end")) >= 6, "six tasks finished")
        pools = [p.pid for p in processes() if p.cwd.startswith(str(flow.folder))
                 and "bin/process_worker_pool.py" in p.cmdline and "guard" not in p.cmdline]
        assert len(pools) == 1, "\n".join(leftovers(flow.folder))
        os.kill(pools[0], signal.SIGKILL)
        return finish(proc)
    finally:
        proc.kill()


def test_killed_worker_pool_tasks_are_retried_in_multi_job(cluster, request):
    flow = Flow(cluster, request, "multi_job", 36, 1)
    result = crash_a_pool(flow)
    assert result["results"] == [i * i for i in range(36)]
    assert result["retries"] >= 1  # tasks were running in the pool that died
    assert set(flow.marked("end")) == set(range(36))
    assert no_leftovers(flow.folder) == []


def test_one_killed_pool_of_a_two_node_block_ends_only_itself(cluster, request):
    """A 2-node block runs one pool per node under one mpiexec. PALS ends every rank when one
    exits non-zero unless told not to; the pool launcher says --no-abort-on-failure, so when
    one node's pool is killed (OOM, a bad node) the other node's tasks run on: they finish once,
    and only the lost ones run again."""
    flow = Flow(cluster, request, "multi_job", 24, 20, nodes_per_job=2, max_jobs=1)
    # Every task waits after starting until the pool is killed: all 24 run at once, on both
    # nodes, however long a loaded machine takes to start the second pool's workers.
    cluster.write(flow.folder / "hold", "0")
    proc = flow.start()
    try:
        wait_for(lambda: len(flow.marked("start")) == 24, "24 tasks running on two nodes")
        pools = {p.pid: p for p in processes() if p.cwd.startswith(str(flow.folder))
                 and "bin/process_worker_pool.py" in p.cmdline and "guard" not in p.cmdline}
        assert len(pools) == 2, "\n".join(leftovers(flow.folder))
        hosts = {pid: _variable(pid, "PARSL_AURORA_HOST") for pid in pools}
        assert len(set(hosts.values())) == 2, hosts  # one pool on each node
        victim = max(pools)
        tree = "\n".join(f"{p.pid} {p.ppid} {p.cmdline[:100]}" for p in processes()
                         if p.cwd.startswith(str(flow.folder)))
        os.kill(victim, signal.SIGKILL)
        (flow.folder / "hold").unlink()
        result = finish(proc)
    finally:
        proc.kill()
    assert result["results"] == [i * i for i in range(24)]
    starts: dict[int, list[str]] = {}  # task -> the node of each of its starts, in order
    for marker in sorted(flow.marks.glob("start-*"), key=lambda m: int(m.name.split(".")[2])):
        task, _pid, _ns, host = marker.name[len("start-"):].split(".", 3)
        starts.setdefault(int(task), []).append(host)
    lost = {t for t, where in starts.items() if where[0] == hosts[victim]}
    seen = f"killed {victim} on {hosts[victim]}; starts {starts}; processes:\n{tree}"
    assert len(lost) == 12, seen  # the killed pool's twelve workers were all busy
    # The other node's tasks ran once; the lost ones once more, after the pool was missed.
    assert {t: len(p) for t, p in starts.items()} == {
        t: 2 if t in lost else 1 for t in range(24)}, seen
    assert set(flow.marked("end")) == set(range(24)) and len(flow.marked("end")) == 24
    assert no_leftovers(flow.folder) == []


def _variable(pid: int, name: str) -> str:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(name.encode() + b"=")),
                "")


@pytest.fixture
def fake(tmp_path):
    from clusters import fake_cluster

    c = fake_cluster(tmp_path)
    yield c
    c.cleanup()


def test_killed_worker_pool_tasks_are_retried_in_job(fake, request):
    flow = Flow(fake, request, "in_job", 36, 1)
    result = crash_a_pool(flow)
    assert result["results"] == [i * i for i in range(36)]
    assert result["retries"] >= 1
    assert no_leftovers(flow.folder) == []


# ------------------------------------------------------------------------------ resume
def checkpointed(run_dir: Path) -> int:
    """How many task results Parsl's checkpoints in run_dir hold (a record being appended
    while we read is not counted yet)."""
    count = 0
    for path in run_dir.glob("*/checkpoint/tasks.pkl"):
        with path.open("rb") as f:
            while True:
                try:
                    pickle.load(f)
                except (EOFError, pickle.UnpicklingError, ValueError):
                    break
                count += 1
    return count


def test_restarted_driver_does_not_rerun_finished_tasks(fake, request):
    """The first run is killed once 12 results are checkpointed; tasks from 12 on wait until
    then, so the kill never races the rest of the run to its end."""
    flow = Flow(fake, request, "in_job", 40, 0.5, resume=True)
    run_dir = flow.folder / "runinfo"
    fake.write(flow.folder / "hold", "12")
    first = flow.start()
    try:
        wait_for(lambda: checkpointed(run_dir) >= 12, "12 checkpointed results")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the login session dies, driver and all
        first.communicate()
    for line in leftovers(flow.folder):  # its worker pool too: nothing survives into the rerun
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    wait_for(lambda: not leftovers(flow.folder), "the killed run's processes gone", 60)
    done_before = checkpointed(run_dir)
    starts_before = len(flow.marked("start"))
    assert 12 <= done_before < 40
    (flow.folder / "hold").unlink()

    result = flow.run()
    assert result["results"] == [i * i for i in range(40)]
    reruns = len(flow.marked("start")) - starts_before
    # Exactly the tasks without a checkpointed result run again; finished ones come from disk.
    assert reruns == 40 - done_before
    assert no_leftovers(flow.folder) == []


def test_without_resume_a_restart_runs_everything_again(fake, request):
    flow = Flow(fake, request, "in_job", 12, 0.1)
    flow.run()
    flow.run()
    assert len(flow.marked("start")) == 24


# ------------------------------------------------------------------------------ monitoring
def test_monitoring_database_holds_the_tasks(fake, request):
    import sqlite3

    flow = Flow(fake, request, "in_job", 12, 0.1, monitoring=True)
    result = flow.run()
    assert result["results"] == [i * i for i in range(12)]
    with sqlite3.connect(flow.folder / "runinfo" / "monitoring.db") as con:
        tasks = con.execute("SELECT task_id, task_func_name FROM task").fetchall()
        tries = con.execute("SELECT COUNT(*) FROM try WHERE task_try_time_returned IS NOT NULL"
                            ).fetchone()[0]
        workflows = con.execute("SELECT COUNT(*) FROM workflow").fetchone()[0]
        tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert sorted(t for t, _ in tasks) == list(range(12))
    assert {name for _, name in tasks} == {"work"}
    assert tries == 12 and workflows == 1
    assert {"workflow", "task", "try", "block", "resource"} <= tables, tables
    assert no_leftovers(flow.folder) == []


# ------------------------------------------------------------------------------ parsl.log
def test_an_idle_run_does_not_fill_its_log(fake, request):
    """At a 0.05 s strategy tick Parsl writes debug lines every tick (about 80 kB/s, 7 GB a day
    of a week-long campaign). None of those; Parsl's scaling decisions stay."""
    from parsl_aurora.modes import TICK_LOGGERS

    flow = Flow(fake, request, "multi_job", 1, 10)  # one task: 200 ticks with nothing to do
    flow.run()
    log = next((flow.folder / "runinfo").glob("*/parsl.log")).read_text().splitlines()
    ticks = [line for line in log if " DEBUG: " in line and any(f" {n}:" in line
                                                                for n in TICK_LOGGERS)]
    assert ticks == [], ticks[:5]
    assert any("Scaling out by 1 blocks" in line for line in log)
