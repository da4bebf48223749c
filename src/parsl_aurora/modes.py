"""The three execution modes, built once for every site: multi-job, MPI ensemble, in-job.

A `Site` is data (node model, queue table, defaults, environment hooks); the functions here turn
a site plus a user's request into a fresh Parsl `Config`, checking the request first.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from parsl_aurora import lmod, topology
from parsl_aurora.container import HostStack
from parsl_aurora.errors import ConfigError
from parsl_aurora.topology import Node

MODES = ("multi_job", "mpi_ensemble", "in_job")
# Parsl submits the first blocks on the strategy's first tick, 5 s after load by default. The
# interchange is up about 0.2 s after load: a 0.05 s tick submits the first block right then.
# Each tick is an in-process check and two interchange queries (scheduler calls keep their own,
# slower interval and back off when refused): about 2% of a core while idle.
STRATEGY_PERIOD = 0.05
# Installed on PATH with this package (and in the image): see _launch_cmd.
GUARD = "worker_pool_guard.sh"
WALLTIME = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")
# How a block starts one worker pool per node. PALS spells binding --cpu-bind (it rejects
# --bind-to); --ppn 1 because PALS otherwise packs ranks onto the first node; and PALS by
# default ends every rank when one exits non-zero, so without --no-abort-on-failure one pool
# that dies (OOM, a bad node) would end every other pool of the block and spend the retry of
# every task running there. MPI apps keep the default ($PARSL_MPI_PREFIX): a failed rank should
# end its task.
POOL_MPIEXEC = {"bind_cmd": "--cpu-bind", "overrides": "--ppn 1 --no-abort-on-failure"}
# ALCF recommends at most this many nodes per job; Parsl #4149 reports HTEX scaling problems
# beyond it on Aurora.
LARGEST_ADVISED_JOB = 2048


@dataclass(frozen=True)
class Queue:
    """A PBS queue's published limits; None means not published, so not checked."""

    name: str
    min_nodes: int = 1
    max_nodes: int | None = None
    min_walltime: str | None = None
    max_walltime: str | None = None
    # Longer jobs allowed for bigger ones: ((from_nodes, max_walltime), ...), ascending.
    walltime_by_nodes: tuple[tuple[int, str], ...] = ()
    max_user_queued: int | None = None  # queued or running jobs one user may have
    max_user_running: int | None = None
    # Per project: shared with every colleague on the same allocation.
    max_project_queued: int | None = None
    max_project_running: int | None = None
    max_queue_nodes: int | None = None  # nodes across every job in the queue, anybody's

    def walltime_cap(self, nodes: int) -> str | None:
        cap = self.max_walltime
        for low, walltime in self.walltime_by_nodes:
            if nodes >= low:
                cap = walltime
        return cap

@dataclass(frozen=True)
class Site:
    """Everything that differs between machines; the modes below are the same everywhere."""

    name: str
    queues: Mapping[str, Queue] = field(default_factory=dict)
    # Physical cores each worker is pinned to; None pins nothing (cpu_affinity="none").
    cores_per_worker: int | None = 8
    # Physical cores per MPI rank in the one-rank-per-tile binding list (PARSL_AURORA_CPU_BIND).
    cores_per_rank: int = 8
    # The node as PBS and PALS see it: its ncpus in select statements, its logical CPU ids in
    # mpiexec's --cpu-bind lists. The fake PALS maps Aurora's ids onto this host, so the fake
    # sites' is Aurora's node; None: the node the mode is given.
    pals_node: Node | None = None
    # Shell lines every block runs after the driver's environment is activated.
    worker_init: str = ""
    # Called when a config is built, for sites that need the environment prepared (the fake).
    prepare: Callable[[Path], dict[str, str]] | None = None
    # What compute nodes lend to workers in the image, and the lines that put apptainer on PATH.
    container_host: HostStack = field(default_factory=HostStack)
    container_init: str = ""
    # The network interface workers reach the interchange through.
    interface: str = "lo"
    # True where jobs run on other machines through a real PBS (Aurora, the OpenPBS site): then
    # a driver inside the image runs its workers in the same image and reaches PBS through the
    # bridge. False for the fake, whose jobs run beside the driver, in its container if any.
    real_pbs: bool = True
    # (period, threshold) in seconds: how often a worker pool and the interchange hear from each
    # other, and how long a silence means the pool is gone and its tasks go back to be retried.
    # Parsl's (30, 120) leaves tasks in a job killed at walltime stranded for two minutes.
    heartbeat: tuple[int, int] = (30, 120)
    # Seconds between qstat calls: how soon a job that ended is noticed and replaced.
    qstat_interval: float = 60
    # (first, longest) seconds between asking PBS again after a refusal or a failed qstat.
    backoff: tuple[float, float] = (2.0, 60.0)


