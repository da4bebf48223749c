"""Scheduler calls per minute while `qsub` refuses or `qstat` fails, and time to the first `qsub`.

    python benchmarks/scheduler.py [--runs 2] [--window 60] [--latency-runs 7]

Stand-in `qsub`/`qstat`/`qdel` scripts, generated here and put first on PATH, log every call
and either answer as PBS does when it refuses or fails, or hand the call to the fake's own
command. `multi_job` is held to Parsl 2025.1.13's PBSProProvider + HTEX with the same tick.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import harness
from configs import LABELS, htex_pbs, site
from harness import Target

RUNS = 2
LATENCY_RUNS = 7
WINDOW = 60.0
CONFIGS = {"multi_job": lambda: site("multi_job"), "tuned_pbs": htex_pbs}
CALLS_PER_MINUTE = 10
FIRST_QSUB = 0.5
# What PBS prints (../shared/reference/openpbs.md, measured on OpenPBS 23.06): a per-user queue
# limit refuses qsub with exit 38; a qstat that cannot reach or authenticate to the server exits
# 255 and still prints the JSON header, without "Jobs".
SERVER = "aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"
REFUSED = "qsub: would exceed queue generic's per-user limit"
CANNOT_CONNECT = ("pbs_iff: cannot connect to host\nauth: error returned: -1\n"
                  f"auth: Unable to authenticate connection ({SERVER}:15001)\n"
                  f"qstat: cannot connect to server {SERVER} (errno=-1)")
HEADER = ('{\n\t"timestamp":\t1796181189,\n\t"pbs_version":\t"23.06.06",\n'
          f'\t"pbs_server":\t"{SERVER}"\n}}')
# What each scenario's stand-ins do; anything not named is handed to the fake.
SCENARIOS = {
    "qsub refused": {"qsub": (REFUSED, "", 38)},
    "qstat fails (JSON header, exit 255)": {"qstat": (CANNOT_CONNECT, HEADER, 255)},
    # A reply cut off mid-document, as when the connection drops.
    "qstat prints non-JSON": {"qstat": (CANNOT_CONNECT, HEADER[:40], 255)},
}
NOTHING_FAILS = "nothing fails"
ABOUT = """
`python benchmarks/scheduler.py`: scheduler commands a workflow runs per minute when PBS says
no, counted by stand-in `qsub`, `qstat` and `qdel` scripts that the benchmark writes and puts
first on PATH. Each logs its call, then either answers as PBS does (`qsub` refused by a
per-user queue limit: `{refused}` on stderr, exit 38; `qstat` unable to reach the server:
exit 255 with only the JSON header on stdout, or with a cut-off reply that is not JSON) or hands
the call to the fake PBS. The workflow submits one task that sleeps through the window, so
there is always demand for a block; calls are counted for the first {window:g} s after
`parsl.load`. `site_configs.load("local", "multi_job")` is held to Parsl 2025.1.13's own
PBSProProvider + HTEX with the same strategy tick (`tuned_pbs`; its provider asks `qstat` every
60 s, the fake site's every second). The last table is the time from `parsl.load` to the first
`qsub` when nothing fails.
"""


# ---------------------------------------------------------------- pure

def standin(command: str, real: str, log: str, answer: tuple[str, str, int] | None) -> str:
    """A POSIX sh script standing in for `command`: it logs `<epoch seconds> <command>` to log,
    then prints answer's (stderr, stdout) and exits with its code, or, with no answer, runs
    `real` (the fake's own command) with its arguments."""
    head = ("#!/bin/sh\n"
            f"printf '%s {command}\\n' \"$(date +%s.%N)\" >> {shlex.quote(log)}\n")
    if answer is None:
        return head + f'exec {shlex.quote(real)} "$@"\n'
    err, out, code = answer
    lines = [f"printf '%s\\n' {shlex.quote(err)} >&2"] if err else []
    lines += [f"printf '%s\\n' {shlex.quote(out)}"] if out else []
    return head + "".join(line + "\n" for line in lines) + f"exit {code}\n"


def calls(log_text: str, start: float, window: float) -> dict[str, int]:
    """{command: calls} logged in [start, start + window)."""
    out = {"qsub": 0, "qstat": 0, "qdel": 0}
    for line in log_text.splitlines():
        stamp, _, command = line.partition(" ")
        if start <= float(stamp) < start + window:
            out[command] = out.get(command, 0) + 1
    return out


# ---------------------------------------------------------------- one run, in its own process

def sleeper(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def _install_standins(scenario: str) -> Path:
    """The stand-ins for `scenario` in ./standin, first on PATH; returns the call log."""
    import os

    from parsl_aurora import fake

    folder, log = Path("standin").resolve(), Path("calls.log").resolve()
    folder.mkdir()
    log.touch()
    answers = SCENARIOS.get(scenario, {})
    for command in ("qsub", "qstat", "qdel"):
        path = folder / command
        path.write_text(standin(command, str(fake.bin_dir() / command), str(log),
                                answers.get(command)))
        path.chmod(0o755)
    os.environ["PATH"] = f"{folder}:{os.environ['PATH']}"
    return log


def one(scenario: str, config: str, window: float) -> dict:
    """Calls in the window (or, with nothing failing, seconds to the first qsub)."""
    import parsl

    built = CONFIGS[config]()  # prepares the fake cluster, then the stand-ins go in front
    log = _install_standins(scenario)
    start = time.time()
    dfk = parsl.load(built)
    try:
        if scenario == NOTHING_FAILS:
            while "qsub" not in log.read_text() and time.time() < start + window:
                time.sleep(0.01)
            first = next((float(line.split()[0]) for line in log.read_text().splitlines()
                          if line.endswith(" qsub")), None)
            return {"first_qsub": None if first is None else first - start}
        future = parsl.python_app(sleeper)(window + 30)
        time.sleep(max(0.0, start + window - time.time()))
        counted = calls(log.read_text(), start, window)
        state = "running"
        if future.done() and future.exception() is not None:
            e = future.exception()
            state = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        return {**counted, "state": state}
    finally:
        dfk.cleanup()
        parsl.clear()


# ---------------------------------------------------------------- measuring and reporting

def _run(scenario: str, config: str, window: float, env: dict, keep: dict) -> float | None:
    """A run's figure, or None when the run failed (no qsub at all counts as failed)."""
    r = harness.fresh([sys.executable, __file__, "--window", str(window), "--one", scenario,
                       config], env)
    if scenario == NOTHING_FAILS:
        if r is None or r["first_qsub"] is None:
            print(f"{config}: no qsub within {window} s of parsl.load", file=sys.stderr)
            return None
        return r["first_qsub"]
    keep.setdefault(f"{scenario} / {config}", []).append(r)
    return None if r is None else (r["qsub"] + r["qstat"] + r["qdel"]) * 60 / window


def failures(details: dict) -> dict[str, str]:
    """{case: "the workflow failed: <exception types>"} for cases where a run's task failed:
    few calls from a workflow that gave up are no success, so the verdict says so beside it."""
    out = {}
    for case, runs in details.items():
        failed = sorted({r["state"].split(": ")[1] for r in runs
                         if r is not None and r["state"] != "running"})
        if failed:
            out[case] = "the workflow failed: " + ", ".join(failed)
    return out


def details_table(keep: dict) -> str:
    """Per command, the calls of each run ("failed" for a run that failed), and how the
    workflow stood at the end."""
    rows = []
    for case, runs in keep.items():
        per = {c: " ".join("failed" if r is None else str(r[c]) for r in runs)
               for c in ("qsub", "qstat", "qdel")}
        states = sorted({"the run failed" if r is None else r["state"] for r in runs})
        rows.append([case, per["qsub"], per["qstat"], per["qdel"], "; ".join(states)])
    return harness.md_table(["case", "qsub (per run)", "qstat", "qdel", "task at the end"], rows)


def measure(runs: int = RUNS, window: float = WINDOW, latency_runs: int = LATENCY_RUNS,
            scenarios=tuple(SCENARIOS)) -> dict:
    env, keep = harness.python_env(), {}
    cases = {f"{s} / {c}": partial(_run, s, c, window, env, keep)
             for s in scenarios for c in CONFIGS}
    values = harness.interleave(cases, runs, "scheduler calls")
    values.update(harness.interleave(
        {f"{NOTHING_FAILS} / {c}": partial(_run, NOTHING_FAILS, c, window, env, keep)
         for c in CONFIGS}, latency_runs, "first qsub"))
    labels = {k: f"{k.split(' / ')[0]}: {LABELS[k.split(' / ')[1]]}" for k in values}
    groups = [{"title": f"Calls per minute, first {window:g} s",
               "unit": "calls/min", "fmt": "{:.0f}", "baseline": None, "labels": labels,
               "cases": list(cases), "caveats": failures(keep), "targets": {
                   f"{s} / multi_job": [Target(CALLS_PER_MINUTE).as_dict()] for s in scenarios}},
              {"title": "Seconds from `parsl.load` to the first `qsub`",
               "unit": "s", "fmt": "{:.3f}", "baseline": f"{NOTHING_FAILS} / tuned_pbs",
               "labels": labels, "cases": [f"{NOTHING_FAILS} / {c}" for c in CONFIGS],
               "targets": {f"{NOTHING_FAILS} / multi_job": [Target(FIRST_QSUB).as_dict()]}}]
    notes = ["Calls of each command in each run, and the sleeping task at the end of the window "
             "(`running`: still waiting or running, i.e. the workflow goes on):\n\n"
             + details_table(keep)]
    return {"about": ABOUT.format(refused=REFUSED, window=window), "runs": runs,
            "latency_runs": latency_runs, "values": values, "groups": groups, "notes": notes,
            "details": keep}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=RUNS)
    p.add_argument("--window", type=float, default=WINDOW, help="seconds counted per run")
    p.add_argument("--latency-runs", type=int, default=LATENCY_RUNS)
    p.add_argument("--one", nargs=2, metavar=("SCENARIO", "CONFIG"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(*a.one, a.window)))
        return 0
    print(harness.report("Scheduler calls", measure(a.runs, a.window, a.latency_runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
