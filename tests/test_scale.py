"""The interchange at scale: the open-file limit raised for it and checked before submit, and a
burst of a few hundred simulated pools (benchmarks/scale.py's run, small) registering whole.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from parsl_aurora import modes
from parsl_aurora.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOLS = 300
# A login shell's soft limit scaled down with the pool count: about 115 pools' connections.
SOFT = 256


def scale_run(tmp_path: Path, setting: str, pools: int, soft: int, *extra: str) -> dict:
    """One run of the scale bench: a real driver under a soft open-file limit of `soft`."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--one", setting,
                        "--managers", str(pools), "--soft-limit", str(soft), "--tasks", "300",
                        *extra],
                       cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_burst_of_300_pools_registers_whole_under_a_low_soft_open_file_limit(tmp_path):
    # All 300 start at once, as one mpiexec starts a block; the interchange needs about 625
    # open files for them and the driver's soft limit allows 256: the driver raises it for the
    # interchange. Without that, about 115 register and the rest are lost, silently.
    r = scale_run(tmp_path, "bundle", POOLS, SOFT)
    # A pool whose address probe missed (Parsl #1666) never connects; every other registers
    # and stays registered through the tasks.
    assert r["registered"] + r["probe_missed"] == POOLS, r
    assert r["still_registered"] == r["registered"], r
    assert r["soft_limit"] == SOFT  # the driver's, as started
    assert r["interchange_fds"][0] > 2 * (POOLS - r["probe_missed"])


def test_pools_past_the_open_file_limit_are_refused_with_the_count(monkeypatch):
    modes.check_open_files(9950, "max_jobs", 5, limit=20000)
    with pytest.raises(ConfigError) as e:
        modes.check_open_files(9951, "max_jobs", 5, limit=20000)
    assert str(e.value).startswith("max_jobs=5 is not valid: expected at most 9950 worker pools")
    assert "9951 asked for" in str(e.value) and "two executors" in str(e.value)
    monkeypatch.setattr(modes, "open_file_limit", lambda: None)  # unlimited: nothing to check
    modes.check_open_files(10**6, "max_jobs", 5)


def _hard_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@pytest.mark.parametrize("args, field", [
    (["aurora", "multi_job", "--set", "account=P", "--set", "queue=prod", "--set",
      "nodes_per_job=256", "--set", "max_jobs=2", "--set", "walltime=1:00:00", "--set",
      "address=10.1.2.3"], "max_jobs=2"),
    # One job alone is past the limit: fewer jobs cannot help, so the refusal names its nodes.
    (["aurora", "multi_job", "--set", "account=P", "--set", "queue=prod", "--set",
      "nodes_per_job=512", "--set", "walltime=1:00:00", "--set", "address=10.1.2.3"],
     "nodes_per_job=512"),
    (["local", "in_job", "--set", "nodes=460"], "nodefile="),
])
def test_a_request_past_the_drivers_hard_limit_is_refused_before_submit(tmp_path, args, field):
    # 512 (460) pools need 1,124 (1,020) files; a hard limit of 1,000 holds 450 pools.
    r = subprocess.run([str(BIN / "parsl-aurora"), "render", *args], cwd=tmp_path,
                       capture_output=True, text=True, preexec_fn=_hard_limit(1000), check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"parsl-aurora: error: {field}"), r.stderr
    assert "at most 450 worker pools" in r.stderr and r.stderr.count("\n") == 1
    ok = subprocess.run([str(BIN / "parsl-aurora"), "render", *args], cwd=tmp_path,
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr


def _guarded(tmp_path: Path, script: str) -> tuple[int, int, str]:
    """Run a stand-in for the pool under the guard: (exit status, starts, the guard's stderr)."""
    r = subprocess.run([str(ROOT / "container" / "scripts" / "worker_pool_guard.sh"), "bash",
                        "-c", f"echo start >> starts; {script}"], cwd=tmp_path,
                       capture_output=True, text=True, check=False)
    return r.returncode, len((tmp_path / "starts").read_text().splitlines()), r.stderr


@pytest.mark.parametrize("script, status, starts", [
    # Parsl 2025.1.13's pool exits 5 when its address probe missed (#1666): started again.
    ('[ "$(wc -l < starts)" -ge 2 ] || exit 5', 0, 2),
    ("exit 5", 5, 3),  # at most three starts, then the block fails as it would have
    ("exit 7", 7, 1),  # any other failure is the block's failure, at once
    ("exit 0", 0, 1),
])
def test_the_guard_starts_a_pool_again_when_its_address_probe_missed(
        tmp_path, script, status, starts):
    rc, started, err = _guarded(tmp_path, script)
    assert (rc, started) == (status, starts)
    assert err.count("probe missed") == starts - 1


def test_the_heartbeat_slows_with_the_square_of_the_pools_above_4096():
    from site_configs import aurora

    assert modes.heartbeat(aurora.SITE, 4096) == aurora.SITE.heartbeat == (10, 60)
    # 9,000 pools: (9000 / 4096)^2 = 4.83 times the period and threshold.
    assert modes.heartbeat(aurora.SITE, 9000) == (49, 290)
    ex = aurora.multi_job(account="P", queue="prod", nodes_per_job=1000, max_jobs=9,
                          walltime="1:00:00", address="10.1.2.3").executors[0]
    assert (ex.heartbeat_period, ex.heartbeat_threshold) == (49, 290)


def test_a_simulated_pool_holds_each_task_its_length_and_counts_its_worker_seconds():
    from parsl_aurora.fake.managers import Held

    held = Held()
    a, b = object(), object()
    held.add(100.0, 2.0, a, b"x")
    held.add(101.0, 0.5, b, b"y")
    assert held.ready(101.4) == {}
    assert held.busy_seconds(101.4) == pytest.approx(1.4 + 0.4)
    assert held.ready(101.5) == {b: [b"y"]}  # the shorter task first, when its time is up
    assert held.next_due(0) == 102.0
    assert held.ready(102.0) == {a: [b"x"]}
    # Each worker busy its task's length, however late the loop sends the result.
    assert held.busy_seconds(105.0) == pytest.approx(2.5)


@pytest.mark.slow
def test_the_busy_share_is_measured_with_tasks_held_their_length(tmp_path):
    # 12 pools of 12 workers; tasks of the length the no-op rate implies, then of the length
    # the first share implies, for 2 s each between the first wave and the last: the pools'
    # worker-seconds are exactly the tasks' lengths, and the shares are shares.
    r = scale_run(tmp_path, "bundle", 12, 1024, "--busy", "2")
    first, second = r["busy_runs"]
    for run in (first, second):
        assert run["held_tasks"] >= 3 * 12 * 12, run
        assert 0 < run["busy"] <= 1.01, run
    held = sum(run["held_tasks"] * run["held_s"] for run in r["busy_runs"])
    assert r["held_worker_s"] == pytest.approx(held, rel=1e-3), r


def test_a_stopped_run_does_not_hide_an_earlier_complete_one(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from scale import merged

    def run(at, **extra):
        return {"setting": "bundle", "managers": 9000, "heartbeat": [49, 290], "at": at, **extra}

    complete, stopped = run(1), run(2, aborted="time")
    assert merged([complete], [stopped]) == [complete, stopped]
    assert merged([complete, stopped], [run(3, aborted="time")]) == [complete, run(3, aborted="time")]
    assert merged([complete, stopped], [run(4)]) == [run(4)]
    other = {**run(5), "managers": 512}
    assert merged([other], [run(6)]) == [other, run(6)]