# ---------------------------------------------------------------- checks of a request
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


def check_queue(site: Site, queue: object, nodes: int, walltime: str, max_jobs: int,
                allow_unlisted: bool = False) -> None:
    """Refuse a request the queue's published limits would reject after a queue wait."""
    q = site.queues.get(queue) if isinstance(queue, str) else None
    if q is None:
        if allow_unlisted and isinstance(queue, str) and queue:
            return  # special queues (e.g. lustre_scaling) exist; the user says this is one
        raise ConfigError("queue", queue, list(site.queues),
                          "use one of these, or pass allow_unlisted_queue=True for a special "
                          "queue ALCF gave you")
    if nodes < q.min_nodes or (q.max_nodes is not None and nodes > q.max_nodes):
        fits = [n for n, x in site.queues.items()
                if x.min_nodes <= nodes and (x.max_nodes is None or nodes <= x.max_nodes)]
        limit = f"{q.min_nodes}-{q.max_nodes}" if q.max_nodes else f">= {q.min_nodes}"
        raise ConfigError("nodes_per_job", nodes, f"{limit} nodes in queue {queue!r}",
                          f"use a queue that takes {nodes} nodes ({', '.join(fits) or 'none'})"
                          " or change nodes_per_job")
    cap = q.walltime_cap(nodes)
    if cap and walltime_seconds(walltime) > walltime_seconds(cap):
        raise ConfigError("walltime", walltime,
                          f"at most {cap} for {nodes}-node jobs in queue {queue!r}",
                          "shorten walltime or pick a queue with longer jobs")
    low = q.min_walltime
    if low and walltime_seconds(walltime) < walltime_seconds(low):
        raise ConfigError("walltime", walltime, f"at least {low} in queue {queue!r}",
                          f"ask for walltime={low!r} or more (a block that is done early "
                          "gives its nodes back)")
    for most, whose in ((q.max_user_queued, "one user"), (q.max_project_queued, "a project")):
        if most is not None and max_jobs > most:
            raise ConfigError("max_jobs", max_jobs,
                              f"at most {most} in queue {queue!r} (ALCF lets {whose} have "
                              f"{most} queued or running job{'s' if most > 1 else ''} there)",
                              f"pass max_jobs={most}, or use a queue that takes more jobs")
    if q.max_queue_nodes is not None and nodes * max_jobs > q.max_queue_nodes:
        raise ConfigError("max_jobs", max_jobs,
                          f"at most {q.max_queue_nodes // nodes} jobs of {nodes} nodes in queue "
                          f"{queue!r} (it runs {q.max_queue_nodes} nodes at once across "
                          "everybody's jobs)", "lower max_jobs or nodes_per_job")
    running = q.max_project_running
    if running is not None and max_jobs > running:
        print(f"parsl-aurora: note: queue {queue!r} runs at most {running} jobs of a project at "
              f"once, counting your colleagues' on the same allocation: of max_jobs={max_jobs}, "
              "the rest wait queued", file=sys.stderr)
    if nodes > LARGEST_ADVISED_JOB:
        print(f"parsl-aurora: warning: nodes_per_job={nodes} is above the {LARGEST_ADVISED_JOB} "
              "nodes ALCF advises per job, and Parsl's HighThroughputExecutor is reported to "
              "struggle beyond it on Aurora (Parsl #4149); consider more, smaller jobs: "
              f"{smaller_jobs(nodes, max_jobs)}", file=sys.stderr)


