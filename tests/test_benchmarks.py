"""The benchmark harness's pure parts: statistics, verdicts, tables, stand-in PBS commands."""

import importlib
import logging
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """The benchmark modules, imported from benchmarks/ as its scripts import each other."""
    monkeypatch.syspath_prepend(str(BENCH))
    return SimpleNamespace(**{m: importlib.import_module(m) for m in
                              ("harness", "configs", "scheduler", "container", "run_all",
                               "slowfs", "model", "sharedfs", "first_result", "throughput")})


def test_ratios_pair_run_i_with_run_i(bench):
    assert bench.harness.paired_ratios([2, 6, 3], [1, 3, 6]) == [2, 2, 0.5]
    # A failed run (None) on either side leaves its pair out.
    assert bench.harness.paired_ratios([2, None, 3, 4], [1, 3, None, 2]) == [2, 2]


@pytest.mark.parametrize("values, target, expected", [
    ([0.90, 0.95, 1.00, 1.02, 1.04, 0.98, 1.01], {"limit": 1.05}, "yes"),
    ([1.06, 1.10, 1.20, 1.30, 1.50, 1.07, 1.09], {"limit": 1.05}, "no"),
    # 5 of 7 paired ratios meet the target, 2 do not: they do not separate (though their
    # middle half, Q1 0.935 to Q3 1.03, does meet it).
    ([0.90, 0.92, 0.95, 0.97, 1.00, 1.06, 1.20], {"limit": 1.05}, "within noise (0.90-1.20)"),
    ([0.96, 1.00, 1.05, 1.10, 1.40], {"limit": 0.95, "better": "higher"}, "yes"),
    ([0.90, 1.00, 1.05, 1.10, 1.40], {"limit": 0.95, "better": "higher"},
     "within noise (0.90-1.40)"),
    ([0.80, 0.85, 0.90, 0.91, 0.94], {"limit": 0.95, "better": "higher"}, "no"),
])
def test_verdict_is_within_noise_unless_every_value_is_on_one_side_of_the_target(
        bench, values, target, expected):
    assert bench.harness.verdict(values, bench.harness.Target(**target)) == expected


def test_failed_runs_are_counted_and_left_out_of_figures_and_verdicts(bench):
    h = bench.harness
    values = {"base": [1.0, 1.0, None, 1.0, 1.0], "case": [0.9, None, 0.9, 0.95, 1.2]}
    # Pairs 2 and 3 have a failed run; of the other three ratios one is over the target.
    assert h.judged(values, "case", h.Target(1.05, of="base")) == (
        0.95, "within noise (0.90-1.20); 2 of 5 pairs had a failed run")
    assert h.judged(values, "base", h.Target(1.5)) == (1.0, "yes; 1 of 5 runs failed")
    assert h.judged({"case": [None, None]}, "case", h.Target(1.5)) == (
        None, "no verdict: 2 of 2 runs failed")
    assert h.failures(values) == (2, 10)


def test_relative_target_is_judged_on_paired_ratios_not_on_medians(bench):
    # The case is slower than its baseline in every run (ratio 1.2), though the spread of each
    # case alone overlaps the other's: pairing the interleaved runs separates them.
    values = {"base": [1.0, 2.0, 3.0, 4.0, 5.0], "case": [1.2, 2.4, 3.6, 4.8, 6.0]}
    t = bench.harness.Target(1.05, of="base")
    figure, holds = bench.harness.judged(values, "case", t)
    assert (round(figure, 3), holds) == (1.2, "no")


def test_group_table_is_rendered_whole(bench):
    h = bench.harness
    group = {"unit": "s", "baseline": "tuned", "cases": ["tuned", "mode"],
             "labels": {"tuned": "hand-tuned"},
             "targets": {"mode": [h.Target(1.05, of="tuned").as_dict(), h.Target(1.5).as_dict()]}}
    values = {"tuned": [1.0, 2.0, 1.0], "mode": [1.0, 2.2, 1.2]}
    assert h.group_table(group, values).splitlines() == [
        "| case | median (s) | min-max | runs | ratio to `tuned` | target | holds |",
        "| --- | ---: | --- | --- | ---: | --- | --- |",
        "| hand-tuned | 1.00 | 1.00-2.00 | 1.00 2.00 1.00 | 1.00 | - | - |",
        ("| `mode` | 1.20 | 1.00-2.20 | 1.00 2.20 1.20 | 1.10 | <= 1.05x `tuned`; <= 1.5 s | "
         "within noise (1.00-1.20); within noise (1.00-2.20) |"),
    ]
    group["caveats"] = {"mode": "it failed"}
    assert h.group_table(group, values).endswith(
        "within noise (1.00-1.20); within noise (1.00-2.20); it failed |")
    assert h.summary_rows("First result", group, values) == [
        ["First result, `mode`", "1.10x", "<= 1.05x `tuned`",
         "within noise (1.00-1.20); it failed"],
        ["First result, `mode`", "1.20 s", "<= 1.5 s", "within noise (1.00-2.20); it failed"]]


