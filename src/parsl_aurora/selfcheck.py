"""`parsl-aurora check`: every assumption the bundle makes about a machine, checked where it
runs (a login node, or with --in-job a one-node job), and which routes work there.

Each check is a function returning a `Check`; commands run with a timeout, so the whole takes
about a minute at most. The verdicts are pure functions of the checks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from parsl_aurora import modes
from parsl_aurora.modes import Queue, Site
from parsl_aurora.topology import Node

LOGIN, COMPUTE, ANY = "login node", "compute node", "any"
# Seconds any one command may take: a hung mount or launcher fails its check, not the run.
TIMEOUT = 60


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not checkable where it ran; `detail` says where it is
    detail: str
    fix: str = ""
    where: str = ANY  # where the result holds: LOGIN, COMPUTE or ANY


def _run(argv: list[str] | str, env: Mapping[str, str] | None = None, cwd: str | None = None,
         ) -> tuple[int, str]:
    """(exit status, stdout and stderr) of a command; 124 when it timed out, 127 when absent."""
    try:
        done = subprocess.run(argv, shell=isinstance(argv, str), env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=TIMEOUT,
                              executable="/bin/bash" if isinstance(argv, str) else None,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return 124, f"no answer in {TIMEOUT} s"
    except FileNotFoundError as e:
        return 127, str(e)
    return done.returncode, (done.stdout + done.stderr).strip()


def _last(text: str) -> str:
    lines = [s for s in text.splitlines() if s.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _gist(text: str) -> str:
    """A failed command's telling line: Lmod, for one, ends its error with advice."""
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    for i, line in enumerate(lines):
        if "error" in line.lower() or "unknown" in line.lower():
            return " ".join(lines[i:i + 2])
    return _last(text)


# ---------------------------------------------------------------- the checks
def apptainer(where: str) -> tuple[Check, str | None]:
    """apptainer on PATH, else after `module load apptainer` (how Aurora's compute nodes have
    it); the check and the executable's path."""
    found = shutil.which("apptainer")
    if found is None:
        rc, out = _run("module load apptainer >/dev/null 2>&1 && command -v apptainer")
        found = out.splitlines()[-1] if rc == 0 and out else None
    if found is None:
        return Check("apptainer", False, "not on PATH, nor from `module load apptainer`",
                     "containers run on Aurora's compute nodes only: use a route whose "
                     "driver runs from a venv", where), None
    rc, out = _run([found, "version"])
    return Check("apptainer", rc == 0, f"{found} ({_last(out)})", "", where), found


def image_mounts(image: str | None, exe: str | None, where: str) -> Check:
    """Can this user run the image here (an unprivileged SIF mount)?"""
    if image is None:
        return Check("image runs", None, "no image named (pass --image aurora.sif)", "", where)
    if exe is None:
        return Check("image runs", False, "apptainer missing (above)", "see apptainer", where)
    rc, out = _run([exe, "exec", "--cleanenv", image, "true"])
    if rc == 0:
        who = "root" if os.geteuid() == 0 else "an unprivileged user"
        return Check("image runs", True, f"`apptainer exec {image} true` as {who}", "", where)
    return Check("image runs", False, f"`apptainer exec {image} true`: {_last(out)}",
                 "check the path; on a login node, run workers and the driver from a venv "
                 "and the image on compute nodes", where)


def image_build(user: str, subuid: Path = Path("/etc/subuid")) -> Check:
    """Whether `apptainer build --fakeroot` can run apt-get here: it needs a /etc/subuid entry
    or the `fakeroot` command (apptainer#1751); `make image` needs neither on the path from a
    base that holds Python."""
    try:
        entries = {line.split(":")[0] for line in subuid.read_text().splitlines() if line}
    except OSError:
        entries = set()
    mapped = user in entries or str(os.getuid()) in entries
    fakeroot = shutil.which("fakeroot")
    detail = (f"/etc/subuid entry for {user}: {'yes' if mapped else 'no'}; fakeroot command: "
              f"{fakeroot or 'no'}")
    if mapped or fakeroot:
        return Check("image build", True, detail)
    return Check("image build", False, detail + " (apt-get in %post fails: "
                 "\"Failed to setgroups\")",
                 "build from a base that already holds Python, with no apt-get in %post, as "
                 "`make image` does (docs/image.md)")


