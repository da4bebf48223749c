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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from parsl_aurora.fake import bin_dir, hydra, procs

BINDINGS = ("none", "depth", "core", "list")
CPUS_PER_NODE = 208  # logical CPUs of an Aurora node
# Sources of the option set, named in OPTIONS: HPE's PALS front end (Cray-HPE/craycli,
# cray/modules/mpiexec/cli.py) and the ALCF Aurora pages that use an option it lacks
# (argonne-lcf/user-guides, docs/aurora/...). docs/fake-cluster.md lists them.
CRAYCLI = "craycli"
# How long aborted ranks have between SIGTERM and SIGKILL.
ABORT_GRACE_S = 5.0


class UsageError(Exception):
    """A request PALS would refuse; the message is printed as PALS prints its errors."""


@dataclass
class Request:
    """What one mpiexec call asks for."""

    command: list[str]
    ranks: int = 1
    ppn: int | None = None
    depth: int = 1
    cpu_bind: str = "none"
    hosts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # PALS ends every rank when one exits non-zero, unless --no-abort-on-failure.
    abort_on_failure: bool = True


@dataclass(frozen=True)
class Option:
    """One PALS option: its spellings, what it takes, the Request field it sets (None: accepted
    and ignored, as it changes nothing a process here can see) and where it is documented."""

    names: tuple[str, ...]
    takes: str  # "flag", "value", "int0" (>= 0), "int1" (>= 1), "pair" (NAME VALUE or NAME=VALUE)
    field: str | None
    source: str
    value: object = True  # what a flag sets
    env: str | None = None  # PALS's variable for the default


OPTIONS = (
    Option(("-n", "-np", "--np"), "int1", "ranks", CRAYCLI, env="PALS_NRANKS"),
    Option(("-ppn", "--ppn"), "int0", "ppn", CRAYCLI, env="PALS_PPN"),
    Option(("-d", "--depth"), "int1", "depth", CRAYCLI, env="PALS_DEPTH"),
    Option(("--cpu-bind",), "value", "cpu_bind", CRAYCLI, env="PALS_CPU_BIND"),
    Option(("-host", "--host", "-hosts", "--hosts", "-hostlist", "--hostlist"), "value",
           "hosts", CRAYCLI, env="PALS_HOSTLIST"),
    Option(("-f", "-hostfile", "--hostfile"), "value", "hostfile", CRAYCLI,
           env="PALS_HOSTFILE"),
    Option(("-env", "--env"), "pair", "env", CRAYCLI),
    Option(("--abort-on-failure",), "flag", "abort_on_failure", CRAYCLI,
           env="PALS_ABORT_ON_FAILURE"),
    Option(("--no-abort-on-failure",), "flag", "abort_on_failure", CRAYCLI, value=False),
    # Accepted; nothing here depends on them (hydra passes the whole environment, places no
    # memory, has no VNIs, labels nothing).
    Option(("-soft", "--soft", "-arch", "--arch", "-wdir", "--wdir", "-path", "--path",
            "-file", "--file", "-umask", "--umask", "-envlist", "--envlist", "--mem-bind",
            "--include-tasks", "--exclude-tasks", "--procinfo-file", "--pmi", "--rlimits"),
           "value", None, CRAYCLI),
    Option(("-envall", "--envall", "-envnone", "--envnone", "--transfer", "--no-transfer",
            "-l", "--label", "--no-label", "--exclusive", "--shared", "--line-buffer",
            "--no-line-buffer", "--sstartup", "--no-sstartup"), "flag", None, CRAYCLI),
    Option(("--no-vni",), "flag", None, "docs/aurora/data-management/daos/daos-overview.md"),
    Option(("-genvall", "--genvall"), "flag", None, "docs/aurora/libraries/mpi.md, "
           "docs/aurora/data-management/moving_data_to_aurora/datamover.md"),
    Option(("-genv",), "pair", "env", "docs/aurora/containers/src/test_container.sh"),
    Option(("--gpu-bind",), "value", None, "docs/aurora/running-jobs-aurora.md"),
    Option(("--rlimit",), "value", None, "docs/aurora/applications-and-libraries/libraries/"
           "mpi.md"),
)
BY_NAME = {name: opt for opt in OPTIONS for name in opt.names}
# What users of other MPIs type; PALS binds with --cpu-bind and places ranks with --ppn.
OTHER_MPI = ("--bind-to", "--map-by", "-bind-to", "-map-by")