def smaller_jobs(nodes: int, max_jobs: int) -> str:
    """The same nodes in all as jobs of at most LARGEST_ADVISED_JOB nodes, as options."""
    split = math.ceil(nodes / LARGEST_ADVISED_JOB)
    per = math.ceil(nodes / split)
    return (f"nodes_per_job={per}, max_jobs={max_jobs * split} ({per * split * max_jobs} "
            f"nodes in all, for {nodes * max_jobs})")


# Open files the interchange holds besides its pools' connections: 25 with none registered
# (Parsl 2025.1.13, encrypted, measured here), doubled and rounded up for the monitoring hub's
# radio and the sockets ZMQ opens while a burst of pools connects.
INTERCHANGE_FILES = 100


def open_file_limit() -> int | None:
    """The hard RLIMIT_NOFILE the driver raises its soft limit to before the interchange starts
    (executors.raise_open_file_limit), which the interchange inherits; None when unlimited."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return None if hard == resource.RLIM_INFINITY else hard


def most_pools(limit: int | None) -> int | None:
    """The worker pools one interchange can hold under an open-file limit (None: no limit):
    two connections each, besides its own files."""
    return None if limit is None else (limit - INTERCHANGE_FILES) // 2


def check_open_files(pools: int, field: str, value: object, limit: int | None = None) -> None:
    """Refuse a request whose worker pools need more connections than one interchange may
    open: two per pool, plus its own files. Past the limit Parsl 2025.1.13 loses the extra
    pools silently; here the request stops before anything is submitted."""
    limit = open_file_limit() if limit is None else limit
    most = most_pools(limit)
    if most is not None and pools > most:
        raise ConfigError(field, value,
                          f"at most {most} worker pools in all ({pools} asked for: one per "
                          f"node, two connections each, and the interchange may open {limit} "
                          "files, the driver's hard open-file limit)",
                          "ask for fewer nodes, split them over two executors (the limit is "
                          "per interchange), or raise the hard limit (`ulimit -Hn`) of the "
                          "shell that starts the driver")


def _boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "True or False", f"pass {name}=True or {name}=False")
    return value


# ---------------------------------------------------------------- what a block runs
def in_image() -> str | None:
    """The image this process runs in (Apptainer sets APPTAINER_CONTAINER), or None."""
    return os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")


def driver_environment() -> str:
    """Shell lines that activate, in a block, the Python environment this driver runs from.

    A venv is sourced; a conda prefix is activated through conda's own hook when conda is
    known (so its activate.d scripts run), else put on PATH; a plain interpreter's folder goes
    first on PATH. Jobs start from a login environment, which has none of these.
    """
    prefix = Path(sys.prefix)
    if (prefix / "pyvenv.cfg").is_file() and (prefix / "bin" / "activate").is_file():
        return f"source {shlex.quote(str(prefix / 'bin' / 'activate'))}"
    if (prefix / "conda-meta").is_dir():
        conda = os.environ.get("CONDA_EXE")
        if conda:
            return (f'eval "$({shlex.quote(conda)} shell.bash hook)" && '
                    f"conda activate {shlex.quote(str(prefix))}")
        return f"export PATH={shlex.quote(str(prefix / 'bin'))}:$PATH"
    return f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"


def check_interface(interface: object, address: object) -> str:
    """The address workers connect to: `address` as given, else `interface`'s IPv4 address."""
    if address is not None:
        if not isinstance(address, str) or not address:
            raise ConfigError("address", address, "an IP address or host name",
                              "pass address='10.1.2.3', or leave it out and name interface=")
        return address
    from parsl.addresses import address_by_interface

    try:
        return address_by_interface(interface)
    except (OSError, TypeError, AssertionError):
        names = sorted(name for _, name in socket_interfaces())
        raise ConfigError("interface", interface, names,
                          "run on a node that has it (Aurora's login and compute nodes have "
                          "hsn0), or pass interface= one of these, or address=") from None


def socket_interfaces() -> list[tuple[int, str]]:
    import socket

    return socket.if_nameindex()