def test_a_failed_run_shows_in_the_table_and_the_summary(bench):
    h = bench.harness
    group = {"unit": "s", "baseline": "tuned", "cases": ["tuned", "mode"],
             "targets": {"mode": [h.Target(1.05, of="tuned").as_dict()]}}
    values = {"tuned": [1.0, 2.0, 1.0], "mode": [1.0, None, 1.0]}
    assert h.group_table(group, values).splitlines()[2:] == [
        "| `tuned` | 1.00 | 1.00-2.00 | 1.00 2.00 1.00 | 1.00 | - | - |",
        ("| `mode` | 1.00 | 1.00-1.00 | 1.00 failed 1.00 | 1.00 | <= 1.05x `tuned` | "
         "yes; 1 of 3 pairs had a failed run |")]
    assert h.summary_rows("First result", group, values) == [
        ["First result, `mode`", "1.00x", "<= 1.05x `tuned`",
         "yes; 1 of 3 pairs had a failed run"]]
    values["mode"] = [None] * 3
    assert h.group_table(group, values).splitlines()[3] == (
        "| `mode` | - | - | failed failed failed | - | <= 1.05x `tuned` | "
        "no verdict: 3 of 3 pairs had a failed run |")


def test_interleave_rotates_the_first_case_each_round(bench):
    order = []
    cases = {c: (lambda c=c: order.append(c) or len(order)) for c in "abc"}
    values = bench.harness.interleave(cases, 3)
    assert order == list("abc" "bca" "cab")
    assert values == {"a": [1, 6, 8], "b": [2, 4, 9], "c": [3, 5, 7]}


def test_lock_pins_keep_name_and_version_only(bench):
    lock = ("# header\ncertifi==2024.12.14 \\\n    --hash=sha256:12 \\\n    # via requests\n"
            "parsl==2025.1.13 \\\n    --hash=sha256:34\n")
    assert bench.harness.lock_pins(lock) == "certifi==2024.12.14\nparsl==2025.1.13\n"


def test_refusing_qsub_answers_as_pbs_and_logs_the_call(bench, tmp_path):
    s = bench.scheduler
    log = tmp_path / "calls.log"
    script = tmp_path / "qsub"
    script.write_text(s.standin("qsub", "/nonexistent/qsub", str(log),
                                s.SCENARIOS["qsub refused"]["qsub"]))
    script.chmod(0o755)
    r = subprocess.run([str(script), "-q", "debug", "job.sh"], capture_output=True, text=True,
                       check=False)
    assert (r.returncode, r.stdout, r.stderr) == (
        38, "", "qsub: would exceed queue generic's per-user limit\n")
    stamp, command = log.read_text().split()
    assert command == "qsub" and float(stamp) > 0


