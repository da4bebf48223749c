"""Running one fake PBS job as a PBS MoM does: where it starts, with what, and how it ends.

qsub forks one detached supervisor per job. It starts the script in the owner's $HOME with a
login-like environment, enforces the walltime (SIGTERM, the kill delay, SIGKILL to every process
the job started), and stages the job's output to its destination when the job has ended.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from parsl_aurora.fake import NODE_SUFFIX, bin_dir, procs
from parsl_aurora.fake.pbs import (
    EXIT_DELETED,
    EXIT_RETRY,
    EXIT_WALLTIME,
    FAIL_ACCOUNT,
    HELD_COMMENT,
    MAX_RUN_COUNT,
    SERVER,
    store,
)

POLL = 0.05
# Seconds between two attempts to start a job whose start failed (the real server's scheduler
# tries again on its next cycle).
RETRY = 1.0
# PBS's default kill_delay: seconds between the SIGTERM and the SIGKILL that end a job.
KILL_DELAY = 10.0
# What a login shell on a compute node finds, before the user's profile; the fake's PALS
# mpiexec stands in for Aurora's system one (ahead of the system's own, as on Aurora).
LOGIN_PATH = "/usr/local/bin:/usr/bin:/bin"
LOGIN_KEEP = ("HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "TZ")


def job_environment(opts: dict, environ: dict[str, str]) -> dict[str, str]:
    """What a job starts with: a login environment (all of qsub's with -V), -v's variables,
    and PBS_O_* describing where qsub ran. The fake's own settings (PARSL_AURORA_*) go along."""
    if opts.get("V"):
        env = dict(environ)
    else:
        env = {k: environ[k] for k in LOGIN_KEEP if k in environ}
        env["PATH"] = f"{bin_dir()}:{LOGIN_PATH}"
        env.update({k: v for k, v in environ.items() if k.startswith("PARSL_AURORA_")})
    for pair in filter(None, str(opts.get("v", "")).split(",")):
        k, eq, v = pair.partition("=")
        env[k] = v if eq else environ.get(k, "")
    for k in ("HOME", "PATH", "LOGNAME", "SHELL", "MAIL", "LANG", "TZ"):
        if k in environ:
            env[f"PBS_O_{k}"] = environ[k]
    return env


def start(job_id: str) -> None:
    """Run the job's supervisor in a daemon: forked twice, in a new session, no descriptors.

    Forked rather than started afresh: a new interpreter importing this package is most of a
    job's start-up latency, and qsub is already loaded. The caller (Parsl's shell) waits for
    qsub's output to close, so the daemon keeps none of qsub's descriptors.
    """
    d = store.state_dir()
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.environ["PARSL_AURORA_FAKE_DIR"] = str(d)
        supervise(job_id)
    finally:
        os._exit(0)


def _reap(main: int, codes: dict[int, int]) -> None:
    for pid, status in procs.reaped():
        _record(main, codes, pid, status)


def _record(main: int, codes: dict[int, int], pid: int, status: int) -> None:
    if pid == main:
        code = os.waitstatus_to_exitcode(status)
        codes[main] = 256 - code if code < 0 else code  # killed by signal N -> 256 + N


def end_job(main: int, codes: dict[int, int], delay: float) -> None:
    """SIGTERM everything the job started, SIGKILL what is left after `delay` seconds."""
    procs.end_descendants(delay, 10.0, POLL,
                          lambda pid, status: _record(main, codes, pid, status))


def pbs_variables(job: dict, home: str, tmpdir: Path, nodefile: Path) -> dict[str, str]:
    """The PBS_* (and NCPUS, TMPDIR) variables a MoM gives a job."""
    env = {
        "PBS_JOBID": job["id"], "PBS_JOBNAME": job["name"], "PBS_QUEUE": job["queue"],
        "PBS_NODEFILE": str(nodefile), "PBS_O_WORKDIR": job["workdir"],
        "PBS_O_QUEUE": job["queue"], "PBS_O_HOST": SERVER, "PBS_O_SYSTEM": "Linux",
        "PBS_JOBDIR": home, "PBS_NODENUM": "0", "PBS_TASKNUM": "1",
        "PBS_JOBCOOKIE": job["id"], "PBS_ENVIRONMENT": "PBS_BATCH", "ENVIRONMENT": "BATCH",
        "TMPDIR": str(tmpdir),
        # The chunk's ncpus, as PBS sets them: 208 on an Aurora node, whatever this host has.
        "NCPUS": str(job["ncpus"]), "OMP_NUM_THREADS": str(job["ncpus"]),
    }
    if job["account"]:
        env["PBS_ACCOUNT"] = job["account"]
    return env


def fail_starts(d: Path, job: dict, deleted: Path) -> None:
    """A job that cannot start (its account is FAIL_ACCOUNT): every attempt counts, and above
    MAX_RUN_COUNT PBS holds it (a system hold, `s`) with the comment users see on Aurora."""
    while not deleted.exists():
        now = time.time()
        # As PBS records an attempt: started (stime), ended at once (obittime), to be retried.
        job.update(run_count=job.get("run_count", 0) + 1, stime=now, etime=now, mtime=now,
                   exit_status=EXIT_RETRY)
        if job["run_count"] > MAX_RUN_COUNT:
            job.update(state="H", substate=20, hold="s", comment=HELD_COMMENT)
            store.save(d, job)
            return
        job.update(comment="Not Running: the job's start failed; PBS tries again")
        store.save(d, job)
        time.sleep(RETRY)
    store.finish(d, job, EXIT_RETRY, 91, "terminated")


def _open_output(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def _stage_out(src: Path, dest: str, extra: str = "") -> None:
    """Deliver a spooled output file as PBS does: at the end, mode 0600, whole."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        return  # PBS would leave it in undelivered/; the spool copy stays
    with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out)
        out.write(extra.encode())
    src.unlink()


def supervise(job_id: str) -> None:
    """Run one job to its end; after qsub, the only writer of its state file."""
    d = store.state_dir()
    os.chdir(d)  # hold no submitter folder open
    job = store.load(d, job_id)
    procs.become_subreaper()
    deleted = d / "jobs" / f"{job_id}.qdel"
    if deleted.exists():  # qdel'd while still queued: no Exit_status, as PBS
        store.finish(d, job, None, 91, "terminated")
        return
    if job["account"] == FAIL_ACCOUNT:
        fail_starts(d, job, deleted)
        return
    home = job["env"].get("HOME", "/")
    tmpdir = d / "tmp" / f"pbs.{job_id}"
    tmpdir.mkdir(mode=0o700, exist_ok=True)
    nodefile = d / "aux" / job_id
    nodefile.write_text("".join(f"{h}.{NODE_SUFFIX}\n" for h in job["hosts"]))
    env = {**job["env"], **pbs_variables(job, home, tmpdir, nodefile)}
    # -k d(irect): PBS writes o/e where they go as the job runs; otherwise to its spool, and
    # delivers them at the end.
    keep = job.get("keep", "n")
    direct = {x: "d" in keep and x in keep for x in "oe"}
    out_spool = (Path(job["stdout"]) if direct["o"] else d / "spool" / f"{job_id}.OU")
    err_spool = (Path(job["stderr"]) if direct["e"] else d / "spool" / f"{job_id}.ER")
    os.umask(0o077)  # PBS's default job umask: the job's files are its owner's
    out, err = _open_output(out_spool), _open_output(err_spool)
    try:
        proc = subprocess.Popen(["/bin/bash", job["script"]], cwd=home, env=env,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out if job["join"] == "oe" else err,
                                start_new_session=True)
    finally:
        os.close(out)
        os.close(err)
    start = time.time()
    ran = "+".join(f"({h}:ncpus={job['ncpus']})" for h in job["hosts"])
    job.update(state="R", substate=42, stime=start, mtime=start, supervisor=os.getpid(),
               pid=proc.pid, comment=f"Job run at {time.strftime('%a %b %d at %H:%M')} "
                                     f"on {ran}")
    store.save(d, job)
    # walltime 0 sets no limit (PBS takes it and kills nothing).
    deadline = time.monotonic() + (job["seconds"] or float("inf"))
    codes: dict[int, int] = {}
    killed = ""
    while True:
        _reap(proc.pid, codes)
        if proc.pid in codes:
            code = codes[proc.pid]
            break
        if deleted.exists():
            code = EXIT_DELETED
            break
        if time.monotonic() >= deadline:
            code = EXIT_WALLTIME
            killed = (f"=>> PBS: job killed: walltime {round(time.time() - start)} exceeded "
                      f"limit {job['seconds']}\n")
            break
        time.sleep(POLL)
    job.update(state="E", substate=51, exit_status=code, mtime=time.time())
    store.save(d, job)
    # PBS ends every process of a job when the job ends, whatever ended it.
    end_job(proc.pid, codes, float(os.environ.get("PARSL_AURORA_KILL_DELAY", KILL_DELAY)))
    proc.returncode = codes.get(proc.pid, code)  # reaped here; keep Popen from waiting again
    if not direct["o"]:
        _stage_out(out_spool, job["stdout"])
    if job["join"] != "oe":
        if not direct["e"]:
            _stage_out(err_spool, job["stderr"], killed)
        elif killed:
            with open(err_spool, "a") as f:
                f.write(killed)
    shutil.rmtree(tmpdir, ignore_errors=True)
    substate, how = ((93, "exceeded resource walltime") if code == EXIT_WALLTIME else
                     (91, f"terminated by {job['owner']}@{SERVER}") if code == EXIT_DELETED else
                     (92, "finished") if code == 0 else (93, "failed"))
    store.finish(d, job, code, substate, how)
