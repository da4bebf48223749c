"""A workflow's run directory seen from outside its driver: the PBS jobs it submitted and their
states, how far its tasks got, where its logs are (`parsl-aurora status`), and deleting the jobs
it left queued or running (`parsl-aurora cleanup`).

Besides Parsl's own files, `runinfo/NNN/` holds two of ours: `run.json`, written when the first
executor starts (the run's tag, which begins every PBS job name of the run; the driver's user,
host, pid and start, and its interchanges; the fake PBS it used, if any), and `pbs_jobs.txt`,
one line per job PBS accepted (`id<TAB>name<TAB>unix time`, written by parsl_aurora.provider).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from parsl_aurora.errors import ConfigError, SchedulerError

RECORD = "run.json"
LEDGER = "pbs_jobs.txt"
EVENTS = "pbs_events.txt"  # what PBS said instead of running a block (the provider writes it)
TAG_PREFIX = "pa"
# PBS job states (qstat's job_state) a job can be deleted in: queued, held, waiting, in
# transit, suspended, running, array begun. E (exiting) is already ending; F has ended.
LIVE = ("Q", "H", "W", "T", "S", "R", "B")
STATE_WORDS = {"Q": "queued", "H": "held", "W": "waiting", "T": "in transit", "S": "suspended",
               "R": "running", "B": "running (array)", "E": "ending", "F": "finished",
               "M": "moved", "X": "expired"}
# On a terminal: what runs green, what waits yellow, what cannot be known red.
STATE_STYLES = {"running": "green", "running (array)": "green", "queued": "yellow",
                "held": "yellow", "waiting": "yellow", "suspended": "yellow", "unknown": "red",
                "finished": "dim", "gone": "dim"}
# Exit_status values PBS gives jobs it ended (../shared/reference/openpbs.md).
EXIT_WORDS = {0: "exit 0", -29: "walltime reached", 271: "deleted (qdel: SIGTERM)",
              265: "killed (SIGKILL)"}
# parsl.log lines that move a task between states (parsl/dataflow/dflow.py at 2025.1.13: "Task N
# submitted...", "Parsl task N try T launched..."). Matched on bytes from the literal "ask ",
# which lets the regex engine skip ahead: about 0.2 GB/s here, reading included.
TASK_LINE = re.compile(
    rb"ask (\d+) (submitted for App|try \d+ launched|completed \(\w+ -> (\w+)\)|"
    rb"marked for retry|failed after|failed due to (?:dependency)?)")
CLEANED_UP = b"DFK cleanup complete"


# ---------------------------------------------------------------- what the driver records
def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot; /proc/PID/stat field 22), or None
    when it does not run (a zombie has ended: it only waits for its parent to notice).

    With the pid it names one process: a pid reused after a reboot or a week has another start.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _user() -> str:
    # PBS's Job_Owner is the account, whatever $USER says.
    return pwd.getpwuid(os.getuid()).pw_name


def start_run(run_dir: str | os.PathLike) -> str:
    """This run's tag: made and recorded in RUN_DIR/run.json by the run's first executor, read
    back by any other (so every job of one run carries one tag)."""
    path = Path(run_dir, RECORD)
    try:
        return json.loads(path.read_text())["run_tag"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from parsl_aurora import fake

    qsub = shutil.which("qsub")
    pid = os.getpid()
    record = {
        "run_tag": TAG_PREFIX + secrets.token_hex(3),
        "user": _user(), "host": socket.gethostname(), "pid": pid,
        "start": process_start(pid), "started": round(time.time()),
        # Status and cleanup, run later from another shell, must reach the same PBS: the
        # fake's state is in the folder this driver's environment names.
        "fake_pbs": (os.environ.get("PARSL_AURORA_FAKE_DIR") or None
                     if qsub and Path(qsub).resolve().parent == fake.bin_dir() else None),
    }
    _write_record(path, record)
    return record["run_tag"]


def record_interchange(run_dir: str | os.PathLike, pid: int) -> None:
    """Add an executor's interchange to run.json: it outlives a driver killed with -9, holding
    its ports on the login node, and cleanup ends it."""
    path = Path(run_dir, RECORD)
    record = read_record(Path(run_dir))
    record.setdefault("interchanges", []).append({"pid": pid, "start": process_start(pid)})
    _write_record(path, record)


def _write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RECORD}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)  # readers never see half a record


def read_record(run_dir: Path) -> dict:
    """run.json, or {} for a run that has none (made before it existed, or no executor of
    ours started)."""
    try:
        record = json.loads(Path(run_dir, RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


@dataclass(frozen=True)
class Submitted:
    """One line of pbs_jobs.txt."""

    job_id: str
    name: str  # <run tag>.<block>.<time>
    at: float

    @property
    def block(self) -> str:
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 and parts[1].isdigit() else "?"


def read_ledger(text: str) -> list[Submitted]:
    """Jobs from pbs_jobs.txt; a line still being written (no newline yet) is left out."""
    out = []
    for line in text.splitlines(keepends=True):
        parts = line.rstrip("\n").split("\t")
        if not line.endswith("\n") or len(parts) != 3 or not parts[0]:
            continue
        try:
            out.append(Submitted(parts[0], parts[1], float(parts[2])))
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class Said:
    """One line of pbs_events.txt: PBS refused a block, or held or dropped one of its jobs."""

    at: float
    kind: str  # refused, held, dropped
    job_id: str  # "-" for a refusal (no job)
    what: str


def read_events(text: str) -> list[Said]:
    """What PBS said to a run, from pbs_events.txt (parsl_aurora.provider writes it)."""
    out = []
    for line in text.splitlines(keepends=True):
        parts = line.rstrip("\n").split("\t")
        if not line.endswith("\n") or len(parts) != 4:
            continue
        try:
            out.append(Said(float(parts[0]), parts[1], parts[2], parts[3]))
        except ValueError:
            continue
    return out


def said_line(events: list[Said]) -> str:
    """`PBS said: 6 refused (the last at T: `...`), 1 held (...)`; "" when PBS said nothing."""
    parts = []
    for kind in ("refused", "held", "dropped"):
        these = [e for e in events if e.kind == kind]
        if these:
            last = these[-1]
            parts.append(f"{len(these)} {kind} (the last at {_when(last.at)}: {last.what})")
    return f"PBS said: {'; '.join(parts)}" if parts else ""


# ---------------------------------------------------------------- finding a run
def find_run(path: str | os.PathLike) -> Path:
    """PATH itself when it is a run directory (holds parsl.log), else its newest run: Parsl
    numbers runs 000, 001, ... in the order they start."""
    p = Path(path)
    if (p / "parsl.log").is_file():
        return p
    runs = sorted((d for d in p.glob("[0-9]*") if d.name.isdigit() and (d / "parsl.log").is_file()),
                  key=lambda d: int(d.name)) if p.is_dir() else []
    if runs:
        return runs[-1]
    raise ConfigError("RUN_DIR", str(path), "a Parsl run directory (runinfo/NNN, holding "
                      "parsl.log) or a folder of them",
                      "run this in the folder the workflow ran in, or name the run, e.g. "
                      "`parsl-aurora status path/to/runinfo/003`")


# ---------------------------------------------------------------- tasks, from parsl.log
def task_states(chunks: Iterable[bytes]) -> tuple[dict[str, int], int, bool]:
    """(tasks by Parsl state name, retries, whether Parsl finished cleaning up) from parsl.log,
    read as CHUNKS of bytes.

    parsl.log is the one source every run has: monitoring.db only exists with monitoring=True
    and reaches the disk through a separate process in batches, which a killed driver loses;
    checkpoints only hold results of cache=True apps with resume=True. The DataFlowKernel
    writes a line at every state change and Python's file handler flushes each one, so a
    driver killed with -9 loses at most the line it was writing (left out here: it has no
    newline yet).
    """
    last: dict[int, str] = {}
    retries, cleaned, rest = 0, False, b""
    for chunk in chunks:
        buf = rest + chunk
        cut = buf.rfind(b"\n") + 1
        body, rest = buf[:cut], buf[cut:]
        cleaned = cleaned or CLEANED_UP in body
        for m in TASK_LINE.finditer(body):
            task, what = int(m.group(1)), m.group(2)
            if what.startswith(b"submitted"):
                last[task] = "pending"
            elif what.startswith(b"try"):
                last[task] = "launched"
            elif what.startswith(b"completed"):
                last[task] = m.group(3).decode()
            elif what == b"marked for retry":
                last[task] = "pending"
                retries += 1
            elif what == b"failed due to dependency":
                last[task] = "dep_fail"
            else:  # failed after N retry attempts, failed due to a join's failure
                last[task] = "failed"
    return dict(Counter(last.values())), retries, cleaned


def read_chunks(path: Path, size: int = 1 << 24) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


# ---------------------------------------------------------------- the driver
def driver_state(record: Mapping, cleaned: bool, here: str, start_now: int | None) -> str:
    """`ended` (Parsl cleaned up), `running` (its pid runs here with the same start), `gone`
    (it ran here and does not any more), `elsewhere` (another host: not visible from here) or
    `unknown` (no record)."""
    if cleaned:
        return "ended"
    if not record.get("pid"):
        return "unknown"
    if record.get("host") != here:
        return "elsewhere"
    if start_now is not None and start_now == record.get("start"):
        return "running"
    return "gone"


def driver_line(state: str, record: Mapping, here: str) -> str:
    who = f"pid {record.get('pid')} on {record.get('host')}"
    return {
        "ended": "driver: ended" + (f" ({who})" if record.get("pid") else "")
                 + "; Parsl cleaned up and deleted its blocks",
        "running": f"driver: running ({who})",
        "gone": (f"driver: gone ({who} no longer runs, and Parsl did not clean up: killed, or "
                 "the login node rebooted)"),
        "elsewhere": f"driver: {who}; this is {here}, so whether it still runs is not visible "
                     "from here",
        "unknown": "driver: not recorded (a run made before parsl-aurora recorded drivers)",
    }[state]


# ---------------------------------------------------------------- PBS
# Every job the server has queued or running, with names and owners: `-u` cannot be combined
# with -f (`qstat: conflicting options`), so jobs are picked by owner here.
LIST_COMMAND = ["qstat", "-f", "-F", "json"]


def qdel_command(job_ids: Iterable[str]) -> list[str]:
    return ["qdel", *job_ids]


def pbs_environment(record: Mapping, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment PBS commands for this run need: the caller's, or for a run on the fake
    cluster the fake's commands first on PATH and its state folder."""
    env = dict(environ)
    if record.get("fake_pbs"):
        from parsl_aurora import fake

        env.update(PATH=f"{fake.bin_dir()}{os.pathsep}{env.get('PATH', '')}",
                   PARSL_AURORA_FAKE_DIR=str(record["fake_pbs"]),
                   PARSL_AURORA_PYTHON=sys.executable)
    return env


