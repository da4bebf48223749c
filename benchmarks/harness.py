"""The loop every benchmark shares: measure cases interleaved, summarise, judge, write markdown.

Pure functions do the statistics, verdicts and tables (tests/test_benchmarks.py checks them);
`interleave` and `fresh` run things. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Work folders the benchmarks keep between runs (venvs, copies of the repository); readable by
# the unprivileged user that some cases run as.
WORK = Path(os.environ.get("PARSL_AURORA_BENCH_DIR", "/tmp/parsl-aurora-bench"))
# Debian 12's Python: the image's interpreter, and one that `nobody` can run (pyenv's is in
# /root). Venvs made from it differ from the image only by the container.
DEBIAN_PYTHON = "/usr/bin/python3.11"
UNPRIVILEGED = "nobody"
LOCK = "container/requirements-3.11.lock"  # the benchmarks run on Debian 12's 3.11


# ---------------------------------------------------------------- pure: statistics, verdicts
# A run that failed is None in a case's values (null in results.json): it is counted and shown,
# and the figures are the successful runs'.

def succeeded(xs: Sequence[float | None]) -> list[float]:
    return [x for x in xs if x is not None]


def paired_ratios(case: Sequence[float | None], base: Sequence[float | None]) -> list[float]:
    """Run i of a case over run i of its baseline: the runs were interleaved, so a drift in the
    machine's load hits both halves of a pair alike and mostly cancels. A pair with a failed
    run on either side has no ratio."""
    return [c / b for c, b in zip(case, base) if c is not None and b is not None]


@dataclass(frozen=True)
class Target:
    """`limit` on a case's figure, or on its ratio to case `of` when one is named."""

    limit: float
    of: str | None = None
    better: str = "lower"  # or "higher"

    def text(self, unit: str) -> str:
        sign = "<=" if self.better == "lower" else ">="
        return f"{sign} {self.limit:g}x `{self.of}`" if self.of else f"{sign} {self.limit:g} {unit}"

    def as_dict(self) -> dict:
        return {"limit": self.limit, "of": self.of, "better": self.better}

    def met(self, x: float) -> bool:
        return x <= self.limit if self.better == "lower" else x >= self.limit


def verdict(values: Sequence[float], target: Target, fmt: str = "{:.2f}") -> str:
    """"yes" when every value (paired ratio, or run for an absolute target) meets the target,
    "no" when none does, else "within noise" with their range (min-max): only values all on
    one side of the target separate the two answers."""
    met = [target.met(x) for x in values]
    if met and all(met):
        return "yes"
    if not any(met):
        return "no"
    return f"within noise ({fmt.format(min(values))}-{fmt.format(max(values))})"


def failed_runs(values: Mapping[str, Sequence[float | None]], case: str,
                target: Target) -> str | None:
    """"k of n runs failed" (an absolute target), "k of n pairs had a failed run" (a relative
    one), or None when every run the verdict needs succeeded."""
    if target.of is None:
        pairs, what = [(x,) for x in values[case]], "runs failed"
    else:
        pairs, what = list(zip(values[case], values[target.of])), "pairs had a failed run"
    k = sum(None in p for p in pairs)
    return f"{k} of {len(pairs)} {what}" if k else None


def judged(values: Mapping[str, Sequence[float | None]], case: str, target: Target,
           fmt: str = "{:.2f}") -> tuple[float | None, str]:
    """(the figure the target is about, the verdict): the median of the paired ratios and their
    verdict for a relative target, the median and its verdict for an absolute one; both from
    the successful runs, the verdict saying how many failed (None: no run succeeded)."""
    if target.of is None:
        xs, fmt_ = succeeded(values[case]), fmt
    else:
        xs, fmt_ = paired_ratios(values[case], values[target.of]), "{:.2f}"
    failed = failed_runs(values, case, target)
    if not xs:
        return None, f"no verdict: {failed}"
    return statistics.median(xs), "; ".join([verdict(xs, target, fmt_), *filter(None, [failed])])


# ---------------------------------------------------------------- pure: markdown

def md_table(header: Sequence[str], rows: Sequence[Sequence[str]],
             right: Sequence[int] = ()) -> str:
    """A markdown table; columns whose index is in `right` are right-aligned."""
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def fmt_runs(xs: Sequence[float | None], fmt: str) -> str:
    return " ".join("failed" if x is None else fmt.format(x) for x in xs)


def failures(values: Mapping[str, Sequence[float | None]]) -> tuple[int, int]:
    """(failed runs, runs) over every case."""
    return (sum(x is None for xs in values.values() for x in xs),
            sum(len(xs) for xs in values.values()))


