"""Dry runs: what a config would hand to the scheduler, made by Parsl's own code.

PBS modes run the provider's real `submit()` with its shell call captured, so the script comes
from Parsl's template and launcher, not from a copy of them.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

# Stand-ins for values that only exist once the interchange is running.
PLACEHOLDERS = {"all_addresses": "<interchange-address>", "worker_task_port": "<task-port>",
                "worker_result_port": "<result-port>", "run_dir": "<run_dir>/<NNN>"}
# Parsl appends time.time() to every job name; show where, not when.
STAMP = re.compile(r"(block-\d+)\.\d+\.\d+")


def worker_command(executor) -> str:
    """The executor's launch command for block 0, as the provider would receive it."""
    for name, value in PLACEHOLDERS.items():
        setattr(executor, name, value)
    if executor.encrypted:  # the keys are made in the run directory when the executor starts
        executor.cert_dir = f"<run_dir>/<NNN>/{executor.label}/certificates"
    executor.initialize_scaling()
    return executor.launch_cmd.format(block_id=0)


def render(config) -> str:
    """The PBS submit script with its qsub line (PBS modes) or the block script (in-job)."""
    from parsl.providers import LocalProvider

    executor = config.executors[0]
    provider = executor.provider
    command = worker_command(executor)
    job_name = f"parsl.{executor.label}.block-0"
    if isinstance(provider, LocalProvider):
        # LocalProvider.submit starts the script at once; build what it would write instead.
        text = (f"{provider.worker_init}\nexport JOBNAME={job_name}\n"
                + provider.launcher(command, 1, provider.nodes_per_block))
        return f"# bash <script_dir>/{job_name}.sh\n{text}\n"
    calls: list[str] = []

    def capture(cmd, walltime=None):
        calls.append(cmd)
        return 0, "0.render", ""

    with tempfile.TemporaryDirectory() as tmp:
        provider.script_dir = tmp
        provider.execute_wait = capture
        provider.submit(command, 1, job_name)
        script = calls[0].split()[-1]
        text = f"# {calls[0]}\n{Path(script).read_text()}"
        return STAMP.sub(r"\1", text.replace(tmp, "<script_dir>"))