def _int(opt: str, text: str, low: int) -> int:
    # PALS's front end declares these click.IntRange: "12.0" (Parsl's derived ranks_per_node)
    # is not an integer to it.
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"Error: Invalid value for '{opt}': '{text}' is not a valid "
                         "integer.") from None
    if value < low:
        raise UsageError(f"Error: Invalid value for '{opt}': {text} is not in the range "
                         f"x>={low}.")
    return value


def _flag(text: str) -> bool:
    return text.strip().lower() not in ("0", "false", "no", "off", "n", "f", "")


def read_hostfile(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().split()
    except OSError as e:
        raise UsageError(f"mpiexec: cannot read hostfile {path}: {e.strerror}") from None
    return list(dict.fromkeys(lines))  # PALS places one node per distinct host, in order


def _set(values: dict, opt: Option, name: str, raw: str | bool | tuple[str, str]) -> None:
    if opt.field is None:
        return
    if opt.takes in ("int0", "int1"):
        values[opt.field] = _int(name, raw, 0 if opt.takes == "int0" else 1)
    elif opt.takes == "pair":
        values.setdefault("env", {})[raw[0]] = raw[1]
    elif opt.takes == "flag" and isinstance(raw, str):  # from PALS's variable
        values[opt.field] = _flag(raw)
    else:
        values[opt.field] = raw


def parse(args: list[str], environ: dict[str, str]) -> Request:
    """PALS's command line -> Request; refuses what PALS refuses."""
    values: dict = {}
    for opt in OPTIONS:  # PALS's variables give defaults; the command line overrides them
        if opt.env and environ.get(opt.env):
            _set(values, opt, opt.env, environ[opt.env])
    i = 0
    command: list[str] = []
    while i < len(args):
        a = args[i]
        if a == "--":
            command = args[i + 1:]
            break
        if not a.startswith("-"):
            command = args[i:]
            break
        name, eq, inline = a.partition("=")
        opt = BY_NAME.get(name)
        if opt is None:
            hint = (" (PALS binds with --cpu-bind and places ranks with --ppn)"
                    if name in OTHER_MPI else "")
            raise UsageError(f"mpiexec: unrecognized option '{name}'{hint}")
        if opt.takes == "flag":
            if eq:
                raise UsageError(f"mpiexec: option '{name}' takes no value")
            _set(values, opt, name, opt.value)
            i += 1
            continue
        if opt.takes == "pair":
            text = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
            i += 1 if eq else 2
            if text is None:
                raise UsageError(f"mpiexec: option '{name}' requires NAME VALUE")
            key, sep, val = text.partition("=")
            if not sep:  # NAME VALUE: craycli's form (and hydra's -genv)
                if i >= len(args):
                    raise UsageError(f"mpiexec: option '{name}' requires NAME VALUE")
                val, i = args[i], i + 1
            _set(values, opt, name, (key, val))
            continue
        if eq:
            raw, i = inline, i + 1
        elif i + 1 < len(args):
            raw, i = args[i + 1], i + 2
        else:
            raise UsageError(f"mpiexec: option '{name}' requires an argument")
        _set(values, opt, name, raw)
    if not command:
        raise UsageError("mpiexec: no command given")
    if ":" in command:
        raise UsageError("mpiexec: MPMD (':' between commands) is PALS's, but this fake runs "
                         "one command")
    hosts = values.pop("hosts", None)
    hostfile = values.pop("hostfile", None)
    ppn = values.pop("ppn", None) or None  # 0 is PALS's "not given"
    req = Request(command=command, ppn=ppn, **values)
    if hosts is not None:
        req.hosts = list(dict.fromkeys(h for h in hosts.split(",") if h))
    else:
        hostfile = hostfile or environ.get("PBS_NODEFILE")
        req.hosts = read_hostfile(hostfile) if hostfile else ["localhost"]
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


def hydra_command(req: Request, hydra_path: str, host_cpus: list[int],
                  status_dir: str = "") -> list[str]:
    """The MPICH hydra command line that runs the request's ranks on this machine; each rank
    records its pid and exit status in status_dir (bin/fake-rank) for the abort rule."""
    env = {**req.env, "PARSL_AURORA_HOSTS": " ".join(req.hosts),
           "PARSL_AURORA_BIND": " ".join(host_cpu_sets(req, host_cpus)),
           "PARSL_AURORA_PALS_STATUS": status_dir}
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


def exit_status(code: int) -> int:
    """A Popen returncode as a shell reports it (-9 -> 137)."""
    return 128 - code if code < 0 else code


def supervise(finished: Callable[[], bool], codes: Callable[[], list[int]],
              running_groups: Callable[[], list[int]], abort: bool) -> int:
    """Wait for the ranks; with PALS's abort rule, the first non-zero exit ends every other
    rank (SIGTERM to its process group, SIGKILL after ABORT_GRACE_S). The exit status is the
    largest of the ranks', as PALS's front end reports it."""
    aborted_at = None
    killed = False
    while not finished():
        time.sleep(0.2)
        if abort and aborted_at is None and any(codes()):
            aborted_at = time.monotonic()
            _signal_groups(running_groups(), signal.SIGTERM)
        elif aborted_at is not None and not killed and (
                time.monotonic() - aborted_at > ABORT_GRACE_S):
            killed = True
            _signal_groups(running_groups(), signal.SIGKILL)
    return max(codes(), default=0)


def _signal_groups(groups: list[int], sig: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except OSError:  # ended meanwhile
            pass


def end_what_is_left(grace: float = ABORT_GRACE_S) -> None:
    """End every process still below this one once the ranks are done: PALS ends all of an
    application's processes with it. hydra signals only its ranks' process groups, so a
    process a rank put in a group of its own (the worker-pool guard's pool) would outlive a
    rank hydra killed; as a subreaper we inherited it. SIGTERM, then SIGKILL after `grace`."""
    procs.end_descendants(grace, grace)


def launch_directly(req: Request, host_cpus: list[int]) -> int:
    """Start every rank as a child process, without PMI: enough for programs that do not call
    MPI (Parsl's worker pool), where hydra is missing (inside the image)."""
    procs.become_subreaper()
    ranks = []
    for env, cpus in rank_environments(req, host_cpus):
        command = ["taskset", "-c", cpus, *req.command] if cpus else req.command
        # Its own session and process group, as hydra gives each rank: an abort ends what the
        # rank started too.
        ranks.append(subprocess.Popen(command, env={**os.environ, **env},
                                      start_new_session=True))

    def forward(sig, _frame):
        _signal_groups([p.pid for p in ranks if p.poll() is None], sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        return supervise(
            lambda: all(p.poll() is not None for p in ranks),
            lambda: [exit_status(p.returncode) for p in ranks if p.returncode is not None],
            lambda: [p.pid for p in ranks if p.poll() is None], req.abort_on_failure)
    finally:
        end_what_is_left()


def launch_with_hydra(req: Request, hydra_path: str, host_cpus: list[int]) -> int:
    """Run the ranks under hydra, which aborts only when a rank dies by a signal (and fake-rank
    turns that into an exit status): PALS's abort rule is applied here, from what each rank
    records in a status folder."""
    status = Path(tempfile.mkdtemp(prefix="fake-pals."))
    procs.become_subreaper()
    try:
        hydra_proc = subprocess.Popen(hydra_command(req, hydra_path, host_cpus, str(status)))

        def forward(sig, _frame):
            hydra_proc.send_signal(sig)  # hydra passes it to every rank

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)

        def recorded(suffix: str) -> dict[str, int]:
            out = {}
            for f in status.glob(f"*.{suffix}"):
                text = f.read_text().strip()
                if text.isdigit():
                    out[f.stem] = int(text)
            return out

        def running() -> list[int]:
            ended = recorded("rc")
            return [pid for rank, pid in recorded("pid").items() if rank not in ended]

        code = supervise(lambda: hydra_proc.poll() is not None,
                         lambda: list(recorded("rc").values()), running, req.abort_on_failure)
        # hydra's own failure (it could not start a rank) leaves no status behind.
        return code or exit_status(hydra_proc.returncode)
    finally:
        end_what_is_left()
        shutil.rmtree(status, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    daemon = os.environ.get("PARSL_AURORA_PALSD")
    if daemon:
        # Called inside the image: PALS starts ranks through its daemon on the host, outside
        # any container, so this fake does too (parsl_aurora.fake.palsd).
        from parsl_aurora.fake import palsd

        return palsd.forward(daemon, argv)
    host_cpus = sorted(os.sched_getaffinity(0))
    try:
        req = parse(argv, dict(os.environ))
        host_cpu_sets(req, host_cpus)  # a bad --cpu-bind is refused before anything starts
    except UsageError as e:
        print(e, file=sys.stderr)
        return 1
    hydra_path = hydra()
    if not hydra_path:
        return launch_directly(req, host_cpus)
    return launch_with_hydra(req, hydra_path, host_cpus)


if __name__ == "__main__":
    sys.exit(main())
