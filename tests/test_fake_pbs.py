"""The fake PBS at the process boundary: real qsub/qstat/qdel processes, real Parsl provider."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from parsl_aurora import fake
from parsl_aurora.fake import pbs


@pytest.fixture
def env(tmp_path):
    """The environment a workflow on the fake cluster has: fake commands first on PATH."""
    return {**os.environ, **fake.environment(tmp_path / "fake"), "PARSL_AURORA_KILL_DELAY": "1"}


def run(env, *cmd, check=False):
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=check)


def script(tmp_path, body, directives=("-l select=2:ncpus=208", "-l walltime=0:01:00")):
    path = tmp_path / "job.sh"
    path.write_text("#!/bin/bash\n" + "".join(f"#PBS {d}\n" for d in directives) + body)
    return str(path)


def qsub(env, *args):
    return run(env, "qsub", *args, check=True).stdout.strip()


def wait_state(env, job_id, state, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        doc = json.loads(run(env, "qstat", "-x", "-f", "-F", "json", job_id).stdout)
        job = doc.get("Jobs", {}).get(job_id)
        if job and job["job_state"] == state:
            return job
        time.sleep(0.1)
    raise AssertionError(f"{job_id} never reached {state}")


def job_processes(env, job_id):
    """Live processes started for this job (they carry its PBS_JOBID and fake run directory)."""
    marks = {f"PBS_JOBID={job_id}".encode(),
             f"PARSL_AURORA_FAKE_DIR={env['PARSL_AURORA_FAKE_DIR']}".encode()}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marks <= environ and state != "Z":
            found.append(f"{pid}: {cmd[:100]}")
    return found


def none_left(env, job_id, seconds=30):
    deadline = time.monotonic() + seconds
    while (left := job_processes(env, job_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_job_runs_with_pbs_environment(env, tmp_path):
    s = script(tmp_path, 'echo "$PBS_JOBID|$PBS_O_WORKDIR|$PBS_QUEUE|$PBS_ACCOUNT|$(pwd)|'
                         '$(paste -sd, $PBS_NODEFILE)"\n')
    job_id = qsub(env, "-q", "debug", "-A", "proj", "-N", "hello", s)
    assert job_id == "1.aurora-pbs-fake"
    job = wait_state(env, job_id, "F")
    assert job["Exit_status"] == 0
    assert (job["queue"], job["Account_Name"], job["Job_Name"]) == ("debug", "proj", "hello")
    assert job["Resource_List"]["nodect"] == 2
    assert job["Resource_List"]["select"] == "2:ncpus=208"
    assert job["exec_host"] == "+".join(f"{h}/0*208" for h in fake.host_names(2))
    # Default output file: <submit folder>/<name>.o<seq>; the job runs in its own folder.
    out = (tmp_path / "hello.o1").read_text().strip()
    jobdir = tmp_path / "fake" / "jobs" / job_id
    assert out == (f"{job_id}|{tmp_path}|debug|proj|{jobdir}|"
                   f"{','.join(fake.host_names(2))}")


def test_ids_count_up_and_cli_wins_over_directives(env, tmp_path):
    s = script(tmp_path, "true\n", ("-N from_file", "-q from_file", "-l select=1",
                                    "-l walltime=0:01:00"))
    first = qsub(env, s)
    second = qsub(env, "-N", "from_cli", "-l", "select=3", s)
    assert [first, second] == ["1.aurora-pbs-fake", "2.aurora-pbs-fake"]
    a, b = wait_state(env, first, "F"), wait_state(env, second, "F")
    assert (a["Job_Name"], a["queue"], a["Resource_List"]["nodect"]) == \
        ("from_file", "from_file", 1)
    assert (b["Job_Name"], b["queue"], b["Resource_List"]["nodect"]) == \
        ("from_cli", "from_file", 3)


def test_finished_jobs_leave_qstat_unless_x(env, tmp_path):
    job_id = qsub(env, script(tmp_path, "exit 3\n"))
    assert wait_state(env, job_id, "F")["Exit_status"] == 3
    r = run(env, "qstat", "-f", "-F", "json", job_id)
    assert r.returncode == 35
    assert r.stderr == (f"qstat: {job_id} Job has finished, use -x or -H to obtain historical "
                        "job information\n")
    assert "Jobs" not in json.loads(r.stdout)  # still JSON, as Parsl parses it regardless
    r = run(env, "qstat", "-f", "-F", "json", "999.aurora-pbs-fake")
    assert (r.returncode, r.stderr) == (153, "qstat: Unknown Job Id 999.aurora-pbs-fake\n")
    # The table truncates ids to 16 characters, as PBS's does.
    assert f"{job_id[:16]}  job.sh" in run(env, "qstat", "-x").stdout
    assert run(env, "qstat").stdout == ""


def test_qstat_mixes_running_and_finished_ids(env, tmp_path):
    done = qsub(env, script(tmp_path, "true\n"))
    wait_state(env, done, "F")
    running = qsub(env, script(tmp_path, "sleep 300\n"))
    wait_state(env, running, "R")
    r = run(env, "qstat", "-f", "-F", "json", done, running)
    assert r.returncode == 35
    assert list(json.loads(r.stdout)["Jobs"]) == [running]
    run(env, "qdel", running)
    wait_state(env, running, "F")


def test_walltime_kills_the_job_and_everything_it_started(env, tmp_path):
    # hydra's proxies and ranks call setsid(): killing the job's process group is not enough.
    s = script(tmp_path, "trap '' TERM\nmpiexec -n 4 --ppn 2 sleep 300\n",
               ("-l select=2", "-l walltime=00:00:02"))
    job_id = qsub(env, s)
    running = wait_state(env, job_id, "R")
    assert running["Resource_List"]["walltime"] == "00:00:02"
    deadline = time.monotonic() + 30
    while len(job_processes(env, job_id)) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(job_processes(env, job_id)) >= 4  # bash, hydra, proxies, ranks
    job = wait_state(env, job_id, "F")
    assert job["Exit_status"] == pbs.EXIT_WALLTIME == -29
    assert none_left(env, job_id) == []


def test_qdel_ends_a_running_job(env, tmp_path):
    job_id = qsub(env, script(tmp_path, "mpiexec -n 2 --ppn 1 sleep 300\n"))
    wait_state(env, job_id, "R")
    assert run(env, "qdel", job_id).returncode == 0
    assert wait_state(env, job_id, "F")["Exit_status"] == pbs.EXIT_DELETED == 271
    assert none_left(env, job_id) == []
    r = run(env, "qdel", job_id)
    assert r.returncode == 35 and "Job has finished" in r.stderr
    assert run(env, "qdel", "77").returncode == 153


@pytest.mark.parametrize("directives,message", [
    (("-l walltime=0:10:00",), "no select statement"),
    (("-l select=0", "-l walltime=0:10:00"),
     "Illegal attribute or resource value Resource_List.select"),
    (("-l select=two", "-l walltime=0:10:00"), "Resource_List.select"),
    (("-l select=1",), "no walltime"),
    (("-l select=1", "-l walltime=ten"),
     "Illegal attribute or resource value Resource_List.walltime"),
    (("-l select=1", "-l walltime=1:2:3:4"), "Resource_List.walltime"),
    (("-l select=1", "-l walltime=0:00:00"), "Resource_List.walltime"),
    (("-l select=1", "-l walltime=0:10:00", "-Z"), "invalid option -- 'Z'"),
])
def test_malformed_scripts_are_refused(env, tmp_path, directives, message):
    r = run(env, "qsub", script(tmp_path, "true\n", directives))
    assert r.returncode != 0 and message in r.stderr and r.stdout == ""
    assert not list((tmp_path / "fake" / "jobs").glob("*.json"))


def test_missing_script_is_refused(env, tmp_path):
    r = run(env, "qsub", str(tmp_path / "nope.sh"))
    assert r.returncode != 0 and "nope.sh" in r.stderr


def test_job_starts_with_a_login_environment_unless_V(env, tmp_path):
    env = {**env, "MY_SETTING": "from-login-node"}
    s = script(tmp_path, 'echo "[$MY_SETTING][$PBS_O_HOME]"\n')
    plain = qsub(env, "-N", "plain", s)
    full = qsub(env, "-N", "full", "-V", s)
    picked = qsub(env, "-N", "picked", "-v", "MY_SETTING,OTHER=x", s)
    for job_id in (plain, full, picked):
        wait_state(env, job_id, "F")
    home = os.environ["HOME"]
    assert (tmp_path / "plain.o1").read_text() == f"[][{home}]\n"
    assert (tmp_path / "full.o2").read_text() == f"[from-login-node][{home}]\n"
    assert (tmp_path / "picked.o3").read_text() == f"[from-login-node][{home}]\n"


def test_output_paths_and_state_stay_where_asked(env, tmp_path):
    job_id = qsub(env, "-o", str(tmp_path / "o"), "-e", str(tmp_path / "e"),
                  script(tmp_path, "touch made_here; echo out; echo err >&2\n"))
    wait_state(env, job_id, "F")
    assert (tmp_path / "fake" / "jobs" / job_id / "made_here").exists()
    assert (tmp_path / "o").read_text() == "out\n" and (tmp_path / "e").read_text() == "err\n"
    assert not (tmp_path / "made_here").exists()


def test_qsub_latency_is_small(env, tmp_path):
    s = script(tmp_path, "true\n")
    qsub(env, s)  # warm the page cache
    took = []
    for _ in range(5):
        start = time.perf_counter()
        qsub(env, s)
        took.append(time.perf_counter() - start)
    print(f"qsub latency: best {min(took) * 1000:.0f} ms, median {sorted(took)[2] * 1000:.0f} ms")


def test_parsl_pbspro_provider_against_the_fake(env, tmp_path, monkeypatch):
    """Parsl's own PBSProProvider submits, polls and cancels through the fake commands."""
    from parsl.jobs.states import JobState
    from parsl.launchers import SimpleLauncher
    from parsl.providers import PBSProProvider

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    provider = PBSProProvider(account="proj", queue="debug", walltime="00:00:03",
                              launcher=SimpleLauncher(), cpus_per_node=208,
                              scheduler_options="#PBS -l filesystems=home:flare")
    provider.script_dir = str(tmp_path)
    short = provider.submit("sleep 300", 1, "walltime")
    gone = provider.submit("sleep 300", 1, "cancelled")
    ends = provider.submit("echo done", 1, "ends")
    assert short and gone and ends

    def states(ids):
        return [s.state for s in provider.status(ids)]

    deadline = time.monotonic() + 60
    while states([short, gone]) != [JobState.RUNNING] * 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert states([short, gone]) == [JobState.RUNNING] * 2
    provider.cancel([gone])
    # Once PBS drops a job (ended, walltime, qdel), qstat leaves it out and Parsl says COMPLETED.
    deadline = time.monotonic() + 60
    while states([short, ends]) != [JobState.COMPLETED] * 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert states([short, ends]) == [JobState.COMPLETED] * 2
    assert states([gone])[0] in (JobState.COMPLETED, JobState.CANCELLED)
    assert wait_state(env, short, "F")["Exit_status"] == -29
    assert Path(provider.resources[ends]["job_stdout_path"]).read_text() == "done\n"
    for job_id in (short, gone, ends):
        assert none_left(env, job_id) == []