def gpu_environment(given: str | None, worker_init: str,
                    env: Mapping[str, str]) -> tuple[str, list[str]]:
    """The block's GPU hierarchy and its closing lines, which export it and the oneAPI device
    selector.

    The hierarchy: `given` (hierarchy=), else what worker_init sets (a literal export, or what
    its module commands set, asked of Lmod), else the driver's (its modules' included), else
    COMPOSITE, Aurora's PE default; `given` against a different value from worker_init is
    refused. The selector: level_zero:gpu (ALCF's fix for frameworks 2025.3.1's
    "opencl:gpu;level_zero:gpu", which shows dpctl every tile twice), unless the user set it:
    worker_init's own export stands, the driver's own export is carried; a module's is not.
    """
    try:
        found = lmod.read(worker_init, env)
    except lmod.LmodError as e:
        if given:  # nothing to check it against; the block's export has the last word
            found = {}
        else:
            raise ConfigError("worker_init", worker_init, "module commands Lmod here can "
                              f"answer for ({e})", "pass hierarchy='FLAT' or 'COMPOSITE' "
                              "(what the modules set), or fix the module command") from None
    setting = found.get(lmod.HIERARCHY)
    if given:
        hierarchy = topology.check_hierarchy(given)
        if setting and setting.value != hierarchy:
            raise ConfigError("hierarchy", given, f"{setting.value!r}, what worker_init sets "
                              f"(`{setting.command}` sets {lmod.HIERARCHY})",
                              f"drop hierarchy=, or end worker_init with `export "
                              f"{lmod.HIERARCHY}={hierarchy}`")
    elif setting and setting.value:
        if setting.value not in topology.HIERARCHIES:
            raise ConfigError("worker_init", worker_init,
                              f"{lmod.HIERARCHY} set to one of {', '.join(topology.HIERARCHIES)}"
                              f" (`{setting.command}` sets {setting.value!r})",
                              "write the value itself, or pass hierarchy=")
        hierarchy = setting.value
    else:
        hierarchy = topology.check_hierarchy(env.get(lmod.HIERARCHY) or "COMPOSITE")
    lines = [f"export {lmod.HIERARCHY}={hierarchy}"]
    selector = found.get(lmod.SELECTOR)
    own = env.get(lmod.SELECTOR)
    if selector and selector.by == "export":
        pass  # worker_init's own line stands
    elif own and not lmod.set_by_modules(env, lmod.SELECTOR):
        lines.append(f"export {lmod.SELECTOR}={shlex.quote(own)}")
    else:
        lines.append(f"export {lmod.SELECTOR}={lmod.LEVEL_ZERO}")
    return hierarchy, lines


@dataclass(frozen=True)
class Block:
    """What every block of a config runs, decided once for all modes."""

    worker_init: str
    launch_cmd: str
    address: str
    hierarchy: str


