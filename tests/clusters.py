"""The two PBS clusters the tests drive the same way: the fake, and a real OpenPBS server.

A `Cluster` runs commands as the user jobs belong to (a test user for real PBS, which refuses
root), in a work folder that user owns, with the PBS client commands on PATH. The fixtures that
make them are in conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ID_FORMAT = r"^(\d+)\.aurora-pbs-0001\.hostmgmt\.cm\.aurora\.alcf\.anl\.gov$"


def wait_for(predicate, what: str, limit: float = 300, every: float = 0.2):
    """Poll until `predicate()` returns something true and return it; fail naming `what`.

    The limit only stops a broken build from hanging CI; it is no performance assertion.
    """
    end = time.monotonic() + limit
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < end, f"never saw {what} (waited {limit:.0f} s)"
        time.sleep(every)


@dataclass
class Cluster:
    """How to reach one PBS: `kind` is "fake" or "real"."""

    kind: str
    user: str
    home: Path
    env: dict[str, str]  # the user's environment for PBS commands (PATH included)
    root: Path  # where work folders are made
    runas: list[str] = field(default_factory=list)  # prefix that switches to the user

    def workdir(self, name: str = "w") -> Path:
        """A fresh folder the user owns (and can reach: not below a 0700 pytest folder)."""
        d = self.root / f"{name}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        if self.runas:
            shutil.chown(d, self.user, self.user)
        return d

    def run(self, *cmd: str, cwd: Path, env: dict | None = None, input: str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        full = {**self.env, **(env or {})}
        if self.runas:  # runuser keeps nothing of ours: pass the environment explicitly
            argv = [*self.runas, "env", "-i", *(f"{k}={v}" for k, v in full.items()), *cmd]
            return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, input=input,
                                  timeout=timeout, check=False)
        return subprocess.run(list(cmd), cwd=cwd, env=full, capture_output=True, text=True,
                              input=input, timeout=timeout, check=False)

    def write(self, path: Path, text: str, mode: int = 0o644) -> Path:
        path.write_text(text)
        path.chmod(mode)
        if self.runas:
            shutil.chown(path, self.user, self.user)
        return path

    def qsub(self, cwd: Path, body: str, *args: str, directives=(), name="job.sh"):
        """Submit a bash script made of `#PBS` directives and `body`; the CompletedProcess."""
        script = "#!/bin/bash\n" + "".join(f"#PBS {d}\n" for d in directives) + body
        path = self.write(cwd / name, script)
        return self.run("qsub", *args, str(path), cwd=cwd)

    def submit(self, cwd: Path, body: str, *args: str, **kw) -> str:
        out = self.qsub(cwd, body, *args, **kw)
        assert out.returncode == 0, f"qsub failed ({out.returncode}): {out.stderr}"
        return out.stdout.strip()

    def qstat(self, *args: str) -> tuple[int, dict, str]:
        """`qstat -f -F json ARGS` -> (exit code, parsed stdout, stderr)."""
        out = self.run("qstat", "-f", "-F", "json", *args, cwd=self.home)
        return out.returncode, json.loads(out.stdout), out.stderr

    def job(self, job_id: str) -> dict | None:
        """The job's qstat -x record, or None."""
        return self.qstat("-x", job_id)[1].get("Jobs", {}).get(job_id)

    def wait_state(self, job_id: str, *states: str, limit: float = 300) -> dict:
        """Poll `qstat -x` until the job is in one of `states`; its record."""
        def seen():
            job = self.job(job_id)
            return job if job and job["job_state"] in states else None
        return wait_for(seen, f"job {job_id} in state {'/'.join(states)}", limit)

    def cleanup(self) -> None:
        """qdel every unfinished job of the user and wait until each has ended: whatever a
        test or its workflow's driver left. A real server outlives the tests, and a deleted
        job counts towards debug's one-job-per-user limit until it has ended."""
        _, doc, _ = self.qstat()
        mine = [j for j, job in doc.get("Jobs", {}).items()
                if job["Job_Owner"].split("@")[0] == self.user]
        if mine:
            self.run("qdel", *mine, cwd=self.home)
            for j in mine:
                self.wait_state(j, "F")


def fake_cluster(folder: Path) -> Cluster:
    """The fake PBS with its state in `folder`, run as the current user."""
    from parsl_aurora import fake

    home = folder / "home"
    home.mkdir(parents=True)
    env = {"HOME": str(home), "LANG": "C.UTF-8", "USER": os.environ.get("USER", "root"),
           "PATH": f"{fake.bin_dir()}:{Path(sys.executable).parent}:/usr/bin:/bin",
           **{k: v for k, v in fake.environment(folder / "state").items() if k != "PATH"}}
    return Cluster("fake", env["USER"], home, env, folder)


def real_cluster(user: str, pbs_bin: Path) -> Cluster:
    """The real OpenPBS server, used as `user` (real PBS refuses jobs from root)."""
    import pwd

    home = Path(pwd.getpwnam(user).pw_dir)
    root = Path("/tmp/parsl-aurora-pbs-tests")
    root.mkdir(mode=0o755, exist_ok=True)
    root.chmod(0o755)
    env = {"HOME": str(home), "USER": user, "LOGNAME": user, "LANG": "C.UTF-8",
           "PATH": f"{pbs_bin}:/usr/local/bin:/usr/bin:/bin"}
    cluster = Cluster("real", user, home, env, root, runas=["runuser", "-u", user, "--"])
    cluster.cleanup()  # what an earlier session left
    return cluster
