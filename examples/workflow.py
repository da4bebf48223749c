"""ALCF's single-tile ensemble: 12 Python tasks and 12 `hello-affinity` tasks, one per GPU tile.

The config comes from $PARSL_SITE and $PARSL_MODE (e.g. aurora/multi_job, or local/multi_job on
the fake cluster), so this same file runs on Aurora and on a laptop. Results go to ./output.
"""

import os
import sys
from pathlib import Path

import parsl
from parsl import bash_app, python_app

import site_configs
from parsl_aurora import progress
from parsl_aurora.errors import run_main


# cache=True lets a config's resume=True skip tasks a killed earlier run finished (else no-op).
@python_app(cache=True)
def where_am_i(task: int, meeting: str, tasks: int) -> dict:
    """Report the node, tile and CPUs this task ran on, once all `tasks` are running at once.

    Waiting for the others (through files in a shared folder, up to a minute) keeps each worker
    busy, so every task lands on a different worker and so on a different tile.
    """
    import os
    import socket
    import time
    from pathlib import Path

    Path(meeting, str(task)).touch()
    deadline = time.time() + 60
    while len(os.listdir(meeting)) < tasks and time.time() < deadline:
        time.sleep(0.05)
    return {
        "task": task,
        "node": os.environ.get("PARSL_AURORA_HOST") or socket.gethostname(),
        "tile": os.environ.get("ZE_AFFINITY_MASK", "unset"),
        "cpus": sorted(os.sched_getaffinity(0)),
    }


# cache=True lets a config's resume=True skip tasks a killed earlier run finished (else no-op).
@bash_app(cache=True)
def hello_affinity(task: int, meeting: str, tasks: int, stdout=None, stderr=None):
    # Meets the others first, as where_am_i does, so each lands on its own worker and tile.
    # On Aurora and in the image, hello-affinity is on PATH (the bundle's stand-in for ALCF's
    # SYCL hello_affinity); swap in your own executable here.
    return (f"touch {meeting}/{task}; for _ in $(seq 1200); do "
            f"[ $(ls {meeting} | wc -l) -ge {tasks} ] && break; sleep 0.05; done; "
            "hello-affinity")


def cpu_ranges(cpus: list[int]) -> str:
    from parsl_aurora.topology import ranges

    return ranges(cpus) if cpus else "-"


def report(rows: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for r in rows:
            print(r["task"], r["node"], r["tile"], cpu_ranges(r["cpus"]))
        return
    table = Table(title="Where each task ran")
    for col in ("task", "fake node" if os.environ.get("PARSL_SITE") == "local" else "node",
                "tile (ZE_AFFINITY_MASK)", "CPUs"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["task"]), r["node"], r["tile"], cpu_ranges(r["cpus"]))
    Console().print(table)


def main() -> int:
    out = Path.cwd() / "output"
    meeting, hello_meeting = out / "running", out / "running-hello"
    for folder in (meeting, hello_meeting):
        folder.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            f.unlink()
    with parsl.load(site_configs.load()):
        rows = [where_am_i(i, str(meeting), 12) for i in range(12)]
        hellos = [hello_affinity(i, str(hello_meeting), 12,
                                 stdout=str(out / f"hello_{i}.stdout"),
                                 stderr=str(out / f"hello_{i}.stderr")) for i in range(12)]
        # A bar on a terminal; in a log (nohup, PBS output) the run directory, then a line of
        # tasks done/failed/pending and blocks running every $PARSL_AURORA_PROGRESS_EVERY s.
        results = progress.wait(rows + hellos, "python and hello-affinity tasks")
        rows, codes = results[:len(rows)], results[len(rows):]
    report(rows)
    tiles = {(r["node"], r["tile"]) for r in rows}
    nodes = {r["node"] for r in rows}
    print(f"{len(rows)} python tasks on {len(tiles)} distinct tiles of {len(nodes)} node(s); "
          f"hello-affinity exit codes {sorted(set(codes))}; outputs in {out}/")
    print((out / "hello_0.stdout").read_text().strip())
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    # A bad config or image is one line on stderr and exit status 2, as with parsl-aurora.
    sys.exit(run_main(main))
