"""The three execution modes, built once for every site: multi-job, MPI ensemble, in-job.

A `Site` is data (node model, queue table, defaults, environment hook); the functions here turn a
site plus a user's request into a fresh Parsl `Config`, checking the request first.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from parsl_aurora import topology
from parsl_aurora.errors import ConfigError
from parsl_aurora.topology import Node

MODES = ("multi_job", "mpi_ensemble", "in_job")
# Parsl submits the first blocks on the strategy's first tick, 5 s after load by default. The
# interchange is up about 0.2 s after load: a 0.05 s tick submits the first block right then.
# Each tick is an in-process check and two interchange queries (scheduler polls keep their own,
# slower interval): about 2% of a core while idle.
STRATEGY_PERIOD = 0.05
# Installed on PATH with this package (and in the image): see _launch_cmd.
GUARD = "worker_pool_guard.sh"
WALLTIME = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")


@dataclass(frozen=True)
class Queue:
    """A PBS queue's limits; None means the limit is not published, so it is not checked."""

    name: str
    min_nodes: int = 1
    max_nodes: int | None = None
    max_walltime: str | None = None


@dataclass(frozen=True)
class Site:
    """Everything that differs between machines; the modes below are the same everywhere."""

    name: str
    node: Node
    queues: Mapping[str, Queue] = field(default_factory=dict)
    # Physical cores each worker is pinned to; None pins nothing (cpu_affinity="none").
    cores_per_worker: int | None = 8
    # Shell lines run before the user's worker_init in every block.
    worker_init: str = ""
    # Called when a config is built, for sites that need the environment prepared (the fake).
    prepare: Callable[[Path], dict[str, str]] | None = None
    # Host paths bound into the image when workers run in one (those missing here are skipped).
    binds: tuple[str, ...] = ()
    # Shell lines that put `apptainer` on PATH in a block (e.g. `module load apptainer`).
    container_init: str = ""
    # (period, threshold) in seconds: how often a worker pool and the interchange hear from each
    # other, and how long a silence means the pool is gone and its tasks go back to be retried.
    # Parsl's (30, 120) leaves tasks in a job killed at walltime stranded for two minutes.
    heartbeat: tuple[int, int] = (30, 120)
    # Seconds between qstat calls: how soon a job that ended is noticed and replaced.
    qstat_interval: int = 60


def _seconds(name: str, value: object) -> int:
    m = WALLTIME.match(value) if isinstance(value, str) else None
    if not m:
        raise ConfigError(name, value, "H:MM:SS, e.g. '0:30:00'",
                          "write hours, minutes and seconds separated by colons")
    h, mnt, s = map(int, m.groups())
    return h * 3600 + mnt * 60 + s


def walltime_seconds(walltime: str) -> int:
    """'1:30:00' -> 5400, refusing anything PBS would not read the same way."""
    seconds = _seconds("walltime", walltime)
    if seconds == 0:
        raise ConfigError("walltime", walltime, "a duration above 0:00:00", "ask for some time")
    return seconds


