"""One set of scenarios, run against the fake PBS and against a real OpenPBS server.

Each test asserts what a PBS client can observe (exit codes, stdout, stderr, qstat's JSON, the
job's directory, environment and output files) and runs twice through the `cluster` fixture.
Expectations are written once, from what OpenPBS 23.06 does (verbatim samples:
../shared/reference/openpbs.md); where the fake differs on purpose, the scenario says why.
docs/fake-cluster.md tabulates these scenarios.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from clusters import ID_FORMAT, wait_for

SERVER = "aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"
NODE = re.compile(r"^x4102c0s\d+b0n0\.hostmgmt2102\.cm\.aurora\.alcf\.anl\.gov$")
WHOLE_NODE = "-l select=1:ncpus=208"
MINUTE = "-l walltime=0:01:00"
# Keys a client sees in each state (Parsl reads job_state; `parsl-aurora status` more).
ALWAYS = {"Job_Name", "Job_Owner", "job_state", "queue", "server", "Resource_List",
          "substate", "Variable_List", "Output_Path", "Error_Path", "ctime", "mtime"}
ONCE_RUN = {"exec_host", "exec_vnode"}  # stime too, though not always at the first R
ONCE_ENDED = {"Exit_status", "obittime"}
HEADER = {"timestamp", "pbs_version", "pbs_server"}


def test_qsub_prints_the_job_id_and_qstat_takes_short_forms(cluster):
    d = cluster.workdir()
    out = cluster.qsub(d, "true\n", directives=(WHOLE_NODE, MINUTE))
    assert (out.returncode, out.stderr) == (0, "")
    job_id = out.stdout.strip()
    assert out.stdout == job_id + "\n" and re.match(ID_FORMAT, job_id), out.stdout
    seq = job_id.split(".")[0]
    cluster.wait_state(job_id, "F")
    for form in (seq, f"{seq}.aurora-pbs-0001", job_id):
        rc, doc, _ = cluster.qstat("-x", form)
        assert rc == 0 and list(doc["Jobs"]) == [job_id], form


@pytest.mark.parametrize("args,directives,code,message", [
    (("-q", "nosuchq"), (MINUTE,), 170, "qsub: Unknown queue"),
    (("-q", "debug"), (WHOLE_NODE, "-l walltime=2:00:00"), 188,
     "qsub: Job violates queue and/or server resource limits"),
])
def test_qsub_refuses_what_the_queue_refuses(cluster, args, directives, code, message):
    d = cluster.workdir()
    out = cluster.qsub(d, "true\n", *args, directives=directives)
    assert (out.returncode, out.stdout, out.stderr) == (code, "", message + "\n")


@pytest.mark.parametrize("directives,code,message", [
    (("-l select=0", MINUTE), 166, "qsub: Illegal attribute or resource value"),
    (("-l select=two", MINUTE), 166,
     "qsub: Illegal attribute or resource value Resource_List.select"),
    (("-l select=1", "-l walltime=ten"), 166,
     "qsub: Illegal attribute or resource value Resource_List.walltime"),
    (("-l select=1", "-l walltime=1:2:3:4"), 166,
     "qsub: Illegal attribute or resource value Resource_List.walltime"),
    (("-l select=1", MINUTE, "-Z"), 1, "qsub: invalid option -- 'Z'\nqsub: directive error: -Z "),
])
def test_qsub_refuses_malformed_scripts(cluster, directives, code, message):
    d = cluster.workdir()
    out = cluster.qsub(d, "true\n", directives=directives)
    assert (out.returncode, out.stdout, out.stderr) == (code, "", message + "\n")


def test_qsub_of_a_missing_script(cluster):
    out = cluster.run("qsub", "nope.sh", cwd=cluster.workdir())
    assert (out.returncode, out.stderr) == (1, "qsub: script file:: No such file or directory\n")


def test_a_second_job_in_debug_exceeds_the_per_user_limit(cluster):
    """Aurora (and the look-alike) allow one queued-or-running job per user in debug."""
    d = cluster.workdir()
    first = cluster.submit(d, "sleep 300\n", "-q", "debug", directives=(WHOLE_NODE, MINUTE))
    out = cluster.qsub(d, "true\n", "-q", "debug", directives=(WHOLE_NODE, MINUTE))
    assert (out.returncode, out.stdout) == (38, "")
    assert out.stderr == "qsub: would exceed queue generic's per-user limit\n"
    cluster.run("qdel", first, cwd=d)
    cluster.wait_state(first, "F")
    # The slot is free again once the first job has ended.
    second = cluster.submit(d, "true\n", "-q", "debug", directives=(WHOLE_NODE, MINUTE))
    assert cluster.wait_state(second, "F")["Exit_status"] == 0


def test_a_job_through_its_life_in_qstat(cluster):
    d = cluster.workdir()
    job_id = cluster.submit(d, f"until [ -e {d}/go ]; do sleep 0.2; done\n",
                            directives=(WHOLE_NODE, MINUTE))
    # R with substate 42 once the script runs (real PBS passes 41, pre-run, on the way).
    running = wait_for(lambda: (job := cluster.job(job_id)) and job["job_state"] == "R"
                       and job["substate"] == 42 and job, f"job {job_id} running (substate 42)")
    assert ALWAYS | ONCE_RUN <= set(running) and not ONCE_ENDED & set(running), sorted(running)
    assert running["exec_host"] == running["exec_vnode"].strip("()").split(":")[0] + "/0*208"
    assert running["Resource_List"]["walltime"] == "00:01:00"  # normalised
    assert running["Resource_List"]["nodect"] == 1 and running["Resource_List"]["ncpus"] == 208
    assert running["Variable_List"]["PBS_O_WORKDIR"] == str(d)
    assert running["Job_Owner"] == f"{cluster.user}@{SERVER}"
    cluster.write(d / "go", "")
    done = cluster.wait_state(job_id, "F")
    assert ALWAYS | ONCE_RUN | ONCE_ENDED | {"stime"} <= set(done), sorted(done)
    assert (done["Exit_status"], done["substate"]) == (0, 92)
    assert done["comment"].endswith(" and finished")
    # Without -x a finished job is gone: exit 35, a message, the JSON header without "Jobs".
    rc, doc, err = cluster.qstat(job_id)
    assert (rc, set(doc)) == (35, HEADER), doc
    assert err == (f"qstat: {job_id} Job has finished, use -x or -H to obtain historical job "
                   "information\n")


def test_qstat_of_live_and_finished_ids_lists_the_live_ones(cluster):
    d = cluster.workdir()
    done = cluster.submit(d, "true\n", directives=(WHOLE_NODE, MINUTE))
    cluster.wait_state(done, "F")
    live = cluster.submit(d, "sleep 300\n", directives=(WHOLE_NODE, MINUTE))
    cluster.wait_state(live, "R")
    rc, doc, _ = cluster.qstat(done, live)
    assert (rc, list(doc["Jobs"])) == (35, [live])


def test_unknown_ids(cluster):
    d = cluster.workdir()
    rc, doc, err = cluster.qstat("99999")
    assert (rc, set(doc), err) == (153, HEADER, f"qstat: Unknown Job Id 99999.{SERVER}\n")
    out = cluster.run("qdel", "99999", cwd=d)
    assert (out.returncode, out.stderr) == (153, f"qdel: Unknown Job Id 99999.{SERVER}\n")


def test_an_exit_code_becomes_exit_status(cluster):
    d = cluster.workdir()
    job = cluster.wait_state(cluster.submit(d, "exit 7\n", directives=(WHOLE_NODE, MINUTE)),
                             "F")
    assert (job["Exit_status"], job["substate"]) == (7, 93)
    assert job["comment"].endswith(" and failed")


def test_walltime_sends_sigterm_then_kills(cluster):
    """The job traps SIGTERM and goes on: PBS sends SIGKILL after the kill delay.

    Real PBS notices the walltime when its MoM polls (here every 1-5 s), the fake on time; both
    report Exit_status -29 and write PBS's line to the job's stderr.
    """
    d = cluster.workdir()
    body = "trap 'echo got TERM' TERM\necho started\nwhile :; do sleep 0.2; done\n"
    job_id = cluster.submit(d, body, "-N", "wall", directives=(WHOLE_NODE,
                                                               "-l walltime=0:00:03"))
    seq = job_id.split(".")[0]
    job = cluster.wait_state(job_id, "F")
    assert (job["Exit_status"], job["substate"]) == (-29, 93)
    assert job["comment"].endswith(" and exceeded resource walltime")
    assert (d / f"wall.o{seq}").read_text().splitlines()[:2] == ["started", "got TERM"]
    assert re.search(r"=>> PBS: job killed: walltime \d+ exceeded limit 3",
                     (d / f"wall.e{seq}").read_text())


def test_qdel_ends_a_running_job(cluster):
    d = cluster.workdir()
    job_id = cluster.submit(d, f"touch {d}/started\nsleep 300\n",
                            directives=(WHOLE_NODE, MINUTE))
    # Once the script runs: a qdel racing the job's start ends it with SIGKILL (265) instead.
    wait_for(lambda: (d / "started").exists(), "the job's script running")
    out = cluster.run("qdel", job_id, cwd=d)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    job = cluster.wait_state(job_id, "F")
    # SIGTERM ends it: 271 when the job's shell dies of it, 143 when the shell outlives its
    # child by an instant and exits with the child's status (real PBS signals the session's
    # processes one at a time, so a loaded node shows either; the fake gives 271).
    assert (job["Exit_status"], job["substate"]) in ((271, 91), (143, 91))
    assert job["comment"].endswith(f" and terminated by {cluster.user}@{SERVER}")
    again = cluster.run("qdel", job_id, cwd=d)
    assert (again.returncode, again.stderr) == (35, f"qdel: Job has finished {job_id}\n")


ENV_PROBE = """
echo "pwd=$(pwd)"
echo "jobid=$PBS_JOBID"
echo "workdir=$PBS_O_WORKDIR"
echo "tmpdir=$(basename "$TMPDIR") $(stat -c %a "$TMPDIR")"
echo "ncpus=$NCPUS $OMP_NUM_THREADS"
echo "umask=$(umask)"
echo "nodes=$(paste -sd, "$PBS_NODEFILE")"
echo "python=$(command -v python3 || true)"
"""


def test_a_job_starts_in_home_with_pbs_variables(cluster):
    """Real PBS starts a job in $HOME, not where qsub ran; two whole nodes, two lines.

    Deliberate difference: the fake's TMPDIR lies in its state folder (pbs.<jobid> as PBS
    names it), so that several fake clusters can share a machine.
    """
    d = cluster.workdir()
    job_id = cluster.submit(d, ENV_PROBE, "-N", "probe",
                            directives=("-l select=2:ncpus=208", "-l place=scatter", MINUTE))
    cluster.wait_state(job_id, "F")
    seen = dict(line.split("=", 1) for line in
                (d / f"probe.o{job_id.split('.')[0]}").read_text().splitlines())
    assert seen["pwd"] == str(cluster.home)
    assert (seen["jobid"], seen["workdir"]) == (job_id, str(d))
    assert seen["tmpdir"] == f"pbs.{job_id} 700"
    assert seen["ncpus"] == "208 208" and seen["umask"] == "0077"
    nodes = seen["nodes"].split(",")
    assert len(nodes) == len(set(nodes)) == 2 and all(NODE.match(n) for n in nodes), nodes
    # A login environment: the interpreter the test (the driver) runs is not on PATH.
    assert not seen["python"].startswith(str(Path(sys.executable).parent)), seen["python"]


def test_a_job_gets_qsubs_environment_only_with_V_or_v(cluster):
    d = cluster.workdir()
    body = 'echo "[$MY_SETTING][$OTHER]"\n'
    setting = {"MY_SETTING": "from-login-node"}
    ids = {}
    for name, args in (("plain", ()), ("all", ("-V",)), ("some", ("-v", "MY_SETTING,OTHER=x"))):
        path = cluster.write(d / f"{name}.sh", "#!/bin/bash\n" + body)
        out = cluster.run("qsub", "-l", "select=1:ncpus=208", "-l", "walltime=0:01:00", *args,
                          str(path), cwd=d, env=setting)
        assert out.returncode == 0, out.stderr
        ids[name] = out.stdout.strip()
    for name, want in (("plain", "[][]"), ("all", "[from-login-node][]"),
                       ("some", "[from-login-node][x]")):
        cluster.wait_state(ids[name], "F")
        seq = ids[name].split(".")[0]
        assert (d / f"{name}.sh.o{seq}").read_text() == want + "\n", name


def test_output_files_arrive_at_the_end_private(cluster):
    d = cluster.workdir()
    job_id = cluster.submit(d, f"echo out; echo err >&2\nuntil [ -e {d}/go ]; do sleep 0.2; "
                               "done\n", "-N", "files", directives=(WHOLE_NODE, MINUTE))
    seq = job_id.split(".")[0]
    cluster.wait_state(job_id, "R")
    assert not (d / f"files.o{seq}").exists()  # PBS spools output until the job ends
    cluster.write(d / "go", "")
    cluster.wait_state(job_id, "F")
    out, err = d / f"files.o{seq}", d / f"files.e{seq}"
    assert (out.read_text(), err.read_text()) == ("out\n", "err\n")
    assert {out.stat().st_mode & 0o777, err.stat().st_mode & 0o777} == {0o600}
    # -o/-e name other paths.
    job_id = cluster.submit(d, "echo there\n", "-o", str(d / "o.txt"), "-e", str(d / "e.txt"),
                            directives=(WHOLE_NODE, MINUTE))
    cluster.wait_state(job_id, "F")
    assert (d / "o.txt").read_text() == "there\n" and (d / "e.txt").read_text() == ""


@pytest.mark.needs("pbs")
def test_a_job_that_can_never_run_stays_queued(real_pbs):
    """Real PBS only: the fake has as many nodes as a job asks for, so it never queues.

    Three whole nodes of the look-alike's two: Q for good, without exec_host; a qdel ends it
    without an Exit_status.
    """
    d = real_pbs.workdir()
    job_id = real_pbs.submit(d, "true\n", directives=("-l select=3:ncpus=208", MINUTE))
    queued = real_pbs.wait_state(job_id, "Q")
    assert ALWAYS <= set(queued) and not (ONCE_RUN | ONCE_ENDED) & set(queued), sorted(queued)
    assert queued["substate"] == 10
    real_pbs.run("qdel", job_id, cwd=d)
    done = real_pbs.wait_state(job_id, "F")
    assert "Exit_status" not in done and done["substate"] == 91


def test_qstat_u_lists_a_users_jobs_with_the_name_cut_after_a_run_tag(cluster):
    """`qstat -u USER`, PBS's alternate listing, shows 9 characters of a job name and a `*`:
    a parsl-aurora job's run tag (pa + 6 hex digits) and its dot. -u and JSON do not mix."""
    d = cluster.workdir()
    job_id = cluster.submit(d, "sleep 300\n", "-N", "pa1b2c3d.12.1796214245.81",
                            directives=("-l select=1:ncpus=1", "-l walltime=0:02:00"))
    cluster.wait_state(job_id, "R")
    out = cluster.run("qstat", "-u", cluster.user, cwd=d)
    lines = out.stdout.splitlines()
    assert (out.returncode, lines[:5]) == (0, [
        "", f"{SERVER}: ",
        "                                                            Req'd  Req'd   Elap",
        "Job ID          Username Queue    Jobname    SessID NDS TSK Memory Time  S Time",
        "--------------- -------- -------- ---------- ------ --- --- ------ ----- - -----"]), \
        out.stdout
    row = next(line for line in lines[5:] if line.startswith(job_id.split(".")[0] + "."))
    assert row[:15] == job_id[:14] + "*", row
    assert row[15:45] == f" {cluster.user:<8} workq    pa1b2c3d.* ", row
    # Session, nodes, CPUs, memory, walltime, state, elapsed. While a job starts it has no
    # session or elapsed time yet: `--`, printed one column short of the field's edge.
    assert re.fullmatch(r"(   -- |\s*\d+)   1   1    --  00:02 R(   --| \d\d:\d\d)",
                        row[45:].rstrip()), row
    mixed = cluster.run("qstat", "-f", "-F", "json", "-u", cluster.user, cwd=d)
    assert (mixed.returncode, mixed.stderr.splitlines()[0]) == (2, "qstat: conflicting options.")
    assert cluster.run("qstat", "-u", "nobody", cwd=d).stdout == ""


