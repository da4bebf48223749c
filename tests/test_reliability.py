"""No task lost: jobs killed at walltime, a worker pool killed with -9, a driver killed and
restarted; and the monitoring database. Every run is a real workflow on the fake cluster.

Each execution of a task leaves marker files (start-*, end-*), so the tests count executions
instead of trusting Parsl's own bookkeeping.
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, leftovers, no_leftovers

pytestmark = pytest.mark.slow

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
    me = f"{i}.{os.getpid()}.{time.time_ns()}"
    Path(marks, "start-" + me).touch()
    time.sleep(seconds)
    Path(marks, "end-" + me).touch()
    return i * i

with parsl.load(site_configs.load("local", args["mode"], **args["options"])):
    futures = [work(i, args["seconds"], args["marks"]) for i in range(args["tasks"])]
    results = [f.result() for f in futures]
print(json.dumps({"results": results,
                  "retries": sum(f.task_record["fail_count"] for f in futures)}))
"""


def start_flow(folder: Path, mode: str, tasks: int, seconds: float, **options):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "marks").mkdir(exist_ok=True)
    script = folder / "flow.py"
    script.write_text(FLOW)
    args = {"mode": mode, "tasks": tasks, "seconds": seconds, "marks": str(folder / "marks"),
            "options": {"run_dir": str(folder / "runinfo"), **options}}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(script), json.dumps(args)], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def marks(folder: Path, kind: str) -> list[int]:
    """Task numbers with a `kind` marker (start or end), one entry per execution."""
    return sorted(int(p.name.split("-", 1)[1].split(".")[0])
                  for p in (folder / "marks").glob(f"{kind}-*"))


def wait_for(predicate, what: str, limit: float = 300):
    # A bound so a broken build fails instead of hanging CI; not a performance assertion.
    end = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < end, f"never saw {what}"
        time.sleep(0.1)


def kill_everything_in(folder: Path) -> None:
    for line in leftovers(folder):
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------ walltime
def walltime_run(folder: Path, drain_margin: str) -> tuple[dict, list[int], list[int]]:
    """100 tasks of 2 s through multi_job, one 20 s job at a time."""
    result = finish(start_flow(folder, "multi_job", 100, 2, walltime="0:00:20", max_jobs=1,
                               retries=3, drain_margin=drain_margin))
    return result, marks(folder, "start"), marks(folder, "end")


def test_walltime_kills_cost_no_task_and_drain_avoids_them(tmp_path):
    runs = {}
    for name, margin in (("drained", "0:00:06"), ("undrained", "0:00:00")):
        result, starts, ends = walltime_run(tmp_path / name, margin)
        assert result["results"] == [i * i for i in range(100)]  # none lost, all correct
        assert set(ends) == set(range(100))
        jobs = list((tmp_path / name / "runinfo" / "fake" / "jobs").glob("*.json"))
        runs[name] = (result["retries"], len(starts) - len(ends), len(jobs))
        assert no_leftovers(tmp_path / name) == []
    print("(retries, killed executions, jobs):", runs)  # shown with pytest -s
    (drained_retries, drained_killed, drained_jobs), (retries, killed, jobs) = runs.values()
    # Without draining, every job that hits its walltime kills the tasks it is running; they
    # come back (heartbeat loss) and run again in the next job.
    assert jobs >= 2 and killed >= 1 and retries >= killed
    # Draining stops taking tasks before the walltime: fewer tasks die, fewer retries burn.
    assert drained_jobs >= 2
    assert drained_retries < retries and drained_killed < killed, runs


# ------------------------------------------------------------------------------ pool crash
@pytest.mark.parametrize("mode", ["in_job", "multi_job"])
def test_killed_worker_pool_tasks_are_retried(mode, tmp_path):
    proc = start_flow(tmp_path, mode, 36, 1)
    try:
        wait_for(lambda: len(marks(tmp_path, "end")) >= 6, "six tasks finished")
        pools = [int(line.split(":")[0]) for line in leftovers(tmp_path)
                 if "process_worker_pool.py" in line and "worker_pool_guard" not in line]
        assert len(pools) == 1, leftovers(tmp_path)
        os.kill(pools[0], signal.SIGKILL)
        result = finish(proc)
    finally:
        proc.kill()
    assert result["results"] == [i * i for i in range(36)]
    assert result["retries"] >= 1  # tasks were running in the pool that died
    assert set(marks(tmp_path, "end")) == set(range(36))
    assert no_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ resume
def checkpointed(run_dir: Path) -> int:
    """How many task results Parsl's checkpoints in run_dir hold."""
    count = 0
    for path in run_dir.glob("*/checkpoint/tasks.pkl"):
        with path.open("rb") as f:
            while True:
                try:
                    pickle.load(f)
                except EOFError:
                    break
                count += 1
    return count


def test_restarted_driver_does_not_rerun_finished_tasks(tmp_path):
    run_dir = tmp_path / "runinfo"
    first = start_flow(tmp_path, "in_job", 40, 0.5, resume=True)
    try:
        wait_for(lambda: checkpointed(run_dir) >= 12, "12 checkpointed results")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the login session dies, driver and all
        first.communicate()
    kill_everything_in(tmp_path)  # its worker pool too: nothing survives into the rerun
    done_before = checkpointed(run_dir)
    starts_before = len(marks(tmp_path, "start"))
    assert 12 <= done_before < 40

    result = finish(start_flow(tmp_path, "in_job", 40, 0.5, resume=True))
    assert result["results"] == [i * i for i in range(40)]
    reruns = len(marks(tmp_path, "start")) - starts_before
    # Exactly the tasks without a checkpointed result run again; finished ones come from disk.
    assert reruns == 40 - done_before
    assert no_leftovers(tmp_path) == []


def test_without_resume_a_restart_runs_everything_again(tmp_path):
    finish(start_flow(tmp_path, "in_job", 12, 0.1))
    finish(start_flow(tmp_path, "in_job", 12, 0.1))
    assert len(marks(tmp_path, "start")) == 24


# ------------------------------------------------------------------------------ monitoring
def test_monitoring_database_holds_the_tasks(tmp_path):
    import sqlite3

    result = finish(start_flow(tmp_path, "in_job", 12, 0.1, monitoring=True))
    assert result["results"] == [i * i for i in range(12)]
    db = tmp_path / "runinfo" / "monitoring.db"
    with sqlite3.connect(db) as con:
        tasks = con.execute("SELECT task_id, task_func_name FROM task").fetchall()
        tries = con.execute("SELECT COUNT(*) FROM try WHERE task_try_time_returned IS NOT NULL"
                            ).fetchone()[0]
        workflows = con.execute("SELECT COUNT(*) FROM workflow").fetchone()[0]
    assert sorted(t for t, _ in tasks) == list(range(12))
    assert {name for _, name in tasks} == {"work"}
    assert tries == 12 and workflows == 1
    assert no_leftovers(tmp_path) == []
