"""Progress a log file shows: workflows on the fake cluster with stdout to a file print their run
directory, then lines of tasks done/failed/pending and blocks running; on a terminal, a bar.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, no_leftovers

from parsl_aurora.errors import ConfigError
from parsl_aurora.progress import (
    block_counts,
    every_s,
    progress_line,
    run_dir_line,
    task_counts,
)

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
LINE = re.compile(rf"{STAMP} tasks: \d+ done, \d+ failed, \d+ pending \(\d+ launched\); "
                  r"blocks: \d+ running, \d+ queued, \d+ failed(; PBS: \d+ \w+(, \d+ \w+)*)?")


# ---------------------------------------------------------------- pure: counting and lines
def test_task_states_fall_into_done_failed_pending():
    states = {"exec_done": 2, "memo_done": 1, "failed": 1, "dep_fail": 1, "pending": 2,
              "launched": 3, "fail_retryable": 1, "unsched": 0, "joining": 1}
    assert task_counts(states) == {"done": 3, "failed": 2, "pending": 7, "launched": 3}


def test_block_states_fall_into_running_queued_failed():
    states = ["RUNNING", "PENDING", "HELD", "FAILED", "MISSING", "COMPLETED", "SCALED_IN",
              "RUNNING", "TIMEOUT"]
    assert block_counts(states) == {"running": 2, "queued": 2, "failed": 2, "refused": 0,
                                    "held": 0, "dropped": 0}
    assert block_counts([], {"refused": 6, "held": 1})["refused"] == 6


def test_progress_line_golden():
    line = progress_line({"done": 9, "failed": 1, "pending": 14, "launched": 12},
                         {"running": 2, "queued": 1, "failed": 0}, "2025-03-01 12:00:05")
    assert line == ("2025-03-01 12:00:05 tasks: 9 done, 1 failed, 14 pending (12 launched); "
                    "blocks: 2 running, 1 queued, 0 failed")
    assert LINE.fullmatch(line)
    # What PBS said, apart from blocks that started and died.
    line = progress_line({"done": 0, "failed": 0, "pending": 30, "launched": 0},
                         block_counts(["RUNNING"], {"refused": 6, "held": 1}),
                         "2025-03-01 12:00:05")
    assert line.endswith("blocks: 1 running, 0 queued, 0 failed; PBS: 6 refused, 1 held")
    assert LINE.fullmatch(line)


@pytest.mark.parametrize("text", ["soon", "0", "-5"])
def test_bad_interval_is_refused_with_the_fix(monkeypatch, text):
    monkeypatch.setenv("PARSL_AURORA_PROGRESS_EVERY", text)
    with pytest.raises(ConfigError, match=r"PARSL_AURORA_PROGRESS_EVERY=.*above 0.*Fix: set"):
        every_s()


def test_interval_default_and_override(monkeypatch):
    monkeypatch.delenv("PARSL_AURORA_PROGRESS_EVERY", raising=False)
    assert every_s() == 60
    monkeypatch.setenv("PARSL_AURORA_PROGRESS_EVERY", "2.5")
    assert every_s() == 2.5


# ---------------------------------------------------------------- end to end, fake cluster
# A user's own workflow: three tasks held until the test lets them go, and one that fails.
HELD = """
import os, sys
import parsl
from parsl import python_app
import site_configs
from parsl_aurora import progress

@python_app
def held(release: str) -> int:
    import os, time
    deadline = time.time() + 600  # never outlive a test that died
    while not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.1)
    return 1

@python_app
def broken() -> int:
    return 1 // 0

with parsl.load(site_configs.load("local", "multi_job")):
    futures = [held(os.path.abspath("release")) for _ in range(3)] + [broken()]
    try:
        progress.wait(futures)
    except ZeroDivisionError:
        print("broken() failed, as planned")