def _block(site: Site, node: Node, mode: str, *, worker_init: str, run_dir: str,
           container: str | None, binds: tuple[str, ...], interface: str | None,
           address: str | None, hierarchy: str | None, activate: bool,
           stage_image: str | None = None) -> Block:
    """The block's shell lines and worker command: environment, folder, GPU hierarchy, image.

    In order: the driver's modules (lmod.replay); the driver's Python environment (or, for
    workers in an image, apptainer); the site's lines; the user's worker_init, so it can
    override anything above; the GPU hierarchy the masks are written for and the oneAPI device
    selector (gpu_environment); for workers in an image, last, what the host lends to the image,
    as the lines above leave the node's environment. Launcher files land in the
    run directory; worker pools start in the driver's working directory, as Parsl's shared file
    system contract has it (a bash app's relative stdout= lands where the driver runs).
    """
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

    from parsl_aurora import container as ctr

    _boolean("activate", activate)
    address = check_interface(site.interface if interface is None else interface, address)
    hierarchy, gpu = gpu_environment(hierarchy, worker_init, os.environ)
    image = container
    if image is None and site.real_pbs and in_image():
        # The driver runs in an image, which exists on the host whether or not it is bound in
        # here, and holds the driver's Parsl: its workers run in the same one.
        image = in_image()
    elif image:
        if not Path(image).is_file():
            raise ConfigError("container", image, "a path to an existing .sif image",
                              "build one with `make image` or fetch it with `make pull`")
        image = str(Path(image).resolve())
        ctr.check_image(image)
    run_path, here = Path(run_dir).resolve(), Path.cwd()
    # The driver's modules come back first, before its venv (ALCF's order); not for workers in
    # an image, nor for a driver in one (the host's module variables leak into it): their
    # Python is the image's, which has no module system.
    replay = activate and not image and not in_image()
    lines = lmod.replay(os.environ, replay, lmod.uses_modules(worker_init))
    if image:
        lines += [site.container_init, site.worker_init]
    else:
        lines += [driver_environment() if activate else "", site.worker_init]
    if mode == "mpi_ensemble":
        # `--cpu-bind $PARSL_AURORA_CPU_BIND` in an app: one rank per tile, reserved cores left.
        bind = topology.rank_cpu_bind(site.pals_node or node, site.cores_per_rank)
        lines.append(f"export PARSL_AURORA_CPU_BIND={bind}")
    # The GPU settings after the user's lines, so the modules they load cannot change the
    # hierarchy the masks were written for (gpu_environment refuses a contradiction).
    lines += [f"cd {shlex.quote(str(run_path))}", worker_init, *gpu]
    if image:
        # After the user's lines: the binds and library path follow what they load (modules).
        lines.append(ctr.block_setup(site.container_host, [str(run_path), str(here), *binds],
                                     image))
    command = f"{GUARD} {DEFAULT_LAUNCH_CMD}"
    if image:
        command = _in_image(command, image, stage_image)
    elif stage_image is not None:
        raise ConfigError("stage_image", stage_image, "a node-local folder, with container=",
                          "pass container= the image to stage, or drop stage_image")
    # Literal braces would meet Parsl's two rounds of str.format: quadruple them.
    cd = ctr.escape_braces(f"cd {shlex.quote(str(here))} && ", 2)
    return Block("\n".join(s for s in lines if s), cd + command, address, hierarchy)


def _in_image(command: str, image: str, stage_image: str | None) -> str:
    """The pool's command in `image`, or (stage_image=) in each node's copy of it, made by the
    first pool on the node: one read of the SIF from the shared file system per node."""
    from parsl_aurora import container as ctr

    if stage_image is None:
        return ctr.wrap_launch_cmd(command, image)
    if not isinstance(stage_image, str) or not stage_image.startswith("/"):
        raise ConfigError("stage_image", stage_image, "an absolute node-local folder",
                          "pass stage_image='/tmp' (each Aurora node's own disk)")
    st = Path(image).stat()
    staged = ctr.staged_path(image, stage_image, st.st_size, st.st_mtime_ns)
    return (ctr.escape_braces(ctr.stage_command(image, staged), 2) + " "
            + ctr.wrap_launch_cmd(command, staged))


def _scheduler_options(filesystems: str, extra: str) -> str:
    """ALCF's header: the file systems the job needs, one node per host (place=scatter), and
    the job's output written where it goes as it runs (-k doe), so a block that fails to start
    its workers can be read before PBS would have delivered its files at the end."""
    lines = [f"#PBS -l filesystems={filesystems}"] if filesystems else []
    lines += ["#PBS -l place=scatter", "#PBS -k doe"]
    return "\n".join(lines + ([extra] if extra else []))


def _prepare(site: Site, run_dir: str) -> None:
    if site.prepare is not None:
        os.environ.update(site.prepare(Path(run_dir, "fake")))


# Up to this many pools on one interchange the site's heartbeat holds; above it the period and
# threshold grow with the square of the pools: the pinned interchange scans every pool for each
# message it handles, so its heartbeat work grows as pools^2 / period (docs/scale.md).
HEARTBEAT_POOLS = 4096


def heartbeat(site: Site, pools: int) -> tuple[int, int]:
    """(period, threshold) in seconds for `pools` worker pools on one interchange."""
    period, threshold = site.heartbeat
    if pools <= HEARTBEAT_POOLS:
        return period, threshold
    scale = (pools / HEARTBEAT_POOLS) ** 2
    return math.ceil(period * scale), math.ceil(threshold * scale)


