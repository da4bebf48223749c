"""The interchange at Aurora's scale: thousands of simulated worker pools against the real one.

    python benchmarks/scale.py [--sizes 128,512,2048,4096,9000] [--split 10000] [--quick]
    python benchmarks/scale.py --one bundle --managers 300 [--soft-limit 256]   # one run, JSON

Each run is a fresh driver that `parsl.load`s a config (encryption on) whose LocalProvider blocks
start `parsl_aurora.fake.managers`: a few hundred managers per process speaking the pinned
Parsl's protocol, all of a block at once, as one mpiexec starts them. Writes docs/scale.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness

DOC = harness.ROOT / "docs" / "scale.md"
RESULTS = harness.ROOT / "benchmarks" / "scale.json"  # committed with the page it renders
SIZES = (128, 512, 2048, 4096, 9000)
SPLIT = 10000  # as two executors of half each: the open-file limit is per interchange
SETTINGS = ("bundle", "parsl")
# split: the bundle's as two executors; real: with Parsl's own pools; fixed: the bundle's
# without slowing the heartbeat for many pools.
EXTRA_SETTINGS = ("split", "real", "fixed")
# Real pools (12 worker processes each) against simulated ones, on these 2 cores.
CHECK = 4
PER_PROCESS = 300
# Above this many pools they skip Parsl's address probe: thousands of probes at once, each a
# ZMQ context with its own thread, overload these 2 cores far more than the interchange does
# (load average 460 at 9,000), and what is measured is the interchange.
PROBE_UP_TO = 512  # simulated managers per process (one process per block)
TASKS = 5000
WORKERS = 12  # per manager: one per GPU tile, as the bundle runs Aurora's nodes
BUSY = 0.95
# The measured busy share: tasks of the derived shortest length run for at least this long
# between the first wave's end and the last wave's start; only up to BUSY_UP_TO pools (past
# that the driver would hold hundreds of thousands of tasks at once).
BUSY_WINDOW = 20.0
BUSY_UP_TO = 4096
# Bounds on one run: what the managers, the interchange and the driver may hold in all, and
# how long the run may take before it is stopped and reported as such.
MEMORY = 8 * 2**30
RUN_LIMIT = 600.0


# ---------------------------------------------------------------- one run, in its own process
def blocks(n: int, per: int = PER_PROCESS) -> tuple[int, int]:
    """(blocks, managers per block) for n managers, at most `per` in a block, all equal."""
    count = math.ceil(n / per)
    while n % count:
        count += 1
    return count, n // count


def sim_command(managers: int, guarded: bool, probe: bool) -> str:
    """The simulated pools' command; under the bundle's guard a missed probe is probed again,
    as often as the guard starts a pool."""
    starts = guard_starts() if guarded else 1
    return (f"{sys.executable} -m parsl_aurora.fake.managers --managers {managers} "
            f"--starts {starts} --hold" + ("" if probe else " --no-probe"))


def guard_starts() -> int:
    from parsl_aurora.modes import GUARD

    text = (harness.ROOT / "container" / "scripts" / GUARD).read_text()
    return int(re.search(r"^STARTS=(\d+)$", text, re.MULTILINE).group(1))


def executors(setting: str, n: int, run_dir: str) -> list:
    """The executors of one run: the bundle's (the local site's in_job config with Aurora's
    heartbeat), Parsl's defaults, or the bundle's as two executors of n/2."""
    from parsl.launchers import SimpleLauncher
    from parsl.providers import LocalProvider

    parts = 2 if setting == "split" else 1
    # real: Parsl's own worker pools, one per block, to check the simulated ones against.
    count, per = (n, 1) if setting == "real" else blocks(n // parts)
    out = []
    for i in range(parts):
        if setting == "parsl":
            from parsl.executors import HighThroughputExecutor
            from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

            ex = HighThroughputExecutor(label="htex", address="127.0.0.1", encrypted=True,
                                        max_workers_per_node=WORKERS,
                                        launch_cmd=DEFAULT_LAUNCH_CMD)
            # Parsl's default of one core per worker: pools that count an Aurora node's 208
            # CPUs start all 12 (this machine's 2 would make it 2).
            init = "export PARSL_CORES=208"
        else:
            from parsl_aurora import modes
            from site_configs import aurora, local

            ex = local.in_job(nodes=1, run_dir=run_dir).executors[0]
            ex.label = f"htex_{i}"
            # Aurora's heartbeat, scaled as the modes scale it for this many pools.
            ex.heartbeat_period, ex.heartbeat_threshold = (
                aurora.SITE.heartbeat if setting == "fixed"
                else modes.heartbeat(aurora.SITE, n // parts))
            init = ex.provider.worker_init
        if setting != "real":
            from parsl_aurora.modes import GUARD

            ex.launch_cmd = ex.launch_cmd.replace(
                "process_worker_pool.py",
                sim_command(per, GUARD in ex.launch_cmd, n <= PROBE_UP_TO), 1)
        # Every block at once, on this machine: Parsl keeps the provider as `_provider`.
        # min_blocks: an idle block is not scaled in while the run watches its heartbeats.
        ex._provider = LocalProvider(init_blocks=count, min_blocks=count, max_blocks=count,
                                     launcher=SimpleLauncher(), worker_init=init)
        out.append(ex)
    return out


def config(setting: str, n: int, run_dir: str):
    from parsl.config import Config

    from parsl_aurora.modes import STRATEGY_PERIOD

    extra = {} if setting == "parsl" else {"strategy_period": STRATEGY_PERIOD}
    return Config(executors=executors(setting, n, run_dir), run_dir=run_dir, **extra)


def noop() -> None:
    return None


def hold(seconds: float) -> float:
    """A task of `seconds`: the simulated pools (--hold) keep its worker busy that long."""
    return seconds


def busy_share(before: dict, after: dict, workers: int) -> float:
    """The share of `workers` busy between two reads of the pools' reports ({pid: (time,
    worker-seconds)}): each process's worker-seconds over its own clock, summed."""
    return sum((after[p][1] - before[p][1]) / (after[p][0] - before[p][0])
               for p in before if p in after and after[p][0] > before[p][0]) / workers


