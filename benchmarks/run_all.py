"""Run the benchmarks and rewrite docs/benchmarks.md from what this run measured.

    python benchmarks/run_all.py                        # everything (nox -s bench)
    python benchmarks/run_all.py --only scheduler       # one part; the document has only it
    python benchmarks/run_all.py --quick --json /tmp/r.json --doc /tmp/b.md   # code works
    python benchmarks/run_all.py --only image_build --merge   # re-run one part, keep the rest
    python benchmarks/run_all.py --from-json            # re-render the last saved results

Raw results go to --json (benchmarks/results.json, committed with the document it renders:
tests/test_claims.py checks that the two agree). Every figure in the document, the header's run
counts included, comes from the results it is written from; each part says when it was measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

import first_result
import harness
import image_build
import scheduler
import throughput

import container

DOC = harness.ROOT / "docs" / "benchmarks.md"
RESULTS = harness.ROOT / "benchmarks" / "results.json"
# part -> (section title, runs it, the run counts it reports)
PARTS = {
    "first_result": ("Time from `parsl.load` to the first result",
                     lambda a: first_result.measure(a.runs), ("runs",)),
    "throughput": ("Throughput of no-op tasks",
                   lambda a: throughput.measure(a.throughput_runs, a.tasks), ("runs",)),
    "scheduler": ("Scheduler calls while PBS refuses or fails",
                  lambda a: scheduler.measure(a.scheduler_runs, a.window, a.runs),
                  ("runs", "latency_runs")),
    "container": ("The image at run time",
                  lambda a: container.measure(a.container_runs, a.runs), ("runs", "first_runs")),
    "image_build": ("Image build", lambda a: image_build.measure(a.builds), ("runs",)),
}
NEEDS_APPTAINER = ("container", "image_build")
QUICK = {"runs": 2, "throughput_runs": 2, "tasks": 1000, "scheduler_runs": 1,
         "container_runs": 3, "builds": 1}
HOW = """
Written by `python benchmarks/run_all.py` (`nox -s bench`, `make bench`) from its own
measurements; do not edit by hand. Cases are measured side by side, interleaved run by run (the
first case rotating each round), and each run of Parsl is a fresh process in a fresh folder.
Figures are medians, with the spread (min-max) and every run shown. A run that failed is not
run again: it shows as `failed` among the runs, the figures are the successful runs', and a
verdict with failed runs says how many. Ratios to a baseline are medians of the paired ratios
(run i of the case over run i of its baseline, measured one after the other; a pair with a
failed run has none), and a target relative to a baseline is judged on those paired ratios:
**yes** when every paired ratio meets the target, **no** when none does, and **within noise**,
with the range (min-max) of the paired ratios, when some do and some do not: only ratios all on
one side of the target separate the two answers. An absolute target is judged the same way on
the case's own runs. No ratio divides runs of two provider kinds (LocalProvider, PBSProProvider).
The bench session installs the project as users do
(`pip install .[fake,image,bench]`: compiled, not editable, without the monitoring extra;
`bench` adds only mfusepy, for the shared file system's stand-in); the image
carries what `container/requirements-3.11.lock` holds.
"""


def counts(results: dict) -> list[list[str]]:
    """One row per part: its run counts, its failed runs, when it was measured (UTC) and how
    long it took."""
    rows = []
    for part, r in results.items():
        keys = PARTS[part][2]
        failed, total = harness.failures(r["values"])
        rows.append([PARTS[part][0], ", ".join(f"{k.replace('_', ' ')} {r[k]}" for k in keys),
                     f"{failed} of {total}", r["measured"], f"{r['seconds']:.0f}",
                     f"{r['load']:.1f}"])
    return rows


def render(results: dict) -> str:
    """docs/benchmarks.md from results {part: measured result}, in PARTS order."""
    results = {p: results[p] for p in PARTS if p in results}
    machines = sorted({r["machine"] for r in results.values()})
    out = ["# Benchmarks", "", HOW.strip(), "",
           "Machine: " + "; or ".join(machines) + ".", "",
           harness.md_table(["part", "runs per case", "failed runs", "measured (UTC)",
                             "took (s)", "load average after"], counts(results),
                            right=(2, 4, 5)), ""]
    rows = [row for p, r in results.items() for g in r["groups"]
            for row in harness.summary_rows(f"{PARTS[p][0]}: {g.get('title', '')}", g,
                                            r["values"])]
    if rows:
        out += ["## Summary", "", harness.md_table(["measure", "figure", "target", "holds"],
                                                   rows, right=(1,)), ""]
    out += [harness.report(PARTS[p][0], r) for p, r in results.items()]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated of {list(PARTS)}")
    p.add_argument("--runs", type=int, default=first_result.RUNS,
                   help="first-result runs per case (also the container's and first-qsub's)")
    p.add_argument("--throughput-runs", type=int, default=throughput.RUNS)
    p.add_argument("--tasks", type=int, default=throughput.TASKS)
    p.add_argument("--scheduler-runs", type=int, default=scheduler.RUNS)
    p.add_argument("--window", type=float, default=scheduler.WINDOW,
                   help="seconds of scheduler calls counted per run")
    p.add_argument("--container-runs", type=int, default=container.RUNS)
    p.add_argument("--builds", type=int, default=image_build.BUILDS)
    p.add_argument("--quick", action="store_true", help=f"small counts: {QUICK}")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--from-json", action="store_true", help="render saved results, run nothing")
    p.add_argument("--merge", action="store_true",
                   help="keep the saved results of parts not run now (each says when it ran)")
    p.add_argument("--doc", type=Path, default=DOC,
                   help="the document to write (a --quick run: somewhere else than the default)")
    p.add_argument("--no-doc", action="store_true", help="write no document")
    a = p.parse_args()
    if a.quick:
        vars(a).update(QUICK)
    if a.from_json:
        results = json.loads(a.json.read_text())
    else:
        results = json.loads(a.json.read_text()) if a.merge and a.json.exists() else {}
        parts = a.only.split(",")
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            p.error(f"--only: unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
        if not shutil.which("apptainer"):
            print("apptainer is not on PATH: skipping " + ", ".join(NEEDS_APPTAINER),
                  file=sys.stderr)
            parts = [x for x in parts if x not in NEEDS_APPTAINER]
        for part in parts:
            print(f"running {part} ...", file=sys.stderr, flush=True)
            start = time.monotonic()
            r = PARTS[part][1](a)
            r.update(seconds=time.monotonic() - start, machine=harness.machine(),
                     load=os.getloadavg()[0],
                     measured=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"))
            results[part] = r
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(results, indent=1))
    doc = render(results)
    print(doc)
    if not a.no_doc:
        a.doc.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
