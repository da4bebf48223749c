"""Fake PALS `mpiexec`: Aurora's options, run by MPICH's hydra so MPI ranks really talk
(where hydra is missing, as inside the image, ranks start directly, without PMI).

Each rank gets PALS's and PMI's variables and its fake node's name in PARSL_AURORA_HOST. CPU
binding rule: the Aurora logical CPUs PALS would give a rank (list: its entry, round-robin by
local rank; depth: local_rank*depth .. +depth-1; core: CPU local_rank; none: unbound) map onto
this machine's allowed CPUs as `host_cpus[c % len(host_cpus)]`, deduplicated, and are applied
with taskset by the per-rank shim bin/fake-rank.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from parsl_aurora.fake import bin_dir, hydra

REJECTED = ("--bind-to", "--map-by", "-bind-to", "-map-by")
BINDINGS = ("none", "depth", "core", "list")
CPUS_PER_NODE = 208  # logical CPUs of an Aurora node


class UsageError(Exception):
    """A request PALS would refuse; the message is printed as PALS prints its errors."""


@dataclass
class Request:
    """What one mpiexec call asks for."""

    command: list[str]
    ranks: int | None = None
    ppn: int | None = None
    depth: int = 1
    cpu_bind: str = "none"
    hosts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def _take(args: list[str], i: int, opt: str) -> tuple[str, int]:
    """The value of option args[i]: `--opt=value` or `--opt value`."""
    if "=" in args[i] and args[i].startswith("--"):
        return args[i].split("=", 1)[1], i + 1
    if i + 1 >= len(args):
        raise UsageError(f"mpiexec: option '{opt}' requires an argument")
    return args[i + 1], i + 2


def _int(opt: str, text: str) -> int:
    # Parsl writes ranks_per_node as "12.0" when it derives it; PALS reads it with atoi.
    whole = text.removesuffix(".0")
    if not whole.isdigit() or int(whole) < 1:
        raise UsageError(f"mpiexec: invalid value '{text}' for {opt}: expected a positive integer")
    return int(whole)


def read_hostfile(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().split()
    except OSError as e:
        raise UsageError(f"mpiexec: cannot read hostfile {path}: {e.strerror}") from None
    return list(dict.fromkeys(lines))  # PALS places one node per distinct host, in order


def parse(args: list[str], environ: dict[str, str]) -> Request:
    """PALS's command line -> Request; refuses what PALS refuses."""
    req = Request(command=[])
    hostfile = None
    i = 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        if name in REJECTED:
            raise UsageError(f"mpiexec: unrecognized option '{name}' (PALS binds with "
                             "--cpu-bind and places ranks with --ppn)")
        if name in ("-n", "--np", "-np"):
            v, i = _take(args, i, name)
            req.ranks = _int(name, v)
        elif name in ("-ppn", "--ppn"):
            v, i = _take(args, i, name)
            req.ppn = _int(name, v)
        elif name in ("-d", "--depth", "-depth"):
            v, i = _take(args, i, name)
            req.depth = _int(name, v)
        elif name in ("--cpu-bind", "-cpu-bind"):
            v, i = _take(args, i, name)
            req.cpu_bind = v
        elif name in ("--hostfile", "-hostfile", "-f"):
            hostfile, i = _take(args, i, name)
        elif name in ("-hosts", "--hosts", "-host", "--host"):
            v, i = _take(args, i, name)
            req.hosts = list(dict.fromkeys(h for h in v.split(",") if h))
        elif name in ("--env", "-env", "-genv", "--genv"):
            v, i = _take(args, i, name)
            key, sep, val = v.partition("=")
            if not sep:  # -env NAME VALUE
                if i >= len(args):
                    raise UsageError(f"mpiexec: {name} needs NAME=VALUE")
                val, i = args[i], i + 1
            req.env[key] = val
        elif name in ("--envall", "--genvall", "-envall", "-genvall", "--no-vni",
                      "-l", "--line-buffer"):
            i += 1  # hydra passes the whole environment and does not need VNIs
        elif a.startswith("-"):
            raise UsageError(f"mpiexec: unrecognized option '{a}'")
        else:
            req.command = args[i:]
            break
    if not req.command:
        raise UsageError("mpiexec: no command given")
    if not req.hosts:
        hostfile = hostfile or environ.get("PBS_NODEFILE")
        req.hosts = read_hostfile(hostfile) if hostfile else ["localhost"]
    if req.ranks is None:
        req.ranks = (req.ppn or 1) * len(req.hosts)
    if req.ppn is None:
        # Without --ppn PALS packs a node before using the next (hence Parsl's "--ppn 1").
        req.ppn = max(1, min(req.ranks, CPUS_PER_NODE // req.depth))
    if req.ranks > req.ppn * len(req.hosts):
        raise UsageError(f"mpiexec: {req.ranks} ranks do not fit {len(req.hosts)} nodes at "
                         f"{req.ppn} per node")
    return req


def ranges(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UsageError(f"mpiexec: bad CPU list '{text}'")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def aurora_cpus(req: Request, local_rank: int) -> list[int] | None:
    """The Aurora logical CPU ids PALS would bind a local rank to; None when unbound."""
    kind, _, spec = req.cpu_bind.partition(":")
    kind = kind.split(",")[-1]  # "verbose,list:..." -> "list"
    if kind == "none":
        return None
    if kind == "depth":
        return list(range(local_rank * req.depth, (local_rank + 1) * req.depth))
    if kind == "core":
        return [local_rank]
    if kind == "list":
        entries = [e for e in spec.split(":") if e]
        if not entries:
            raise UsageError("mpiexec: --cpu-bind list: needs at least one CPU set")
        return ranges(entries[local_rank % len(entries)])
    raise UsageError(f"mpiexec: unsupported --cpu-bind '{req.cpu_bind}' "
                     f"(this fake takes {', '.join(BINDINGS)})")


def host_cpu_sets(req: Request, host_cpus: list[int]) -> list[str]:
    """One CPU set per local rank on this machine, or [] when nothing is bound."""
    sets = []
    for r in range(req.ppn or 1):
        ids = aurora_cpus(req, r)
        if ids is None:
            return []
        mapped = sorted({host_cpus[c % len(host_cpus)] for c in ids})
        sets.append(",".join(map(str, mapped)))
    return sets


def hydra_command(req: Request, hydra_path: str, host_cpus: list[int]) -> list[str]:
    """The MPICH hydra command line that runs the request's ranks on this machine."""
    env = {**req.env, "PARSL_AURORA_HOSTS": " ".join(req.hosts),
           "PARSL_AURORA_BIND": " ".join(host_cpu_sets(req, host_cpus))}
    cmd = [hydra_path, "-launcher", "fork", "-hosts", ",".join(req.hosts),
           "-ppn", str(req.ppn), "-n", str(req.ranks)]
    for k, v in env.items():
        cmd += ["-genv", k, v]
    return cmd + [str(bin_dir() / "fake-rank"), *req.command]


def rank_environments(req: Request, host_cpus: list[int]) -> list[tuple[dict[str, str], str]]:
    """(variables, CPU set) for each rank, as PALS gives them, for a launch without hydra."""
    sets = host_cpu_sets(req, host_cpus)
    out = []
    for rank in range(req.ranks):
        node, local = divmod(rank, req.ppn)
        local_size = min(req.ppn, req.ranks - node * req.ppn)
        env = {**req.env, "PALS_RANKID": str(rank), "PALS_NODEID": str(node),
               "PALS_LOCAL_RANKID": str(local), "PALS_LOCAL_SIZE": str(local_size),
               "PMI_RANK": str(rank), "PMI_SIZE": str(req.ranks),
               "PMI_LOCAL_RANK": str(local), "PMI_LOCAL_SIZE": str(local_size),
               "PARSL_AURORA_HOST": req.hosts[node]}
        out.append((env, sets[local % len(sets)] if sets else ""))
    return out


def launch_directly(req: Request, host_cpus: list[int]) -> int:
    """Start every rank as a child process, without PMI: enough for programs that do not call
    MPI (Parsl's worker pool), where hydra is missing (inside the image). Exit status: the
    first non-zero one of the ranks', as PALS reports."""
    import signal
    import subprocess

    procs = []
    for env, cpus in rank_environments(req, host_cpus):
        command = ["taskset", "-c", cpus, *req.command] if cpus else req.command
        procs.append(subprocess.Popen(command, env={**os.environ, **env}))

    def forward(sig, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    codes = [p.wait() for p in procs]
    return next((c if c > 0 else 128 - c for c in codes if c), 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    host_cpus = sorted(os.sched_getaffinity(0))
    try:
        req = parse(argv, dict(os.environ))
        cmd = hydra_command(req, hydra(), host_cpus)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 1
    if not cmd[0]:
        return launch_directly(req, host_cpus)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
