"""`parsl-aurora status` and `cleanup`: what a run directory says about its tasks, driver and
PBS jobs (pure functions, exact text), then a real workflow whose driver is killed with -9 on
the fake PBS and on a real OpenPBS server: status sees it, and cleanup deletes every job of that
run and no other.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from clusters import wait_for
from conftest import leftovers

from parsl_aurora import runs
from parsl_aurora.errors import ConfigError

# parsl.log lines as Parsl 2025.1.13 writes them (prefix: time, process, thread, logger, level).
PREFIX = ("1796214245.783078 2026-12-02 12:24:05 MainProcess-3364 MainThread-140377644944256 "
          "parsl.dataflow.dflow:1089 submit INFO: ")
LOG = "".join(PREFIX + line + "\n" for line in [
    "Run id is: f692aaef-c473-4172-8eb7-16b0a3b40745",
    *(f"Task {i} submitted for App f, not waiting on any dependency" for i in range(7)),
    "Task 6 submitted for App g, waiting on task 5",  # a second submission line is harmless
    *(f"Parsl task {i} try 0 launched on executor htex_tiles with executor id {i + 1}"
      for i in range(5)),
    "Task 0 completed (launched -> exec_done)",
    "Reusing cached result for task 1",
    "Task 1 completed (pending -> memo_done)",
    "Task 2 try 0 failed with exception of type ValueError",
    "Task 2 marked for retry",
    "Parsl task 2 try 1 launched on executor htex_tiles with executor id 7",
    "Task 2 try 1 failed with exception of type ValueError",
    "Task 2 failed after 1 retry attempts",
    "Task 3 try 0 failed with exception of type WorkerLost",
    "Task 3 marked for retry",
    "Task 5 failed due to dependency failure",
    "Task 6 failed due to dependency failure so skipping retries",
    "Tasks in state States.pending: 0",
])


# ---------------------------------------------------------------- pure: parsl.log
@pytest.mark.parametrize("size", [1 << 20, 7])
def test_task_states_from_parsl_log(size):
    """The last state each task reached, whatever the chunk boundaries; 7-byte chunks cut every
    line several times."""
    data = LOG.encode()
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    tasks, retries, cleaned = runs.task_states(chunks)
    assert tasks == {"exec_done": 1, "memo_done": 1, "failed": 1, "pending": 1, "launched": 1,
                     "dep_fail": 2}
    assert (retries, cleaned) == (2, False)


def test_a_half_written_last_line_is_not_read_and_cleanup_is_seen():
    done = (LOG + PREFIX + "DFK cleanup complete\n").encode()
    assert runs.task_states([done])[2] is True
    half = (LOG + PREFIX + "Task 4 completed (launched -> exec_").encode()
    assert runs.task_states([half])[0]["launched"] == 1


def test_tasks_line_counts_as_the_progress_lines_do():
    tasks, retries, _ = runs.task_states([LOG.encode()])
    assert runs.tasks_line(tasks, retries) == (
        "tasks: 2 done, 3 failed, 2 pending (1 launched), 7 in all; 2 retries")


# ---------------------------------------------------------------- pure: ledger, jobs, driver
def test_ledger_lines_and_blocks():
    text = ("0.s\tpa0a0a0a.0.1796214245.81\t1796214246\n"
            "garbage\n"
            "12.s\tpa0a0a0a.12.1796214300.2\t1796214301\n"
            "13.s\tpa0a0a0a.13.17962")  # still being written
    ledger = runs.read_ledger(text)
    assert [(s.job_id, s.block, s.at) for s in ledger] == [
        ("0.s", "0", 1796214246.0), ("12.s", "12", 1796214301.0)]


def _job(owner: str, name: str, state: str = "R") -> dict:
    return {"Job_Owner": f"{owner}@aurora-uan-0010", "Job_Name": name, "job_state": state}


def test_jobs_of_a_run_are_its_recorded_ones_and_those_named_with_its_tag():
    live = {
        "1.s": _job("me", "pa111111.0.17962"),          # recorded
        "2.s": _job("me", "pa111111.3.17963"),          # its tag, not recorded (driver died)
        "3.s": _job("me", "pa222222.0.17962"),          # another run of mine
        "4.s": _job("me", "job.sh"),                    # a plain job of mine
        "5.s": _job("you", "pa111111.0.17962"),         # someone else's, same name
        "6.s": _job("me", "pa1111110.0.1"),             # a longer tag sharing the prefix
    }
    assert sorted(runs.jobs_of_run(live, ["1.s", "9.s"], "pa111111", "me")) == ["1.s", "2.s"]
    assert sorted(runs.jobs_of_run(live, ["1.s"], "", "me")) == ["1.s"]


@pytest.mark.parametrize("record,cleaned,now,state", [
    ({"pid": 7, "host": "uan10", "start": 99}, True, None, "ended"),
    ({"pid": 7, "host": "uan10", "start": 99}, False, 99, "running"),
    ({"pid": 7, "host": "uan10", "start": 99}, False, None, "gone"),
    ({"pid": 7, "host": "uan10", "start": 99}, False, 123, "gone"),  # pid reused
    ({"pid": 7, "host": "uan11", "start": 99}, False, 99, "elsewhere"),
    ({}, False, None, "unknown"),
])
def test_driver_state(record, cleaned, now, state):
    assert runs.driver_state(record, cleaned, "uan10", now) == state


def test_cleanup_refuses_a_live_or_unseen_driver_unless_forced():
    """A driver that still runs would submit new blocks: cleanup refuses, naming the fix; one on
    another login node cannot be seen from here, so only --force lets cleanup go on."""
    here = socket.gethostname()
    me = {"pid": os.getpid(), "host": here, "start": runs.process_start(os.getpid())}
    with pytest.raises(ConfigError, match=f"`kill {os.getpid()}`"):
        runs.check_driver_stopped(me, Path("runinfo/000"), False, force=False)
    elsewhere = {"pid": 7, "host": "aurora-uan-0099", "start": 1}
    with pytest.raises(ConfigError, match="run cleanup on aurora-uan-0099, or pass --force"):
        runs.check_driver_stopped(elsewhere, Path("runinfo/000"), False, force=False)
    for record in (me, elsewhere):
        assert runs.check_driver_stopped(record, Path("runinfo/000"), False, force=True) is None
    gone = {"pid": 7, "host": here, "start": 1}  # no such process start here: nothing to refuse
    assert runs.check_driver_stopped(gone, Path("runinfo/000"), False, force=False) is None


def test_process_start_names_a_running_process_and_not_a_zombie():
    assert runs.process_start(os.getpid()) == runs.process_start(os.getpid()) is not None
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z", "a zombie")
    try:
        assert runs.process_start(pid) is None
    finally:
        os.waitpid(pid, 0)
    assert runs.process_start(pid) is None


@pytest.mark.parametrize("job,words", [
    (None, ("gone", "no longer in PBS's job history")),
    ({"job_state": "Q", "comment": "Not Running: Not enough free nodes available"},
     ("queued", "Not Running: Not enough free nodes available")),
    ({"job_state": "R", "stime": "Wed Dec  2 12:24:06 2026"},
     ("running", "since Wed Dec  2 12:24:06 2026")),
    ({"job_state": "F", "Exit_status": 271}, ("finished", "deleted (qdel: SIGTERM)")),
    ({"job_state": "F", "Exit_status": -29}, ("finished", "walltime reached")),
    ({"job_state": "F", "Exit_status": 7}, ("finished", "exit 7")),
    ({"job_state": "E", "Exit_status": 0}, ("ending", "exit 0")),
])
def test_job_states_in_words(job, words):
    assert runs.job_state(job, "") == words
    assert runs.job_state(job, "qstat failed") == ("unknown", "")


def test_short_ids_are_what_qstat_lists():
    assert runs.short_id("1234.aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov") == \
        "1234.aurora-pbs-0001"
    assert runs.short_id("1234") == "1234"


def test_pbs_commands_golden():
    from parsl_aurora.provider import history_command

    assert history_command(["1.s", "2.s"]) == ["qstat", "-x", "-f", "-F", "json", "1.s", "2.s"]
    assert runs.LIST_COMMAND == ["qstat", "-f", "-F", "json"]
    assert runs.qdel_command(["1.s"]) == ["qdel", "1.s"]


# ---------------------------------------------------------------- finding a run
def _run_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "parsl.log").write_text(LOG)
    return path


def test_newest_run_is_the_highest_number(tmp_path):
    for name in ("000", "009", "010"):
        _run_dir(tmp_path / "runinfo" / name)
    (tmp_path / "runinfo" / "011").mkdir()  # being made: no parsl.log yet
    (tmp_path / "runinfo" / "fake").mkdir()
    assert runs.find_run(tmp_path / "runinfo") == tmp_path / "runinfo" / "010"
    assert runs.find_run(tmp_path / "runinfo" / "009") == tmp_path / "runinfo" / "009"


@pytest.mark.parametrize("name", ["runinfo", "nothing-here"])
def test_no_run_is_one_error_naming_the_fix(tmp_path, name):
    (tmp_path / "runinfo" / "fake").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"RUN_DIR=.* expected a Parsl run directory .*"
                                          r"Fix: run this in the folder the workflow ran in"):
        runs.find_run(tmp_path / name)


# ---------------------------------------------------------------- what the commands print
def _status(**kw) -> runs.Status:
    record = {"run_tag": "pa1b5cba", "pid": 25541, "host": "uan10", "user": "me"}
    blocks = [runs.Block("0", "0.aurora-pbs-0001", "pa1b5cba.0.17962", 1796214787.0, "running",
                         "since Wed Dec  2 12:33:07 2026"),
              runs.Block("1", "1.aurora-pbs-0001", "pa1b5cba.1.17962", 1796214788.0, "queued",
                         "Not Running: Not enough free nodes available")]
    logs = [("Parsl's log", "runinfo/000/parsl.log"), ("interchange", "runinfo/000/x.log")]
    fields = {"run_dir": Path("runinfo/000"), "record": record,
              "tasks": {"exec_done": 9, "launched": 12, "pending": 3}, "retries": 1,
              "driver": "gone", "here": "uan10", "log_age": 75.0, "blocks": blocks,
              "logs": logs, "checked": 1796214800.0}
    return runs.Status(**{**fields, **kw})


def _text(status: runs.Status) -> str:
    from rich.console import Console

    out = io.StringIO()
    runs.render(status, Console(file=out, width=200, no_color=True, force_terminal=False))
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_status_text_golden(utc):
    assert _text(_status()) == """\
