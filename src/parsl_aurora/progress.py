"""Waiting for a workflow's tasks where someone can see it: rich's progress bar on a terminal;
one line every N seconds (tasks done, failed, pending; blocks running) when stdout is a log file.

`wait(futures)` is the one call: `results = progress.wait(futures)`.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from collections.abc import Iterable, Mapping

from parsl_aurora.errors import ConfigError

# How often a log gets a line: often enough to see a stall within minutes, sparse enough that a
# week-long campaign writes about ten thousand lines. $PARSL_AURORA_PROGRESS_EVERY overrides it.
EVERY_S = 60.0
EVERY_ENV = "PARSL_AURORA_PROGRESS_EVERY"
# Parsl's task states (parsl.dataflow.states.States), by name, in the three groups users count.
DONE_STATES = ("exec_done", "memo_done")
FAILED_STATES = ("failed", "dep_fail")
# Handed to an executor: queued at its interchange or running on a worker.
LAUNCHED_STATES = ("launched", "running", "running_ended")
# Parsl's block states (parsl.jobs.states.JobState), by name.
QUEUED_BLOCKS = ("PENDING", "HELD")
FAILED_BLOCKS = ("FAILED", "MISSING")
# What PBS can say to a block instead of running it (parsl_aurora.provider counts each).
PBS_SAID = ("refused", "held", "dropped")

_announced: set[str] = set()  # run ids whose run directory this process has printed


# ---------------------------------------------------------------- pure: the lines
def task_counts(states: Mapping[str, int]) -> dict[str, int]:
    """done / failed / pending / launched, from task counts by Parsl state name."""
    done = sum(states.get(s, 0) for s in DONE_STATES)
    failed = sum(states.get(s, 0) for s in FAILED_STATES)
    return {"done": done, "failed": failed,
            "pending": sum(states.values()) - done - failed,
            "launched": sum(states.get(s, 0) for s in LAUNCHED_STATES)}


def block_counts(states: Iterable[str], said: Mapping[str, int] | None = None
                 ) -> dict[str, int]:
    """running / queued / failed from the Parsl JobState names of the blocks PBS took and ran or
    queued, and what PBS said (refused, held, dropped) from the providers' counts, so that
    refusals read as refusals, not as blocks that failed."""
    states = list(states)
    return {"running": states.count("RUNNING"),
            "queued": sum(states.count(s) for s in QUEUED_BLOCKS),
            "failed": sum(states.count(s) for s in FAILED_BLOCKS),
            **{k: (said or {}).get(k, 0) for k in PBS_SAID}}


def progress_line(tasks: Mapping[str, int], blocks: Mapping[str, int], stamp: str) -> str:
    """`STAMP tasks: 9 done, 0 failed, 15 pending (12 launched); blocks: 1 running, ...`, and
    `; PBS: 6 refused, 1 held` when PBS refused, held or dropped any."""
    said = ", ".join(f"{blocks[k]} {k}" for k in PBS_SAID if blocks.get(k))
    return (f"{stamp} tasks: {tasks['done']} done, {tasks['failed']} failed, "
            f"{tasks['pending']} pending ({tasks['launched']} launched); blocks: "
            f"{blocks['running']} running, {blocks['queued']} queued, {blocks['failed']} failed"
            + (f"; PBS: {said}" if said else ""))


def run_dir_line(run_dir: str) -> str:
    return (f"run directory: {run_dir} (parsl.log, submit_scripts/, one folder of worker logs "
            "per executor)")


# ---------------------------------------------------------------- reading the running workflow
def loaded_dfk():
    """The DataFlowKernel `parsl.load()` made, or None."""
    from parsl.dataflow.dflow import DataFlowKernelLoader
    from parsl.errors import NoDataFlowKernelError

    try:
        return DataFlowKernelLoader.dfk()
    except NoDataFlowKernelError:
        return None


def snapshot(dfk) -> tuple[dict[str, int], dict[str, int]]:
    """(task counts, block counts) of DFK as it stands; no scheduler call.

    Tasks come from the DFK's own counters (garbage-collected tasks included); blocks from
    each executor's status_facade, the state its last scheduler poll saw.
    """
    from parsl_aurora.provider import DROPPED, HELD

    with dfk.task_state_counts_lock:
        states = {s.name: n for s, n in dfk.task_state_counts.items()}
    blocks, said = [], {}
    for executor in dfk.executors.values():
        for k, n in getattr(getattr(executor, "provider", None), "said", {}).items():
            said[k] = said.get(k, 0) + n
        taken = getattr(executor, "blocks_to_job_id", {})
        for block, status in dict(getattr(executor, "status_facade", None) or {}).items():
            # A block qsub refused has no job; one PBS held or dropped says so: PBS's counts
            # show them, not "failed".
            if status.state.name in FAILED_BLOCKS and (
                    block not in taken or str(status.message or "").startswith((HELD, DROPPED))):
                continue
            blocks.append(status.state.name)
    return task_counts(states), block_counts(blocks, said)


def every_s() -> float:
    text = os.environ.get(EVERY_ENV, "")
    if not text:
        return EVERY_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ConfigError(EVERY_ENV, text, "a number of seconds above 0",
                          f"set e.g. {EVERY_ENV}=60, or unset it for {EVERY_S:g} s")
    return value


# ---------------------------------------------------------------- waiting
def wait(futures: Iterable[concurrent.futures.Future], label: str = "tasks", *,
         every: float | None = None, file=None) -> list:
    """Every future's result, in order, once all have finished (the first failure raised).

    First prints the run directory (once per run). Then, on a terminal, a progress bar for
    these futures; otherwise a line every `every` seconds (default $PARSL_AURORA_PROGRESS_EVERY
    or 60) and one at the end, counting every task of the loaded workflow.
    """
    file = file or sys.stdout
    futures = list(futures)
    every = every_s() if every is None else every
    dfk = loaded_dfk()
    if dfk is not None and dfk.run_id not in _announced:
        _announced.add(dfk.run_id)
        print(run_dir_line(dfk.run_dir), file=file, flush=True)
    if file.isatty() and _bar(futures, label, file):
        return [f.result() for f in futures]

    def report() -> None:
        if dfk is not None:
            tasks, blocks = snapshot(dfk)
        else:  # futures of no Parsl run: count them alone
            tasks = task_counts({"exec_done": sum(not f.exception() for f in futures if f.done()),
                                 "failed": sum(bool(f.exception()) for f in futures if f.done()),
                                 "pending": sum(not f.done() for f in futures)})
            blocks = block_counts(())
        print(progress_line(tasks, blocks, time.strftime("%Y-%m-%d %H:%M:%S")), file=file,
              flush=True)

    left = set(futures)
    deadline = time.monotonic() + every
    while left:
        _, left = concurrent.futures.wait(left, timeout=max(0.0, deadline - time.monotonic()))
        if left:
            report()
            # From now, not from the missed deadline: a slow report never turns into a burst.
            deadline = time.monotonic() + every
    report()
    return [f.result() for f in futures]


def _bar(futures: list, label: str, file) -> bool:
    """rich's bar over FUTURES as they finish; False where rich is missing."""
    try:
        from rich.console import Console
        from rich.progress import Progress
    except ImportError:  # a bare venv: the lines instead
        return False
    with Progress(console=Console(file=file), transient=True) as bar:
        task = bar.add_task(label, total=len(futures))
        for _ in concurrent.futures.as_completed(futures):
            bar.advance(task)
    return True