# ---------------------------------------------------------------- Aurora beyond the queue table
@pytest.mark.parametrize("nodes,walltime,queue", [
    (1, "0:01:00", "small"),  # Aurora: 256-1024 nodes
    (2, "0:01:00", "medium"),  # Aurora: 1025-1999 nodes
    (2, "17:00:00", "medium"),
])
def test_prod_routes_a_job_by_its_node_count(cluster, nodes, walltime, queue):
    d = cluster.workdir()
    job_id = cluster.submit(d, "true\n", "-q", "prod",
                            directives=(f"-l select={nodes}:ncpus=1", f"-l walltime={walltime}"))
    rc, doc, _ = cluster.qstat("-x", job_id)
    assert rc == 0 and doc["Jobs"][job_id]["queue"] == queue
    cluster.run("qdel", job_id, cwd=d)


@pytest.mark.parametrize("args,directives,code,message", [
    # The routing queue's own limit comes first.
    (("-q", "prod"), ("-l select=1:ncpus=1", "-l walltime=25:00:00"), 188,
     "qsub: Job violates queue and/or server resource limits"),
    # prod's destinations take jobs only from prod.
    (("-q", "small"), ("-l select=1:ncpus=1", MINUTE), 174, "qsub: Access to queue is denied"),
    (("-q", "medium"), ("-l select=2:ncpus=1", MINUTE), 174, "qsub: Access to queue is denied"),
])
def test_a_routing_queue_refuses_at_qsub(cluster, args, directives, code, message):
    d = cluster.workdir()
    out = cluster.qsub(d, "true\n", *args, directives=directives)
    assert (out.returncode, out.stdout, out.stderr) == (code, "", message + "\n")


