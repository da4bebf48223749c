"""Fake PBS Pro: `qsub`, `qstat` and `qdel` over one JSON file per job in $PARSL_AURORA_FAKE_DIR.

There is no daemon: qsub starts one detached supervisor per job that runs the script, enforces
walltime as PBS does and records the end. Behaviour and deviations: docs/fake-cluster.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from parsl_aurora.fake import SERVER, bin_dir, host_names, state_dir

# PBS's Exit_status for a job ended by walltime (JOB_EXEC_KILL_WALLTIME) and by qdel
# (256 + SIGTERM: PBS reports a job killed by signal N as 256 + N).
EXIT_WALLTIME = -29
EXIT_DELETED = 271
# PBS's exit codes for qstat/qdel on a finished job and on an id it never knew.
RC_FINISHED = 35
RC_UNKNOWN = 153
WALLTIME = re.compile(r"^(?:(?:(\d+):)?(\d+):)?(\d+)$")
SELECT = re.compile(r"^([1-9]\d*)(?::[A-Za-z_]\w*=[^:+]+)*$")
# Options whose value follows them, as in PBS's qsub(1); -V takes none.
VALUED = set("qANoelvjmSWPa")
ACTIVE = ("Q", "R", "E", "H")
CPUS_PER_NODE = 208  # an Aurora node's logical CPUs, shown in exec_host
POLL = 0.05


class PBSError(Exception):
    """A refusal, printed on stderr as PBS prints it; `code` is the command's exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- pure parsing


def parse_walltime(text: str) -> int:
    """`[[H:]M:]S` -> seconds; PBS refuses anything else, and so do we."""
    m = WALLTIME.match(text.strip())
    if not m or sum(int(x or 0) for x in m.groups()) == 0:
        raise PBSError("qsub: Illegal attribute or resource value Resource_List.walltime")
    h, mi, s = (int(x or 0) for x in m.groups())
    return h * 3600 + mi * 60 + s


def parse_options(args: list[str]) -> tuple[dict, list[str]]:
    """qsub's options -> ({letter: value, "l": [..]}, operands after the options)."""
    opts: dict = {"l": []}
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return opts, args[i + 1:]
        if a == "-V":
            opts["V"] = True
        elif len(a) >= 2 and a[0] == "-" and a[1] in VALUED:
            if a[2:]:
                value = a[2:]
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise PBSError(f"qsub: option requires an argument -- '{a[1]}'", 2)
            if a[1] == "l":
                opts["l"].append(value)
            else:
                opts[a[1]] = value
        elif a.startswith("-") and len(a) > 1:
            raise PBSError(f"qsub: invalid option -- '{a[1:]}' (this fake takes -q -A -N -o -e "
                           "-l -v -V -j -m -S -W -P -a)", 2)
        else:
            return opts, args[i:]
        i += 1
    return opts, []


def directives(script: str) -> list[str]:
    """Arguments from the script's `#PBS` lines; PBS stops reading at the first command."""
    out: list[str] = []
    for line in script.splitlines():
        s = line.strip()
        if s.startswith("#PBS"):
            out += s[4:].split()
        elif s and not s.startswith("#"):
            break
    return out


def resources(items: list[str]) -> dict[str, str]:
    """`-l a=1,b=2` items -> {a: 1, b: 2}; later items win, as later -l options do in PBS."""
    res: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            key, _, value = part.partition("=")
            if key.strip():
                res[key.strip()] = value.strip()
    return res


def request(cli: list[str], script: str) -> dict:
    """A job request from qsub's arguments and the script's `#PBS` lines (the CLI wins)."""
    file_opts, _ = parse_options(directives(script))
    cli_opts, _ = parse_options(cli)
    merged = {k: v for k, v in [*file_opts.items(), *cli_opts.items()] if k != "l"}
    res = resources(file_opts["l"] + cli_opts["l"])
    select = res.get("select")
    if select is None:
        raise PBSError("qsub: Job rejected: no select statement; request nodes with "
                       "-l select=<nodes>[:ncpus=208] (on the command line or as #PBS -l)")
    m = SELECT.match(select)
    if not m:
        raise PBSError("qsub: Illegal attribute or resource value Resource_List.select")
    if "walltime" not in res:
        raise PBSError("qsub: Job rejected: no walltime; add -l walltime=HH:MM:SS "
                       "(on the command line or as #PBS -l)")
    seconds = parse_walltime(res["walltime"])
    return {"opts": merged, "resources": res, "select": select, "nodes": int(m.group(1)),
            "walltime": res["walltime"], "seconds": seconds}