def interface(site: Site) -> Check:
    from parsl_aurora.errors import ConfigError

    try:
        address = modes.check_interface(site.interface, None)
    except ConfigError as e:
        return Check("interface", False, f"{site.interface}: not on this host", e.fix)
    return Check("interface", True, f"{site.interface} has {address}: workers reach the "
                 "interchange there")


def open_files(pools: int) -> Check:
    limit = modes.open_file_limit()
    if limit is None:
        return Check("open files", True, "no hard limit")
    most = (limit - modes.INTERCHANGE_FILES) // 2
    detail = f"hard limit {limit}: at most {most} worker pools on one interchange"
    if pools > most:
        return Check("open files", False, f"{detail}, fewer than the {pools} asked",
                     "split the nodes over two executors, or raise `ulimit -Hn` in the shell "
                     "that starts the driver")
    return Check("open files", True, detail)


def python_vs_image(image: str | None) -> Check:
    from parsl_aurora import container
    from parsl_aurora.errors import ConfigError, ImageError

    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if image is None:
        return Check("python vs image", None, f"driver Python {here}; no image named")
    try:
        container.check_image(image)
    except (ConfigError, ImageError) as e:
        fix = getattr(e, "fix", "")
        return Check("python vs image", False, str(e).split(". Fix:")[0], fix)
    return Check("python vs image", True, f"the image holds this driver's Parsl and Python "
                 f"{here} (from its labels)")


def modules(env: Mapping[str, str]) -> Check:
    """The modules a block will load (those loaded here) load in a fresh shell, and after them
    and this environment's activation the block's Python imports this driver's Parsl: a
    module's PYTHONPATH (the PE's own py-parsl, say) must not shadow it."""
    import parsl

    from parsl_aurora import lmod

    lines = lmod.replay(env, modules=True, worker_init_uses=False)
    probe = "python3 -c 'import parsl; print(parsl.__version__, parsl.__file__)'"
    rc, out = _run("\n".join(["set -e", *lines, modes.driver_environment(), probe]), env=env)
    loaded = " ".join(lmod.loaded(env)) or "none"
    if rc != 0:
        return Check("modules", False, f"loading {loaded} and this environment in a fresh "
                     f"shell: {_gist(out)}",
                     "load them again (`module load ...`) and check `module list`, or unload "
                     "the ones that fail, before starting the driver")
    got = _last(out).split()
    prefix = Path(sys.prefix).resolve()
    if len(got) != 2 or got[0] != parsl.__version__ or prefix not in Path(got[1]).resolve(
            ).parents:
        return Check("modules", False, f"after loading {loaded} and this environment, a "
                     f"block's python3 imports parsl {' '.join(got)}, not this environment's "
                     f"(under {prefix})",
                     "unset the PYTHONPATH that puts another Parsl first (a module's, e.g. the "
                     "PE's py-parsl: unload it), so blocks import the bundle's")
    return Check("modules", True, f"blocks load {loaded}, then this environment, and import "
                 f"its parsl {got[0]}")


def pals(site: Site, node: Node, env: Mapping[str, str]) -> Check:
    """The launcher lines as the bundle writes them, run for real on this job's nodes: one
    pool per node (--ppn 1 --no-abort-on-failure) and one MPI rank per tile."""
    from parsl.launchers import MpiExecLauncher

    from parsl_aurora import topology

    nodefile = env.get("PBS_NODEFILE")
    if not nodefile:
        return Check("pals", None, "not in a PBS job", "", COMPUTE)
    hosts = modes.read_nodefile(nodefile)
    pal = site.pals_node or node
    pools = MpiExecLauncher(**modes.POOL_MPIEXEC)("true", 1, len(set(hosts)))
    bind = topology.rank_cpu_bind(pal, site.cores_per_rank)
    ranks = (f"mpiexec -n {pal.tiles} -ppn {pal.tiles} -hosts {hosts[0]} "
             f"--cpu-bind {bind} true")
    with tempfile.TemporaryDirectory(prefix="parsl-aurora-check-") as d:
        script = f"{site.worker_init}\nexport JOBNAME=check\n{pools}\n{ranks}"
        rc, out = _run(script, env=env, cwd=d)
    if rc == 0:
        return Check("pals", True, f"mpiexec took the pool line on {len(set(hosts))} node(s) "
                     f"and {pal.tiles} ranks with the tile binding", "", COMPUTE)
    return Check("pals", False, f"the bundle's mpiexec lines failed ({rc}): {_last(out)}",
                 "report it with this output: the launcher's options changed", COMPUTE)


