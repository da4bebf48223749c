"""The configs the benchmarks compare: the site configs, and what a skilled user writes by hand.

The hand-written ones are the configs on ALCF's "Parsl on Aurora" page, tuned the way a user
who knows Parsl would tune them (TUNED says how; their LABELS say the same). They run on the fake
cluster through `parsl_aurora.fake.environment`, as a user of the fake would.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

# Aurora's 12 GPU tiles as ALCF's page lists them: one worker per tile.
TILES = [f"{gpu}.{tile}" for gpu in range(6) for tile in range(2)]
ACCOUNT = "fake_project"
RUN_DIR = "runinfo"


def fake_cluster(run_dir: str = RUN_DIR) -> str:
    """Point this process at the fake cluster (its qsub, qstat and mpiexec first on PATH) and
    return the worker_init that does the same in a block: the fake's stand-in for ALCF's
    `source $HOME/_env/bin/activate; cd {execute_dir}`, with ALCF's `export TMPDIR=/tmp`
    (Parsl #3947: Aurora's TMPDIR, lengthened by mpiexec, overflows the 108-byte AF_UNIX path
    of the pool's multiprocessing Manager; the fake's TMPDIR, deep in its state folder, does too).
    """
    from parsl_aurora import fake

    os.environ.update(fake.environment(Path(run_dir, "fake")))
    return (f"export PATH={fake.bin_dir()}:{Path(sys.executable).parent}:$PATH TMPDIR=/tmp; "
            f"cd {os.getcwd()}")


def _tuned() -> dict:
    """What a skilled user adds to ALCF's config, besides 12 workers and encryption: the site
    configs' tick (Parsl's default 5 s delays the first block by up to 5 s), a retry, and the
    site configs' quiet per-tick loggers, by the modes' own function: at that tick Parsl's DEBUG
    lines would otherwise make the baseline measure its logging."""
    from parsl_aurora.modes import STRATEGY_PERIOD, quiet_tick_logs

    quiet_tick_logs()
    return {"strategy_period": STRATEGY_PERIOD, "retries": 1, "run_dir": RUN_DIR}


def _htex(provider):
    from parsl.executors import HighThroughputExecutor

    # Parsl starts at most CPUs / cores_per_worker workers: 12 on an Aurora node with the
    # default 1.0, but only as many as this machine has CPUs on the fake node, unless lowered.
    cpus = os.cpu_count() or 1
    return HighThroughputExecutor(
        label="htex", available_accelerators=TILES, max_workers_per_node=12,
        cores_per_worker=1.0 if cpus >= 12 else math.floor(cpus / 12 * 1000) / 1000,
        prefetch_capacity=0, encrypted=True, provider=provider)


def htex_pbs(max_blocks: int = 1, **provider_options):
    """ALCF's multi-job config (HTEX, Parsl's own PBSProProvider, MpiExecLauncher), tuned."""
    from parsl.config import Config
    from parsl.launchers import MpiExecLauncher
    from parsl.providers import PBSProProvider

    provider = PBSProProvider(
        account=ACCOUNT, queue="debug", walltime="0:30:00", worker_init=fake_cluster(),
        scheduler_options="#PBS -l filesystems=home:flare",
        launcher=MpiExecLauncher(bind_cmd="--cpu-bind", overrides="--ppn 1 --no-abort-on-failure"),
        select_options="", nodes_per_block=1, min_blocks=0, max_blocks=max_blocks,
        cpus_per_node=208, **provider_options)
    return Config(executors=[_htex(provider)], **_tuned())


def htex_local():
    """ALCF's in-job config (HTEX, LocalProvider, MpiExecLauncher over $PBS_NODEFILE), tuned."""
    from parsl.config import Config
    from parsl.launchers import MpiExecLauncher
    from parsl.providers import LocalProvider

    from parsl_aurora import fake

    init = fake_cluster()
    nodefile = Path(RUN_DIR, "nodefile").resolve()
    nodefile.parent.mkdir(parents=True, exist_ok=True)
    nodefile.write_text(fake.host_names(1)[0] + "\n")
    os.environ["PBS_NODEFILE"] = str(nodefile)  # as inside a PBS job
    provider = LocalProvider(
        nodes_per_block=1, launcher=MpiExecLauncher(bind_cmd="--cpu-bind", overrides="--ppn 1 --no-abort-on-failure"),
        init_blocks=1, max_blocks=1, worker_init=init)
    return Config(executors=[_htex(provider)], **_tuned())