@pytest.mark.parametrize("directives", [
    ("-l select=3:ncpus=1", MINUTE),  # no destination takes 3 nodes
    ("-l select=1:ncpus=1", "-l walltime=13:00:00"),  # small: 12 h; medium: 2 nodes
])
def test_a_job_no_destination_takes_is_accepted_and_then_unknown(cluster, directives):
    """PBS routes after qsub has returned the id: a job every destination rejects is then
    deleted, and qstat, even with -x, never knew it. (ALCF quotes qsub's "Job rejected by all
    possible destinations", exit 191, for the case where PBS routes at once.)"""
    d = cluster.workdir()
    out = cluster.qsub(d, "true\n", "-q", "prod", directives=directives)
    assert out.returncode == 0 and re.match(ID_FORMAT, out.stdout.strip()), out
    job_id = out.stdout.strip()
    _, doc, err = wait_for(lambda: (r := cluster.qstat("-x", job_id))[0] == 153 and r,
                           "the routed job unknown")
    assert (set(doc), err) == (HEADER, f"qstat: Unknown Job Id {job_id}\n")


def test_a_job_that_fails_to_start_is_held_by_the_system(cluster):
    """A start that fails (on the look-alike: a MoM prologue failing jobs of the account
    fail-start; on the fake: the same account) is counted; above run_count 20 PBS holds the job
    with a system hold and Aurora's comment."""
    d = cluster.workdir()
    job_id = cluster.submit(d, "echo ran > ran.txt\n", "-A", "fail-start", "-W", "run_count=20",
                            directives=("-l select=1:ncpus=1", MINUTE))
    held = cluster.wait_state(job_id, "H")
    assert (held["Hold_Types"], held["substate"], held["run_count"]) == ("s", 20, 21), held
    assert held["comment"] == "job held, too many failed attempts to run", held
    # The failed attempt: started and ended (stime, obittime), no host, Exit_status -3.
    assert {"stime", "obittime"} <= set(held) and "exec_host" not in held, sorted(held)
    assert held["Exit_status"] == -3
    assert not (cluster.home / "ran.txt").exists()
    cluster.run("qdel", job_id, cwd=d)
    done = cluster.wait_state(job_id, "F")
    assert (done["substate"], done["Exit_status"]) == (91, -3), done
    assert done["comment"] == "job held, too many failed attempts to run and terminated"