def test_failing_qstat_prints_only_the_json_header_and_exits_255(bench, tmp_path):
    import json

    s = bench.scheduler
    script = tmp_path / "qstat"
    script.write_text(s.standin("qstat", "/nonexistent", str(tmp_path / "log"),
                                s.SCENARIOS["qstat fails (JSON header, exit 255)"]["qstat"]))
    script.chmod(0o755)
    r = subprocess.run([str(script), "-f", "-F", "json", "1.server"], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 255
    assert set(json.loads(r.stdout)) == {"timestamp", "pbs_version", "pbs_server"}
    assert r.stderr.splitlines()[-1].startswith("qstat: cannot connect to server ")
    garbage = s.SCENARIOS["qstat prints non-JSON"]["qstat"][1]
    with pytest.raises(json.JSONDecodeError):
        json.loads(garbage)


def test_forwarding_standin_runs_the_real_command_with_its_arguments(bench, tmp_path):
    real = tmp_path / "real"
    real.write_text('#!/bin/sh\necho "real $*"\nexit 3\n')
    real.chmod(0o755)
    script = tmp_path / "qdel"
    script.write_text(bench.scheduler.standin("qdel", str(real), str(tmp_path / "log"), None))
    script.chmod(0o755)
    r = subprocess.run([str(script), "-W", "force", "7.x"], capture_output=True, text=True,
                       check=False)
    assert (r.returncode, r.stdout) == (3, "real -W force 7.x\n")


def test_calls_counts_each_command_inside_the_window_only(bench):
    log = "99.9 qsub\n100.0 qsub\n100.5 qstat\n159.9 qdel\n160.0 qsub\n"
    assert bench.scheduler.calls(log, 100.0, 60) == {"qsub": 1, "qstat": 1, "qdel": 1}


def test_a_workflow_that_gave_up_is_named_beside_its_verdict(bench):
    details = {"qsub refused / multi_job": [
                   {"state": "running"},
                   {"state": "failed: TooManyJobFailuresError: Error 1:"}],
               "qsub refused / tuned_pbs": [{"state": "running"}]}
    assert bench.scheduler.failures(details) == {
        "qsub refused / multi_job": "the workflow failed: TooManyJobFailuresError"}


def test_count_stale_reads_python_verbose_output(bench):
    err = ("# /x/__pycache__/a.cpython-311.pyc matches /x/a.py\n"
           "# code object from '/x/__pycache__/a.cpython-311.pyc'\n"
           "# bytecode is stale for 'b'\n"
           "# code object from '/x/__pycache__/stale.cpython-311.pyc'\n")
    assert bench.container.count_stale(err) == {"stale": 1, "used": 2}


def test_count_under_keeps_calls_whose_path_is_in_the_folder(bench):
    trace = [
        '12 openat(AT_FDCWD, "/shared/venv/lib/x.py", O_RDONLY) = 3',
        '[pid 13] newfstatat(AT_FDCWD, "/shared", {st_mode=S_IFDIR}, 0) = 0',
        '12 openat(AT_FDCWD, "/sharedother/y", O_RDONLY) = 3',
        '12 <... readlink resumed>"/shared/venv/bin/python3", 4096) = 24',
        '12 stat("/usr/lib/python3.11/os.py", ...) = 0',
    ]
    assert bench.container.count_under("\n".join(trace), "/shared/") == {"openat": 1, "newfstatat": 1}


def test_document_header_states_the_run_counts_of_the_results(bench):
    h = bench.harness
    result = {"about": "About.", "runs": 3, "latency_runs": 4, "measured": "2026-01-01 00:00",
              "seconds": 12.0, "load": 1.5, "machine": "test machine",
              "values": {"multi_job": [1.0, None, 2.0, 3.0]},
              "groups": [{"title": "Calls", "unit": "calls/min", "fmt": "{:.0f}",
                          "cases": ["multi_job"], "targets": {
                              "multi_job": [h.Target(10).as_dict()]}}]}
    doc = bench.run_all.render({"scheduler": result})
    assert "Machine: test machine." in doc
    assert ("| Scheduler calls while PBS refuses or fails | runs 3, latency runs 4 | 1 of 4 | "
            "2026-01-01 00:00 | 12 | 1.5 |") in doc
    assert ("| Scheduler calls while PBS refuses or fails: Calls, `multi_job` | 2 calls/min | "
            "<= 10 calls/min | yes; 1 of 4 runs failed |") in doc
    assert "| `multi_job` | 2 | 1-3 | 1 failed 2 3 | <= 10 calls/min |" in doc


def test_a_failed_scheduler_run_is_shown_in_the_details(bench):
    keep = {"qsub refused / multi_job": [
        {"qsub": 3, "qstat": 4, "qdel": 0, "state": "running"}, None]}
    assert bench.scheduler.details_table(keep).splitlines()[2] == (
        "| qsub refused / multi_job | 3 failed | 4 failed | 0 failed | running; the run failed |")
    assert bench.scheduler.failures(keep) == {}


def _tick_levels(names) -> dict[str, int]:
    return {n: logging.getLogger(n).level for n in names}


def test_tuned_baselines_quiet_the_per_tick_loggers_as_the_site_configs_do(bench, restore_environ,
                                                                          monkeypatch):
    from parsl_aurora.modes import TICK_LOGGERS

    monkeypatch.delenv("PARSL_AURORA_DEBUG", raising=False)
    before = _tick_levels(TICK_LOGGERS)

    def levels(case):
        """The tick loggers' levels once `case`'s config is built in a fresh state."""
        for n in TICK_LOGGERS:
            logging.getLogger(n).setLevel(logging.NOTSET)
        bench.configs.CONFIGS[case]()
        return _tick_levels(TICK_LOGGERS)

    try:
        site = levels("in_job")
        assert site == dict.fromkeys(TICK_LOGGERS, logging.INFO)
        assert {c: levels(c) for c in ("tuned_local", "tuned_pbs", "tuned_mpi",
                                       "multi_job")} == dict.fromkeys(
            ("tuned_local", "tuned_pbs", "tuned_mpi", "multi_job"), site)
        # Parsl's plain default keeps Parsl's logging, and its label says so.
        assert levels("default") == dict.fromkeys(TICK_LOGGERS, logging.NOTSET)
    finally:
        for n, level in before.items():
            logging.getLogger(n).setLevel(level)
    labels = bench.configs.LABELS
    assert "DEBUG logging" in labels["default"]
    assert all("quiet per-tick loggers" in labels[c] and "encryption" in labels[c]
               for c in ("tuned_local", "tuned_pbs", "tuned_mpi"))


def test_no_ratio_divides_runs_of_two_provider_kinds(bench, restore_environ):
    c = bench.configs

    def kind(case):
        """The Parsl provider class a case's built config uses, or derives its own from."""
        provider = c.CONFIGS[case]().executors[0].provider
        return next(k for k in type(provider).__mro__ if k.__module__.startswith("parsl.")).__name__

    assert {case: kind(case) for case in c.CONFIGS} == c.PROVIDERS
    groups = [*bench.first_result.groups(tuple(c.CONFIGS)),
              *bench.throughput.groups(bench.throughput.CASES)]
    assert [g["title"] for g in groups] == ["Inside one job", "Many PBS jobs", "MPI ensembles",
                                            "Inside one job", "Many PBS jobs"]
    for g in groups:
        assert {case: c.PROVIDERS[case] for case in g["cases"]} == dict.fromkeys(
            g["cases"], c.PROVIDERS[g["baseline"]]), g["title"]
    # Parsl's default (LocalProvider) stays beside the LocalProvider cases.
    assert [g["cases"][0] for g in groups] == ["default", "tuned_pbs", "tuned_mpi", "default",
                                               "tuned_pbs"]


def test_every_case_but_parsls_default_runs_encrypted(bench, restore_environ):
    # docs/security.md: no figure here compares encrypted with plain like for like.
    built = {case: make().executors[0].encrypted for case, make in bench.configs.CONFIGS.items()}
    assert built == {case: case != "default" for case in bench.configs.CONFIGS}


def test_hand_tuned_htex_starts_twelve_workers_on_this_machine(bench):
    # Parsl's pool starts min(max_workers_per_node, CPUs // cores_per_worker) workers; the
    # baseline must run the modes' 12 whatever this machine's CPU count.
    import math
    import os

    from parsl.providers import LocalProvider

    htex = bench.configs._htex(LocalProvider())
    cpus = os.cpu_count()
    assert min(htex.max_workers_per_node, math.floor(cpus / htex.cores_per_worker)) == 12
    assert len(htex.available_accelerators) == 12 and htex.encrypted


def _slowfs_counts(slowfs, store, mnt, files, latency_ms, cache=True, passes=1):
    """Seconds to stat `files` through a fresh slowfs `passes` times over, and its counts."""
    with slowfs.mounted(store, mnt, latency_ms, cache=cache) as m:
        start = time.perf_counter()
        for _ in range(passes):
            for f in files:
                (mnt / f).stat()
        seconds = time.perf_counter() - start
    return seconds, m


@pytest.mark.needs("fuse")
def test_slowfs_delays_each_metadata_operation_by_its_latency_and_counts_it(bench, tmp_path):
    store, mnt, n, latency_ms = tmp_path / "store", tmp_path / "mnt", 30, 5.0
    store.mkdir()
    files = [f"f{i}" for i in range(n)]
    for f in files:
        (store / f).write_text(f)
    # What a mount costs with no stat at all (the mount's own look at its root).
    _, empty = _slowfs_counts(bench.slowfs, store, mnt, [], latency_ms)
    seconds, m = _slowfs_counts(bench.slowfs, store, mnt, files, latency_ms, passes=2)
    # The client caches as a Lustre client does: one lookup per new file, none the second time.
    ops = m.metadata() - empty.metadata()
    assert ops == n, m.counts
    per_op = seconds / ops
    # sleep() never wakes early; the passthrough in Python adds well under a millisecond an
    # operation even on the loaded 2-core CI machine, so twice the latency is already absurd.
    assert latency_ms / 1000 <= per_op < 2 * latency_ms / 1000, (per_op, m.counts)
    # Without the cache every stat is a round trip again (a lookup and a getattr, and the
    # parent's), each delayed alike.
    seconds, m = _slowfs_counts(bench.slowfs, store, mnt, files, latency_ms, cache=False)
    ops = m.metadata() - empty.metadata()
    # The kernel may send some of a stat's requests at once, so the wall time bounds the
    # operations from below only per stat: each waits at least one delayed operation.
    assert ops >= 2 * n and seconds >= n * latency_ms / 1000, (seconds, m.counts)
    assert seconds / ops < 2 * latency_ms / 1000, (seconds, m.counts)


@pytest.mark.needs("fuse")
def test_slowfs_drops_its_caches_between_mounts(bench, tmp_path):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    store.mkdir()
    (store / "data").write_bytes(b"x" * 100_000)
    for _ in range(2):  # the second mount must see the reads and lookups again
        with bench.slowfs.mounted(store, mnt, 0.0) as m:
            for _ in range(3):
                assert (mnt / "data").read_bytes() == b"x" * 100_000
        assert m.counts["bytes"] == 100_000, m.counts  # pages kept within a mount
        assert m.counts["getattr"] <= 3 and m.counts["open"] == 3, m.counts


def test_flare_model_fits_mpi4py_and_finds_where_the_image_wins(bench):
    m = bench.model
    i = m.Inputs(venv_ops=5000, mpi4py_ops=1000, mpi4py_one_node=1.0, image_ops=20,
                 image_bytes=30e6, stage_ops=5, sif_bytes=60e6, venv_one_node=3.0,
                 image_one_node=4.0, staged_one_node=3.5, latency_ms=1.0)
    rate = m.mdt_rate(i.mpi4py_ops)
    # The fit: 512 nodes of mpi4py's operations queue 100 s at the MDT (the node's own aside).
    assert rate == 5120
    assert m.startup(512, 0.0, 1000, 0, rate, 1) == pytest.approx(100 * 511 / 512)
    assert m.bandwidth(1) == 650e9 / 160 and m.bandwidth(500) == 650e9
    assert m.knee(1.0, 1000, rate) == pytest.approx(6.12)
    assert m.agreement(40, 32) == "the check holds (within a factor of 2: 1.25x)"
    assert m.agreement(6.12, 32).startswith("the check fails: 5.2x earlier than published")
    # The knee pins one node's time, whatever the operations: COPPER's 32 nodes, 6.05 s.
    assert m.implied_one_node(32) == pytest.approx(31 * 100 / 512)
    for ops in (10, 1000, 10**5):
        assert m.knee(m.implied_one_node(32), ops, m.mdt_rate(ops)) == pytest.approx(32)
    assert "take about 6.1 s on one Flare node" in m.render(i)
    rows = {r["nodes"]: r for r in m.table(i)}
    assert rows[1] == pytest.approx({"nodes": 1, "venv": 3.0, "image": 4.0 + 30e6 / 4.0625e9,
                                     "striped": 4.0 + 30e6 / 650e9,
                                     "staged": 3.5 + 2 * 60e6 / 4.0625e9})
    assert rows[8]["venv"] == pytest.approx(3.0 + 7 * 5000 / 5120)
    assert rows[8]["image"] == pytest.approx(4.0 + 7 * 20 / 5120 + 8 * 30e6 / 4.0625e9)
    # The venv falls behind the image between 1 and 8 nodes, by 10x between 32 and 128.
    assert m.crossing(m.table(i), "image") == 8
    assert m.crossing(m.table(i), "image", 10) == 128
    assert "beats the venv from 8 nodes, by 10x from 128 nodes" in m.render(i)


def test_sharedfs_rewrites_only_its_section(bench, tmp_path):
    s = bench.sharedfs
    doc = tmp_path / "image.md"
    doc.write_text(f"# Image\n\nbefore\n\n{s.BEGIN}\nold table\n{s.END}\n\nafter\n")
    s.write_doc(f"{s.BEGIN}\nnew table\n{s.END}", doc)
    assert doc.read_text() == f"# Image\n\nbefore\n\n{s.BEGIN}\nnew table\n{s.END}\n\nafter\n"