def _robust(site: Site, drain: int | None, encrypted: bool, block: Block,
            pools: int = 1) -> dict:
    """Executor settings every mode shares: how blocks are given up on, lost pools noticed,
    and who may connect."""
    from parsl_aurora.executors import GiveUp

    period, threshold = heartbeat(site, pools)
    return {
        "address": block.address,
        "heartbeat_period": period,
        "heartbeat_threshold": threshold,
        "drain_period": drain,
        # A refused qsub is "not now"; three accepted blocks in a row that never start workers
        # still stop a workflow whose blocks cannot start, with their stderr in the error.
        "block_error_handler": GiveUp(threshold=3),
        # CurveZMQ: only pools holding this run's keys can register, fetch tasks (pickles) or
        # send results back; the interchange listens on a shared login node.
        "encrypted": _boolean("encrypted", encrypted),
        "launch_cmd": block.launch_cmd,
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


# Parsl loggers that write DEBUG lines on every strategy tick: at a 0.05 s tick about 80 kB/s
# of parsl.log (7 GB a day of an idle week-long campaign). Their INFO lines (scaling decisions)
# stay; PARSL_AURORA_DEBUG=1 keeps everything.
TICK_LOGGERS = ("parsl.jobs.strategy", "parsl.executors.high_throughput.zmq_pipes",
                "parsl.process_loggers")


def quiet_tick_logs() -> None:
    """TICK_LOGGERS at INFO (unless $PARSL_AURORA_DEBUG): every mode's config does this, and
    the benchmarks' hand-tuned baselines call it too, so they are held to the same logging."""
    import logging

    if os.environ.get("PARSL_AURORA_DEBUG", "") in ("", "0"):
        for name in TICK_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)


def _config(executor, *, retries: int, run_dir: str, resume: bool, monitoring: bool):
    """The Config around one executor, with checkpoint-resume and monitoring when asked for."""
    from parsl.config import Config

    quiet_tick_logs()

    extra: dict = {}
    if _boolean("resume", resume):
        from parsl.utils import get_all_checkpoints

        # Apps declared with cache=True are skipped when an earlier run in run_dir finished
        # them; each result is checkpointed as it arrives, so a killed driver loses none.
        extra.update(app_cache=True, checkpoint_mode="task_exit",
                     checkpoint_files=get_all_checkpoints(run_dir))
    if _boolean("monitoring", monitoring):
        _monitoring_importable()
        from parsl.monitoring import MonitoringHub

        # Messages from workers travel through the interchange, which runs next to the hub.
        extra["monitoring"] = MonitoringHub(
            hub_address="127.0.0.1",
            logging_endpoint=f"sqlite:///{Path(run_dir).resolve() / 'monitoring.db'}",
            resource_monitoring_interval=10)
    return Config(executors=[executor], retries=retries, run_dir=run_dir,
                  strategy_period=STRATEGY_PERIOD, **extra)


def _htex_tiles(site: Site, node: Node, provider, block: Block, robust: dict):
    from parsl_aurora.executors import HighThroughputExecutor

    affinity = ("none" if site.cores_per_worker is None
                else topology.cpu_affinity(node, site.cores_per_worker))
    return HighThroughputExecutor(
        label="htex_tiles",
        # One worker per GPU tile; Parsl sets ZE_AFFINITY_MASK to the tile's name for each, in
        # the form the block's ZE_FLAT_DEVICE_HIERARCHY reads.
        available_accelerators=topology.tile_names(node, block.hierarchy),
        max_workers_per_node=node.tiles,
        # Parsl caps workers at CPUs / cores_per_worker; a node with fewer CPUs than tiles
        # (the fake on a laptop) still gets one worker per tile.
        cores_per_worker=1.0 if node.cpus >= node.tiles else math.floor(
            node.cpus / node.tiles * 1000) / 1000,
        cpu_affinity=affinity,
        # Tasks wait in the interchange, not on a busy worker, so a new block can take them.
        prefetch_capacity=0,
        provider=provider,
        **robust,
    )