def test_keep_files_direct_writes_output_as_the_job_runs(cluster):
    """ALCF's header has `-k doe`: the output is in its final place while the job runs."""
    d = cluster.workdir()
    job_id = cluster.submit(d, f"echo started\nuntil [ -e {d}/go ]; do sleep 0.2; done\n",
                            "-N", "kept", "-k", "doe", directives=(WHOLE_NODE, MINUTE))
    seq = job_id.split(".")[0]
    running = cluster.wait_state(job_id, "R")
    assert running["Keep_Files"] == "doe"
    out = d / f"kept.o{seq}"
    wait_for(lambda: out.exists() and out.read_text() == "started\n", "output while running")
    assert out.stat().st_mode & 0o777 == 0o600
    cluster.write(d / "go", "")
    cluster.wait_state(job_id, "F")
    assert out.read_text() == "started\n" and (d / f"kept.e{seq}").read_text() == ""


# What the look-alike's server prints for `qstat -Qf` (OpenPBS 23.06, .ci/install-openpbs.sh):
# every attribute but the counts. The fake prints the ones it enforces (it does not enforce
# per-project limits or max_run), each with the real value.
LOOK_ALIKE_QUEUES = {
    "workq": {"queue_type": "Execution"},
    "debug": {"queue_type": "Execution", "max_queued": "[u:PBS_GENERIC=1]",
              "resources_max.walltime": "01:00:00"},
    "debug-scaling": {"queue_type": "Execution", "max_queued": "[u:PBS_GENERIC=1]",
                      "resources_max.walltime": "01:00:00"},
    "small": {"queue_type": "Execution", "max_queued": "[p:PBS_GENERIC=100]",
              "from_route_only": "True", "resources_max.nodect": "1",
              "resources_max.walltime": "12:00:00", "resources_min.nodect": "1",
              "max_run": "[p:PBS_GENERIC=10]"},
    "medium": {"queue_type": "Execution", "max_queued": "[p:PBS_GENERIC=100]",
               "from_route_only": "True", "resources_max.nodect": "2",
               "resources_max.walltime": "18:00:00", "resources_min.nodect": "2",
               "max_run": "[p:PBS_GENERIC=10]"},
    "capacity": {"queue_type": "Execution", "max_queued": "[u:PBS_GENERIC=5]",
                 "resources_max.walltime": "168:00:00", "max_run": "[u:PBS_GENERIC=2]"},
    "prod": {"queue_type": "Route", "resources_max.walltime": "24:00:00",
             "route_destinations": "small,medium"},
}
# Counts, not limits (PBS adds resources_assigned.* once a queue has run a job).
COUNTS = {"total_jobs", "state_count", "enabled", "started"}


