"""What only the fake does, or does differently on purpose; the rest is held to real PBS by
test_pbs_conformance.py. Real qsub/qstat/qdel processes of the fake, and Parsl's own provider."""

import os
from pathlib import Path

import pytest
from clusters import fake_cluster, wait_for

from parsl_aurora.fake.pbs import EXIT_DELETED, EXIT_WALLTIME, cli


@pytest.fixture
def fake(tmp_path):
    c = fake_cluster(tmp_path)
    c.env["PARSL_AURORA_KILL_DELAY"] = "1"
    yield c
    c.cleanup()


def job_processes(cluster, job_id):
    """Live processes started for this job (they carry its PBS_JOBID and fake state folder)."""
    marks = {f"PBS_JOBID={job_id}".encode(),
             f"PARSL_AURORA_FAKE_DIR={cluster.env['PARSL_AURORA_FAKE_DIR']}".encode()}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marks <= environ and state != "Z":
            found.append(pid)
    return found


@pytest.mark.needs("mpi")
@pytest.mark.parametrize("end", ["walltime", "qdel"])
def test_the_end_of_a_job_ends_everything_it_started(fake, end):
    """hydra's proxies and ranks call setsid(): killing the job's process group is not enough;
    the fake's supervisor (a child subreaper) finds and ends them all, as PBS's MoM does."""
    d = fake.workdir()
    # Long enough for all nine processes to start on a loaded machine before the walltime.
    walltime = "0:00:15" if end == "walltime" else "0:01:00"
    job_id = fake.submit(d, "trap '' TERM\nmpiexec -n 4 --ppn 2 sleep 300\n",
                         directives=("-l select=2", f"-l walltime={walltime}"))
    wait_for(lambda: len(job_processes(fake, job_id)) >= 7,
             "bash, mpiexec, hydra, two proxies and four ranks running")
    if end == "qdel":
        fake.run("qdel", job_id, cwd=d)
    job = fake.wait_state(job_id, "F")
    assert job["Exit_status"] == (EXIT_WALLTIME if end == "walltime" else EXIT_DELETED)
    wait_for(lambda: not job_processes(fake, job_id), "every process of the job gone", 30)


def test_a_job_without_walltime_is_refused(fake):
    """Deliberate: Aurora's queues give every job a walltime, the look-alike's workq none;
    the fake asks for one so that no fake job runs unbounded on a laptop."""
    out = fake.qsub(fake.workdir(), "true\n", directives=("-l select=1",))
    assert out.returncode == 1 and "no walltime" in out.stderr


def test_the_fake_takes_jobs_from_anyone(fake):
    """Deliberate: real PBS refuses root (`qsub: Bad UID for job execution`, 175); the fake
    takes jobs from whoever runs it, so the fake cluster runs wherever the tests run (CI runs
    them as root)."""
    out = fake.qsub(fake.workdir(), "true\n", directives=("-l walltime=0:01:00",))
    assert (out.returncode, out.stderr) == (0, "")
    job = fake.wait_state(out.stdout.strip(), "F")
    assert job["Job_Owner"].split("@")[0] == fake.user


def test_the_fake_has_as_many_nodes_as_a_job_asks_for(fake):
    """Deliberate: real PBS queues a job larger than its nodes for good; the fake starts it at
    once, so a laptop runs mpi_ensemble's 10-node jobs."""
    d = fake.workdir()
    job_id = fake.submit(d, 'sort -u "$PBS_NODEFILE" | wc -l\n', "-N", "ten",
                         directives=("-l select=10:ncpus=208", "-l walltime=0:01:00"))
    assert fake.wait_state(job_id, "F")["Exit_status"] == 0
    assert (d / f"ten.o{job_id.split('.')[0]}").read_text().strip() == "10"


def test_environment_puts_the_fake_first_and_keeps_a_chosen_cluster(tmp_path, monkeypatch):
    import sys

    from parsl_aurora import fake

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("PARSL_AURORA_FAKE_DIR", raising=False)
    env = fake.environment(tmp_path / "run")
    assert env["PATH"].split(":") == [str(fake.bin_dir()), str(Path(sys.executable).parent),
                                      "/usr/bin", "/bin"]
    assert env["PARSL_AURORA_FAKE_DIR"] == str((tmp_path / "run").resolve())
    assert (env["PARSL_AURORA_PYTHON"], env["PARSL_AURORA_HYDRA"]) == (sys.executable,
                                                                       fake.hydra())
    # A cluster already chosen, and a PATH that already holds the fake's commands, are kept.
    chosen = f"/tmp/stand-ins:{fake.bin_dir()}:/usr/bin"
    monkeypatch.setenv("PATH", chosen)
    monkeypatch.setenv("PARSL_AURORA_FAKE_DIR", str(tmp_path / "cluster"))
    env = fake.environment(tmp_path / "run")
    assert (env["PATH"], env["PARSL_AURORA_FAKE_DIR"]) == (chosen, str(tmp_path / "cluster"))
    assert fake.host_names(3) == ["x4102c0s0b0n0", "x4102c0s1b0n0", "x4102c0s2b0n0"]
    assert fake.nodefile_lines(2) == ("x4102c0s0b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov\n"
                                      "x4102c0s1b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov\n")