def _pbs_blocks(site: Site, node: Node, mode: str, launcher, *, account, queue, walltime,
                filesystems, scheduler_options, select_options, nodes_per_job, max_jobs,
                run_dir, **block_options) -> tuple[Block, object]:
    """What the PBS modes share once the request is checked: PBS reachable, the block's lines
    and command, the fake's environment where the site is the fake, and the provider."""
    from parsl_aurora.provider import PBSProProvider

    _pbs_reachable(site)
    block = _block(site, node, mode, run_dir=run_dir, **block_options)
    _prepare(site, run_dir)
    return block, PBSProProvider(
        account=account,
        queue=queue,
        walltime=walltime,
        scheduler_options=_scheduler_options(filesystems, scheduler_options),
        worker_init=block.worker_init,
        launcher=launcher,
        select_options=select_options,
        nodes_per_block=nodes_per_job,
        min_blocks=0,
        max_blocks=max_jobs,
        cpus_per_node=(site.pals_node or node).cpus,
        status_polling_interval=site.qstat_interval,
        backoff=site.backoff,
    )


def _pbs_reachable(site: Site) -> None:
    """Inside the image, PBS commands go through the bridge (PBS's setuid authentication helper
    cannot work in an unprivileged container); refuse before submitting when it is not there."""
    if not (site.real_pbs and in_image()):
        return
    from parsl_aurora import bridge

    bridge.use_from_image()


def multi_job(site: Site, node: Node, *, account: str, queue: str = "debug",
              walltime: str = "0:30:00", nodes_per_job: int = 1, max_jobs: int = 1,
              filesystems: str = "home:flare", worker_init: str = "", retries: int = 1,
              select_options: str = "", scheduler_options: str = "",
              run_dir: str = "runinfo", container: str | None = None,
              binds: tuple[str, ...] = (), drain_margin: str | None = None,
              encrypted: bool = True, resume: bool = False, monitoring: bool = False,
              interface: str | None = None, address: str | None = None,
              hierarchy: str | None = None, activate: bool = True,
              allow_unlisted_queue: bool = False, stage_image: str | None = None):
    """Many PBS jobs, one worker pool per node, one worker per GPU tile."""
    check_account(account)
    drain = drain_period(walltime, drain_margin)
    _at_least("nodes_per_job", nodes_per_job)
    _at_least("max_jobs", max_jobs)
    _retries(retries)
    check_queue(site, queue, nodes_per_job, walltime, max_jobs,
                _boolean("allow_unlisted_queue", allow_unlisted_queue))
    # Name the value to change: nodes_per_job when one job alone holds too many pools.
    limit = open_file_limit()
    one_job_too_big = limit is not None and nodes_per_job > most_pools(limit)
    check_open_files(nodes_per_job * max_jobs, *(("nodes_per_job", nodes_per_job)
                                                 if one_job_too_big else ("max_jobs", max_jobs)),
                     limit=limit)
    # Parsl is imported once the cheap checks pass: a refused request answers at once.
    from parsl.launchers import MpiExecLauncher

    block, provider = _pbs_blocks(
        site, node, "multi_job", MpiExecLauncher(**POOL_MPIEXEC),
        account=account, queue=queue, walltime=walltime, filesystems=filesystems,
        scheduler_options=scheduler_options, select_options=select_options,
        nodes_per_job=nodes_per_job, max_jobs=max_jobs, run_dir=run_dir,
        worker_init=worker_init, container=container, binds=binds, interface=interface,
        address=address, hierarchy=hierarchy, activate=activate, stage_image=stage_image)
    executor = _htex_tiles(site, node, provider, block,
                           _robust(site, drain, encrypted, block, nodes_per_job * max_jobs))
    return _config(executor, retries=retries, run_dir=run_dir, resume=resume,
                   monitoring=monitoring)