def group_table(group: Mapping, values: Mapping[str, Sequence[float]]) -> str:
    """One interleaved measurement as a table: median, min-max, every run ("failed" for a
    failed one; the figures are the others'), the median of the ratios to the group's baseline
    paired run by run, and each target with its verdict.

    group: {"unit", "fmt", "baseline" (case name or None), "cases" [names],
            "labels" {case: text}, "targets" {case: [Target.as_dict()]},
            "caveats" {case: text the verdict needs beside it}}
    """
    fmt, unit, base = group.get("fmt", "{:.2f}"), group["unit"], group.get("baseline")
    header = ["case", f"median ({unit})", "min-max", "runs"]
    header += [f"ratio to `{base}`"] if base else []
    header += ["target", "holds"]
    rows = []
    for case in group["cases"]:
        xs, ok = values[case], succeeded(values[case])
        row = [group.get("labels", {}).get(case, f"`{case}`"),
               fmt.format(statistics.median(ok)) if ok else "-",
               f"{fmt.format(min(ok))}-{fmt.format(max(ok))}" if ok else "-", fmt_runs(xs, fmt)]
        if base:
            ratios = paired_ratios(xs, values[base])
            row.append(f"{statistics.median(ratios):.2f}" if ratios else "-")
        targets = [Target(**t) for t in group.get("targets", {}).get(case, [])]
        row.append("; ".join(t.text(unit) for t in targets) or "-")
        row.append(_holds([judged(values, case, t, fmt)[1] for t in targets], group, case))
        rows.append(row)
    return md_table(header, rows, right=(1, 4) if base else (1,))


def _holds(verdicts: Sequence[str], group: Mapping, case: str) -> str:
    """The verdicts, and what the figure alone does not say (group["caveats"][case])."""
    caveat = group.get("caveats", {}).get(case)
    return "; ".join([*verdicts, *([caveat] if caveat else [])]) or "-"


def summary_rows(title: str, group: Mapping, values: Mapping[str, Sequence[float]]
                 ) -> list[list[str]]:
    """One summary row per target in a group: measure, figure, target, holds."""
    rows = []
    fmt, unit = group.get("fmt", "{:.2f}"), group["unit"]
    for case in group["cases"]:
        for t in (Target(**d) for d in group.get("targets", {}).get(case, [])):
            figure, holds = judged(values, case, t, fmt)
            shown = ("-" if figure is None else f"{figure:.2f}x" if t.of
                     else f"{fmt.format(figure)} {unit}")
            label = group.get("labels", {}).get(case, f"`{case}`")
            rows.append([f"{title}, {label}", shown, t.text(unit), _holds([holds], group, case)])
    return rows


def counts_text(runs: Mapping[str, int]) -> str:
    """"first result 7, throughput 5" from {part: runs}."""
    return ", ".join(f"{k} {v}" for k, v in runs.items())


# ---------------------------------------------------------------- running

def interleave(cases: Mapping[str, Callable[[], float | None]], runs: int,
               progress: str = "") -> dict[str, list[float | None]]:
    """Each case once per round, `runs` rounds, the starting case rotating each round, so a
    drift in the machine's load (other users, a page cache warming) hits every case alike.
    A case returns None for a run that failed; it stays in its place."""
    names = list(cases)
    out: dict[str, list[float | None]] = {c: [] for c in names}
    for r in range(runs):
        for c in names[r % len(names):] + names[:r % len(names)]:
            out[c].append(cases[c]())
        if progress:
            print(f"{progress}: round {r + 1}/{runs} done", file=sys.stderr, flush=True)
    return out


def timed(cmd: Sequence[str], **kwargs) -> float:
    """Wall seconds of a command that must succeed (its output thrown away)."""
    start = time.perf_counter()
    subprocess.run(list(cmd), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   **kwargs)
    return time.perf_counter() - start


def as_user(user: str | None, cmd: Sequence[str]) -> list[str]:
    """cmd run as `user` (root switches with runuser, keeping the environment), or as is."""
    return ["runuser", "-u", user, "--", *cmd] if user else list(cmd)


def fresh(cmd: Sequence[str], env: Mapping[str, str] | None = None,
          user: str | None = None) -> object | None:
    """Run cmd in a new empty folder (owned by `user`), return the JSON on its last stdout line,
    or None when the run failed (its stderr printed): a failed run is counted and shown, never
    run again, since rerunning until success would hide how often a config fails. (On the loaded
    shared host the pool of Parsl's default config sometimes exits with "Failed to find a viable
    address to connect to interchange": its probe of the host's addresses timed out.)
    """
    # A fake job's supervisor may still be writing its end state as the folder goes.
    with tempfile.TemporaryDirectory(prefix="bench-", ignore_cleanup_errors=True) as tmp:
        if user:
            shutil.chown(tmp, user)
        r = subprocess.run(as_user(user, cmd), cwd=tmp, env=dict(env or os.environ),
                           capture_output=True, text=True, check=False)
    if not r.returncode and r.stdout.strip():
        return json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{' '.join(cmd)} failed (exit {r.returncode}; recorded as a failed run):\n"
          f"{r.stderr[-2000:]}", file=sys.stderr, flush=True)
    return None