def busy_fraction(app, length: float, workers: int, run_dir: str,
                  window: float = BUSY_WINDOW) -> dict:
    """Run tasks of `length` s on every worker, enough for at least BUSY_WINDOW s of them after
    the first wave ends and before the last one starts; measure the share of workers busy in
    that window from the worker-seconds the pools report (each process over its own clock)."""
    waves = 2 + math.ceil(window / length)
    count = workers * waves
    done = [0]
    lock = threading.Lock()

    def one_more(_):
        with lock:
            done[0] += 1

    start = time.monotonic()
    futures: list = []

    def submit() -> None:  # while the driver submits, tasks already run and end
        for _ in range(count):
            futures.append(app(length))
            futures[-1].add_done_callback(one_more)

    submitter = threading.Thread(target=submit)
    submitter.start()
    snaps = []
    for mark in (workers, count - workers):
        while done[0] < mark:
            time.sleep(0.05)
        snaps.append({r["pid"]: (r["at"], r["busy_s"]) for r in sim_reports(run_dir)})
    submitter.join()
    for f in futures:
        f.result()
    a, b = snaps
    return {"held_s": length, "held_tasks": count, "busy": busy_share(a, b, workers),
            "busy_window_s": max(b[p][0] - a[p][0] for p in a if p in b),
            "held_run_s": time.monotonic() - start}


def sim_reports(run_dir: str) -> list[dict]:
    """What each process of simulated pools last wrote (parsl_aurora.fake.managers.report)."""
    return [json.loads(p.read_text()) for p in Path(run_dir).rglob("sim-*.json")]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Watch:
    """Stops the run (SIGKILL to this process group's Parsl children, then exit) when the
    processes it started hold more than MEMORY or the run outlives RUN_LIMIT."""

    def __init__(self, limit: float):
        self.peak, self.limit = 0, limit
        self.extra: dict = {}  # what the run's record should say even if it is stopped
        self.start = time.monotonic()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            rss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, rss)
            over = "memory" if rss > MEMORY else (
                "time" if time.monotonic() - self.start > self.limit else "")
            if over:
                print(json.dumps({"aborted": over, "rss": rss, **self.extra}), flush=True)
                for p in me.children(recursive=True):
                    p.kill()
                os._exit(3)
            time.sleep(1)


