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
# Parsl submits the first blocks on the strategy's first tick, 5 s after load by default. A
# 0.2 s tick starts workers sooner and notices lost blocks faster; each tick is an in-process
# check (scheduler polls keep their own, slower interval), so the cost is negligible.
STRATEGY_PERIOD = 0.2
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


def walltime_seconds(walltime: str) -> int:
    """'1:30:00' -> 5400, refusing anything PBS would not read the same way."""
    m = WALLTIME.match(walltime) if isinstance(walltime, str) else None
    if not m:
        raise ConfigError("walltime", walltime, "H:MM:SS, e.g. '0:30:00'",
                          "write hours, minutes and seconds separated by colons")
    h, mnt, s = map(int, m.groups())
    if h == mnt == s == 0:
        raise ConfigError("walltime", walltime, "a duration above 0:00:00", "ask for some time")
    return h * 3600 + mnt * 60 + s


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(name, value, "an integer >= 1", f"pass {name}=1 or more")
    return value


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


def _launch_cmd(site: Site, container: str | None, binds: tuple[str, ...], run_dir: str):
    """Parsl's worker-pool command, wrapped in `apptainer exec` when workers use an image.

    The image must hold the driver's Parsl: checked here, before anything is submitted.
    """
    if not container:
        return None
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

    from parsl_aurora import container as ctr

    image = Path(container)
    if not image.is_file():
        raise ConfigError("container", container, "a path to an existing .sif image",
                          "build one with `make image` or fetch it with `make pull`")
    ctr.check_image_parsl(str(image.resolve()))
    # Worker logs go under run_dir; the other binds are the site's, where this host has them.
    wanted = [b for b in site.binds if Path(b.split(":")[0]).exists()]
    wanted += [str(Path(run_dir).resolve()), *binds]
    return ctr.wrap_launch_cmd(DEFAULT_LAUNCH_CMD, str(image.resolve()),
                               list(dict.fromkeys(wanted)))


def _scheduler_options(filesystems: str, extra: str) -> str:
    lines = [f"#PBS -l filesystems={filesystems}"] if filesystems else []
    return "\n".join(lines + ([extra] if extra else []))


def _prepare(site: Site, run_dir: str) -> None:
    if site.prepare is not None:
        os.environ.update(site.prepare(Path(run_dir, "fake")))


def _htex_tiles(site: Site, node: Node, provider, label: str, launch_cmd: str | None):
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
    )


def multi_job(site: Site, node: Node, *, account: str, queue: str = "debug",
              walltime: str = "0:30:00", nodes_per_job: int = 1, max_jobs: int = 1,
              filesystems: str = "home:flare", worker_init: str = "", retries: int = 1,
              select_options: str = "", scheduler_options: str = "",
              run_dir: str = "runinfo", container: str | None = None,
              binds: tuple[str, ...] = ()):
    """Many PBS jobs, one worker pool per node, one worker per GPU tile."""
    from parsl.config import Config
    from parsl.launchers import MpiExecLauncher
    from parsl.providers import PBSProProvider

    check_account(account)
    walltime_seconds(walltime)
    _positive("nodes_per_job", nodes_per_job)
    _positive("max_jobs", max_jobs)
    check_queue(site, queue, nodes_per_job, walltime)
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
    )
    launch_cmd = _launch_cmd(site, container, binds, run_dir)
    return Config(executors=[_htex_tiles(site, node, provider, "htex_tiles", launch_cmd)],
                  retries=retries, run_dir=run_dir,
                  strategy_period=STRATEGY_PERIOD)


def mpi_ensemble(site: Site, node: Node, *, account: str, nodes_per_task: int = 2,
                 nodes_per_job: int = 10, max_jobs: int = 1, queue: str = "debug-scaling",
                 walltime: str = "0:30:00", filesystems: str = "home:flare",
                 worker_init: str = "", retries: int = 1, select_options: str = "",
                 scheduler_options: str = "", run_dir: str = "runinfo",
                 container: str | None = None, binds: tuple[str, ...] = ()):
    """Ensembles of multi-node MPI tasks: each worker owns a slot of nodes_per_task nodes."""
    from parsl.config import Config
    from parsl.executors import MPIExecutor
    from parsl.launchers import SimpleLauncher
    from parsl.providers import PBSProProvider

    check_account(account)
    walltime_seconds(walltime)
    _positive("nodes_per_task", nodes_per_task)
    _positive("nodes_per_job", nodes_per_job)
    _positive("max_jobs", max_jobs)
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
    check_queue(site, queue, nodes_per_job, walltime)
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
    )
    executor = MPIExecutor(
        label="mpi_tasks",
        max_workers_per_block=nodes_per_job // nodes_per_task,
        provider=provider,
        launch_cmd=_launch_cmd(site, container, binds, run_dir),
    )
    return Config(executors=[executor], retries=retries, run_dir=run_dir,
                  strategy_period=STRATEGY_PERIOD)


def read_nodefile(nodefile: str | os.PathLike | None) -> list[str]:
    """Host names from a PBS node file (`$PBS_NODEFILE` when none is given), blank lines ignored."""
    path = nodefile or os.environ.get("PBS_NODEFILE")
    if not path:
        raise ConfigError("nodefile", None, "a PBS node file",
                          "run inside a PBS job (which sets $PBS_NODEFILE) or pass nodefile=")
    try:
        hosts = [h.strip() for h in Path(path).read_text().splitlines() if h.strip()]
    except OSError as e:
        raise ConfigError("nodefile", str(path), "a readable file listing one host per line",
                          f"check the path ({e.strerror})") from None
    if not hosts:
        raise ConfigError("nodefile", str(path), "at least one host name",
                          "the node file is empty: is this the right job's $PBS_NODEFILE?")
    return hosts


def in_job(site: Site, node: Node, *, nodefile: str | None = None, worker_init: str = "",
           retries: int = 0, run_dir: str = "runinfo", container: str | None = None,
           binds: tuple[str, ...] = ()):
    """Everything inside one PBS job: one worker pool per node of the job, started by mpiexec."""
    from parsl.config import Config
    from parsl.launchers import MpiExecLauncher
    from parsl.providers import LocalProvider

    _prepare(site, run_dir)
    hosts = read_nodefile(nodefile)
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
    launch_cmd = _launch_cmd(site, container, binds, run_dir)
    return Config(executors=[_htex_tiles(site, node, provider, "htex_tiles", launch_cmd)],
                  retries=retries, run_dir=run_dir,
                  strategy_period=STRATEGY_PERIOD)