# ---------------------------------------------------------------- pure functions, golden


def test_directives_stop_at_the_first_command():
    text = "#!/bin/bash\n#PBS -l select=3\n# note\n\n#PBS -q debug\necho\n#PBS -A x\n"
    assert pbs.directives(text) == ["-l", "select=3", "-q", "debug"]


def test_resources_and_walltime():
    assert pbs.resources(["select=3:ncpus=208", "walltime=0:30:00,place=scatter"]) == {
        "select": "3:ncpus=208", "walltime": "0:30:00", "place": "scatter"}
    assert [pbs.parse_walltime(w) for w in ("1:02:03", "90", "2:00", "00:00:02")] == \
        [3723, 90, 120, 2]


def test_request_golden():
    script = ("#!/bin/bash\n#PBS -S /bin/bash\n#PBS -N parsl.block\n#PBS -m n\n"
              "#PBS -l walltime=00:20:00\n#PBS -l select=2:ncpus=208\n#PBS -o /r/o\n"
              "#PBS -e /r/e\n#PBS -l filesystems=home:flare\n\nexport JOBNAME=x\n")
    assert pbs.request(["-q", "debug", "-A", "proj", "job.sh"], script) == {
        "opts": {"S": "/bin/bash", "N": "parsl.block", "m": "n", "o": "/r/o",
                 "e": "/r/e", "q": "debug", "A": "proj"},
        "resources": {"walltime": "00:20:00", "select": "2:ncpus=208",
                      "filesystems": "home:flare"},
        "select": "2:ncpus=208", "nodes": 2, "walltime": "00:20:00", "seconds": 1200}
