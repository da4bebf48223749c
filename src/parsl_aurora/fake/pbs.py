"""Fake PBS Pro: `qsub`, `qstat` and `qdel` over one JSON file per job; no daemon.

qsub starts a small supervisor per job that runs the script, enforces walltime as PBS does
(SIGTERM, then SIGKILL after a kill delay) and records the end. See docs/fake-cluster.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from parsl_aurora.fake import SERVER, bin_dir, host_names

# PBS's exit codes for a job ended by walltime and by qdel (SIGTERM = 256 + 15).
EXIT_WALLTIME = -29
EXIT_DELETED = 271
WALLTIME = re.compile(r"^(?:(?:(\d+):)?(\d+):)?(\d+)$")
DEFAULT_WALLTIME = "1:00:00"  # used when a script names none, as a queue default would be
ACTIVE = ("Q", "R", "E", "H")


class PBSError(Exception):
    """A refusal, printed as PBS prints it; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def state_dir() -> Path:
    d = Path(os.environ.get("PARSL_AURORA_FAKE_DIR") or Path.cwd() / "fake-pbs")
    (d / "jobs").mkdir(parents=True, exist_ok=True)
    return d


def parse_walltime(text: str) -> int:
    m = WALLTIME.match(text.strip())
    if not m:
        raise PBSError("qsub: Illegal attribute or resource value Resource_List.walltime")
    h, mi, s = (int(x or 0) for x in m.groups())
    return h * 3600 + mi * 60 + s


def parse_options(args: list[str]) -> tuple[dict, list[str]]:
    """qsub's options (-q -A -N -o -e -l -v -V -j -m -S); returns (options, rest)."""
    opts: dict = {"l": []}
    takes_value = set("qANoelvjmSWP")
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-V":
            opts["V"] = True
        elif len(a) >= 2 and a[0] == "-" and a[1] in takes_value:
            value = a[2:] or (args[i + 1] if i + 1 < len(args) else None)
            if value is None:
                raise PBSError(f"qsub: option requires an argument -- '{a[1]}'", 2)
            i += 0 if a[2:] else 1
            if a[1] == "l":
                opts["l"].append(value)
            else:
                opts[a[1]] = value
        elif a.startswith("-"):
            raise PBSError(f"qsub: invalid option -- '{a[1:]}'", 2)
        else:
            return opts, args[i:]
        i += 1
    return opts, []


def directives(script: str) -> list[str]:
    """Arguments from the script's leading `#PBS` lines (PBS stops at the first command)."""
    out: list[str] = []
    for line in script.splitlines()[1:] if script.startswith("#!") else script.splitlines():
        s = line.strip()
        if s.startswith("#PBS"):
            out += s[4:].split()
        elif s and not s.startswith("#"):
            break
    return out


def resources(items: list[str]) -> dict[str, str]:
    res: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            key, _, value = part.partition("=")
            res[key.strip()] = value.strip()
    return res