def python_env(python: str | os.PathLike = sys.executable) -> dict[str, str]:
    """The environment for a driver run by `python`: Parsl starts interchange.py and
    process_worker_pool.py from PATH, so that interpreter's scripts come first."""
    return {**os.environ, "PATH": f"{Path(python).parent}:{os.environ['PATH']}"}


def venv(folder: Path, *requirements: str, python: str = DEBIAN_PYTHON,
         pip_args: Sequence[str] = ()) -> Path:
    """A venv of `python` at folder with `requirements` installed by pip (compiled, not
    editable: as users install), made once and kept; returns its interpreter."""
    py, done = folder / "bin" / "python", folder / ".complete"
    if done.exists():
        return py
    folder.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)  # half made by an interrupted run
    subprocess.run([python, "-m", "venv", str(folder)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *pip_args, *requirements], check=True)
    done.touch()
    return py


def lock_pins(lock_text: str) -> str:
    """`name==version` lines of a hash-pinned lock, usable as pip constraints."""
    return "".join(line.split()[0] + "\n" for line in lock_text.splitlines()
                   if line and not line[0].isspace() and not line.startswith("#")
                   and "==" in line)


def _project(py: Path) -> Path:
    """This checkout installed into the venv afresh (its code changes between runs)."""
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                    str(ROOT)], check=True, stdout=subprocess.DEVNULL)
    return py


def _lock_key() -> str:
    """Short digest of the lock: a venv made from an older lock is not reused."""
    return hashlib.sha256((ROOT / LOCK).read_bytes()).hexdigest()[:12]


def locked_venv(parent: Path = WORK) -> Path:
    """A venv holding exactly the image's packages (container/requirements-3.11.lock, hash-checked,
    from the wheelhouse when there is one) and this checkout, so it and the image import the
    same code and only where it lives differs."""
    # `make image` keeps the locked wheels in .wheelhouse/base (and pip's in .../project).
    wheels = sorted(d for d in (ROOT / ".wheelhouse").glob("*") if d.is_dir())
    src = ["--no-index", *(f"--find-links={d}" for d in wheels)] if wheels else []
    return _project(venv(parent / f"locked-venv-{_lock_key()}", "--require-hashes", "-r",
                         str(ROOT / LOCK), pip_args=["--no-deps", *src]))


def user_venv(parent: Path = WORK) -> Path:
    """`pip install parsl-aurora[fake]` as a user does (no monitoring extra), held to the
    lock's versions, so it differs from the image only by what the image adds."""
    pins = WORK / f"lock-pins-{_lock_key()}.txt"
    WORK.mkdir(mode=0o755, parents=True, exist_ok=True)
    pins.write_text(lock_pins((ROOT / LOCK).read_text()))
    return _project(venv(parent / f"user-venv-{_lock_key()}", f"{ROOT}[fake]",
                         pip_args=["-c", str(pins)]))


def machine() -> str:
    """One line naming the machine and the versions that the figures depend on."""
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    osname = next((line.split("=", 1)[1].strip('"') for line in
                   Path("/etc/os-release").read_text().splitlines()
                   if line.startswith("PRETTY_NAME=")), platform.system())
    appt = shutil.which("apptainer")
    appt = (subprocess.run([appt, "--version"], capture_output=True, text=True,
                           check=False).stdout.strip() if appt else "no apptainer")
    from importlib.metadata import version

    return (f"{osname}, kernel {platform.release()}, {os.cpu_count()} cores, "
            f"{mem / 2**20:.1f} GiB, Python {platform.python_version()}, "
            f"Parsl {version('parsl')}, {appt}")


def report(title: str, result: Mapping) -> str:
    """A benchmark's section: its description, then each group's table, then its notes."""
    out = [f"## {title}", "", textwrap.fill(" ".join(result["about"].split()), 96,
                                          break_on_hyphens=False), ""]
    for group in result["groups"]:
        if group.get("title"):
            out += [f"**{group['title']}**", ""]
        out += [group_table(group, result["values"]), ""]
    out += [n.strip() + "\n" for n in result.get("notes", [])]
    return "\n".join(out).rstrip() + "\n"