# ---------------------------------------------------------------- state files


def job_path(d: Path, job_id: str) -> Path:
    return d / "jobs" / f"{job_id}.json"


def full_id(job_id: str) -> str:
    # PBS accepts the bare sequence number and also the id with a longer server name.
    return f"{job_id.split('.')[0]}.{SERVER}"


def next_seq(d: Path) -> int:
    with open(d / "seq", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released on close; concurrent qsubs get distinct ids
        f.seek(0)
        n = int(f.read() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
        f.flush()
    return n


def save(d: Path, job: dict) -> None:
    # Readers never see half a file: write aside, then rename over.
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


# ---------------------------------------------------------------- qsub


def login_env(environ: dict[str, str], python: str) -> dict[str, str]:
    """What a job starts with without -V: a login-like environment, not the submitter's."""
    keep = ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TERM", "SHELL", "TMPDIR")
    env = {k: environ[k] for k in keep if k in environ}
    env.update({k: v for k, v in environ.items() if k.startswith("PARSL_AURORA_")})
    # On Aurora qsub and mpiexec are on every job's PATH; here they are the fake's. The
    # workflow's interpreter stands in for the venv a user's ~/.bashrc or worker_init activates.
    env["PATH"] = f"{bin_dir()}:{Path(python).parent}:/usr/local/bin:/usr/bin:/bin"
    return env


def job_env(opts: dict, environ: dict[str, str], python: str) -> dict[str, str]:
    env = dict(environ) if opts.get("V") else login_env(environ, python)
    for pair in filter(None, opts.get("v", "").split(",")):
        k, eq, v = pair.partition("=")
        env[k] = v if eq else environ.get(k, "")
    for k in ("HOME", "PATH", "LOGNAME", "SHELL", "LANG", "MAIL", "TZ"):
        if k in environ:
            env[f"PBS_O_{k}"] = environ[k]
    return env


def qsub(args: list[str]) -> str:
    _, rest = parse_options(args)
    if not rest:
        raise PBSError("usage: qsub [-A account] [-q queue] [-l resource=value] ... script", 2)
    script_path = Path(rest[0]).resolve()
    try:
        script = script_path.read_text()
    except OSError as e:
        raise PBSError(f"qsub: script file:: {e.strerror}: {rest[0]}") from None
    req = request(args, script)
    opts = req["opts"]
    d = state_dir()
    seq = next_seq(d)
    job_id = f"{seq}.{SERVER}"
    name = opts.get("N") or script_path.name
    (d / "aux").mkdir(exist_ok=True)
    nodefile = d / "aux" / job_id
    nodefile.write_text("".join(h + "\n" for h in host_names(req["nodes"])))
    python = os.environ.get("PARSL_AURORA_PYTHON") or sys.executable
    now = time.time()
    job = {
        "id": job_id, "seq": seq, "name": name, "owner": os.environ.get("USER", "user"),
        "queue": opts.get("q", "workq"), "account": opts.get("A", ""),
        "nodes": req["nodes"], "select": req["select"], "walltime": req["walltime"],
        "seconds": req["seconds"], "resources": req["resources"], "script": str(script_path),
        "workdir": os.getcwd(), "jobdir": str(d / "jobs" / job_id),
        # As PBS: without -o/-e, <name>.o<seq> and <name>.e<seq> land in the submit folder.
        "stdout": str(Path(opts.get("o") or f"{name}.o{seq}").resolve()),
        "stderr": str(Path(opts.get("e") or f"{name}.e{seq}").resolve()),
        "nodefile": str(nodefile), "state": "Q", "exit_status": None,
        "ctime": now, "mtime": now, "stime": None, "etime": None,
        "env": job_env(opts, dict(os.environ), python),
    }
    save(d, job)
    _detach(lambda: supervise(job_id), {"PARSL_AURORA_FAKE_DIR": str(d)})
    return job_id


# ---------------------------------------------------------------- the per-job supervisor


def _detach(run, env: dict[str, str]) -> None:
    """Run `run()` in a daemon: forked twice, in a new session, with no terminal or pipes.

    Forked rather than started afresh: a new interpreter importing this module is most of a
    job's start-up latency, and qsub is already loaded. The caller (Parsl's shell) waits for
    qsub's output to close, so the daemon keeps none of qsub's descriptors.
    """
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
        os.environ.update(env)
        run()
    finally:
        os._exit(0)


def _become_subreaper() -> None:
    # hydra's proxies and ranks each call setsid(), escaping the job's process group; as a
    # subreaper the supervisor inherits every orphan, so walking its descendants finds them all.
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def descendants(root: int) -> list[int]:
    """Live (non-zombie) processes below `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _reap(main: int, codes: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == main:
            code = os.waitstatus_to_exitcode(status)
            codes[main] = 256 - code if code < 0 else code  # killed by signal N -> 256 + N


def _kill_all(sig: int, pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def end_job(main: int, codes: dict[int, int], delay: float) -> None:
    """SIGTERM everything the job started, SIGKILL what is left after `delay` seconds."""
    me = os.getpid()
    for sig, wait in ((signal.SIGTERM, delay), (signal.SIGKILL, 10.0)):
        deadline = time.monotonic() + wait
        _kill_all(sig, descendants(me))
        while time.monotonic() < deadline:
            _reap(main, codes)
            left = descendants(me)
            if not left:
                return
            if sig == signal.SIGKILL:
                _kill_all(sig, left)  # children forked after the first round
            time.sleep(POLL)


def supervise(job_id: str) -> None:
    """Run one job to its end; after qsub, the only writer of its state file."""
    import subprocess

    d = state_dir()
    os.chdir(d)  # hold no submitter folder open
    job = load(d, job_id)
    _become_subreaper()
    jobdir = Path(job["jobdir"])
    jobdir.mkdir(parents=True, exist_ok=True)
    deleted = d / "jobs" / f"{job_id}.qdel"
    if deleted.exists():  # qdel'd while still queued
        finish(d, job, EXIT_DELETED)
        return
    env = {**job["env"], "PBS_JOBID": job_id, "PBS_JOBNAME": job["name"],
           "PBS_NODEFILE": job["nodefile"], "PBS_O_WORKDIR": job["workdir"],
           "PBS_QUEUE": job["queue"], "PBS_ACCOUNT": job["account"],
           "PBS_O_SERVER": SERVER, "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_JOBDIR": str(jobdir),
           "PBS_JOBCOOKIE": job_id, "ENVIRONMENT": "BATCH"}
    for path in (job["stdout"], job["stderr"]):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(job["stdout"], "ab") as out, open(job["stderr"], "ab") as err:
        # Real PBS starts a job in $HOME; the fake starts it in its own folder in the run
        # directory so launcher files (cmd_*.sh, *.nodes) stay inside the run directory.
        proc = subprocess.Popen(["/bin/bash", job["script"]], cwd=jobdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
    start = time.time()
    job.update(state="R", stime=start, mtime=start, supervisor=os.getpid(), pid=proc.pid)
    save(d, job)
    deadline = time.monotonic() + job["seconds"]
    codes: dict[int, int] = {}
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
            break
        time.sleep(POLL)
    job.update(state="E", mtime=time.time())
    save(d, job)
    # PBS ends every process of a job when the job ends, whatever ended it.
    end_job(proc.pid, codes, float(os.environ.get("PARSL_AURORA_KILL_DELAY", "2")))
    proc.returncode = codes.get(proc.pid, code)  # reaped here; keep Popen from waiting again
    finish(d, job, code)


def finish(d: Path, job: dict, code: int) -> None:
    now = time.time()
    job.update(state="F", exit_status=code, mtime=now, etime=now)
    save(d, job)


# ---------------------------------------------------------------- qstat


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def as_pbs(job: dict) -> dict:
    """One job in the shape of `qstat -f -F json`."""
    ncpus = job["resources"].get("ncpus") or (
        re.search(r"ncpus=(\d+)", job["select"]) or [None, CPUS_PER_NODE])[1]
    out = {
        "Job_Name": job["name"], "Job_Owner": f"{job['owner']}@{SERVER}",
        "job_state": job["state"], "queue": job["queue"], "server": SERVER,
        "Account_Name": job["account"], "Checkpoint": "u",
        "ctime": time.ctime(job["ctime"]), "Error_Path": f"{SERVER}:{job['stderr']}",
        "Output_Path": f"{SERVER}:{job['stdout']}", "Join_Path": "n", "Keep_Files": "n",
        "Mail_Points": "n", "mtime": time.ctime(job["mtime"]), "Priority": 0,
        "qtime": time.ctime(job["ctime"]), "Rerunable": "False",
        "Resource_List": {**job["resources"], "ncpus": int(ncpus) * job["nodes"],
                          "nodect": job["nodes"], "place": job["resources"].get("place", "free"),
                          "select": job["select"], "walltime": job["walltime"]},
        "substate": {"Q": 10, "R": 42, "E": 50, "F": 92}.get(job["state"], 0),
        "Variable_List": {k: v for k, v in job["env"].items() if k.startswith("PBS_O_")}
        | {"PBS_O_WORKDIR": job["workdir"], "PBS_O_QUEUE": job["queue"]},
        "project": job["account"] or "_pbs_project_default",
        "Submit_arguments": job["script"],
    }
    if job["stime"]:
        hosts = host_names(job["nodes"])
        out["stime"] = time.ctime(job["stime"])
        out["exec_host"] = "+".join(f"{h}/0*{ncpus}" for h in hosts)
        out["exec_vnode"] = "+".join(f"({h}:ncpus={ncpus})" for h in hosts)
        out["resources_used"] = {"walltime": _hms((job["etime"] or time.time()) - job["stime"])}
        out["session_id"] = job.get("pid", 0)
    if job["state"] == "F":
        out["Exit_status"] = job["exit_status"]
        out["obittime"] = time.ctime(job["etime"])
    return out


def parse_qstat(args: list[str]) -> tuple[set[str], list[str]]:
    """qstat's flags (f, x, H, json) and the job ids asked for."""
    flags, ids = set(), []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-F":
            i += 1
            flags.add(args[i] if i < len(args) else "")
        elif a.startswith("-F"):
            flags.add(a[2:])
        elif a.startswith("-"):
            flags.update(a[1:])
        else:
            ids.append(a)
        i += 1
    return flags, ids


def qstat(args: list[str]) -> tuple[str, str, int]:
    flags, ids = parse_qstat(args)
    history = bool(flags & {"x", "H"})
    d = state_dir()
    errors, code, jobs = [], 0, {}
    if ids:
        for job_id in ids:
            job = load(d, job_id)
            if job is None:
                errors.append(f"qstat: Unknown Job Id {job_id}")
                code = RC_UNKNOWN
            elif job["state"] == "F" and not history:
                errors.append(f"qstat: {job['id']} Job has finished, use -x or -H to obtain "
                              "historical job information")
                code = RC_FINISHED
            else:
                jobs[job["id"]] = job
    else:
        jobs = {j["id"]: j for j in all_jobs(d) if history or j["state"] in ACTIVE}
    err = "".join(e + "\n" for e in errors)
    if "f" in flags and "json" in flags:
        # Real PBS prints this document even when some ids failed; Parsl parses stdout
        # without looking at the exit code, and takes a job missing from "Jobs" as ended.
        doc: dict = {"timestamp": int(time.time()), "pbs_version": "2022.1.6.fake",
                     "pbs_server": SERVER}
        if jobs:
            doc["Jobs"] = {i: as_pbs(j) for i, j in jobs.items()}
        return json.dumps(doc, indent=4) + "\n", err, code
    return table(list(jobs.values())), err, code


def table(jobs: list[dict]) -> str:
    """`qstat`'s default listing."""
    if not jobs:
        return ""
    lines = ["Job id            Name             User              Time Use S Queue",
             "----------------  ---------------- ----------------  -------- - -----"]
    for j in jobs:
        used = _hms((j["etime"] or time.time()) - j["stime"]) if j["stime"] else "0"
        lines.append(f"{j['id'][:16]:<16}  {j['name'][:16]:<16} {j['owner'][:16]:<16}  "
                     f"{used:>8} {j['state']} {j['queue']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- qdel


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def qdel(args: list[str]) -> tuple[str, int]:
    ids = [a for a in args if not a.startswith("-")]
    if not ids:
        return "usage: qdel [-W force] job_identifier...\n", 2
    d = state_dir()
    errors, code = [], 0
    for job_id in ids:
        job = load(d, job_id)
        if job is None:
            errors.append(f"qdel: Unknown Job Id {job_id}")
            code = RC_UNKNOWN
        elif job["state"] == "F":
            errors.append(f"qdel: Job has finished {job['id']}")
            code = RC_FINISHED
        else:
            # The supervisor sees the mark, then signals the job (SIGTERM, kill delay, SIGKILL).
            (d / "jobs" / f"{job['id']}.qdel").touch()
            if job["state"] == "R" and not _alive(job.get("supervisor")):
                finish(d, job, EXIT_DELETED)  # its supervisor is gone: nobody else will
    return "".join(e + "\n" for e in errors), code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if command == "qsub":
            print(qsub(args))
            return 0
        if command == "qstat":
            out, err, code = qstat(args)
            sys.stdout.write(out)
            sys.stderr.write(err)
            return code
        if command == "qdel":
            err, code = qdel(args)
            sys.stderr.write(err)
            return code
    except PBSError as e:
        print(e, file=sys.stderr)
        return e.code
    print(f"parsl_aurora.fake.pbs: unknown command {command!r} (choices: qsub, qstat, qdel)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