def next_id(d: Path) -> int:
    with open(d / "seq", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
    return n


def save(d: Path, job: dict) -> None:
    tmp = d / "jobs" / f".{job['id']}.tmp"
    tmp.write_text(json.dumps(job))
    tmp.replace(d / "jobs" / f"{job['id']}.json")


def load(d: Path, job_id: str) -> dict | None:
    # Parsl passes full ids; PBS also accepts the bare sequence number.
    name = job_id if "." in job_id else f"{job_id}.{SERVER}"
    try:
        return json.loads((d / "jobs" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def qsub(args: list[str]) -> str:
    opts, rest = parse_options(args)
    if not rest:
        raise PBSError("usage: qsub [-A account] [-l resources] [-q queue] ... script", 2)
    script_path = Path(rest[0]).resolve()
    try:
        script = script_path.read_text()
    except OSError as e:
        raise PBSError(f"qsub: script file:: {e.strerror}: {rest[0]}") from None
    file_opts, _ = parse_options(directives(script))
    merged = {**file_opts, **{k: v for k, v in opts.items() if k != "l"}}
    res = resources(file_opts["l"] + opts["l"])
    select = res.get("select", "")
    m = re.match(r"^(\d+)(?::|$)", select)
    if not m or int(m.group(1)) < 1:
        raise PBSError("qsub: Job has no select (or an illegal one): add -l select=<nodes>")
    nodes = int(m.group(1))
    walltime = res.get("walltime", DEFAULT_WALLTIME)
    seconds = parse_walltime(walltime)
    if seconds < 1:
        raise PBSError("qsub: Illegal attribute or resource value Resource_List.walltime")
    d = state_dir()
    seq = next_id(d)
    job_id = f"{seq}.{SERVER}"
    name = merged.get("N") or script_path.name
    workdir = os.getcwd()
    aux = d / "aux"
    aux.mkdir(exist_ok=True)
    nodefile = aux / job_id
    nodefile.write_text("".join(h + "\n" for h in host_names(nodes)))
    env = dict(os.environ) if merged.get("V") else login_env()
    for pair in filter(None, merged.get("v", "").split(",")):
        k, _, v = pair.partition("=")
        env[k] = v if _ else os.environ.get(k, "")
    job = {
        "id": job_id, "name": name, "owner": os.environ.get("USER", "user"),
        "queue": merged.get("q", "workq"), "account": merged.get("A", ""),
        "nodes": nodes, "select": select, "walltime": walltime, "seconds": seconds,
        "resources": res, "script": str(script_path), "workdir": workdir,
        "stdout": merged.get("o") or f"{workdir}/{name}.o{seq}",
        "stderr": merged.get("e") or f"{workdir}/{name}.e{seq}",
        "nodefile": str(nodefile), "state": "Q", "exit_status": None,
        "ctime": time.time(), "stime": None, "mtime": time.time(), "env": env,
    }
    save(d, job)
    subprocess.Popen([sys.executable, "-m", "parsl_aurora.fake.pbs", "_supervise", job_id],
                     start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     env={**os.environ, "PARSL_AURORA_FAKE_DIR": str(d)})
    return job_id


def login_env() -> dict[str, str]:
    """What a PBS job starts with: a login-like environment, not the submitter's."""
    keep = ("HOME", "USER", "LOGNAME", "LANG", "TERM", "SHELL", "TMPDIR",
            "PARSL_AURORA_PYTHON", "PARSL_AURORA_HYDRA", "PARSL_AURORA_FAKE_DIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    # On Aurora mpiexec and qsub are on every job's PATH; here they are the fake's.
    env["PATH"] = f"{bin_dir()}:/usr/local/bin:/usr/bin:/bin"
    return env


def supervise(job_id: str) -> None:
    """Run one job to its end; the only writer of its state after qsub."""
    d = state_dir()
    job = load(d, job_id)
    jobdir = d / "jobs" / job_id.replace("/", "_")
    jobdir.mkdir(exist_ok=True)
    env = {**job["env"], "PBS_JOBID": job_id, "PBS_JOBNAME": job["name"],
           "PBS_NODEFILE": job["nodefile"], "PBS_O_WORKDIR": job["workdir"],
           "PBS_QUEUE": job["queue"], "PBS_ACCOUNT": job["account"],
           "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_JOBDIR": str(jobdir)}
    deleted = d / "jobs" / f"{job_id}.qdel"
    if deleted.exists():  # qdel'd while queued
        finish(d, job, EXIT_DELETED)
        return
    with open(job["stdout"], "ab") as out, open(job["stderr"], "ab") as err:
        # Real PBS starts jobs in $HOME; the fake uses a folder of its own so launcher files
        # (cmd_*.sh, *.nodes) stay inside the run directory.
        proc = subprocess.Popen(["/bin/bash", job["script"]], cwd=jobdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
    job.update(state="R", stime=time.time(), mtime=time.time(), pgid=proc.pid)
    save(d, job)
    try:
        code = proc.wait(timeout=job["seconds"])
    except subprocess.TimeoutExpired:
        terminate(proc)
        code = EXIT_WALLTIME
    else:
        if deleted.exists():
            code = EXIT_DELETED
        terminate(proc)  # whatever the script left running in its group ends with the job
    finish(d, job, code)


def terminate(proc: subprocess.Popen) -> None:
    delay = float(os.environ.get("PARSL_AURORA_KILL_DELAY", "2"))
    for sig, wait in ((signal.SIGTERM, delay), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            if proc.poll() is not None and not group_alive(proc.pid):
                return
            time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def finish(d: Path, job: dict, code: int) -> None:
    job.update(state="F", exit_status=code, mtime=time.time(), etime=time.time())
    save(d, job)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def as_pbs(job: dict) -> dict:
    """A job in the shape of `qstat -f -F json`."""
    out = {
        "Job_Name": job["name"], "Job_Owner": f"{job['owner']}@{SERVER}",
        "job_state": job["state"], "queue": job["queue"], "server": SERVER,
        "Account_Name": job["account"], "Checkpoint": "u", "ctime": time.ctime(job["ctime"]),
        "Error_Path": job["stderr"], "Output_Path": job["stdout"],
        "Resource_List": {**job["resources"], "select": job["select"],
                          "nodect": job["nodes"], "walltime": job["walltime"]},
        "mtime": time.ctime(job["mtime"]),
        "Variable_List": {k: job["env"].get(k, "") for k in ("PBS_O_HOME", "PBS_O_PATH")}
        | {"PBS_O_WORKDIR": job["workdir"]},
        "substate": {"Q": 10, "R": 42, "F": 92}.get(job["state"], 0),
    }
    if job["stime"]:
        out["stime"] = time.ctime(job["stime"])
        out["exec_host"] = "+".join(f"{h}/0*208" for h in host_names(job["nodes"]))
        out["resources_used"] = {"walltime": _hms((job.get("etime") or time.time())
                                                  - job["stime"])}
    if job["state"] == "F":
        out["Exit_status"] = job["exit_status"]
    return out


def qstat(args: list[str]) -> tuple[str, str, int]:
    history = "-x" in args or "-H" in args
    full = "-f" in args
    as_json = "json" in args
    ids = [a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] != "-F"]
    d = state_dir()
    errors, code, jobs = [], 0, {}
    if ids:
        for job_id in ids:
            job = load(d, job_id)
            if job is None:
                errors.append(f"qstat: Unknown Job Id {job_id}")
                code = 153
            elif job["state"] == "F" and not history:
                errors.append(f"qstat: {job['id']} Job has finished, use -x or -H to obtain "
                              "historical job information")
                code = 35
            else:
                jobs[job["id"]] = job
    else:
        for f in sorted((d / "jobs").glob("*.json"), key=lambda p: int(p.name.split(".")[0])):
            job = json.loads(f.read_text())
            if history or job["state"] in ACTIVE:
                jobs[job["id"]] = job
    err = "".join(e + "\n" for e in errors)
    if as_json and full:
        doc = {"timestamp": int(time.time()), "pbs_version": "2024.1.0-fake",
               "pbs_server": SERVER}
        if jobs:
            doc["Jobs"] = {i: as_pbs(j) for i, j in jobs.items()}
        return json.dumps(doc, indent=4) + "\n", err, code
    lines = ["Job id            Name             User              Time Use S Queue",
             "----------------  ---------------- ----------------  -------- - -----"]
    lines += [f"{i[:16]:<16}  {j['name'][:16]:<16} {j['owner'][:16]:<16}  "
              f"{'0':>8} {j['state']} {j['queue']}" for i, j in jobs.items()]
    return ("\n".join(lines) + "\n" if jobs else ""), err, code


def qdel(args: list[str]) -> tuple[str, int]:
    d = state_dir()
    errors, code = [], 0
    ids = [a for a in args if not a.startswith("-")]
    if not ids:
        return "usage: qdel [-W force] job_identifier...\n", 2
    for job_id in ids:
        job = load(d, job_id)
        if job is None:
            errors.append(f"qdel: Unknown Job Id {job_id}")
            code = 153
            continue
        if job["state"] == "F":
            errors.append(f"qdel: Job has finished {job['id']}")
            code = 35
            continue
        (d / "jobs" / f"{job['id']}.qdel").touch()
        if job.get("pgid"):
            try:
                os.killpg(job["pgid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
    return "".join(e + "\n" for e in errors), code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, args = argv[0], argv[1:]
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
        if command == "_supervise":
            supervise(args[0])
            return 0
    except PBSError as e:
        print(e, file=sys.stderr)
        return e.code
    print(f"unknown command {command}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
