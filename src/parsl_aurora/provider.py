"""Parsl's PBSProProvider, patient with a shared PBS server: a refused or failing command is
"not now", asked again later with backoff, never a storm and never the end of a workflow.

Parsl 2025.1.13 retries a refused `qsub` on every strategy tick, turns a `qstat` that cannot
reach the server (exit 255, JSON header without jobs) into "every job completed", and retries a
`qstat` whose output is not JSON on every tick. Here: a refused submission holds further ones
off (doubling from `backoff[0]` to `backoff[1]` seconds); a failed `qstat` keeps the last known
states (as Parsl's open PR #3855 does) and stretches the polling interval the same way; a
refusal that cannot change (unknown queue, no qsub, root) is recorded as `fatal` for the error
handler (parsl_aurora.executors) to report in one line. docs/reliability.md has the behaviour.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from parsl.jobs.states import JobState, JobStatus
from parsl.providers import PBSProProvider as _ParslPBSProProvider
from parsl.providers.torque.torque import translate_table

from parsl_aurora.runs import EVENTS, LEDGER

# Under Parsl's logger, so these lines go to the run's parsl.log with Parsl's own, not to the
# driver's stderr (where `progress` lines and one-line errors are the user's view).
logger = logging.getLogger(f"parsl.{__name__}")

# qsub exit codes that no retry can change, with what to do about each. 126/127 come from the
# shell Parsl runs qsub in; the others are PBS's (../shared/reference/openpbs.md).
PERMANENT = {
    2: "fix the qsub options (scheduler_options, select_options)",
    126: "qsub is not executable here",
    127: "run the driver where qsub is on PATH (an Aurora login node), or inside the image "
         "through `parsl-aurora pbs-bridge -- apptainer exec aurora.sif python workflow.py`",
    166: "fix the resource request (select_options, scheduler_options)",
    170: "pick a queue PBS has (`qstat -Q` lists them)",
    174: "submit to the routing queue (prod), not to the queues it routes to",
    175: "submit as your own user, not root",
    188: "ask for a walltime and node count the queue allows",
    191: "ask for a node count and walltime one of the routing queue's destinations takes "
         "(Aurora's prod: small 256-1024 nodes up to 12 h, medium 1025-1999 up to 18 h, large "
         "2000 and more up to 24 h)",
}
# A block PBS held (it failed to start too often) is deleted and replaced with the backoff; this
# many in a row end the run. One PBS dropped (qsub took it, and qstat no longer knows it though
# it never ran: a routing queue's destinations all rejected it after qsub returned) ends the run
# at once, as qsub's own 191 does: the next block would be rejected the same way.
LOST_IN_A_ROW = 3
HELD = "held by PBS"
DROPPED = "dropped by PBS"

# States a finished job can be in (`qstat -x`), and exit statuses that mean PBS or Parsl ended
# it: walltime (-29), qdel (271: SIGTERM, 265: SIGKILL).
ENDED_BY_PBS = (-29, 265, 271)
STATES = {**translate_table, "F": JobState.COMPLETED}


def backoff_delay(failures: int, first: float, cap: float) -> float:
    """Seconds to wait after `failures` failures in a row: first, 2*first, ... up to cap."""
    return 0.0 if failures <= 0 else min(cap, first * 2 ** (failures - 1))


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def parse_qstat(stdout: str, rc: int) -> dict[str, dict] | None:
    """Jobs from `qstat -x -f -F json`, or None when qstat failed (keep the last states).

    Exit 0 lists every job asked for; 153 means some ids are unknown (long purged from the
    history: gone). Any other exit (255: cannot reach or authenticate to the server, with the
    JSON header and no jobs) or a stdout that is not PBS's JSON is a failure, not an answer.
    """
    if rc not in (0, 153):
        return None
    try:
        doc = json.loads(stdout)
    except ValueError:
        return None
    if not isinstance(doc, dict) or "pbs_server" not in doc:
        return None
    return doc.get("Jobs", {})


def history_command(job_ids: Iterable[str]) -> list[str]:
    """One qstat for jobs whether they run or ended (-x), in PBS's JSON."""
    return ["qstat", "-x", "-f", "-F", "json", *job_ids]


def lookup(jobs: Mapping[str, dict], job_id: str) -> dict | None:
    # qstat may print an id shortened; PBS's own ids start with the same sequence number.
    return jobs.get(job_id) or next((j for k, j in jobs.items() if job_id.startswith(k)), None)


