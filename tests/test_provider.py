"""The patient PBSProProvider on its own: backoff and its cap, qstat recovery, permanent refusals.

Stand-in `qsub` and `qstat` first on PATH answer as PBS does; a clock the test moves stands in
for time.monotonic, so minutes of backoff take no time.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from parsl.jobs.states import JobState
from parsl.launchers import SimpleLauncher

from parsl_aurora import provider as prov

SERVER = "aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"
JOB = f"7.{SERVER}"
QSUB = """#!/bin/sh
echo "$*" >> {d}/qsub.calls
if [ -e {d}/qsub.rc ]; then cat {d}/qsub.err >&2; exit "$(cat {d}/qsub.rc)"; fi
n=$(cat {d}/seq 2>/dev/null || echo 7)
echo $((n + 1)) > {d}/seq
echo "$n.{server}"
"""
QSTAT = """#!/bin/sh
echo "$*" >> {d}/qstat.calls
if [ -e {d}/qstat.fails ]; then
    printf '{{"timestamp": 1, "pbs_version": "23.06.06", "pbs_server": "aurora-pbs-0001"}}\\n'
    echo "qstat: cannot connect to server aurora-pbs-0001 (errno=15010)" >&2
    exit 255
fi
cat {d}/qstat.json
"""
QDEL = """#!/bin/sh
echo "$*" >> {d}/qdel.calls
"""


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(prov, "time", SimpleNamespace(monotonic=c, time=time.time))
    return c


class PBS:
    """Stand-in qsub and qstat in `folder`: accepting and answering until told otherwise."""

    def __init__(self, folder: Path):
        self.d = folder
        self.answer("Q")
        for name, text in (("qsub", QSUB), ("qstat", QSTAT), ("qdel", QDEL)):
            path = folder / "bin" / name
            path.parent.mkdir(exist_ok=True)
            path.write_text(text.format(d=folder, server=SERVER))
            path.chmod(0o755)

    def answer(self, state: str, hold: str = "", **others: str) -> None:
        """What qstat says from now on, in PBS's JSON: of JOB (held with Hold_Types `hold`),
        and of other jobs by number."""
        jobs = {j: {"job_state": s} for j, s in
                {JOB: state, **{f"{n}.{SERVER}": s for n, s in others.items()}}.items()}
        if hold:
            jobs[JOB].update(Hold_Types=hold, comment="job held, too many failed attempts to run")
        (self.d / "qstat.json").write_text(json.dumps(
            {"pbs_server": "aurora-pbs-0001", "Jobs": jobs}))

    def qdel_calls(self) -> list[str]:
        calls = self.d / "qdel.calls"
        return calls.read_text().splitlines() if calls.exists() else []

    def qstat_calls(self) -> list[str]:
        return (self.d / "qstat.calls").read_text().splitlines()

    def refuse(self, rc: int, stderr: str) -> None:
        (self.d / "qsub.rc").write_text(str(rc))
        (self.d / "qsub.err").write_text(stderr + "\n")

    def accept(self) -> None:
        (self.d / "qsub.rc").unlink()

    def qstat_fails(self, failing: bool) -> None:
        flag = self.d / "qstat.fails"
        flag.touch() if failing else flag.unlink()

    def qsub_calls(self) -> int:
        calls = self.d / "qsub.calls"
        return len(calls.read_text().splitlines()) if calls.exists() else 0


@pytest.fixture
def pbs(tmp_path, monkeypatch) -> PBS:
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    return PBS(tmp_path)


def provider(tmp_path: Path, **kwargs) -> prov.PBSProProvider:
    p = prov.PBSProProvider(launcher=SimpleLauncher(), queue="debug", account="P",
                            walltime="0:10:00", **kwargs)
    p.script_dir = str(tmp_path / "submit_scripts")
    Path(p.script_dir).mkdir(exist_ok=True)
    return p


def delays(caplog) -> list[float]:
    """The `asking again in N s` of every refusal logged so far."""
    return [float(m) for r in caplog.records
            for m in re.findall(r"asking again in (\d+) s", r.getMessage())]


def test_refused_qsub_backs_off_doubling_from_2_s_to_a_60_s_cap(tmp_path, pbs, clock, caplog):
    caplog.set_level(logging.WARNING, logger=prov.logger.name)
    p = provider(tmp_path)
    pbs.refuse(38, "qsub: would exceed queue generic's per-user limit")
    for _ in range(8):
        assert not p.holding_off()
        assert p.submit("true", 1) is None
        wait = delays(caplog)[-1]
        clock.now += wait - 0.01
        assert p.holding_off()  # no block is asked for until the backoff ends ...
        clock.now += 0.01
        assert not p.holding_off()  # ... and not a moment longer
    assert delays(caplog) == [2, 4, 8, 16, 32, 60, 60, 60]
    assert pbs.qsub_calls() == 8 and p.fatal == ""  # a refusal is "not now", never the end
    # PBS takes jobs again: the next refusal starts from 2 s once more.
    pbs.accept()
    assert p.submit("true", 1) == JOB
    pbs.refuse(38, "qsub: would exceed queue generic's per-user limit")
    assert p.submit("true", 1) is None
    assert delays(caplog)[-1] == 2


def test_failing_qstat_keeps_states_stretches_polling_to_the_cap_and_recovers(tmp_path, pbs):
    p = provider(tmp_path, status_polling_interval=1)
    assert p.submit("true", 1) == JOB
    pbs.answer("R")
    assert p.status([JOB])[0].state == JobState.RUNNING
    pbs.qstat_fails(True)
    intervals = []
    for _ in range(8):
        # The last known state is kept: a block is neither taken for ended nor replaced.
        assert p.status([JOB])[0].state == JobState.RUNNING
        intervals.append(p.status_polling_interval)
    assert intervals == [1, 2, 4, 8, 16, 32, 60, 60]
    # qstat answers again: the states are its, and polling is back to every second.
    pbs.qstat_fails(False)
    pbs.answer("F")
    assert p.status([JOB])[0].state == JobState.COMPLETED
    assert p.status_polling_interval == 1


@pytest.mark.parametrize("rc, stderr", [
    (170, "qsub: Unknown queue"),
    (174, "qsub: Access to queue is denied"),  # a queue only its routing queue may send to
    (175, "qsub: Bad UID for job execution"),
    (188, "qsub: Job violates queue and/or server resource limits"),
    (166, "qsub: Illegal attribute or resource value Resource_List.select"),
    (127, None),  # no qsub on PATH: the shell Parsl runs it in says so
])
def test_each_permanent_refusal_is_one_line_with_code_and_fix(tmp_path, pbs, clock, rc, stderr):
    p = provider(tmp_path)
    if stderr is None:
        (pbs.d / "bin" / "qsub").unlink()
        assert shutil.which("qsub") is None
    else:
        pbs.refuse(rc, stderr)
    assert p.submit("true", 1) is None
    assert len(p.fatal.splitlines()) == 1, p.fatal
    assert f"(qsub exit {rc}). Fix: {prov.PERMANENT[rc]}" in p.fatal
    assert f"`{stderr or p.last_refusal}`" in p.fatal and p.last_refusal
    if stderr is None:
        assert "qsub" in p.last_refusal and "not found" in p.last_refusal


@pytest.mark.parametrize("hold", ["u", "o"])
def test_a_users_or_operators_hold_is_left_alone_and_a_system_hold_deleted(tmp_path, pbs, clock,
                                                                         hold):
    p = provider(tmp_path)
    assert p.submit("true", 1) == JOB
    pbs.answer("H", hold=hold)  # held by its user (qhold) or an operator: theirs to release
    assert p.status([JOB])[0].state == JobState.HELD
    assert pbs.qdel_calls() == [] and p.fatal == "" and not p.holding_off()
    pbs.answer("H", hold="s")  # PBS's own hold: the job would sit in the queue for good
    status = p.status([JOB])[0]
    assert status.state == JobState.FAILED and "held by PBS" in status.message
    assert pbs.qdel_calls() == [JOB] and p.holding_off()  # deleted, replaced after the backoff


def test_parsls_own_provider_takes_a_failed_qstat_for_every_job_ended(tmp_path, pbs):
    """What the patient provider is for: Parsl 2025.1.13's PBSProProvider reads the JSON
    header of a qstat that could not reach the server (exit 255) as "no job left"."""
    from parsl.providers import PBSProProvider

    p = PBSProProvider(launcher=SimpleLauncher(), queue="debug", account="P", walltime="0:10:00")
    p.script_dir = str(tmp_path)
    assert p.submit("true", 1) == JOB
    pbs.answer("R")
    assert p.status([JOB])[0].state == JobState.RUNNING
    pbs.qstat_fails(True)
    assert p.status([JOB])[0].state == JobState.COMPLETED


def test_qstat_is_asked_once_per_poll_and_only_about_jobs_not_seen_ending(tmp_path, pbs):
    p = provider(tmp_path)
    first, second = p.submit("true", 1), p.submit("true", 1)
    assert (first, second) == (JOB, f"8.{SERVER}")
    pbs.answer("R", **{"8": "R"})
    p.status([first, second])
    pbs.answer("F", **{"8": "R"})
    p.status([first, second])
    p.status([first, second])  # the first has ended: only the second is asked about
    assert pbs.qstat_calls() == [f"-x -f -F json {first} {second}"] * 2 + [
        f"-x -f -F json {second}"]
