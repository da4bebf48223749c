"""Parsl's executors with two changes to how blocks are asked for and given up on.

- No block is asked for while the provider holds off after a refused `qsub` (its backoff), so a
  refusing PBS sees a request every few seconds to a minute, not one per strategy tick.
- `GiveUp`, the block error handler, ends a workflow only for a refusal no retry can change, or
  when the last `threshold` accepted blocks all ended before any of their workers connected; a
  refused submission never counts. The error names the cause in one line: qsub's stderr, or the
  last such block's stderr.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from parsl.executors import HighThroughputExecutor as _HTEX
from parsl.executors import MPIExecutor as _MPIExecutor
from parsl.executors.errors import InvalidResourceSpecification
from parsl.jobs.states import JobState

from parsl_aurora.errors import AuroraError, SchedulerError


class _Patient:
    """Mixin for a block-based Parsl executor whose provider may ask to be left alone."""

    def start(self):
        from parsl_aurora.runs import record_interchange, start_run

        # The run's tag and driver, in run_dir/run.json for `parsl-aurora status` and
        # `cleanup`; PBS job names begin with the tag (`qstat -u $USER` shows whose run).
        tag = start_run(self.run_dir)
        if hasattr(self.provider, "run_tag"):
            self.provider.run_tag = tag
        raise_open_file_limit()
        started = super().start()
        interchange = getattr(self, "interchange_proc", None)
        if interchange is not None:  # it outlives a killed driver: cleanup ends it
            record_interchange(self.run_dir, interchange.pid)
        return started

    def scale_out_facade(self, n: int):
        holding_off = getattr(self.provider, "holding_off", None)
        if holding_off is not None and holding_off():
            return []
        return super().scale_out_facade(n)


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the new soft limit.

    Each worker pool holds two TCP connections to the interchange, and Parsl 2025.1.13 raises
    no limit: under a login shell's usual soft limit of 1,024 only about 500 pools register, and
    the rest are lost silently (libzmq retries the refused accept() without a word in
    interchange.log). Parsl starts the interchange with subprocess.Popen and no preexec hook, so
    raising the driver's own soft limit before that is what reaches the interchange: the limit
    is inherited. The driver's own sockets are polled by ZMQ, not select(), so the higher
    limit costs it nothing.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux takes no infinite RLIMIT_NOFILE; fs.nr_open is the most it takes.
    target = hard if hard != resource.RLIM_INFINITY else int(
        Path("/proc/sys/fs/nr_open").read_text())
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


class HighThroughputExecutor(_Patient, _HTEX):
    pass


class MPIExecutor(_Patient, _MPIExecutor):
    def validate_resource_spec(self, resource_specification: dict):
        whole_ranks_per_node(resource_specification)
        return super().validate_resource_spec(resource_specification)


def whole_ranks_per_node(spec: dict) -> None:
    """Give a task's spec the ranks_per_node Parsl would derive, as the integer PALS takes.

    Parsl 2025.1.13 derives it as num_ranks / num_nodes, a float ("12.0"), and writes it into
    `$PARSL_MPI_PREFIX` as `-ppn 12.0`, which PALS's mpiexec declares an integer and refuses.
    Ranks that do not divide evenly over the nodes are refused here, before the task runs.
    """
    nodes, ranks = spec.get("num_nodes"), spec.get("num_ranks")
    if not nodes or not ranks or spec.get("ranks_per_node"):
        return
    per_node, rest = divmod(int(ranks), int(nodes))
    if rest or not per_node:
        raise UnevenRanks(
            {"num_ranks"}, f"num_ranks={ranks} does not divide evenly over num_nodes={nodes}: "
            "PALS places the same number of ranks on every node (--ppn takes an integer). "
            "Fix: pass ranks_per_node, or a num_ranks that is a multiple of num_nodes")
    spec["ranks_per_node"] = per_node


class UnevenRanks(AuroraError, InvalidResourceSpecification):
    """Parsl's own refusal of a task's resources (what its callers catch), and one of ours, so
    the task's future, and a script that lets it end the run, say it in one line."""


def last_line(path: str | None) -> str:
    """The last non-empty line of a block's output file (PBS delivers it when the job ends)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines() if path else []
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


class GiveUp:
    """block_error_handler: see the module's docstring.

    Parsl's HighThroughputExecutor already marks a block MISSING when its job ended and none of
    its workers ever connected; only blocks PBS accepted (those with a job id) are judged.
    """

    # Seconds to wait for the last block's output files: PBS copies them back after the job
    # has ended, and they say why the block failed.
    DELIVERY = 30.0

    def __init__(self, threshold: int = 3):
        self.threshold = threshold
        self._missing_since: dict[str, float] = {}

    def __call__(self, executor, status) -> None:
        fatal = getattr(executor.provider, "fatal", "")
        if fatal:
            executor.set_bad_state_and_fail_all(SchedulerError(fatal))
            return
        accepted = sorted((b for b in status if b in executor.blocks_to_job_id), key=int)
        window = accepted[-self.threshold:]
        if len(window) < self.threshold or any(status[b].state != JobState.MISSING
                                                for b in window):
            return
        last = status[window[-1]]
        since = self._missing_since.setdefault(window[-1], time.monotonic())
        delivered = any(p and Path(p).exists() for p in (last.stdout_path, last.stderr_path))
        if not delivered and time.monotonic() - since < self.DELIVERY:
            return  # ask again on the next poll, when PBS has delivered them
        # Parsl's worker pool says why it gave up on stdout; shells and Python on stderr.
        why = (last_line(last.stderr_path) or last_line(last.stdout_path)
               or (f"exit status {last.exit_code}" if last.exit_code is not None else "no output"))
        executor.set_bad_state_and_fail_all(SchedulerError(
            f"{self.threshold} blocks in a row ended before any of their workers connected; "
            f"the last one said: `{why}` ({last.stderr_path}). Fix: make the block's "
            "environment start Parsl's worker pool (worker_init, the image, the network "
            "interface)"))
