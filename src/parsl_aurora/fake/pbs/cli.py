"""The fake's command lines: what qsub, qstat and qdel read, and what they print and return."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from parsl_aurora.fake.pbs import (
    QUEUES,
    RC_FINISHED,
    RC_ILLEGAL,
    RC_UNKNOWN_JOB,
    RC_UNKNOWN_QUEUE,
    PBSError,
    render,
    store,
    supervisor,
)

WALLTIME = re.compile(r"^(?:(?:(\d+):)?(\d+):)?(\d+)$")
SELECT = re.compile(r"^([1-9]\d*)((?::[A-Za-z_]\w*=[^:+]+)*)$")
# Options whose value follows them, as in PBS's qsub(1); -V and -f take none.
VALUED = set("qANoelvjmSWPak")
FLAGS = set("Vf")


# ---------------------------------------------------------------- qsub: pure parsing
def parse_walltime(text: str) -> int:
    """`[[H:]M:]S` -> seconds; PBS refuses anything else, and so do we (0 means no limit)."""
    m = WALLTIME.match(text.strip())
    if not m:
        raise PBSError("qsub: Illegal attribute or resource value Resource_List.walltime",
                       RC_ILLEGAL)
    h, mi, s = (int(x or 0) for x in m.groups())
    return h * 3600 + mi * 60 + s


def parse_options(args: list[str], where: str = "") -> tuple[dict, list[str]]:
    """qsub's options -> ({letter: value, "l": [..]}, operands after the options).

    `where` is "directive" for a script's #PBS lines, whose errors PBS reports differently.
    """
    opts: dict = {"l": []}
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return opts, args[i + 1:]
        if len(a) == 2 and a[0] == "-" and a[1] in FLAGS:
            opts[a[1]] = True
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
            if where == "directive":
                raise PBSError(f"qsub: invalid option -- '{a[1:]}'\nqsub: directive error: {a} ",
                               1)
            raise PBSError(f"qsub: invalid option -- '{a[1:]}'\nusage: qsub [-a date_time] "
                           "[-A account_string] [-e path] [-f ] [-j oe|eo] [-l resource_list] "
                           "[-m mail_options] [-N jobname] [-o path] [-P project] [-q queue] "
                           "[-S path] [-W otherattributes=value...] [-v variable_list] [-V ] "
                           "[script]  (the options this fake takes)", 2)
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
    file_opts, _ = parse_options(directives(script), "directive")
    cli_opts, _ = parse_options(cli)
    merged = {k: v for k, v in [*file_opts.items(), *cli_opts.items()] if k != "l"}
    res = resources(file_opts["l"] + cli_opts["l"])
    # PBS's server default: one chunk of one CPU.
    select = res.get("select", "1")
    m = SELECT.match(select)
    if not m:
        # PBS names the attribute only when the value does not parse at all.
        bare = select.isdigit()
        raise PBSError("qsub: Illegal attribute or resource value"
                       + ("" if bare else " Resource_List.select"), RC_ILLEGAL)
    chunk = resources([m.group(2).lstrip(":").replace(":", ",")]) if m.group(2) else {}
    if "walltime" not in res:
        # Aurora's queues give a default; the fake asks for it, so no job runs unbounded.
        raise PBSError("qsub: Job rejected: no walltime; add -l walltime=HH:MM:SS "
                       "(on the command line or as #PBS -l)")
    seconds = parse_walltime(res["walltime"])
    return {"opts": merged, "resources": res, "select": select, "nodes": int(m.group(1)),
            "ncpus": int(chunk.get("ncpus", 1)), "walltime": res["walltime"],
            "seconds": seconds}


# ---------------------------------------------------------------- the three commands
def qsub(args: list[str], stdin_text: str | None = None) -> str:
    _, rest = parse_options(args)
    if rest:
        script_path = Path(rest[0]).resolve()
        try:
            script = script_path.read_text()
        except OSError as e:
            raise PBSError(f"qsub: script file:: {e.strerror}") from None
        name = script_path.name
    else:  # a job read from standard input, as `echo cmd | qsub` does
        script = stdin_text if stdin_text is not None else sys.stdin.read()
        script_path, name = None, "STDIN"
    req = request(args, script)
    env = supervisor.job_environment(req["opts"], dict(os.environ))
    job = store.submit(req, script, script_path, name, env)
    if not job.get("dropped"):
        supervisor.start(job["id"])
    return job["id"]


def parse_qstat(args: list[str]) -> tuple[set[str], list[str], list[str]]:
    """qstat's flags (f, x, H, json), the job ids asked for, and the users of `-u`."""
    flags, ids, users = set(), [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-F":
            i += 1
            flags.add(args[i] if i < len(args) else "")
        elif a.startswith("-F"):
            flags.add(a[2:])
        elif a == "-u" or (a.startswith("-u") and len(a) > 2):
            if a == "-u":
                i += 1
            users += (args[i] if a == "-u" and i < len(args) else a[2:]).split(",")
        elif a.startswith("-"):
            flags.update(a[1:])
        else:
            ids.append(a)
        i += 1
    return flags, ids, users


def qstat(args: list[str]) -> tuple[str, str, int]:
    flags, ids, users = parse_qstat(args)
    if "Q" in flags:
        unknown = [q for q in ids if q not in QUEUES]
        if unknown:
            return "", f"qstat: Unknown queue {unknown[0]}\n", RC_UNKNOWN_QUEUE
        table = {q: QUEUES[q] for q in ids} if ids else QUEUES
        jobs = store.all_jobs(store.state_dir())
        return render.queues(table, jobs, "f" in flags), "", 0
    if users:
        if "json" in flags:  # -u is for listings; PBS refuses it with JSON
            return "", "qstat: conflicting options.\n", 2
        jobs = [j for j in store.all_jobs(store.state_dir())
                if j["owner"] in users and j["state"] != "F"]
        return render.alternate(jobs), "", 0
    history = bool(flags & {"x", "H"})
    d = store.state_dir()
    errors, code, jobs = [], 0, {}
    if ids:
        for job_id in ids:
            job = store.load(d, job_id)
            if job is None:
                errors.append(f"qstat: Unknown Job Id {store.full_id(job_id)}")
                code = RC_UNKNOWN_JOB
            elif job["state"] == "F" and not history:
                errors.append(f"qstat: {job['id']} Job has finished, use -x or -H to obtain "
                              "historical job information")
                code = RC_FINISHED
            else:
                jobs[job["id"]] = job
    else:
        jobs = {j["id"]: j for j in store.all_jobs(d) if history or j["state"] != "F"}
    err = "".join(e + "\n" for e in errors)
    if "f" in flags and "json" in flags:
        # Real PBS prints the document even when some ids failed (without "Jobs" when none is
        # left); Parsl parses stdout without looking at the exit code.
        return render.document(list(jobs.values())), err, code
    return render.table(list(jobs.values())), err, code


def qdel(args: list[str]) -> tuple[str, int]:
    ids = [a for a in args if not a.startswith("-")]
    if not ids:
        return "usage: qdel [-W force] job_identifier...\n", 2
    d = store.state_dir()
    errors, code = [], 0
    for job_id in ids:
        job = store.load(d, job_id)
        if job is None:
            errors.append(f"qdel: Unknown Job Id {store.full_id(job_id)}")
            code = RC_UNKNOWN_JOB
        elif job["state"] == "F":
            errors.append(f"qdel: Job has finished {job['id']}")
            code = RC_FINISHED
        else:
            store.delete(d, job)
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