def query_jobs(job_ids: list[str], run: Callable[[list[str]], tuple[int, str, str]]
               ) -> tuple[dict[str, dict] | None, str]:
    """(qstat's record of each job it knows, why not) from `qstat -x -f -F json IDS`, run by
    RUN(argv) -> (exit code, stdout, stderr); (None, why) when qstat failed.

    OpenPBS built from its main branch (23.06.06-85 here; openpbs/openpbs#2672) prints only the
    first job it finds when given several ids in JSON, with exit 0 and nothing on stderr. A job
    left out of the answer without an error naming it is therefore asked about again alone; a
    job PBS no longer knows is named on stderr (`Unknown Job Id`) and stays out: it ended.
    """
    rc, out, err = run(history_command(job_ids))
    jobs = parse_qstat(out, rc)
    if jobs is None:
        return None, f"exit {rc}: {first_line(err) or first_line(out)[:80] or 'no output'}"
    if len(job_ids) > 1:
        for job_id in job_ids:
            if lookup(jobs, job_id) is None and job_id.split(".")[0] not in _named(err):
                rc, out, err1 = run(history_command([job_id]))
                one = parse_qstat(out, rc)
                if one is None:
                    return None, f"exit {rc}: {first_line(err1) or first_line(out)[:80]}"
                jobs.update(one)
    return jobs, ""


def _named(stderr: str) -> set[str]:
    """Sequence numbers of the jobs qstat's error lines name (`qstat: Unknown Job Id 12.srv`)."""
    return {word.split(".")[0] for line in stderr.splitlines() for word in line.split()
            if word[:1].isdigit()}