def test_qstat_Q_lists_the_queues_and_their_limits(cluster):
    """What `parsl-aurora check` reads to hold a site's queue table to the server."""
    from parsl_aurora.selfcheck import parse_qstat_Qf

    d = cluster.workdir()
    table = cluster.run("qstat", "-Q", cwd=d)
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()
    assert rows[0].split() == ["Queue", "Max", "Tot", "Ena", "Str", "Que", "Run", "Hld", "Wat",
                               "Trn", "Ext", "Type"]
    assert [(r.split()[0], r.split()[-1]) for r in rows[2:]] == [
        (q, a["queue_type"][:3] + "*") for q, a in LOOK_ALIKE_QUEUES.items()]
    full = cluster.run("qstat", "-Qf", cwd=d)
    assert full.returncode == 0, full.stderr
    queues = parse_qstat_Qf(full.stdout)
    assert list(queues) == list(LOOK_ALIKE_QUEUES)
    for name, attrs in queues.items():
        assert attrs["state_count"].startswith("Transit:"), attrs  # folded line joined
        shown = {k: v for k, v in attrs.items()
                 if k not in COUNTS and not k.startswith("resources_assigned.")}
        expected = LOOK_ALIKE_QUEUES[name]
        if cluster.kind == "real":
            assert shown == expected, name
        else:
            assert shown.items() <= expected.items() and "queue_type" in shown, name
    unknown = cluster.run("qstat", "-Qf", "nope", cwd=d)
    assert (unknown.returncode, unknown.stdout, unknown.stderr) == (
        170, "", "qstat: Unknown queue nope\n")