def run_pbs(argv: list[str], env: Mapping[str, str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); a missing command is exit 127, as from a shell."""
    exe = shutil.which(argv[0], path=env.get("PATH"))
    if exe is None:
        return 127, "", f"{argv[0]}: not found on PATH"
    try:
        done = subprocess.run([exe, *argv[1:]], env=dict(env), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return -1, "", f"{argv[0]} did not answer within 300 s"
    return done.returncode, done.stdout, done.stderr


def job_state(job: Mapping | None, qstat_error: str) -> tuple[str, str]:
    """(state in words, note) of one job from its qstat record (None: not in PBS's history)."""
    if qstat_error:
        return "unknown", ""
    if job is None:
        return "gone", "no longer in PBS's job history"
    letter = job.get("job_state", "?")
    word = STATE_WORDS.get(letter, letter)
    if letter == "F" or "Exit_status" in job:
        code = job.get("Exit_status")
        note = "" if code is None else EXIT_WORDS.get(code, f"exit {code}")
    elif letter == "R":
        note = f"since {job['stime']}" if job.get("stime") else ""
    else:  # queued, held...: PBS's comment says why it is not running
        note = job.get("comment", "")
    return word, note


def owner(job: Mapping) -> str:
    return str(job.get("Job_Owner", "")).split("@")[0]


def jobs_of_run(live: Mapping[str, dict], ledger_ids: Iterable[str], tag: str, user: str
                ) -> dict[str, dict]:
    """The jobs among LIVE (qstat's listing) that belong to the run: those it recorded, and
    those of USER named with its tag (a job qsub accepted as the driver died, before it could
    record it). Nothing else: not another run's, not another user's, not a plain job."""
    ids = set(ledger_ids)
    return {k: j for k, j in live.items()
            if owner(j) == user and (k in ids or (tag and str(j.get("Job_Name", ""))
                                                  .startswith(f"{tag}.")))}


# ---------------------------------------------------------------- status
@dataclass
class Block:
    block: str
    job_id: str
    name: str
    submitted: float
    state: str
    note: str


@dataclass
class Status:
    run_dir: Path
    record: dict
    tasks: dict[str, int]
    retries: int
    driver: str
    here: str
    log_age: float | None  # seconds since parsl.log was last written
    blocks: list[Block] = field(default_factory=list)
    qstat_error: str = ""
    logs: list[tuple[str, str]] = field(default_factory=list)
    checked: float = 0.0  # when qstat answered
    events: list[Said] = field(default_factory=list)  # what PBS said instead of running blocks


def log_places(run_dir: Path, shown: Path) -> list[tuple[str, str]]:
    """(what, where) for the logs a run has, paths as SHOWN (the run directory as named)."""
    out = [("Parsl's log", str(shown / "parsl.log"))]
    if (run_dir / "submit_scripts").is_dir():
        where = (f"{shown / 'submit_scripts'}/ (<job name>, and <job name>.stdout, .stderr: PBS "
                 "delivers them when the job ends)")
        out.append(("job scripts and output", where))
    for executor in sorted(d for d in run_dir.iterdir() if d.is_dir()
                           and (d / "interchange.log").exists()):
        out.append(("interchange", str(shown / executor.name / "interchange.log")))
        where = (f"{shown / executor.name}/block-<N>/<pool>/manager.log (one folder per block, "
                 "one per node)")
        out.append(("worker pools", where))
    if (run_dir / "checkpoint").is_dir():
        out.append(("checkpoints", f"{shown / 'checkpoint'}/ (resume=True reads them)"))
    if (run_dir.parent / "monitoring.db").exists():
        out.append(("monitoring", str(shown.parent / "monitoring.db")))
    return out


def status(path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> Status:
    """Everything `parsl-aurora status` shows, read now: one qstat call for all the run's jobs
    (provider.query_jobs: more only where OpenPBS leaves jobs out of its answer)."""
    environ = os.environ if environ is None else environ
    shown = find_run(path)
    run_dir = shown.resolve()
    record = read_record(run_dir)
    log = run_dir / "parsl.log"
    tasks, retries, cleaned = task_states(read_chunks(log))
    here = socket.gethostname()
    pid = record.get("pid")
    state = driver_state(record, cleaned, here, process_start(pid) if pid else None)
    try:
        log_age = max(0.0, time.time() - log.stat().st_mtime)
    except OSError:
        log_age = None
    out = Status(run_dir=shown, record=record, tasks=tasks, retries=retries, driver=state,
                 here=here, log_age=log_age, logs=log_places(run_dir, shown))
    try:
        out.events = read_events((run_dir / EVENTS).read_text())
    except OSError:
        pass
    try:
        ledger = read_ledger((run_dir / LEDGER).read_text())
    except OSError:
        ledger = []
    if not ledger:
        return out
    from parsl_aurora.provider import lookup, query_jobs

    env = pbs_environment(record, environ)
    jobs, why = query_jobs([s.job_id for s in ledger], lambda argv: run_pbs(argv, env))
    out.checked = time.time()
    if jobs is None:
        out.qstat_error = f"qstat failed ({why})"
        jobs = {}
    lost = {e.job_id: e for e in out.events if e.kind != "refused"}
    for s in ledger:
        word, note = job_state(lookup(jobs, s.job_id), out.qstat_error)
        if s.job_id in lost:  # deleted by the run: why counts more than how it ended
            note = f"{lost[s.job_id].kind} by PBS: {lost[s.job_id].what}"
        out.blocks.append(Block(s.block, s.job_id, s.name, s.at, word, note))
    return out


def short_id(job_id: str) -> str:
    """`1234.aurora-pbs-0001` for `1234.aurora-pbs-0001.hostmgmt.cm...`: what qstat's listings
    show, and qstat and qdel take."""
    return ".".join(job_id.split(".")[:2])


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s // 3600} h {s % 3600 // 60} min ago"


def tasks_line(tasks: Mapping[str, int], retries: int) -> str:
    """`tasks: 9 done, 1 failed, 14 pending (12 launched), 24 in all; 2 retries` (the counts of
    progress.progress_line)."""
    from parsl_aurora.progress import task_counts

    c = task_counts(tasks)
    return (f"tasks: {c['done']} done, {c['failed']} failed, {c['pending']} pending "
            f"({c['launched']} launched), {sum(tasks.values())} in all; {retries} "
            f"retr{'y' if retries == 1 else 'ies'}")


def render(s: Status, console) -> None:
    """Print a Status with rich: lines that never wrap (a log keeps each whole) and a table of
    the run's PBS jobs."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    def say(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True, markup=False)

    tag = s.record.get("run_tag")
    say(f"run {s.run_dir}" + (f" (tag {tag}: its PBS jobs are named {tag}.<block>.<time>)"
                              if tag else ""))
    say(driver_line(s.driver, s.record, s.here)
        + ("" if s.log_age is None else f"; parsl.log written {_ago(s.log_age)}"))
    say(f"{tasks_line(s.tasks, s.retries)} (from parsl.log)"
        + ("; unfinished tasks are not running: the driver is gone" if s.driver == "gone"
           else ""))
    live = sum(b.state in [STATE_WORDS[x] for x in LIVE] for b in s.blocks)
    if s.blocks:
        seen = (f"{s.qstat_error}: states unknown" if s.qstat_error
                else f"{live} queued or running (qstat -x at {_when(s.checked)})")
        say(f"PBS jobs: {len(s.blocks)} submitted, {seen}")
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, highlight=False)
        for col in ("block", "job id", "state", "submitted", "note"):
            # Only the note wraps, on a narrow terminal; ids, states and times stay whole.
            table.add_column(col, no_wrap=col != "note", overflow="fold")
        for b in s.blocks:
            table.add_row(b.block, short_id(b.job_id),
                          Text(b.state, style=STATE_STYLES.get(b.state, "")),
                          _when(b.submitted), b.note)
        console.print(table)
    else:
        say("PBS jobs: none recorded (pbs_jobs.txt lists each job a PBS mode submits; an in_job "
            "run works inside the job that started it)")
    if s.events:
        say(said_line(s.events))
    if s.driver == "gone":
        left = (f"the {live} job{'s' if live != 1 else ''}" if not s.qstat_error
                else "any job")
        say("next: " + (f"`parsl-aurora cleanup` deletes {left} it left, then "
                        if live or s.qstat_error else "")
            + "run the workflow again (with resume=True, finished tasks are not run again)")
    say("logs:")
    width = max(len(what) for what, _ in s.logs)
    for what, where in s.logs:
        say(f"  {what:<{width}}  {where}")


def console(file=None):
    """rich's Console: colour on a terminal; in a log, plain text that never wraps a row."""
    from rich.console import Console

    file = file or sys.stdout
    tty = file.isatty()
    return Console(file=file, width=None if tty else 200, no_color=not tty,
                   force_terminal=tty, highlight=False)


# ---------------------------------------------------------------- cleanup
@dataclass
class Cleanup:
    run_dir: Path
    tag: str
    deleted: dict[str, dict]  # job id -> its qstat record
    ending: list[str]  # jobs of the run already exiting
    submitted: int  # lines in pbs_jobs.txt
    unrecorded: list[str]  # deleted jobs found by their tag alone
    interchanges: list[int] = field(default_factory=list)  # orphaned ones, ended


def end_interchanges(record: Mapping, here: str) -> list[int]:
    """SIGTERM the run's interchanges still running on this host (its driver is gone: nobody
    else will end them); the pids signalled."""
    ended = []
    if record.get("host") != here:
        return ended
    for ic in record.get("interchanges", []):
        pid, start = ic.get("pid"), ic.get("start")
        if pid and start is not None and process_start(pid) == start:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:  # ended meanwhile, or not ours to end
                continue
            ended.append(pid)
    return ended


def check_driver_stopped(record: Mapping, run_dir: Path, cleaned: bool, force: bool) -> None:
    """Refuse to clean up under a driver that still runs: it would submit new blocks."""
    here = socket.gethostname()
    pid = record.get("pid")
    state = driver_state(record, cleaned, here, process_start(pid) if pid else None)
    if force or state not in ("running", "elsewhere"):
        return
    if state == "running":
        raise ConfigError("RUN_DIR", str(run_dir), "a run whose driver has stopped (pid "
                          f"{pid} on {here} still runs it, and would submit new jobs)",
                          f"stop the driver first (`kill {pid}`: its jobs stay for cleanup), "
                          "then run cleanup again")
    raise ConfigError("RUN_DIR", str(run_dir), f"a run whose driver has stopped (it ran as pid "
                      f"{pid} on {record.get('host')}, and this is {here})",
                      f"run cleanup on {record.get('host')}, or pass --force if the driver "
                      "is gone")


def cleanup(path: str | os.PathLike, *, force: bool = False,
            environ: Mapping[str, str] | None = None) -> Cleanup:
    """qdel every job of the run that is queued or running, and nothing else."""
    environ = os.environ if environ is None else environ
    shown = find_run(path)
    run_dir = shown.resolve()
    record = read_record(run_dir)
    _, _, cleaned = task_states(read_chunks(run_dir / "parsl.log"))
    check_driver_stopped(record, shown, cleaned, force)
    try:
        ledger = read_ledger((run_dir / LEDGER).read_text())
    except OSError:
        ledger = []
    tag = str(record.get("run_tag", ""))
    result = Cleanup(shown, tag, {}, [], len(ledger), [])
    result.interchanges = end_interchanges(record, socket.gethostname())
    if not ledger and not tag:
        return result
    env = pbs_environment(record, environ)
    rc, stdout, stderr = run_pbs(LIST_COMMAND, env)
    from parsl_aurora.provider import first_line, parse_qstat

    live = parse_qstat(stdout, rc)
    if live is None:
        raise SchedulerError(f"cannot list PBS's jobs to find those of {shown}: `qstat` exit "
                             f"{rc}: {first_line(stderr) or first_line(stdout) or 'no output'}. "
                             "Fix: run cleanup where qstat reaches the PBS server (an Aurora "
                             "login node)")
    mine = jobs_of_run(live, (s.job_id for s in ledger), tag, str(record.get("user") or _user()))
    result.ending = sorted((k for k, j in mine.items() if j.get("job_state") == "E"), key=_seq)
    doomed = {k: j for k, j in mine.items() if j.get("job_state") in LIVE}
    if not doomed:
        return result
    ids = sorted(doomed, key=_seq)
    rc, stdout, stderr = run_pbs(qdel_command(ids), env)
    # 35: one ended between the listing and qdel, which is what we wanted.
    gone = {line.split()[-1] for line in stderr.splitlines() if "has finished" in line}
    if rc not in (0, 35) or (rc == 35 and not gone):
        raise SchedulerError(f"qdel of {len(ids)} jobs of {shown} failed (exit {rc}: "
                             f"{first_line(stderr) or first_line(stdout) or 'no output'}). "
                             "Fix: run `parsl-aurora status` to see them, then try again")
    recorded = {s.job_id for s in ledger}
    result.deleted = {k: doomed[k] for k in ids if k not in gone}
    result.unrecorded = [k for k in result.deleted if k not in recorded]
    return result


def _seq(job_id: str) -> tuple[int, str]:
    head = job_id.split(".", 1)[0]
    return (int(head), job_id) if head.isdigit() else (-1, job_id)


def cleanup_lines(c: Cleanup) -> list[str]:
    """What cleanup says: the jobs it deleted, or that there were none."""
    head = f"run {c.run_dir}" + (f" (tag {c.tag})" if c.tag else "")
    lines = []
    if not c.deleted:
        lines.append(f"{head}: nothing to delete, no job of this run is queued or running "
                     f"({c.submitted} submitted)")
    else:
        lines.append(f"{head}: deleted {len(c.deleted)} job{'s' if len(c.deleted) > 1 else ''} "
                     "(qdel; PBS ends each within its kill delay):")
        for job_id, job in c.deleted.items():
            name = str(job.get("Job_Name", ""))
            block = name.split(".")[1] if name.count(".") >= 1 else "?"
            word = STATE_WORDS.get(job.get("job_state", ""), job.get("job_state", ""))
            extra = ("  (not in pbs_jobs.txt: submitted as the driver died)"
                     if job_id in c.unrecorded else "")
            lines.append(f"  block {block:<4} {job_id}  was {word}  {name}{extra}")
    if c.ending:
        lines.append(f"  already ending: {', '.join(c.ending)}")
    if c.interchanges:
        lines.append(f"  ended the run's interchange (pid {', '.join(map(str, c.interchanges))}), "
                     "left running on this host when the driver died")
    return lines
