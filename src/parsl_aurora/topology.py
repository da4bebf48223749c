"""The node model and everything derived from it: tile names, worker CPU lists, GPU masks.

Affinity strings are computed from a `Node`, never typed in, so a change to the node (reserved
cores, a different machine) changes every derived string consistently.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from parsl_aurora.errors import ConfigError

HIERARCHIES = ("COMPOSITE", "FLAT")


@dataclass(frozen=True)
class Node:
    """One compute node: CPU sockets and cores, hyperthreads, GPUs and their tiles."""

    sockets: int
    cores_per_socket: int
    threads_per_core: int
    gpus: int
    tiles_per_gpu: int
    # Physical core ids (0 .. sockets*cores_per_socket-1) kept for the system, never given out.
    reserved_cores: tuple[int, ...] = ()

    @property
    def cores(self) -> int:
        return self.sockets * self.cores_per_socket

    @property
    def cpus(self) -> int:
        """Logical CPUs (hardware threads), as PBS's ncpus counts them."""
        return self.cores * self.threads_per_core

    @property
    def tiles(self) -> int:
        return self.gpus * self.tiles_per_gpu


# Aurora compute node: 2 x Xeon Max (52 cores, 2 threads) and 6 x Max 1550 (2 tiles each).
# Cores 0 and 52 (logical 0, 104, 52, 156) are reserved for system services since 2025-03-31.
AURORA = Node(
    sockets=2, cores_per_socket=52, threads_per_core=2, gpus=6, tiles_per_gpu=2,
    reserved_cores=(0, 52),
)


def local(gpus: int = 0, tiles_per_gpu: int = 1) -> Node:
    """The machine this runs on, read from sysfs (or the CPU count where sysfs is missing).

    GPUs cannot be discovered portably, so the caller says how many it wants modelled.
    """
    cpus = sorted(os.sched_getaffinity(0))
    cores: set[tuple[str, str]] = set()
    packages: set[str] = set()
    for cpu in cpus:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topo}/physical_package_id") as f:
                pkg = f.read().strip()
            with open(f"{topo}/core_id") as f:
                core = f.read().strip()
        except OSError:
            pkg, core = "0", str(cpu)
        packages.add(pkg)
        cores.add((pkg, core))
    sockets = max(len(packages), 1)
    cores_per_socket = max(len(cores) // sockets, 1)
    threads = max(len(cpus) // (sockets * cores_per_socket), 1)
    return Node(sockets, cores_per_socket, threads, gpus, tiles_per_gpu)


def check_hierarchy(hierarchy: object) -> str:
    if hierarchy not in HIERARCHIES:
        raise ConfigError("hierarchy", hierarchy, HIERARCHIES,
                          "pass hierarchy='COMPOSITE' (Aurora's default) or 'FLAT' (the "
                          "frameworks module's), or set ZE_FLAT_DEVICE_HIERARCHY")
    return hierarchy


def tile_names(node: Node, hierarchy: str = "COMPOSITE") -> list[str]:
    """The ZE_AFFINITY_MASK of each tile: `gpu.tile` (0.0, 0.1, 1.0, ...) under COMPOSITE,
    flat device indices (0, 1, ..., tiles-1) under FLAT, where each tile is its own device."""
    if check_hierarchy(hierarchy) == "FLAT":
        return [str(i) for i in range(node.tiles)]
    return [f"{g}.{t}" for g in range(node.gpus) for t in range(node.tiles_per_gpu)]


def ranges(ids: list[int]) -> str:
    """[1,2,3,7] -> '1-3,7' (the syntax Parsl's list: affinity and --cpu-bind list: read)."""
    out: list[str] = []
    start = prev = ids[0]
    for i in ids[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def worker_cores(node: Node, cores_per_worker: int = 8) -> list[list[int]]:
    """Physical cores for each tile's worker: contiguous blocks on the tile's socket.

    Tiles are spread evenly over sockets (Aurora: GPUs 0-2 sit on socket 0, 3-5 on socket 1).
    """
    if node.tiles % node.sockets:
        raise ConfigError(
            "node.tiles", node.tiles, f"a multiple of node.sockets ({node.sockets})",
            "model a node whose tiles divide evenly over its sockets",
        )
    per_socket = node.tiles // node.sockets
    blocks: list[list[int]] = []
    for s in range(node.sockets):
        first = s * node.cores_per_socket
        free = [c for c in range(first, first + node.cores_per_socket)
                if c not in node.reserved_cores]
        if len(free) < per_socket * cores_per_worker:
            raise ConfigError(
                "cores_per_worker", cores_per_worker,
                f"at most {len(free) // max(per_socket, 1)} (socket {s} has {len(free)} free "
                f"cores for {per_socket} tiles)",
                "ask for fewer cores per worker or model a bigger node",
            )
        blocks += [free[w * cores_per_worker:(w + 1) * cores_per_worker]
                   for w in range(per_socket)]
    return blocks


def worker_cpus(node: Node, cores_per_worker: int = 8) -> list[list[int]]:
    """Logical CPUs per worker: its physical cores, then their hyperthread siblings."""
    return [[c + t * node.cores for t in range(node.threads_per_core) for c in block]
            for block in worker_cores(node, cores_per_worker)]


def cpu_affinity(node: Node, cores_per_worker: int = 8) -> str:
    """HighThroughputExecutor's `cpu_affinity="list:..."`, one entry per tile's worker."""
    entries = []
    for block in worker_cores(node, cores_per_worker):
        parts = [ranges([c + t * node.cores for c in block])
                 for t in range(node.threads_per_core)]
        entries.append(",".join(parts))
    return "list:" + ":".join(entries)


def rank_cpu_bind(node: Node, cores_per_worker: int = 8) -> str:
    """mpiexec `--cpu-bind list:...` for one rank per tile (physical cores only, as ALCF shows)."""
    return "list:" + ":".join(ranges(b) for b in worker_cores(node, cores_per_worker))


def ze_affinity_mask(node: Node, local_rank: int, hierarchy: str = "COMPOSITE") -> str:
    """The `ZE_AFFINITY_MASK` a rank gets: `g.t` under COMPOSITE, a flat index under FLAT.

    Ranks beyond the node's tiles wrap around, as ALCF's set_affinity_gpu_aurora.sh does.
    """
    check_hierarchy(hierarchy)
    if local_rank < 0:
        raise ConfigError("local_rank", local_rank, "an integer >= 0", "pass PALS_LOCAL_RANKID")
    if hierarchy == "FLAT":
        return str(local_rank % node.tiles)
    gpu = (local_rank // node.tiles_per_gpu) % node.gpus
    return f"{gpu}.{local_rank % node.tiles_per_gpu}"


def without_reserved(node: Node) -> Node:
    """The node as it was before Aurora reserved system cores (the ALCF page's values)."""
    return dataclasses.replace(node, reserved_cores=())
