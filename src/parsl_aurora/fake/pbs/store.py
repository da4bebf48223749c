"""The fake server's state: one JSON file per job, a sequence counter, the queues' limits.

Every writer replaces a job's file whole (write aside, rename), so readers never see half of
one; submissions take one lock so ids and per-user limits stay consistent under concurrency.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import time
from pathlib import Path

from parsl_aurora.fake import host_names
from parsl_aurora.fake.pbs import (
    DEFAULT_QUEUE,
    EXIT_DELETED,
    QUEUES,
    RC_OVER_LIMITS,
    RC_PER_USER_LIMIT,
    RC_QUEUE_DENIED,
    RC_UNKNOWN_QUEUE,
    SERVER,
    PBSError,
)


def state_dir() -> Path:
    """Where the fake PBS keeps its jobs: $PARSL_AURORA_FAKE_DIR, else one folder per user."""
    d = os.environ.get("PARSL_AURORA_FAKE_DIR") or f"/tmp/parsl-aurora-fake-{os.getuid()}"
    path = Path(d).resolve()
    for sub in ("jobs", "scripts", "spool", "aux", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def full_id(job_id: str) -> str:
    # PBS accepts the bare sequence number and the id with a shortened server name.
    return f"{job_id.split('.')[0]}.{SERVER}"


def job_path(d: Path, job_id: str) -> Path:
    return d / "jobs" / f"{job_id}.json"


def save(d: Path, job: dict) -> None:
    tmp = d / "jobs" / f".{job['id']}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(job))
    tmp.replace(job_path(d, job["id"]))


def load(d: Path, job_id: str) -> dict | None:
    try:
        return json.loads(job_path(d, full_id(job_id)).read_text())
    except (OSError, ValueError):
        return None


def all_jobs(d: Path) -> list[dict]:
    jobs = []
    for f in (d / "jobs").glob("*.json"):
        try:
            jobs.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(jobs, key=lambda j: j["seq"])


@contextlib.contextmanager
def _server_lock(d: Path):
    with open(d / "server.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released on close
        yield


def _next_seq(d: Path) -> int:
    seq_file = d / "seq"
    n = int(seq_file.read_text() or 0) if seq_file.exists() else 0
    seq_file.write_text(str(n + 1))
    return n  # a fresh PBS datastore starts at 0


def check_queue(d: Path, queue: str, seconds: int, nodes: int, owner: str,
                routed: bool = False) -> str | None:
    """The queue a job lands in, refusing as qsub does: unknown queue, a queue only its routing
    queue may send to, walltime or nodes outside the queue's, a full per-user limit. A routing
    queue hands the job to its first destination that takes it; None when none does."""
    limits = QUEUES.get(queue)
    if limits is None:
        raise PBSError("qsub: Unknown queue", RC_UNKNOWN_QUEUE)
    if limits.from_route_only and not routed:
        raise PBSError("qsub: Access to queue is denied", RC_QUEUE_DENIED)
    if ((limits.max_walltime is not None and seconds > limits.max_walltime)
            or (limits.min_nodes is not None and nodes < limits.min_nodes)
            or (limits.max_nodes is not None and nodes > limits.max_nodes)):
        raise PBSError("qsub: Job violates queue and/or server resource limits", RC_OVER_LIMITS)
    if limits.routes_to:
        for dest in limits.routes_to:
            try:
                return check_queue(d, dest, seconds, nodes, owner, routed=True)
            except PBSError:
                continue
        # OpenPBS routes after qsub has returned the id: a job no destination takes is then
        # deleted, and qstat never knew it ("Unknown Job Id", even with -x).
        return None
    if limits.max_user_queued is not None:
        mine = [j for j in all_jobs(d)
                if j["owner"] == owner and j["queue"] == queue and j["state"] != "F"]
        if len(mine) >= limits.max_user_queued:
            raise PBSError("qsub: would exceed queue generic's per-user limit", RC_PER_USER_LIMIT)
    return queue


def _output_path(option: str | None, default: str, workdir: str) -> str:
    # `-o host:path` names a host as well; relative paths are qsub's folder's.
    path = (option or default).split(":", 1)[-1]
    return str(Path(workdir, path))


def submit(req: dict, script: str, script_path: Path | None, default_name: str,
           env: dict[str, str]) -> dict:
    """Check and record a job that will start with `env`; its supervisor (qsub starts it)
    runs it."""
    opts = req["opts"]
    owner = pwd.getpwuid(os.getuid()).pw_name
    queue = opts.get("q", DEFAULT_QUEUE)
    d = state_dir()
    workdir = os.getcwd()
    with _server_lock(d):
        queue = check_queue(d, queue, req["seconds"], req["nodes"], owner)
        seq = _next_seq(d)
        job_id = f"{seq}.{SERVER}"
        if queue is None:
            return {"id": job_id, "dropped": True}
        name = opts.get("N") or default_name
        stored = d / "scripts" / job_id  # PBS keeps its own copy: later edits do not count
        stored.write_text(script)
        now = time.time()
        job = {
            "id": job_id, "seq": seq, "name": name, "owner": owner, "queue": queue,
            "account": opts.get("A"), "nodes": req["nodes"], "ncpus": req["ncpus"],
            "select": req["select"], "walltime": req["walltime"], "seconds": req["seconds"],
            "resources": req["resources"], "script": str(stored),
            "submit_args": " ".join(str(a) for a in [*_cli_words(opts),
                                                      script_path or ""]).strip(),
            "hosts": host_names(req["nodes"]), "workdir": workdir,
            # PBS writes <name>.o<seq> / .e<seq> into qsub's folder when the job ends.
            "stdout": _output_path(opts.get("o"), f"{name}.o{seq}", workdir),
            "stderr": _output_path(opts.get("e"), f"{name}.e{seq}", workdir),
            "join": opts.get("j", "n"), "keep": opts.get("k", "n"), "env": env,
            "run_count": _run_count(opts.get("W", "")), "hold": "n",
            "state": "Q", "substate": 10, "exit_status": None, "comment": None,
            "ctime": now, "mtime": now, "stime": None, "etime": None,
        }
        save(d, job)
    return job


def _run_count(w: str) -> int:
    """`-W run_count=N` (how many times PBS counts the job as started already)."""
    for part in w.split(","):
        key, _, value = part.partition("=")
        if key.strip() == "run_count":
            if not value.strip().isdigit():
                raise PBSError("qsub: Illegal attribute or resource value run_count", 166)
            return int(value)
    return 0


def _cli_words(opts: dict) -> list[str]:
    return [w for k, v in opts.items() if k != "l"
            for w in ([f"-{k}"] if v is True else [f"-{k}", str(v)])]


def delete(d: Path, job: dict) -> None:
    """qdel: the job's supervisor sees the mark and ends it (SIGTERM, kill delay, SIGKILL)."""
    (d / "jobs" / f"{job['id']}.qdel").touch()
    if job["state"] == "H":  # held: nothing runs, nothing watches it
        finish(d, job, job["exit_status"], 91, "terminated")
    elif job["state"] in ("R", "E") and not _alive(job.get("supervisor")):
        finish(d, job, EXIT_DELETED, 91, f"terminated by {job['owner']}@{SERVER}")


def finish(d: Path, job: dict, code: int | None, substate: int, how: str) -> None:
    now = time.time()
    ran = job.get("comment") or "Not Running"
    job.update(state="F", substate=substate, exit_status=code, mtime=now, etime=now,
               comment=f"{ran} and {how}")
    save(d, job)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