class PBSProProvider(_ParslPBSProProvider):
    def __init__(self, *, status_polling_interval: float = 60,
                 backoff: tuple[float, float] = (2.0, 60.0), **kwargs):
        super().__init__(**kwargs)
        self._interval = status_polling_interval
        self.backoff = backoff
        self._submit_failures = 0
        self._hold_until = 0.0
        self._qstat_failures = 0
        self.last_refusal = ""  # qsub's stderr, the last time it refused
        self.fatal = ""  # a refusal no retry can change, in one line with its fix
        self._ran: set[str] = set()  # jobs qstat has shown running (or run)
        self._lost_in_a_row = 0  # blocks held or dropped since a job last ran
        # How often PBS refused a block, held one, dropped one (the progress line shows them).
        self.said = {"refused": 0, "held": 0, "dropped": 0}
        # Set by the executor (parsl_aurora.runs.start_run): every job name of the run begins
        # with it, so `qstat -u $USER` shows which run a job belongs to.
        self.run_tag = ""

    # ------------------------------------------------------------ qsub
    def holding_off(self) -> bool:
        """True while a refused submission's backoff lasts: the executor asks for no block."""
        return time.monotonic() < self._hold_until

    def submit(self, command, tasks_per_node, job_name="parsl"):
        if self.run_tag:  # qstat -u $USER shows the run in the name's first characters
            job_name = f"{self.run_tag}.{job_name.rsplit('block-', 1)[-1]}"
        self._last = (0, "", "")
        try:
            job_id = super().submit(command, tasks_per_node, job_name)
        except (OSError, subprocess.SubprocessError) as e:  # a hung qsub (cmd_timeout): not now
            self._last = (-1, "", f"{type(e).__name__}: {e}")
            job_id = None
        if job_id:
            self._submit_failures = 0
            # The name PBS got: Parsl appends the submission time to the one it is given.
            self._record(job_id, Path(self.resources[job_id]["job_stdout_path"]).stem)
            return job_id
        rc, out, err = self._last
        self.last_refusal = first_line(err) or first_line(out) or f"exit status {rc}"
        if rc in PERMANENT:
            self.fatal = (f"PBS will not take this workflow's jobs: `{self.last_refusal}` "
                          f"(qsub exit {rc}). Fix: {PERMANENT[rc]}")
        self._event("refused", "-", f"{self.last_refusal} (qsub exit {rc})")
        delay = self._back_off()
        logger.warning("qsub refused a block (%s); asking again in %.0f s", self.last_refusal,
                       delay)
        return None

    def _back_off(self) -> float:
        """Hold further submissions off, for longer after each refusal or lost block in a row."""
        self._submit_failures += 1
        delay = backoff_delay(self._submit_failures, *self.backoff)
        self._hold_until = time.monotonic() + delay
        return delay

    def _event(self, kind: str, job_id: str, what: str) -> None:
        self.said[kind] += 1
        # What PBS said to this run, a line each: <unix time> TAB <kind> TAB <job id or -> TAB
        # <what> (`parsl-aurora status` shows it).
        if self.script_dir:
            with open(Path(self.script_dir).parent / EVENTS, "a") as f:
                f.write(f"{time.time():.0f}\t{kind}\t{job_id}\t{what}\n")

    def _lost(self, job_id: str, kind: str, what: str, fix: str) -> JobStatus:
        """A block PBS held or dropped: deleted (a held job would sit in the queue for good),
        replaced after the backoff; LOST_IN_A_ROW in a row end the run with WHAT and FIX."""
        if kind == "held":
            self._run_qdel(job_id)
        self._event(kind, job_id, what)
        self._lost_in_a_row += 1
        delay = self._back_off()
        logger.warning("job %s %s (%s); a new block in %.0f s", job_id,
                       HELD if kind == "held" else DROPPED, what, delay)
        if kind == "dropped" and not self.fatal:  # every destination refused: permanent
            self.fatal = f"PBS dropped job {job_id} without running it: {what}. Fix: {fix}"
        elif self._lost_in_a_row >= LOST_IN_A_ROW and not self.fatal:
            self.fatal = (f"{self._lost_in_a_row} blocks in a row were {kind} by PBS without "
                          f"running; the last, job {job_id}: `{what}`. Fix: {fix}")
        paths = {"stdout_path": self.resources[job_id]["job_stdout_path"],
                 "stderr_path": self.resources[job_id]["job_stderr_path"]}
        return JobStatus(JobState.FAILED, message=f"{HELD if kind == 'held' else DROPPED}: "
                         f"{what}", **paths)

    def _run_qdel(self, job_id: str) -> None:
        try:
            self.execute_wait(shlex.join(["qdel", job_id]))
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("qdel %s failed: %s", job_id, e)

    def _record(self, job_id: str, job_name: str) -> None:
        """One line per submitted job in <run_dir>/pbs_jobs.txt (`id<TAB>name<TAB>unix time`),
        for `parsl-aurora status` and `cleanup` (parsl_aurora.runs)."""
        if self.script_dir:
            with open(Path(self.script_dir).parent / LEDGER, "a") as f:
                f.write(f"{job_id}\t{job_name}\t{time.time():.0f}\n")

    def execute_wait(self, cmd, timeout=None):
        self._last = super().execute_wait(cmd, timeout)
        return self._last

    # ------------------------------------------------------------ qstat
    @property
    def status_polling_interval(self) -> float:
        cap = max(self.backoff[1], self._interval)
        return max(self._interval, backoff_delay(self._qstat_failures, self._interval, cap))

    def _status(self):
        # Jobs seen ending cannot change: over a week-long run, qstat is asked only about the
        # few that are queued or running.
        ids = [job_id for job_id, r in self.resources.items() if not r["status"].terminal]
        if not ids:
            return
        jobs, why = query_jobs(ids, self._run_qstat)
        if jobs is None:
            self._qstat_failures += 1
            logger.warning("qstat failed (%s); keeping the last known job states, next try in "
                           "%.0f s", why, self.status_polling_interval)
            return
        self._qstat_failures = 0
        for job_id in ids:
            job = lookup(jobs, job_id)
            paths = {"stdout_path": self.resources[job_id]["job_stdout_path"],
                     "stderr_path": self.resources[job_id]["job_stderr_path"]}
            if job is None and job_id not in self._ran:
                self.resources[job_id]["status"] = self._lost(
                    job_id, "dropped", "qsub took it, and PBS no longer knows it though it "
                    "never ran: the routing queue's destinations all rejected it",
                    PERMANENT[191])
                continue
            if job is None:  # gone from the history: it ended
                self.resources[job_id]["status"] = JobStatus(JobState.COMPLETED, **paths)
                continue
            if job.get("job_state") == "H" and "s" in str(job.get("Hold_Types", "")):
                # A system hold (a user's or operator's hold is theirs to release).
                self.resources[job_id]["status"] = self._lost(
                    job_id, "held", job.get("comment") or "system hold",
                    "the job cannot start on the nodes PBS gives it; write to ALCF support "
                    "with the job ids (`parsl-aurora status` lists them)")
                continue
            if job.get("job_state") in ("R", "E", "F") and ("stime" in job or
                                                            job.get("job_state") == "R"):
                self._ran.add(job_id)
                self._lost_in_a_row = 0
            code = job.get("Exit_status")
            state = STATES.get(job.get("job_state"), JobState.UNKNOWN)
            self.resources[job_id]["status"] = JobStatus(
                state, message=job.get("comment"),
                exit_code=code if code is not None and code not in ENDED_BY_PBS else None,
                **paths)

    def _run_qstat(self, argv: list[str]) -> tuple[int, str, str]:
        try:
            return self.execute_wait(shlex.join(argv))
        except (OSError, subprocess.SubprocessError) as e:  # a hung qstat: keep what we knew
            return -1, "", f"{type(e).__name__}: {e}"