def parse_qstat_Qf(text: str) -> dict[str, dict[str, str]]:
    """`qstat -Qf` -> {queue: {attribute: value}}, PBS's folded lines joined."""
    queues: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    last = ""
    for line in text.splitlines():
        if line.startswith("Queue: "):
            current = queues.setdefault(line[7:].strip(), {})
        elif current is not None and line.startswith("\t") and last:
            current[last] += line.strip()
        elif current is not None and " = " in line:
            last, _, value = line.strip().partition(" = ")
            current[last] = value
    return queues


def _hms(text: str) -> int:
    h, m, s = (int(x) for x in text.split(":"))
    return h * 3600 + m * 60 + s


def _clock(seconds: int) -> str:
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _limit(attrs: Mapping[str, str], key: str, who: str) -> int | None:
    m = re.search(rf"\[{who}:PBS_GENERIC=(\d+)\]", attrs.get(key, ""))
    return int(m.group(1)) if m else None


def queue_differences(table: Mapping[str, Queue], server: Mapping[str, Mapping[str, str]],
                      ) -> list[str]:
    """Where the site's queue table allows what the server refuses (each a sentence); a
    routing queue is judged with its destinations, as PBS routes."""
    problems = []
    for name, q in table.items():
        attrs = server.get(name)
        if attrs is None:
            problems.append(f"{name}: no such queue on this server")
            continue
        dests = [server.get(d, {}) for d in attrs.get("route_destinations", "").split(",") if d]
        parts = dests or [attrs]
        said = "the site's table"
        wall = [_hms(p["resources_max.walltime"]) for p in parts
                if "resources_max.walltime" in p]
        most = [x for x in (_hms(attrs["resources_max.walltime"])
                            if "resources_max.walltime" in attrs else None,
                            max(wall) if wall and len(wall) == len(parts) else None) if x]
        ours = max([modes.walltime_seconds(w) for w in
                    [q.max_walltime, *(w for _, w in q.walltime_by_nodes)] if w] or [0])
        if most and (not ours or ours > min(most)):
            problems.append(f"{name}: the server takes at most {_clock(min(most))} of "
                            f"walltime, {said} {_clock(ours) if ours else 'no limit'}")
        low = attrs.get("resources_min.walltime")
        if low and _hms(low) > modes.walltime_seconds(q.min_walltime or "0:00:01"):
            problems.append(f"{name}: the server wants at least {low}, {said} "
                            f"{q.min_walltime or 'nothing'}")
        tops = [p.get("resources_max.nodect") for p in parts]
        if all(tops) and (q.max_nodes is None or q.max_nodes > max(int(t) for t in tops)):
            problems.append(f"{name}: the server runs at most {max(int(t) for t in tops)} "
                            f"nodes a job, {said} {q.max_nodes or 'no limit'}")
        bottoms = [int(p.get("resources_min.nodect", 1)) for p in parts]
        if q.min_nodes < min(bottoms):
            problems.append(f"{name}: the server wants at least {min(bottoms)} nodes a job, "
                            f"{said} {q.min_nodes}")
        for key, who, ours_n, what in (
                ("max_queued", "u", q.max_user_queued, "queued jobs a user"),
                ("max_queued", "p", q.max_project_queued, "queued jobs a project"),
                ("max_run", "u", q.max_user_running, "running jobs a user"),
                ("max_run", "p", q.max_project_running, "running jobs a project")):
            found = [x for x in (_limit(p, key, who) for p in [attrs, *dests]) if x is not None]
            if found and (ours_n is None or ours_n > min(found)):
                problems.append(f"{name}: the server allows {min(found)} {what}, {said} "
                                f"{ours_n if ours_n is not None else 'no limit'}")
    return problems


