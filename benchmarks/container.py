"""The image at run time: `import parsl` from a fresh `apptainer exec`, pycs, the first result
with workers in the image, and metadata calls on a shared file system; each beside a venv.

    python benchmarks/container.py [--runs 10] [--first-runs 7] [--only import,pycs,first,syscalls]

Needs apptainer and ./aurora.sif (built with `python -m parsl_aurora.image build` if missing).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import harness
from harness import ROOT, UNPRIVILEGED, WORK, Target

SIF = ROOT / "aurora.sif"
RUNS = 10
FIRST_RUNS = 7
IMAGE_OVER_VENV = 1.1
IMPORT = "import parsl"
SQLALCHEMY = "import parsl, sys; print('sqlalchemy' in sys.modules)"
PARTS = ("import", "pycs", "first", "syscalls")
STRACE = "/usr/bin/strace"
SHARED = WORK / "shared"  # a pretend shared file system: a venv and a copy of the SIF
ABOUT = """
`python benchmarks/container.py`. The venvs are made from Debian 12's Python 3.11 (the image's
interpreter, `{python}`): for `import parsl`, a venv of exactly the image's packages
(`container/requirements-3.11.lock` from the wheelhouse, and this checkout); for the first result,
`pip install parsl-aurora[fake]` as a user installs it (compiled, not editable, no monitoring
extra) held to the lock's versions. Root mounts the SIF's squashfs in the kernel; an
unprivileged user (`runuser -u {user}`, the way Aurora users run) mounts it with squashfuse.
Each `apptainer exec` is a fresh one, so nothing is cached in a mount between runs.
"""


def image() -> Path:
    """./aurora.sif, built (or found up to date) through the project's own command."""
    subprocess.run([sys.executable, "-m", "parsl_aurora.image", "build"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return SIF


def home(user: str | None) -> dict[str, str]:
    """The environment for `user`: apptainer binds $HOME, and root's is closed to others."""
    if not user:
        return dict(os.environ)
    folder = WORK / f"home-{user}"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.chown(folder, user)
    return {**os.environ, "HOME": str(folder)}


def _exec(sif: Path, *args: str) -> list[str]:
    return ["apptainer", "exec", str(sif), "python", *args]


def import_parsl(runs: int, sif: Path, venv: Path) -> dict:
    """Wall seconds of `python -c 'import parsl'`, image beside venv, as root and as nobody."""
    cases = {}
    for who, user in (("root", None), (UNPRIVILEGED, UNPRIVILEGED)):
        env = {"env": home(user), "cwd": "/tmp"}
        cases[f"venv, {who}"] = partial(harness.timed, harness.as_user(
            user, [str(venv), "-c", IMPORT]), **env)
        cases[f"image, {who}"] = partial(harness.timed, harness.as_user(
            user, _exec(sif, "-c", IMPORT)), **env)
        # Apptainer's own start-up: the image's extra time that no Python setting can change.
        cases[f"image, {who}, `python -c pass`"] = partial(harness.timed, harness.as_user(
            user, _exec(sif, "-c", "pass")), **env)
    for run in cases.values():
        run()  # warm the page cache with every file each case reads
    values = harness.interleave(cases, runs, "import parsl")
    groups = [{"title": f"`{IMPORT}`, as {who}", "unit": "s", "fmt": "{:.3f}",
               "baseline": f"venv, {who}", "labels": {k: k for k in values},
               "cases": [f"venv, {who}", f"image, {who}", f"image, {who}, `python -c pass`"]}
              for who in ("root", UNPRIVILEGED)]
    return {"values": values, "groups": groups}


def count_stale(verbose_stderr: str) -> dict[str, int]:
    """From `python -v`'s stderr: pycs found stale (recompiled from source) and pycs used."""
    return {"stale": verbose_stderr.count("bytecode is stale"),
            "used": len(re.findall(r"^# code object from '.*\.pyc'$", verbose_stderr, re.MULTILINE))}


def pycs(sif: Path, venv: Path) -> str:
    """A table: `python -v -c 'import parsl'` in a fresh exec, pycs stale and used."""
    rows = []
    for label, user, cmd in (("image, root", None, _exec(sif, "-v", "-c", IMPORT)),
                             (f"image, {UNPRIVILEGED}", UNPRIVILEGED,
                              _exec(sif, "-v", "-c", IMPORT)),
                             ("venv, root", None, [str(venv), "-v", "-c", IMPORT])):
        r = subprocess.run(harness.as_user(user, cmd), env=home(user), cwd="/tmp",
                           capture_output=True, text=True, check=True)
        n = count_stale(r.stderr)
        sqla = subprocess.run(harness.as_user(user, [*cmd[:-3], "-c", SQLALCHEMY]),
                              env=home(user), cwd="/tmp", capture_output=True, text=True,
                              check=True).stdout.strip()
        rows.append([label, str(n["stale"]), str(n["used"]), sqla])
    return ("`python -v -c 'import parsl'` in a fresh exec: lines saying `bytecode is stale` "
            "(a pyc that Python ignores and recompiles in memory) and pycs loaded; and whether "
            "`import parsl` imports SQLAlchemy there:\n\n"
            + harness.md_table(["where", "stale pycs", "pycs used", "imports SQLAlchemy"],
                               rows, right=(1, 2)))


def first_result(runs: int, sif: Path, driver: Path) -> dict:
    """`in_job` from parsl.load to the first result as nobody: workers in the image
    (`container=`, via $PARSL_CONTAINER) beside the same config from a venv."""
    script = str(Path(__file__).with_name("first_result.py"))
    env = {**harness.python_env(driver), "HOME": home(UNPRIVILEGED)["HOME"]}
    env.pop("PARSL_CONTAINER", None)
    cases = {"workers from the venv": partial(harness.fresh, [str(driver), script, "--one",
                                                              "in_job"], env, UNPRIVILEGED),
             "workers in the image": partial(harness.fresh, [str(driver), script, "--one",
                                                             "in_job"],
                                             {**env, "PARSL_CONTAINER": str(sif)}, UNPRIVILEGED)}
    values = harness.interleave(cases, runs, "first result, container=")
    return {"values": values, "groups": [{
        "title": f"First result, `in_job`, as {UNPRIVILEGED}", "unit": "s",
        "baseline": "workers from the venv", "cases": list(cases), "targets": {
            "workers in the image": [Target(IMAGE_OVER_VENV, of="workers from the venv")
                                     .as_dict()]}}]}


# ---------------------------------------------------------------- shared-file-system pressure

# 1234 openat(AT_FDCWD, "/path", ...) = 3   |   [pid 1234] stat("/path", ...
_CALL = re.compile(r'^(?:\[pid\s+\d+\]\s*|\d+\s+)?(\w+)\((.*)$')
_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')


def count_under(trace: str, folder: str) -> dict[str, int]:
    """{syscall: calls} of an `strace -f` log whose first path argument lies under folder."""
    prefix, out = folder.rstrip("/"), {}
    for line in trace.splitlines():
        m = _CALL.match(line.strip())
        # A `<... call resumed>` line has no `call(`: the path was on its <unfinished> half.
        s = _STR.search(m.group(2)) if m else None
        if s and (s.group(1) == prefix or s.group(1).startswith(prefix + "/")):
            out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def _strace(cmd: list[str]) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "trace"
        subprocess.run([STRACE, "-f", "-e", "trace=%file,getdents64", "-o", str(log), *cmd],
                       check=True, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return count_under(log.read_text(errors="replace"), str(SHARED))


def syscalls(sif: Path) -> str:
    """A table: metadata calls under SHARED for `import parsl` from a venv and from the image
    there (as root: strace cannot follow the setuid starter for an ordinary user)."""
    venv = harness.locked_venv(SHARED)
    copy = SHARED / "aurora.sif"
    if not copy.exists() or copy.stat().st_mtime < sif.stat().st_mtime:
        shutil.copy2(sif, copy)
    rows = []
    for label, cmd in (("venv", [str(venv), "-c", IMPORT]),
                       ("image", ["apptainer", "exec", str(copy), "python", "-c", IMPORT])):
        calls = _strace(cmd)
        rows.append([label, str(sum(calls.values())),
                     ", ".join(f"{k} {n}" for k, n in sorted(calls.items()))])
    return (f"File-system calls (`strace -f -e trace=%file,getdents64`, as root) whose path lies "
            f"under `{SHARED}`, a pretend shared file system holding a venv of the image's "
            "packages and a copy of the SIF, for `python -c 'import parsl'` from each (the "
            "venv's interpreter and stdlib live outside it, so its count is a lower bound; "
            "reads from the open SIF are not path calls):\n\n"
            + harness.md_table(["from", "calls", "by call"], rows, right=(1,)))


def measure(runs: int = RUNS, first_runs: int = FIRST_RUNS, parts=PARTS) -> dict:
    sif = image()
    values, groups, notes = {}, [], []
    locked = harness.locked_venv()
    if "import" in parts:
        r = import_parsl(runs, sif, locked)
        values.update(r["values"])
        groups += r["groups"]
    if "first" in parts:
        r = first_result(first_runs, sif, harness.user_venv())
        values.update(r["values"])
        groups += r["groups"]
    if "pycs" in parts:
        notes.append(pycs(sif, locked))
    if "syscalls" in parts and Path(STRACE).exists():
        notes.append(syscalls(sif))
    return {"about": ABOUT.format(python=harness.DEBIAN_PYTHON, user=UNPRIVILEGED),
            "runs": runs, "first_runs": first_runs, "values": values, "groups": groups,
            "notes": notes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=RUNS, help="runs of each command")
    p.add_argument("--first-runs", type=int, default=FIRST_RUNS, help="first-result runs")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated")
    a = p.parse_args()
    print(harness.report("The image at run time",
                         measure(a.runs, a.first_runs, a.only.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