def drain_period(walltime: str, drain_margin: str | None) -> int | None:
    """Seconds after a worker pool starts when it stops taking tasks; None never drains.

    The margin should cover the longest task (and the pool's start-up, which it also eats into):
    a task still running at walltime is killed and run again in the next job. By default it is a
    tenth of the walltime, at most 5 minutes; '0:00:00' turns draining off.
    """
    total = walltime_seconds(walltime)
    margin = (max(1, min(300, total // 10)) if drain_margin is None
              else _seconds("drain_margin", drain_margin))
    if margin == 0:
        return None
    if margin >= total:
        raise ConfigError("drain_margin", drain_margin, f"less than the walltime ({walltime})",
                          "ask for a longer walltime or a shorter drain_margin "
                          "(about your longest task)")
    return total - margin


def _at_least(name: str, value: object, low: int = 1, fix: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(name, value, f"an integer >= {low}", fix or f"pass {name}={low} or more")
    return value


def _retries(value: object) -> int:
    return _at_least("retries", value, 0, "pass retries=1 (each task runs at most twice)")


def check_account(account: object) -> str:
    if not isinstance(account, str) or not account.strip():
        raise ConfigError("account", account, "your ALCF project name",
                          "pass account='MyProject' (see `sbank` or your allocation email)")
    return account


def check_queue(site: Site, queue: str, nodes: int, walltime: str) -> None:
    """Refuse a request the queue's published limits would reject after a queue wait."""
    q = site.queues.get(queue)
    if q is None:  # special queues (e.g. lustre_scaling) are passed through unchecked
        return
    if nodes < q.min_nodes or (q.max_nodes is not None and nodes > q.max_nodes):
        fits = [n for n, x in site.queues.items()
                if x.min_nodes <= nodes and (x.max_nodes is None or nodes <= x.max_nodes)]
        limit = f"{q.min_nodes}-{q.max_nodes}" if q.max_nodes else f">= {q.min_nodes}"
        raise ConfigError("nodes_per_job", nodes, f"{limit} nodes in queue {queue!r}",
                          f"use a queue that takes {nodes} nodes ({', '.join(fits) or 'none'})"
                          " or change nodes_per_job")
    if q.max_walltime and walltime_seconds(walltime) > walltime_seconds(q.max_walltime):
        raise ConfigError("walltime", walltime, f"at most {q.max_walltime} in queue {queue!r}",
                          "shorten walltime or pick a queue with longer jobs")


def _worker_init(site: Site, user: str, container: str | None = None) -> str:
    # The user's lines go last and verbatim, so they can override anything the site sets.
    lines = (site.worker_init, site.container_init if container else "", user)
    return "\n".join(s for s in lines if s)


def _launch_cmd(site: Site, container: str | None, binds: tuple[str, ...], run_dir: str) -> str:
    """Parsl's worker-pool command under worker_pool_guard.sh, in `apptainer exec` when workers
    use an image.

    The guard ends whatever a crashed pool leaves behind, so its block ends and a new one takes
    its tasks (container/scripts/worker_pool_guard.sh says why). The image must hold the
    driver's Parsl: checked here, before anything is submitted.
    """
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

    from parsl_aurora import container as ctr

    command = f"{GUARD} {DEFAULT_LAUNCH_CMD}"
    if not container:
        return command

    image = Path(container)
    if not image.is_file():
        raise ConfigError("container", container, "a path to an existing .sif image",
                          "build one with `make image` or fetch it with `make pull`")
    ctr.check_image_parsl(str(image.resolve()))
    # Worker logs go under run_dir; the other binds are the site's, where this host has them.
    wanted = [b for b in site.binds if Path(b.split(":")[0]).exists()]
    wanted += [str(Path(run_dir).resolve()), *binds]
    return ctr.wrap_launch_cmd(command, str(image.resolve()),
                               list(dict.fromkeys(wanted)))


def _scheduler_options(filesystems: str, extra: str) -> str:
    lines = [f"#PBS -l filesystems={filesystems}"] if filesystems else []
    return "\n".join(lines + ([extra] if extra else []))


def _prepare(site: Site, run_dir: str) -> None:
    if site.prepare is not None:
        os.environ.update(site.prepare(Path(run_dir, "fake")))


def _robust(site: Site, drain: int | None, encrypted: bool) -> dict:
    """Executor settings every mode shares: how lost pools are noticed and who may connect."""
    from functools import partial

    from parsl.jobs.error_handlers import windowed_error_handler

    period, threshold = site.heartbeat
    return {
        "heartbeat_period": period,
        "heartbeat_threshold": threshold,
        "drain_period": drain,
        # Parsl's default gives up on the whole executor when every block so far has failed,
        # e.g. the in-job mode's one block after a crash; three failures in a row still stop a
        # workflow whose blocks cannot start at all.
        "block_error_handler": partial(windowed_error_handler, threshold=3),
        # CurveZMQ: only pools holding this run's keys can register, fetch tasks (pickles) or
        # send results back; the interchange listens on a shared login node.
        "encrypted": encrypted,
    }


def _monitoring_importable() -> None:
    """Make SQLAlchemy importable for Parsl's monitoring hub, or say how to get it.

    The image keeps SQLAlchemy off the default import path, because once importable, every
    Parsl process imports it (a third of each worker's start-up); its folder is in
    $PARSL_AURORA_MONITORING_PATH, added here, in the driver only. Parsl (pinned) tried the
    import when `parsl` was first imported and kept the failure: try again and hand it the
    database manager it then could not load.
    """
    import importlib.util
    import sys

    extra = os.environ.get("PARSL_AURORA_MONITORING_PATH")
    if extra and importlib.util.find_spec("sqlalchemy") is None and Path(extra).is_dir():
        sys.path.append(extra)
        import parsl.monitoring.monitoring as hub

        if hub._db_manager_excepts is not None:
            from parsl.monitoring.db_manager import dbm_starter

            hub.dbm_starter, hub._db_manager_excepts = dbm_starter, None
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise ConfigError("monitoring", True, "Parsl's monitoring extra installed",
                          "pip install 'parsl-aurora[monitoring]' or run in the image") from None


def _config(executor, *, retries: int, run_dir: str, resume: bool, monitoring: bool):
    """The Config around one executor, with checkpoint-resume and monitoring when asked for."""
    from parsl.config import Config

    extra: dict = {}
    if resume:
        from parsl.utils import get_all_checkpoints

        # Apps declared with cache=True are skipped when an earlier run in run_dir finished
        # them; each result is checkpointed as it arrives, so a killed driver loses none.
        extra.update(app_cache=True, checkpoint_mode="task_exit",
                     checkpoint_files=get_all_checkpoints(run_dir))
    if monitoring:
        _monitoring_importable()
        from parsl.monitoring import MonitoringHub

        # Messages from workers travel through the interchange, which runs next to the hub.
        extra["monitoring"] = MonitoringHub(
            hub_address="127.0.0.1",
            logging_endpoint=f"sqlite:///{Path(run_dir).resolve() / 'monitoring.db'}",
            resource_monitoring_interval=10)
    return Config(executors=[executor], retries=retries, run_dir=run_dir,
                  strategy_period=STRATEGY_PERIOD, **extra)


def _htex_tiles(site: Site, node: Node, provider, label: str, launch_cmd: str | None,
                robust: dict):
    from parsl.executors import HighThroughputExecutor

    affinity = ("none" if site.cores_per_worker is None
                else topology.cpu_affinity(node, site.cores_per_worker))
    return HighThroughputExecutor(
        label=label,
        # One worker per GPU tile; Parsl sets ZE_AFFINITY_MASK to the tile name for each.
        available_accelerators=topology.tile_names(node),
        max_workers_per_node=node.tiles,
        # Parsl caps workers at CPUs / cores_per_worker; a node with fewer CPUs than tiles
        # (the fake on a laptop) still gets one worker per tile.
        cores_per_worker=1.0 if node.cpus >= node.tiles else math.floor(
            node.cpus / node.tiles * 1000) / 1000,
        cpu_affinity=affinity,
        # Tasks wait in the interchange, not on a busy worker, so a new block can take them.
        prefetch_capacity=0,
        provider=provider,
        launch_cmd=launch_cmd,
        **robust,
    )


def multi_job(site: Site, node: Node, *, account: str, queue: str = "debug",
              walltime: str = "0:30:00", nodes_per_job: int = 1, max_jobs: int = 1,
              filesystems: str = "home:flare", worker_init: str = "", retries: int = 1,
              select_options: str = "", scheduler_options: str = "",
              run_dir: str = "runinfo", container: str | None = None,
              binds: tuple[str, ...] = (), drain_margin: str | None = None,
              encrypted: bool = True, resume: bool = False, monitoring: bool = False):
    """Many PBS jobs, one worker pool per node, one worker per GPU tile."""
    check_account(account)
    drain = drain_period(walltime, drain_margin)
    _at_least("nodes_per_job", nodes_per_job)
    _at_least("max_jobs", max_jobs)
    _retries(retries)
    check_queue(site, queue, nodes_per_job, walltime)
    # Parsl is imported once the cheap checks pass: a refused request answers at once.
    from parsl.launchers import MpiExecLauncher

    from parsl_aurora.provider import PBSProProvider

    launch_cmd = _launch_cmd(site, container, binds, run_dir)
    _prepare(site, run_dir)
    provider = PBSProProvider(
        account=account,
        queue=queue,
        walltime=walltime,
        scheduler_options=_scheduler_options(filesystems, scheduler_options),
        worker_init=_worker_init(site, worker_init, container),
        # PALS spells binding --cpu-bind (it rejects --bind-to); one pool per node.
        launcher=MpiExecLauncher(bind_cmd="--cpu-bind", overrides="--ppn 1"),
        select_options=select_options,
        nodes_per_block=nodes_per_job,
        min_blocks=0,
        max_blocks=max_jobs,
        cpus_per_node=node.cpus,
        status_polling_interval=site.qstat_interval,
    )
    executor = _htex_tiles(site, node, provider, "htex_tiles", launch_cmd,
                           _robust(site, drain, encrypted))
    return _config(executor, retries=retries, run_dir=run_dir, resume=resume,
                   monitoring=monitoring)


def mpi_ensemble(site: Site, node: Node, *, account: str, nodes_per_task: int = 2,
                 nodes_per_job: int = 10, max_jobs: int = 1, queue: str = "debug-scaling",
                 walltime: str = "0:30:00", filesystems: str = "home:flare",
                 worker_init: str = "", retries: int = 1, select_options: str = "",
                 scheduler_options: str = "", run_dir: str = "runinfo",
                 container: str | None = None, binds: tuple[str, ...] = (),
                 drain_margin: str | None = None, encrypted: bool = True,
                 resume: bool = False, monitoring: bool = False):
    """Ensembles of multi-node MPI tasks: each worker owns a slot of nodes_per_task nodes."""
    check_account(account)
    drain = drain_period(walltime, drain_margin)
    _at_least("nodes_per_task", nodes_per_task)
    _at_least("nodes_per_job", nodes_per_job)
    _at_least("max_jobs", max_jobs)
    if nodes_per_task < 2:
        raise ConfigError("nodes_per_task", nodes_per_task, "2 or more",
                          "MPIExecutor is for multi-node tasks; run single-node work with "
                          "multi_job or in_job")
    if nodes_per_task > nodes_per_job:
        raise ConfigError("nodes_per_task", nodes_per_task, f"at most nodes_per_job "
                          f"({nodes_per_job})", "raise nodes_per_job or lower nodes_per_task")
    if nodes_per_job % nodes_per_task:
        raise ConfigError("nodes_per_job", nodes_per_job,
                          f"a multiple of nodes_per_task ({nodes_per_task})",
                          f"use nodes_per_job={nodes_per_job // nodes_per_task * nodes_per_task}"
                          " so no node sits idle")
    _retries(retries)
    check_queue(site, queue, nodes_per_job, walltime)
    from parsl.executors import MPIExecutor
    from parsl.launchers import SimpleLauncher

    from parsl_aurora.provider import PBSProProvider

    launch_cmd = _launch_cmd(site, container, binds, run_dir)
    _prepare(site, run_dir)
    provider = PBSProProvider(
        account=account,
        queue=queue,
        walltime=walltime,
        scheduler_options=_scheduler_options(filesystems, scheduler_options),
        worker_init=_worker_init(site, worker_init, container),
        # One pool on the first node; each task's mpiexec spreads over its slot's nodes.
        launcher=SimpleLauncher(),
        select_options=select_options,
        nodes_per_block=nodes_per_job,
        max_blocks=max_jobs,
        cpus_per_node=node.cpus,
        status_polling_interval=site.qstat_interval,
    )
    executor = MPIExecutor(
        label="mpi_tasks",
        max_workers_per_block=nodes_per_job // nodes_per_task,
        provider=provider,
        launch_cmd=launch_cmd,
        **_robust(site, drain, encrypted),
    )
    return _config(executor, retries=retries, run_dir=run_dir, resume=resume,
                   monitoring=monitoring)


def read_nodefile(nodefile: str | os.PathLike | None) -> list[str]:
    """Host names from a PBS node file (`$PBS_NODEFILE` when none is given), one per line."""
    path = nodefile or os.environ.get("PBS_NODEFILE")
    if not path:
        raise ConfigError("nodefile", None, "a PBS node file",
                          "run inside a PBS job (which sets $PBS_NODEFILE) or pass nodefile=")
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or "not text"
        raise ConfigError("nodefile", str(path), "a readable file listing one host per line",
                          f"check the path ({why})") from None
    hosts = [h.strip() for h in lines]
    if not any(hosts):
        raise ConfigError("nodefile", str(path), "at least one host name",
                          "the node file is empty: is this the right job's $PBS_NODEFILE?")
    # The launcher hands every distinct line to mpiexec as a host, a blank one included.
    for number, host in enumerate(hosts, 1):
        if not host or any(c.isspace() for c in host):
            raise ConfigError("nodefile", str(path), "one host name per line",
                              f"line {number} is {lines[number - 1]!r}: remove blank lines and "
                              "spaces")
    return hosts


def in_job(site: Site, node: Node, *, nodefile: str | None = None, worker_init: str = "",
           retries: int = 1, run_dir: str = "runinfo", container: str | None = None,
           binds: tuple[str, ...] = (), encrypted: bool = True, resume: bool = False,
           monitoring: bool = False):
    """Everything inside one PBS job: one worker pool per node of the job, started by mpiexec."""
    hosts = read_nodefile(nodefile)
    _retries(retries)
    from parsl.launchers import MpiExecLauncher
    from parsl.providers import LocalProvider

    launch_cmd = _launch_cmd(site, container, binds, run_dir)
    _prepare(site, run_dir)
    init = _worker_init(site, worker_init, container)
    if nodefile:
        # MpiExecLauncher reads $PBS_NODEFILE in the block's script; point it at our file.
        init = "\n".join(s for s in (f"export PBS_NODEFILE={Path(nodefile).resolve()}", init) if s)
    provider = LocalProvider(
        nodes_per_block=len(set(hosts)),
        launcher=MpiExecLauncher(bind_cmd="--cpu-bind", overrides="--ppn 1"),
        init_blocks=1,
        max_blocks=1,
        worker_init=init,
    )
    # No drain: the job's walltime belongs to the script that started this driver.
    executor = _htex_tiles(site, node, provider, "htex_tiles", launch_cmd,
                           _robust(site, None, encrypted))
    return _config(executor, retries=retries, run_dir=run_dir, resume=resume,
                   monitoring=monitoring)