def mpi_ensemble(site: Site, node: Node, *, account: str, nodes_per_task: int = 2,
                 nodes_per_job: int = 10, max_jobs: int = 1, queue: str = "debug-scaling",
                 walltime: str = "0:30:00", filesystems: str = "home:flare",
                 worker_init: str = "", retries: int = 1, select_options: str = "",
                 scheduler_options: str = "", run_dir: str = "runinfo",
                 container: str | None = None, binds: tuple[str, ...] = (),
                 drain_margin: str | None = None, encrypted: bool = True,
                 resume: bool = False, monitoring: bool = False,
                 interface: str | None = None, address: str | None = None,
                 hierarchy: str | None = None, activate: bool = True,
                 allow_unlisted_queue: bool = False, stage_image: str | None = None):
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
    check_queue(site, queue, nodes_per_job, walltime, max_jobs,
                _boolean("allow_unlisted_queue", allow_unlisted_queue))
    from parsl.launchers import SimpleLauncher

    from parsl_aurora.executors import MPIExecutor

    block, provider = _pbs_blocks(
        # One pool on the first node; each task's mpiexec spreads over its slot's nodes.
        site, node, "mpi_ensemble", SimpleLauncher(),
        account=account, queue=queue, walltime=walltime, filesystems=filesystems,
        scheduler_options=scheduler_options, select_options=select_options,
        nodes_per_job=nodes_per_job, max_jobs=max_jobs, run_dir=run_dir,
        worker_init=worker_init, container=container, binds=binds, interface=interface,
        address=address, hierarchy=hierarchy, activate=activate, stage_image=stage_image)
    executor = MPIExecutor(
        label="mpi_tasks",
        max_workers_per_block=nodes_per_job // nodes_per_task,
        provider=provider,
        **_robust(site, drain, encrypted, block),
    )
    return _config(executor, retries=retries, run_dir=run_dir, resume=resume,
                   monitoring=monitoring)


def build(mode: str, site: Site, node: Node, **kwargs):
    """The config for `mode` at `site` on `node`, after checking the option names, so that a
    typo or a missing account is the usual one-line error, not a TypeError."""
    import inspect

    if mode not in MODES:
        raise ConfigError("mode", mode, MODES, "pass mode= or set PARSL_MODE to a known mode")
    make = globals()[mode]
    params = {n: p for n, p in inspect.signature(make).parameters.items()
              if p.kind == p.KEYWORD_ONLY}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError("option", unknown[0], sorted(params),
                          f"{site.name}.{mode} does not take {unknown[0]!r}; use one of the above")
    for name, p in params.items():
        if p.default is p.empty and name not in kwargs:
            raise ConfigError(name, None, f"a value ({site.name}.{mode} requires it)",
                              f"pass {name}=... or set PARSL_{name.upper()}")
    return make(site, node, **kwargs)


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
           monitoring: bool = False, interface: str | None = None,
           address: str | None = None, hierarchy: str | None = None, activate: bool = True,
           stage_image: str | None = None):
    """Everything inside one PBS job: one worker pool per node of the job, started by mpiexec."""
    hosts = read_nodefile(nodefile)
    check_open_files(len(set(hosts)), "nodefile", nodefile or os.environ.get("PBS_NODEFILE"))
    _retries(retries)
    from parsl.launchers import MpiExecLauncher
    from parsl.providers import LocalProvider

    if nodefile:
        # MpiExecLauncher reads $PBS_NODEFILE in the block's script; point it at our file.
        worker_init = "\n".join(s for s in (
            f"export PBS_NODEFILE={shlex.quote(str(Path(nodefile).resolve()))}", worker_init)
            if s)
    provider_class = LocalProvider
    if site.real_pbs and in_image():
        # PALS's mpiexec and apptainer are the host's: the job script on the host starts the
        # block the driver in the image hands it (bridge.host_local_provider).
        from functools import partial

        from parsl_aurora import bridge

        provider_class = partial(bridge.host_local_provider, bridge.host_channel())
        scripts = str(Path(run_dir).resolve())
        if not set(scripts) <= bridge.SAFE:
            raise ConfigError("run_dir", scripts, "a path of letters, digits and _./+:=- (the "
                              "host's launcher reads the block scripts' paths without a shell)",
                              "run the workflow from such a folder, or pass run_dir= one")
    block = _block(site, node, "in_job", worker_init=worker_init, run_dir=run_dir,
                   container=container, binds=binds, interface=interface, address=address,
                   hierarchy=hierarchy, activate=activate, stage_image=stage_image)
    _prepare(site, run_dir)
    provider = provider_class(
        nodes_per_block=len(set(hosts)),
        launcher=MpiExecLauncher(**POOL_MPIEXEC),
        init_blocks=1,
        max_blocks=1,
        worker_init=block.worker_init,
    )
    # No drain: the job's walltime belongs to the script that started this driver.
    executor = _htex_tiles(site, node, provider, block,
                           _robust(site, None, encrypted, block, len(set(hosts))))
    return _config(executor, retries=retries, run_dir=run_dir, resume=resume,
                   monitoring=monitoring)