"""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARSL_")}
    return {**env, "PARSL_AURORA_PROGRESS_EVERY": "0.3", **extra}


def _wait_for_line(log: Path, pattern: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not re.search(pattern, log.read_text(), re.MULTILINE):
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    else:
        return
    pytest.fail(f"no line matching {pattern!r} in {log} (exit status {proc.poll()}):\n"
                f"{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_a_workflow_logging_to_a_file_shows_tasks_and_blocks(tmp_path):
    script = tmp_path / "my_workflow.py"
    script.write_text(HELD)
    log, err = tmp_path / "log.txt", tmp_path / "err.txt"
    with open(log, "w") as out, open(err, "w") as errors:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=_env(),
                                stdout=out, stderr=errors)
    try:
        # While the three are held: the failure is counted, the three are out on a running block.
        _wait_for_line(log, r"tasks: 0 done, 1 failed, 3 pending \(3 launched\); "
                            r"blocks: 1 running, 0 queued, 0 failed$", proc)
    finally:
        (tmp_path / "release").touch()
        status = proc.wait(timeout=300)
    assert status == 0, err.read_text()[-3000:]
    lines = log.read_text().splitlines()
    assert lines[0] == run_dir_line(str(tmp_path / "runinfo" / "000"))
    assert (tmp_path / "runinfo" / "000" / "parsl.log").is_file()
    assert lines[-1] == "broken() failed, as planned"
    progress = lines[1:-1]
    assert len(progress) >= 2 and all(LINE.fullmatch(x) for x in progress), progress
    # The last line is written once every task has finished.
    assert " tasks: 3 done, 1 failed, 0 pending (0 launched); " in progress[-1], progress[-1]
    assert no_leftovers(tmp_path) == []


@pytest.mark.slow
def test_example_workflow_logs_its_run_directory_and_progress(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        r = subprocess.run([sys.executable, str(ROOT / "examples" / "workflow.py")],
                           cwd=tmp_path, stdout=out, stderr=subprocess.PIPE, text=True,
                           env=_env(PARSL_SITE="local", PARSL_MODE="multi_job"),
                           timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = log.read_text().splitlines()
    assert lines[0] == run_dir_line(str(tmp_path / "runinfo" / "000"))
    progress = [x for x in lines if LINE.fullmatch(x)]
    assert progress and lines[1:len(progress) + 1] == progress, lines
    assert " tasks: 24 done, 0 failed, 0 pending (0 launched); " in progress[-1], progress[-1]
    assert any("python tasks on 12 distinct tiles" in x for x in lines)
    assert no_leftovers(tmp_path) == []


QUICK = """
import parsl
from parsl import python_app
import site_configs
from parsl_aurora import progress

@python_app
def square(x: int) -> int:
    return x * x

with parsl.load(site_configs.load("local", "in_job")):
    print("results", progress.wait([square(i) for i in range(4)], "squares"))
"""


@pytest.mark.slow
def test_on_a_terminal_a_bar_and_no_log_lines(tmp_path):
    script = tmp_path / "quick.py"
    script.write_text(QUICK)
    primary, secondary = pty.openpty()
    with open(tmp_path / "err.txt", "w") as errors:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=_env(),
                                stdin=subprocess.DEVNULL, stdout=secondary, stderr=errors)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(timeout=300) == 0, (tmp_path / "err.txt").read_text()[-3000:]
    text = b"".join(chunks).decode(errors="replace")
    assert "run directory: " in text and "squares" in text, text
    assert "results [0, 1, 4, 9]" in text
    assert not re.search(r"tasks: \d+ done", text), text


@pytest.mark.slow
@pytest.mark.needs("mpi")
def test_watching_asks_the_scheduler_nothing(tmp_path, monkeypatch):
    """progress reads the block states Parsl's last poll saw: however often it looks, it runs
    no scheduler command. The provider's real status() is watched for calls from this thread
    (Parsl's poller keeps calling it from its own)."""
    import subprocess as sp
    import threading

    import parsl
    from clusters import wait_for

    import site_configs
    from parsl_aurora.progress import snapshot

    saved = dict(os.environ)  # the local site puts the fake's commands into os.environ
    config = site_configs.load("local", "multi_job")
    provider = config.executors[0].provider
    real, watching, asked = provider.status, threading.Event(), []

    def status(job_ids):
        if watching.is_set() and threading.current_thread() is threading.main_thread():
            asked.append(job_ids)
        return real(job_ids)

    monkeypatch.setattr(provider, "status", status)
    dfk = parsl.load(config)
    try:
        parsl.python_app(sp.call)(["sleep", "600"])
        wait_for(lambda: snapshot(dfk)[1]["running"] >= 1, "a running block")
        watching.set()
        views = [snapshot(dfk) for _ in range(20)]
        watching.clear()
    finally:
        dfk.cleanup()
        os.environ.clear()
        os.environ.update(saved)
    assert all(blocks["running"] == 1 for _, blocks in views), views
    assert asked == []
    assert no_leftovers(tmp_path) == []