run runinfo/000 (tag pa1b5cba: its PBS jobs are named pa1b5cba.<block>.<time>)
driver: gone (pid 25541 on uan10 no longer runs, and Parsl did not clean up: killed, or the login node rebooted); parsl.log written 75 s ago
tasks: 9 done, 0 failed, 15 pending (12 launched), 24 in all; 1 retry (from parsl.log); unfinished tasks are not running: the driver is gone
PBS jobs: 2 submitted, 2 queued or running (qstat -x at 2026-12-02 12:33:20)
block   job id              state     submitted             note
────────────────────────────────────────────────────────────────────────────────────────────────────────
0       0.aurora-pbs-0001   running   2026-12-02 12:33:07   since Wed Dec  2 12:33:07 2026
1       1.aurora-pbs-0001   queued    2026-12-02 12:33:08   Not Running: Not enough free nodes available
next: `parsl-aurora cleanup` deletes the 2 jobs it left, then run the workflow again (with resume=True, finished tasks are not run again)
logs:
  Parsl's log  runinfo/000/parsl.log
  interchange  runinfo/000/x.log"""


def test_status_text_of_a_running_in_job_run_and_a_failed_qstat(utc):
    text = _text(_status(driver="running", blocks=[], log_age=None))
    assert text.splitlines()[1:4] == [
        "driver: running (pid 25541 on uan10)",
        "tasks: 9 done, 0 failed, 15 pending (12 launched), 24 in all; 1 retry (from parsl.log)",
        ("PBS jobs: none recorded (pbs_jobs.txt lists each job a PBS mode submits; an in_job "
         "run works inside the job that started it)")]
    failed = _status(qstat_error="qstat failed (exit 255: cannot connect)",
                     blocks=[runs.Block("0", "0.s", "n", 1796214787.0, "unknown", "")])
    assert ("PBS jobs: 1 submitted, qstat failed (exit 255: cannot connect): states unknown"
            in _text(failed))
    assert "next: `parsl-aurora cleanup` deletes any job it left, then" in _text(failed)


def test_status_says_what_pbs_said_apart_from_the_jobs(utc):
    text = ("1796214790\trefused\t-\tqsub: would exceed queue generic's per-user limit (qsub "
            "exit 38)\n" * 6
            + "1796214795\theld\t0.aurora-pbs-0001\tjob held, too many failed attempts to run\n"
            + "1796214796\trefused\t-\thalf a line")
    events = runs.read_events(text)
    assert [e.kind for e in events] == ["refused"] * 6 + ["held"]
    lines = _text(_status(events=events)).splitlines()
    assert lines[8] == ("PBS said: 6 refused (the last at 2026-12-02 12:33:10: qsub: would exceed "
                        "queue generic's per-user limit (qsub exit 38)); 1 held (the last at "
                        "2026-12-02 12:33:15: job held, too many failed attempts to run)")
    assert runs.said_line([]) == "" and "PBS said" not in _text(_status())


def test_cleanup_text_golden():
    deleted = {"0.s": _job("me", "pa1b5cba.0.17962"), "9.s": _job("me", "pa1b5cba.3.17963", "Q")}
    c = runs.Cleanup(Path("runinfo/000"), "pa1b5cba", deleted, ["4.s"], 3, ["9.s"], [25861])
    assert runs.cleanup_lines(c) == [
        ("run runinfo/000 (tag pa1b5cba): deleted 2 jobs (qdel; PBS ends each within its kill "
         "delay):"),
        "  block 0    0.s  was running  pa1b5cba.0.17962",
        ("  block 3    9.s  was queued  pa1b5cba.3.17963  (not in pbs_jobs.txt: submitted as the "
         "driver died)"),
        "  already ending: 4.s",
        ("  ended the run's interchange (pid 25861), left running on this host when the driver "
         "died")]
    none = runs.Cleanup(Path("runinfo/000"), "pa1b5cba", {}, [], 3, [])
    assert runs.cleanup_lines(none) == [
        ("run runinfo/000 (tag pa1b5cba): nothing to delete, no job of this run is queued or "
         "running (3 submitted)")]


# ---------------------------------------------------------------- the record a driver leaves
def test_one_tag_per_run_and_the_fake_pbs_only_when_its_qsub_is_used(tmp_path, monkeypatch):
    from parsl_aurora import fake

    monkeypatch.setenv("PARSL_AURORA_FAKE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PATH", f"{fake.bin_dir()}:{os.environ['PATH']}")
    tag = runs.start_run(tmp_path / "a")
    assert runs.start_run(tmp_path / "a") == tag  # a second executor of the run
    record = runs.read_record(tmp_path / "a")
    assert tag.startswith("pa") and len(tag) == 8 and record["run_tag"] == tag
    assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
    assert record["start"] == runs.process_start(os.getpid())
    assert record["fake_pbs"] == str(tmp_path / "state")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a real site: whatever qsub there is
    assert runs.read_record(tmp_path / "b") == {}
    runs.start_run(tmp_path / "b")
    assert runs.read_record(tmp_path / "b")["fake_pbs"] is None
    assert runs.start_run(tmp_path / "c") != tag


# ---------------------------------------------------------------- one qstat for many jobs
def test_query_jobs_gets_every_job_a_server_knows(cluster):
    """Three jobs (one ended, two running) and one id PBS never had, in one question. The real
    OpenPBS answers with the first job only (openpbs/openpbs#2672), so query_jobs asks again
    about those it left out; the fake answers whole, in one call."""
    from parsl_aurora.provider import query_jobs

    d = cluster.workdir()
    done = cluster.submit(d, "true\n", directives=("-l select=1:ncpus=1", "-l walltime=0:05:00"))
    cluster.wait_state(done, "F")
    live = [cluster.submit(d, "sleep 300\n", directives=("-l select=1:ncpus=1",
                                                         "-l walltime=0:05:00"))
            for _ in range(2)]
    unknown = f"99999.{done.split('.', 1)[1]}"
    calls = []

    def run(argv):
        calls.append(argv)
        out = cluster.run(*argv, cwd=cluster.home)
        return out.returncode, out.stdout, out.stderr

    jobs, why = query_jobs([done, *live, unknown], run)
    assert why == "" and sorted(jobs) == sorted([done, *live]), jobs.keys()
    assert jobs[done]["job_state"] == "F"
    assert len(calls) == (1 if cluster.kind == "fake" else 3), calls


# ---------------------------------------------------------------- a driver killed with -9
def _qsub(cluster, cwd: Path, env: dict, name: str) -> str:
    """A plain job of the cluster's user named NAME, on the PBS the run uses (ENV)."""
    script = cluster.write(cwd / f"{name}.sh", "#!/bin/bash\nsleep 600\n")
    out = cluster.run("qsub", "-N", name, "-l", "select=1:ncpus=1", "-l", "walltime=0:15:00",
                      str(script), cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _states(cluster, env: dict, ids: list[str]) -> dict[str, str]:
    """State of each job, asked as query_jobs asks (OpenPBS answers several ids in JSON with
    the first alone)."""
    from parsl_aurora.provider import query_jobs

    def run(argv):
        out = cluster.run(*argv, cwd=cluster.home, env=env)
        return out.returncode, out.stdout, out.stderr

    jobs, why = query_jobs(ids, run)
    assert jobs is not None, why
    return {i: jobs[i]["job_state"] for i in ids if i in jobs}


@pytest.mark.slow
@pytest.mark.needs("mpi")
def test_cleanup_after_the_driver_is_killed_deletes_that_runs_jobs_only(cluster, request):
    """A multi_job run of 24 long tasks in two blocks; its driver killed with -9 mid-run. Status
    sees the driver gone and the jobs still there; cleanup deletes the run's two blocks and a
    job named with its tag that it never recorded (qsub accepted as the driver died), ends its
    orphaned interchange, and leaves a job named as another run's block and a plain job of the
    same user alone. A second cleanup deletes nothing.
    """
    from test_reliability import Flow

    flow = Flow(cluster, request, "multi_job", 24, 600, max_jobs=2, queue="workq",
                allow_unlisted_queue=True, walltime="0:15:00")
    run_dir = flow.folder / "runinfo" / "000"
    # Jobs submitted by hand reach the run's PBS: the fake's driver keeps the cluster's
    # PARSL_AURORA_FAKE_DIR, which flow.env carries.
    env = dict(flow.env)
    others: list[str] = []
    driver = flow.start()
    try:
        wait_for(lambda: len(runs.read_ledger(_read(run_dir / runs.LEDGER))) == 2
                 and flow.marked("start"), "two blocks submitted and a task running")
        record = runs.read_record(run_dir)
        tag, pid = record["run_tag"], record["pid"]
        ledger = [s.job_id for s in runs.read_ledger(_read(run_dir / runs.LEDGER))]
        orphan = _qsub(cluster, flow.folder, env, f"{tag}.9.1796214245.5")
        others = [_qsub(cluster, flow.folder, env, "pa000000.0.1796214245.5"),
                  _qsub(cluster, flow.folder, env, "plain")]

        alive = cluster.run("parsl-aurora", "status", cwd=flow.folder, env=env)
        assert alive.returncode == 0, alive.stderr
        assert f"driver: running (pid {pid} on " in alive.stdout, alive.stdout
        assert "24 in all" in alive.stdout
        assert all(f"{runs.short_id(j)} " in alive.stdout for j in ledger), alive.stdout
        refused = cluster.run("parsl-aurora", "cleanup", cwd=flow.folder, env=env)
        assert refused.returncode == 2 and f"`kill {pid}`" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

        os.kill(pid, signal.SIGKILL)  # the driver alone: its interchange and blocks live on
        wait_for(lambda: runs.process_start(pid) is None, "the driver gone", 60)
        assert set(_states(cluster, env, ledger).values()) <= set(runs.LIVE)
        dead = cluster.run("parsl-aurora", "status", cwd=flow.folder, env=env)
        assert "driver: gone" in dead.stdout and "next: `parsl-aurora cleanup`" in dead.stdout, \
            dead.stdout

        out = cluster.run("parsl-aurora", "cleanup", cwd=flow.folder, env=env)
        assert out.returncode == 0, out.stderr
        deleted = [line.split()[2] for line in out.stdout.splitlines()
                   if line.startswith("  block ")]
        assert sorted(deleted) == sorted([*ledger, orphan]), out.stdout
        assert "ended the run's interchange" in out.stdout, out.stdout
        wait_for(lambda: set(_states(cluster, env, [*ledger, orphan]).values()) == {"F"},
                 "every job of the run finished")
        kept = _states(cluster, env, others)
        assert len(kept) == 2 and "F" not in kept.values(), kept
        again = cluster.run("parsl-aurora", "cleanup", cwd=flow.folder, env=env)
        assert again.returncode == 0 and "nothing to delete" in again.stdout, again.stdout
        cluster.run("qdel", *others, cwd=cluster.home, env=env)
        wait_for(lambda: set(_states(cluster, env, others).values()) == {"F"}, "plain jobs gone")
        wait_for(lambda: not leftovers(flow.folder), "no process of the run left", 120)
    finally:
        driver.kill()
        ids = [*others, *(s.job_id for s in runs.read_ledger(_read(run_dir / runs.LEDGER)))]
        if ids:
            cluster.run("qdel", *ids, cwd=cluster.home, env=env)
        # Before reading the driver's output: an interchange a failed test left holds its pipes.
        # On the fake, the plain jobs' processes too (whose supervisors this may kill before
        # they act on the qdel); real PBS ends its jobs itself, and its test folder is shared.
        for line in leftovers(cluster.root if cluster.kind == "fake" else flow.folder):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        driver.communicate(timeout=60)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