def queues(site: Site, env: Mapping[str, str]) -> Check:
    rc, out = _run(["qstat", "-Qf"], env=env)
    if rc != 0:
        return Check("queues", False, f"`qstat -Qf` failed ({rc}): {_last(out)}",
                     "run where PBS's commands work (a login node) with PBS on PATH")
    problems = queue_differences(site.queues, parse_qstat_Qf(out))
    if problems:
        return Check("queues", False, "; ".join(problems),
                     f"the {site.name} site's queue table is out of date: tell the "
                     "maintainers; until then pass allow_unlisted_queue=True or the limit PBS "
                     "reports")
    return Check("queues", True, f"{', '.join(site.queues)} as `qstat -Qf` reports them")


# ---------------------------------------------------------------- verdicts
# Each route, and the checks it needs with where each must hold.
ROUTES = {
    "a": ("a venv driver on a login node, workers from the venv",
          (("queues", ANY), ("interface", LOGIN), ("open files", LOGIN), ("modules", ANY))),
    "b": ("a venv driver on a login node, workers in the image",
          (("queues", ANY), ("interface", LOGIN), ("open files", LOGIN), ("modules", ANY),
           ("python vs image", ANY), ("apptainer", COMPUTE), ("image runs", COMPUTE))),
    "c": ("in_job with the image (qsub examples/in_job.pbs)",
          (("apptainer", COMPUTE), ("image runs", COMPUTE), ("pals", COMPUTE),
           ("interface", COMPUTE), ("open files", COMPUTE))),
    "d": ("the driver in the image on a login node (opt-in)",
          (("queues", ANY), ("interface", LOGIN), ("apptainer", LOGIN), ("image runs", LOGIN))),
}


def verdicts(checks: list[Check], here: str) -> dict[str, tuple[str, str]]:
    """Route -> (its description, "works", "fails: ..." or "unknown here: ...")."""
    by = {c.name: c for c in checks}
    out = {}
    for route, (what, needs) in ROUTES.items():
        failed, unknown = [], []
        for name, place in needs:
            c = by.get(name)
            if c is None or c.ok is None or (place not in (ANY, here) and c.where != place):
                unknown.append(name if place in (ANY, here) else f"{name} on a {place}")
            elif not c.ok:
                failed.append(name)
        if failed:
            out[route] = (what, "fails: " + ", ".join(failed))
        elif unknown:
            out[route] = (what, "not checked here: " + ", ".join(unknown))
        else:
            out[route] = (what, "works")
    return out


def run(site: Site, node: Node, *, image: str | None, in_job: bool, pools: int,
        env: Mapping[str, str] | None = None) -> list[Check]:
    """Every check, in the order printed."""
    env = dict(os.environ if env is None else env)
    if site.prepare is not None:  # the fake: its qstat and mpiexec, with a state of its own
        env.update(site.prepare(Path(tempfile.mkdtemp(prefix="parsl-aurora-check-"))))
    here = COMPUTE if in_job else LOGIN
    image = str(Path(image).resolve()) if image else None
    found, exe = apptainer(here)
    checks = [found, image_mounts(image, exe, here), python_vs_image(image),
              image_build(env.get("USER") or env.get("LOGNAME") or str(os.getuid())),
              interface(site), open_files(pools), modules(env), queues(site, env)]
    if in_job:
        checks.append(pals(site, node, env))
    else:
        checks.append(Check("pals", None, "not in a job: run `parsl-aurora check --in-job` in "
                            "a one-node job", "", COMPUTE))
    return checks


def report(checks: list[Check], here: str) -> str:
    mark = {True: "ok", False: "FAIL", None: "--"}
    lines = [f"parsl-aurora check, on a {here}:"]
    for c in checks:
        lines.append(f"  {mark[c.ok]:<4}  {c.name:<16} {c.detail}"
                     + (f". Fix: {c.fix}" if c.ok is False and c.fix else ""))
    lines.append("routes:")
    for route, (what, verdict) in verdicts(checks, here).items():
        lines.append(f"  ({route}) {what}: {verdict}")
    return "\n".join(lines) + "\n"