def mpi_pbs():
    """ALCF's MPI-ensemble config (MPIExecutor, PBSProProvider, SimpleLauncher), tuned, with
    the 2-node job and 2-node slots the `mpi_ensemble` case uses."""
    from parsl.config import Config
    from parsl.executors import MPIExecutor
    from parsl.launchers import SimpleLauncher
    from parsl.providers import PBSProProvider

    provider = PBSProProvider(
        account=ACCOUNT, queue="debug-scaling", walltime="0:30:00",
        worker_init=fake_cluster(), scheduler_options="#PBS -l filesystems=home:flare",
        launcher=SimpleLauncher(), select_options="", nodes_per_block=2, max_blocks=1,
        cpus_per_node=208)
    executor = MPIExecutor(label="mpi", max_workers_per_block=1, provider=provider,
                           encrypted=True)
    return Config(executors=[executor], **_tuned())


def parsl_default():
    """Parsl's plain default: HTEX on LocalProvider, 5 s strategy tick, no encryption."""
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor

    return Config(executors=[HighThroughputExecutor()], run_dir=RUN_DIR)


def site(mode: str, **options):
    """The site config under test, as a workflow gets it."""
    import site_configs

    if mode == "mpi_ensemble":
        options = {"nodes_per_task": 2, "nodes_per_job": 2, **options}
    return site_configs.load("local", mode, run_dir=RUN_DIR, **options)


# name -> factory of a fresh Config: the bundle's modes and the references they are held to.
CONFIGS = {
    "default": parsl_default,
    "tuned_local": htex_local,
    "in_job": lambda: site("in_job"),
    "tuned_pbs": htex_pbs,
    "multi_job": lambda: site("multi_job"),
    "tuned_mpi": mpi_pbs,
    "mpi_ensemble": lambda: site("mpi_ensemble"),
}
MPI_CASES = ("tuned_mpi", "mpi_ensemble")
# Each case's provider, by the Parsl class it is (or derives from): a ratio compares cases of
# one provider only (tests/test_benchmarks.py checks this table against the built configs).
PROVIDERS = {"default": "LocalProvider", "tuned_local": "LocalProvider",
             "in_job": "LocalProvider", "tuned_pbs": "PBSProProvider",
             "multi_job": "PBSProProvider", "tuned_mpi": "PBSProProvider",
             "mpi_ensemble": "PBSProProvider"}
# What _tuned() and _htex() give ALCF's configs; the rest of a baseline is ALCF's page.
TUNED = ("tuned: the modes' strategy tick, {workers}encryption, retries=1, "
         "quiet per-tick loggers")
LABELS = {
    "default": "Parsl's default (`HighThroughputExecutor()`, LocalProvider, 5 s tick, "
               "DEBUG logging)",
    "tuned_local": "hand-tuned HTEX + LocalProvider (ALCF's in-job config; "
                   + TUNED.format(workers="12 workers per node, ") + ")",
    "in_job": "`in_job`",
    "tuned_pbs": "hand-tuned HTEX + PBSProProvider (ALCF's multi-job config; "
                 + TUNED.format(workers="12 workers per node, ") + ")",
    "multi_job": "`multi_job`",
    "tuned_mpi": "hand-written MPIExecutor + PBSProProvider (ALCF's ensemble config; "
                 + TUNED.format(workers="") + ")",
    "mpi_ensemble": "`mpi_ensemble`",
}


def same_provider(group: dict) -> dict:
    """The group with only the cases whose provider is its baseline's: a ratio between a
    LocalProvider run and a PBS one would measure the provider, not the config."""
    base = group.get("baseline")
    if base is None:
        return group
    return {**group, "cases": [c for c in group["cases"] if PROVIDERS[c] == PROVIDERS[base]]}