def test_parsl_pbspro_provider_against_the_fake(fake, tmp_path, monkeypatch):
    """Parsl's own PBSProProvider submits, polls and cancels through the fake commands."""
    from parsl.jobs.states import JobState
    from parsl.launchers import SimpleLauncher
    from parsl.providers import PBSProProvider

    for k, v in fake.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(fake.workdir())
    # `short` must still run when `gone` starts, on a loaded machine too.
    provider = PBSProProvider(account="proj", queue="workq", walltime="00:00:10",
                              launcher=SimpleLauncher(), cpus_per_node=208,
                              scheduler_options="#PBS -l filesystems=home:flare")
    provider.script_dir = str(tmp_path)
    short = provider.submit("sleep 300", 1, "walltime")
    gone = provider.submit("sleep 300", 1, "cancelled")
    ends = provider.submit("echo done", 1, "ends")
    assert short and gone and ends

    def states(ids):
        return [s.state for s in provider.status(ids)]

    wait_for(lambda: states([short, gone]) == [JobState.RUNNING] * 2, "two jobs running")
    provider.cancel([gone])
    # Once PBS drops a job (ended, walltime, qdel), qstat leaves it out and Parsl says COMPLETED.
    wait_for(lambda: states([short, ends]) == [JobState.COMPLETED] * 2, "two jobs completed")
    assert states([gone])[0] in (JobState.COMPLETED, JobState.CANCELLED)
    assert fake.wait_state(short, "F")["Exit_status"] == EXIT_WALLTIME
    assert Path(provider.resources[ends]["job_stdout_path"]).read_text() == "done\n"


# ---------------------------------------------------------------- pure functions, golden
def test_directives_stop_at_the_first_command():
    text = "#!/bin/bash\n#PBS -l select=3\n# note\n\n#PBS -q debug\necho\n#PBS -A x\n"
    assert cli.directives(text) == ["-l", "select=3", "-q", "debug"]


def test_resources_and_walltime():
    assert cli.resources(["select=3:ncpus=208", "walltime=0:30:00,place=scatter"]) == {
        "select": "3:ncpus=208", "walltime": "0:30:00", "place": "scatter"}
    assert [cli.parse_walltime(w) for w in ("1:02:03", "90", "2:00", "00:00:02")] == \
        [3723, 90, 120, 2]


def test_request_golden():
    script = ("#!/bin/bash\n#PBS -S /bin/bash\n#PBS -N parsl.block\n#PBS -m n\n"
              "#PBS -l walltime=00:20:00\n#PBS -l select=2:ncpus=208\n#PBS -o /r/o\n"
              "#PBS -e /r/e\n#PBS -l filesystems=home:flare\n\nexport JOBNAME=x\n")
    assert cli.request(["-q", "debug", "-A", "proj", "job.sh"], script) == {
        "opts": {"S": "/bin/bash", "N": "parsl.block", "m": "n", "o": "/r/o",
                 "e": "/r/e", "q": "debug", "A": "proj"},
        "resources": {"walltime": "00:20:00", "select": "2:ncpus=208",
                      "filesystems": "home:flare"},
        "select": "2:ncpus=208", "nodes": 2, "ncpus": 208, "walltime": "00:20:00",
        "seconds": 1200}


def test_concurrent_qsubs_get_distinct_ids_and_the_per_user_limit_holds(fake):
    """Submissions take one lock: a dozen qsubs at once get a dozen ids, one after another, and
    into debug (one job per user) exactly one of a dozen is accepted."""
    from concurrent.futures import ThreadPoolExecutor

    d = fake.workdir()
    script = fake.write(d / "job.sh", "#!/bin/bash\n#PBS -l select=1\n"
                        "#PBS -l walltime=0:01:00\nsleep 60\n")

    def qsubs(*args: str) -> list:
        with ThreadPoolExecutor(12) as pool:
            return list(pool.map(lambda _: fake.run("qsub", *args, str(script), cwd=d),
                                 range(12)))

    ids = [out.stdout.strip() for out in qsubs()]
    assert sorted(int(i.split(".")[0]) for i in ids) == list(range(12)), ids
    debug = qsubs("-q", "debug")
    assert sorted(out.returncode for out in debug) == [0] + [38] * 11
    assert {out.stderr for out in debug if out.returncode} == {
        "qsub: would exceed queue generic's per-user limit\n"}
    fake.run("qdel", *ids, *(out.stdout.strip() for out in debug if out.returncode == 0),
             cwd=d)