def one(setting: str, n: int, window: float, tasks: int, soft_limit: int | None,
        limit: float = RUN_LIMIT, busy: float = 0.0) -> dict:
    """Load, wait for every manager, watch heartbeats for `window` s (below 0: that many
    heartbeat periods), run no-op tasks; with `busy` (s), then tasks of the length the no-op
    rate says keeps BUSY of the workers busy for at least that long, measuring the share it
    does, and again at the length that share implies."""
    import psutil

    if soft_limit:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (soft_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    import parsl

    watch = Watch(limit)
    run_dir = str(Path("runinfo").resolve())
    app = parsl.python_app(noop)
    result: dict = {"setting": setting, "managers": n,
                    "soft_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
    with parsl.load(config(setting, n, run_dir)) as dfk:
        exs = [e for e in dfk.executors.values() if hasattr(e, "interchange_proc")]
        ics = [psutil.Process(e.interchange_proc.pid) for e in exs]
        watch.extra["heartbeat"] = [exs[0].heartbeat_period, exs[0].heartbeat_threshold]
        start = time.monotonic()
        connected = missed = 0
        # Until every pool has registered or missed its probe, or none has for a minute (or a
        # heartbeat threshold, if shorter).
        last_new, wait = start, min(60, max(e.heartbeat_threshold for e in exs))
        while connected + missed < n and time.monotonic() - last_new < wait:
            time.sleep(0.5)
            now_connected = sum(e.connected_workers for e in exs) // WORKERS
            reports = sim_reports(run_dir)
            missed = sum(r["states"].get("probe_missed", 0) for r in reports)
            watch.extra.update(registered=now_connected, gave_up=sum(
                r["states"].get("lost", 0) for r in reports))
            if now_connected > connected:
                connected, last_new = now_connected, time.monotonic()
        result["register_s"] = last_new - start if connected + missed == n else None
        result["registered"] = connected
        result["interchange_fds"] = [len(os.listdir(f"/proc/{p.pid}/fd")) for p in ics]
        cpu0, t0 = sum(sum(p.cpu_times()[:2]) for p in ics), time.monotonic()
        if window < 0:
            window = -window * exs[0].heartbeat_period
        result["window_s"] = window
        time.sleep(window)
        result["ic_cpu_idle"] = (sum(sum(p.cpu_times()[:2]) for p in ics) - cpu0) / (
            time.monotonic() - t0) if window else None
        app().result()
        cpu0, t0 = sum(sum(p.cpu_times()[:2]) for p in ics), time.monotonic()
        futures = [app() for _ in range(tasks)]
        for f in futures:
            f.result()
        elapsed = time.monotonic() - t0
        result["tasks_per_s"] = tasks / elapsed
        result["ic_cpu_tasks"] = (sum(sum(p.cpu_times()[:2]) for p in ics) - cpu0) / elapsed
        result["still_registered"] = sum(e.connected_workers for e in exs) // WORKERS
        if busy:
            # First at the length the no-op burst's rate implies, then at the length the
            # first's busy share implies (the sustained rate can be lower than a burst's).
            held = parsl.python_app(hold)
            first = busy_fraction(held, BUSY * n * WORKERS / result["tasks_per_s"],
                                  n * WORKERS, run_dir, busy)
            result["busy_runs"] = [first, busy_fraction(
                held, first["held_s"] * BUSY / max(first["busy"], 0.05), n * WORKERS,
                run_dir, busy)]
        time.sleep(2)  # each process rewrites its report every second
        reports = sim_reports(run_dir)
        result["held_worker_s"] = sum(r.get("busy_s", 0) for r in reports)
    rtts = [r for rep in reports for r in rep["rtts"]]
    states: dict[str, int] = {}
    for rep in reports:
        for k, v in rep["states"].items():
            states[k] = states.get(k, 0) + v
    result.update(
        rtt_p50=percentile(rtts, 0.50), rtt_p99=percentile(rtts, 0.99), heartbeats=len(rtts),
        states=states, lost=n - result["still_registered"],
        probe_missed=states.get("probe_missed", 0), probe_misses=states.get("probe_misses", 0),
        peak_rss=watch.peak,
        heartbeat=[exs[0].heartbeat_period, exs[0].heartbeat_threshold],
        shortest_task_s=BUSY * n * WORKERS / result["tasks_per_s"])
    return result


# ---------------------------------------------------------------- the series, and the page
def run(setting: str, n: int, window: float, tasks: int, soft_limit: int | None = None,
        limit: float = RUN_LIMIT, busy: float = 0.0) -> dict:
    cmd = [sys.executable, __file__, "--one", setting, "--managers", str(n),
           "--window", str(window), "--tasks", str(tasks), "--limit", str(limit)]
    cmd += ["--busy", str(busy)] if busy else []
    if soft_limit:
        cmd += ["--soft-limit", str(soft_limit)]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="scale-", ignore_cleanup_errors=True) as tmp:
        r = subprocess.run(cmd, cwd=tmp, env=harness.python_env(), capture_output=True,
                           text=True, timeout=limit + 120, check=False)
    lines = r.stdout.strip().splitlines()
    out = json.loads(lines[-1]) if lines else {"aborted": f"exit {r.returncode}"}
    if r.returncode and "aborted" not in out:
        out = {"aborted": f"exit {r.returncode}: {r.stderr.strip()[-300:]}"}
    out.update(setting=setting, managers=n, load_before=load, load_after=os.getloadavg()[0],
               measured=dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"))
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def _key(r: dict) -> tuple:
    """Runs kept apart when merged: a setting's heartbeat may have changed between runs."""
    return (r["setting"], r["managers"], r.get("check", False), tuple(r.get("heartbeat", ())))


def merged(saved: list[dict], new: list[dict]) -> list[dict]:
    """Saved runs and new ones: a new complete run replaces the saved runs of its key; a new
    stopped run replaces only stopped ones, so it does not hide an earlier complete one."""
    done = {_key(r) for r in new if "aborted" not in r}
    stopped = {_key(r) for r in new if "aborted" in r}
    return [r for r in saved if _key(r) not in done
            and not ("aborted" in r and _key(r) in stopped)] + new


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--split", type=int, default=SPLIT, help="0: no two-executor run")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--window", type=float, default=None,
                   help="seconds of heartbeats watched (default: two periods)")
    p.add_argument("--tasks", type=int, default=TASKS)
    p.add_argument("--limit", type=float, default=RUN_LIMIT, help="seconds one run may take")
    p.add_argument("--quick", action="store_true", help="128 and 512 only, short windows")
    p.add_argument("--from-json", action="store_true", help="re-render docs/scale.md")
    p.add_argument("--check", type=int, default=CHECK,
                   help="pools in the simulated-against-real check (0: none)")
    p.add_argument("--merge", action="store_true",
                   help="keep the saved runs of other sizes and settings")
    p.add_argument("--one", choices=(*SETTINGS, *EXTRA_SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--managers", type=int, default=300, help=argparse.SUPPRESS)
    p.add_argument("--soft-limit", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--busy", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--busy-up-to", type=int, default=BUSY_UP_TO,
                   help="measure the busy share of the bundle's runs up to this many pools")
    a = p.parse_args()
    if a.one:
        window = 0.0 if a.window is None else a.window
        print(json.dumps(one(a.one, a.managers, window, a.tasks, a.soft_limit, a.limit,
                             a.busy)))
        return 0
    if not a.from_json:
        sizes = [128, 512] if a.quick else [int(s) for s in a.sizes.split(",") if s]
        runs = []
        started = dt.datetime.now(dt.timezone.utc)
        # Two heartbeat periods watched, whatever the period (fewer with --quick).
        window = a.window if a.window is not None else (-1.2 if a.quick else -2)
        for n in sizes:
            for setting in a.settings.split(","):
                runs.append(run(setting, n, window, a.tasks, limit=a.limit,
                                busy=BUSY_WINDOW if setting == "bundle" and n <= a.busy_up_to
                                else 0.0))
        if a.split and not a.quick:
            runs.append(run("split", a.split, window, a.tasks, limit=a.limit))
        for setting in ("real", "bundle") if a.check else ():
            runs.append(run(setting, a.check, window, 1000, limit=a.limit) | {"check": True})
        saved = json.loads(RESULTS.read_text()) if a.merge and RESULTS.exists() else {}
        for r in saved.get("runs", []):  # kept from an earlier series: when that one ran
            r.setdefault("measured", saved["started"])
        runs = merged(saved.get("runs", []), runs)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
        RESULTS.write_text(json.dumps({"started": started.isoformat(timespec="minutes"),
                                       "machine": harness.machine(),
                                       "uptime": uptime.stdout.strip(), "runs": runs},
                                      indent=1))
    DOC.write_text(render(json.loads(RESULTS.read_text())))
    print(DOC.read_text())
    return 0


def _f(x, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


LABEL = {"bundle": "bundle", "parsl": "Parsl's defaults", "split": "bundle, 2 executors",
         "real": "bundle, Parsl's real pools", "fixed": "bundle, heartbeat not slowed"}


def shortest(r: dict) -> str:
    """The shortest task keeping BUSY of the workers busy: measured (the second length tried,
    with the share it kept busy) where the run measured it, else derived from the no-op rate."""
    if "busy_runs" in r:
        first, last = r["busy_runs"]
        bound = "at most" if last["busy"] >= BUSY else "more than"
        return (f"{bound} {last['held_s']:.1f} (measured: {last['held_s']:.1f} s kept "
                f"{last['busy']:.0%} busy, {first['held_s']:.1f} s {first['busy']:.0%})")
    return f"{r['shortest_task_s']:.1f} (derived)"


def _load(r: dict) -> str:
    """The one-minute load average before the run, and after it where recorded."""
    after = f" / {r['load_after']:.0f}" if "load_after" in r else ""
    return f"{r['load_before']:.0f}{after}"


def _registered(r: dict) -> str:
    if r["register_s"] is None:
        return f"never ({r['registered']:,} of {r['managers']:,})"
    return f"{r['register_s']:.1f}"


def _lost(r: dict) -> str:
    if r["setting"] == "real":
        return f"{r['lost']}"
    if r["managers"] > PROBE_UP_TO:
        return f"{r['lost']:,} (no probe)"
    return (f"{r['lost']:,} ({r['probe_missed']} after every probe missed; "
            f"{r.get('probe_misses', 0)} misses in all)")


def _row(r: dict, started: str = "") -> list[str]:
    label = LABEL[r["setting"]]
    if "heartbeat" in r:
        label += " ({} s / {} s)".format(*r["heartbeat"])
    if "aborted" in r:
        state = (f" ({r['registered']:,} registered, {r['gave_up']:,} pools gave up)"
                 if "registered" in r else "")
        return [f"{r['managers']:,}", label, f"stopped: {r['aborted']}{state}", *["-"] * 7,
                _load(r), r.get("measured", started)]
    return [f"{r['managers']:,}", label,
            _registered(r), _lost(r),
            f"{_ms(r['rtt_p50'])} / {_ms(r['rtt_p99'])}", _pct(r["ic_cpu_idle"]),
            _pct(r["ic_cpu_tasks"]), f"{r['tasks_per_s']:.0f}", shortest(r),
            f"{r['peak_rss'] / 2**30:.1f}", _load(r), r.get("measured", started)]


HEADER = ["pools", "settings", "all registered after (s)", "lost",
          "heartbeat round trip p50 / p99 (ms)", "interchange CPU, heartbeats alone",
          "interchange CPU, tasks", "no-op tasks/s",
          f"shortest task keeping {BUSY:.0%} of workers busy (s)", "peak memory (GB)",
          "load average before / after", "measured (UTC)"]


def compare(check: list[dict]) -> str:
    """What the check says, in words: the interchange's side agrees or not, the pools' differ."""
    by = {r["setting"]: r for r in check if "aborted" not in r}
    real, sim = by.get("real"), by.get("bundle")
    if not (real and sim):
        return ""
    return (f"The interchange's CPU with heartbeats alone: {_pct(real['ic_cpu_idle'])} with "
            f"Parsl's pools, {_pct(sim['ic_cpu_idle'])} with simulated ones; while tasks run: "
            f"{_pct(real['ic_cpu_tasks'])} and {_pct(sim['ic_cpu_tasks'])}. The no-op rate "
            f"({real['tasks_per_s']:.0f} and {sim['tasks_per_s']:.0f} tasks/s) and the "
            f"registration time ({real['register_s']:.1f} s and {sim['register_s']:.1f} s) "
            "differ by the pools' own work, which the simulated ones skip: a real pool starts "
            f"{WORKERS} worker processes and hands each task through multiprocessing queues, a "
            "simulated one runs it inline. So the rates measured with simulated pools are the "
            "interchange's and the driver's, an upper bound on what real pools get when the "
            "pools, not the interchange, are the bottleneck. Parsl's pools keep no heartbeat "
            "timings, hence no round trip for them.")


def bundle_heartbeat(r: dict) -> list[int]:
    """The heartbeat the bundle now sets for a run's pools per interchange."""
    from parsl_aurora import modes
    from site_configs import aurora

    parts = 2 if r["setting"] == "split" else 1
    return list(modes.heartbeat(aurora.SITE, r["managers"] // parts))


def render(data: dict) -> str:
    runs = sorted(data["runs"], key=lambda r: (r["managers"], SETTINGS_ORDER.index(r["setting"]),
                                                r.get("heartbeat", [0])[0]))
    scale = [r for r in runs if not r.get("check")]
    check = [r for r in runs if r.get("check")]
    envelope = [r for r in scale if r["setting"] in ("bundle", "split") and "aborted" not in r
                and r["heartbeat"] == bundle_heartbeat(r)]
    env_rows = [[f"{r['managers']:,}" + (" (2 x half)" if r["setting"] == "split" else ""),
                 "{} s / {} s".format(*r["heartbeat"]), _registered(r), _lost(r), _pct(r["ic_cpu_idle"]), f"{r['tasks_per_s']:.0f}",
                 shortest(r)] for r in envelope]
    return TEMPLATE.format(
        table=harness.md_table(HEADER, [_row(r, data["started"]) for r in scale]),
        check=(harness.md_table(HEADER, [_row(r, data["started"]) for r in check]) + "\n\n"
               + compare(check)
               if check else "(not run)"),
        envelope=harness.md_table(
            ["pools (nodes)", "heartbeat period / threshold", "all registered after (s)", "lost",
             "interchange CPU, heartbeats alone",
             "no-op tasks/s", IDLE_HEADER], env_rows),
        **{k: data[k] for k in ("started", "machine", "uptime")}, workers=WORKERS,
        busy=f"{BUSY:.0%}", probe_up_to=PROBE_UP_TO, per=PER_PROCESS, busy_up_to=BUSY_UP_TO,
        window=BUSY_WINDOW)


IDLE_HEADER = f"shortest task keeping {BUSY:.0%} of workers busy (s)"
SETTINGS_ORDER = ("bundle", "fixed", "parsl", "split", "real")


TEMPLATE = """# The interchange at scale

Written by `python benchmarks/scale.py` (`nox -s scale`) from its own measurements; do not edit
by hand; `benchmarks/scale.json` holds the runs it is written from. Last series started
{started} on {machine}; `uptime` at its end: `{uptime}`; each run's one-minute load average
before it started (and after it, where recorded), and when it ran (runs of earlier series kept
with `--merge` say so), are in its row below. A run stopped at its limit does not replace an
earlier complete run of its setting: both are shown.

## What to set: the envelope

With the bundle's settings (Aurora's heartbeat of 10 s and threshold of 60 s, slowed with the
square of the pools above 4,096 per interchange), one interchange:

{envelope}

- One interchange holds at most (hard open-file limit - 100) / 2 pools, one per node: 9,950
  under this machine's hard limit of 20,000. The driver raises its soft limit to the hard limit
  before Parsl starts the interchange, which inherits it
  <!-- claim: tests/test_scale.py::test_a_burst_of_300_pools_registers_whole_under_a_low_soft_open_file_limit -->,
  and a request for more pools than that is refused before anything is submitted, with the
  count and the value to change (`nodes_per_job` when one job alone is too many, else
  `max_jobs`) <!-- claim: tests/test_scale.py::test_a_request_past_the_drivers_hard_limit_is_refused_before_submit -->.
  `ulimit -Hn` on the login node says what yours is.
- More nodes than that: two executors (two interchanges) in one config, each with half the
  jobs; the last row above is 10,000 pools that way. A job above 2,048 nodes gets a warning
  that names the options spreading the same nodes over smaller jobs
  <!-- claim: tests/test_site_configs.py::test_a_job_above_2048_nodes_gets_one_warning_line -->.
- A pool whose address probe missed the interchange (Parsl 2025.1.13 exits 5, #1666) is
  started again by the bundle's guard, up to three times; a miss costs that pool the probe's
  30 s timeout first, which shows in the registration time of a run that had one
  <!-- claim: tests/test_scale.py::test_the_guard_starts_a_pool_again_when_its_address_probe_missed -->.
- Tasks: the last column is the shortest task that keeps {busy} of the workers ({workers} per
  pool) busy, measured up to {busy_up_to:,} pools (tasks of that length run on every worker
  for at least {window:.0f} s; the share of workers busy beside it), derived from the no-op rate
  beyond; shorter tasks should be batched into longer ones. Parsl's own documentation (at
  2025.1.13) asks HTEX for tasks of at least 0.01 s per node (20 s at 2,048 nodes); the
  column says what this interchange sustains by that measure.

## Every run

{table}

## Simulated pools against Parsl's own

The same bundle config with real `process_worker_pool.py` pools ({workers} worker processes
each) and with simulated ones, side by side:

{check}

## How each run goes

A fresh driver `parsl.load`s a config with encryption on; its LocalProvider blocks each start
one process of simulated worker pools (`parsl_aurora.fake.managers`, at most {per} per
process, all of a block at once, as one `mpiexec` starts a block's pools). Each simulated pool
is a manager of Parsl 2025.1.13 built from Parsl's own code: its address probe (up to
{probe_up_to} pools; above that the pools connect without it, as thousands of probes at once,
each a ZMQ context with its own thread, overload these 2 cores far more than the interchange),
its CurveZMQ client context and keys, its registration and heartbeat messages, and tasks run
through Parsl's `execute_task`; each says it has {workers} workers. Under the bundle's guard a
simulated pool whose probe missed probes again, as the guard starts a real one again.

Settings: **bundle**: the site configs' executor (the local site's `in_job`, with Aurora's
heartbeat of 10 s and threshold 60 s; the open-file limit raised); **Parsl's defaults**:
Parsl's `HighThroughputExecutor` with its defaults (heartbeat 30 s, threshold 120 s; strategy
every 5 s), under this machine's soft open-file limit, which is already its hard limit; **2
executors**: the bundle's as two executors of half the pools each; **heartbeat not slowed**:
the bundle's with Aurora's 10 s / 60 s whatever the pools, as before `modes.heartbeat`. A run
stopped at its time limit says how many pools had registered by then and how many had given up
on the interchange (no answer for a heartbeat threshold).

Columns: time from `parsl.load` returning until the interchange counts every pool (starting the
pools' processes included); pools lost (not registered at the end); heartbeat round trip as the
pools see it (sent on the task channel, the interchange's answer received), over the whole run;
the interchange's CPU (user + system, one core = 100%) over two heartbeat periods with no tasks,
and while the tasks run; no-op `python_app` tasks per second, 5,000 from the driver, after a
warm-up task; the shortest task that keeps {busy} of the workers busy: up to {busy_up_to:,}
pools measured in the bundle's runs, twice: tasks of {busy} x workers / no-op rate seconds
(the length the no-op burst implies), then of that length x {busy} / the share of workers the
first kept busy (a steady stream is slower than a burst of 5,000); each time 2 waves plus at
least {window:.0f} s of tasks, one per worker per wave, submitted from one thread as a workflow
does, the simulated pools keeping each task's worker busy for its length without spending CPU
(`--hold`), and the share of workers busy measured from the worker-seconds the pools report
between the end of the first wave and the start of the last; shown is the second length and
the share it kept busy. Past {busy_up_to:,} pools (hundreds of thousands of tasks held by
one driver) and in Parsl's default runs it is derived, {busy} x workers / no-op rate, and says
so; the peak memory of the driver, interchange and pools together. Each run is stopped past
8 GB or 10 minutes.

This machine is a pessimistic stand-in for an Aurora login node: 2 cores, shared with other
work (the load above), and the simulated pools run on the same 2 cores as the interchange and
the driver, where on Aurora they run on the compute nodes. The interchange's CPU share and the
round trips are upper bounds, and the no-op rate a lower bound (so the shortest task an upper
bound), for a login node (where, too, a driver busy with other work submits more slowly);
the registration time here includes starting the pools' processes on these 2 cores. The
open-file limit and the message counts (2 x pools / heartbeat period per second) are the same
anywhere.
"""


if __name__ == "__main__":
    sys.exit(main())
