"""The host for a driver inside the image: the login node runs `qsub`, `qstat` and `qdel` for
it, and in one job (in_job) the job's host starts the blocks it asks for.

PBS clients authenticate through a setuid helper (`pbs_iff`) that cannot gain privileges in an
unprivileged container, so the image's own clients cannot reach the server. Instead

    parsl-aurora pbs-bridge -- apptainer exec aurora.sif python workflow.py

serves a Unix socket in a private folder under /tmp (which Apptainer binds) for as long as the
command runs, and the image's `qsub`/`qstat`/`qdel` (small shims, put first on PATH by the site
config when it finds the socket) send their arguments and working directory through it. The
bridge runs only those three commands, without a shell, as the user who started it, for
connections from that same user.

In one job, `in_job_host.sh` (run by examples/in_job.pbs on the job's first host, carried by
the image) plays that part for blocks: PALS's `mpiexec` and `apptainer` are host commands, so a
driver in the image hands each block's script to the host through a FIFO in a private folder
(`HostLocalProvider`), and the host starts it as Parsl's LocalProvider would have.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from parsl_aurora.errors import ConfigError

COMMANDS = ("qsub", "qstat", "qdel")
ENV = "PARSL_AURORA_PBS_BRIDGE"
HOW = "parsl-aurora pbs-bridge -- apptainer exec aurora.sif python workflow.py"


def shims_dir() -> Path:
    """The folder of the image-side `qsub`, `qstat` and `qdel`."""
    return Path(__file__).resolve().parent / "bridge_bin"


def use_from_image() -> None:
    """Inside the image: put the shims first on PATH, or refuse before anything is submitted."""
    path = os.environ.get(ENV, "")
    if not path or not Path(path).is_socket():
        raise ConfigError("PBS", "unreachable from inside the image",
                          "the PBS bridge's socket ($" + ENV + ")",
                          f"start the driver through the bridge on the login node: `{HOW}`")
    shims = str(shims_dir())
    if os.environ.get("PATH", "").split(os.pathsep)[0] != shims:
        os.environ["PATH"] = shims + os.pathsep + os.environ.get("PATH", "")


# ---------------------------------------------------------------- the host side
def run_command(request: dict) -> dict:
    """Run one allowed PBS command as asked (argv, cwd); its exit code and output."""
    argv = request.get("argv")
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)
            and argv[0] in COMMANDS):
        return {"rc": 2, "stdout": "", "stderr": f"pbs-bridge: only {', '.join(COMMANDS)}\n"}
    exe = shutil.which(argv[0])
    if exe is None:
        return {"rc": 127, "stdout": "", "stderr": f"pbs-bridge: {argv[0]}: not found on the "
                                                   "host's PATH\n"}
    cwd = request.get("cwd")
    if not isinstance(cwd, str) or not os.path.isdir(cwd):
        cwd = None  # a folder only the image has: run from the bridge's own
    done = subprocess.run([exe, *argv[1:]], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():  # the folder is private already; this says so twice
            return
        try:
            request = json.loads(self.rfile.readline())
        except ValueError:
            return
        self.wfile.write(json.dumps(run_command(request)).encode() + b"\n")


class Bridge(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


def serve(path: str) -> Bridge:
    """Start serving `path` in a background thread; `shutdown()` and `server_close()` end it."""
    server = Bridge(path, _Handler)
    threading.Thread(target=server.serve_forever, name="pbs-bridge", daemon=True).start()
    return server


def run_bridged(command: list[str]) -> int:
    """Serve the bridge while `command` runs (with the socket in its environment, also for
    Apptainer's --cleanenv); the command's exit status."""
    with tempfile.TemporaryDirectory(prefix="parsl-aurora-bridge-", dir="/tmp") as folder:
        os.chmod(folder, 0o700)
        path = os.path.join(folder, "pbs.sock")
        server = serve(path)
        env = {**os.environ, ENV: path, f"APPTAINERENV_{ENV}": path}
        try:
            return subprocess.call(command, env=env)
        finally:
            server.shutdown()
            server.server_close()


# ---------------------------------------------------------------- the image side
def client(argv: list[str]) -> int:
    """One PBS command through the bridge: print its output, return its exit code."""
    path = os.environ.get(ENV, "")
    request = {"argv": argv, "cwd": os.getcwd()}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(s.makefile("rb").readline())
    except (OSError, ValueError) as e:
        print(f"{argv[0]}: cannot reach the PBS bridge at {path or '$' + ENV} ({e}); run the "
              f"driver as `{HOW}`", file=sys.stderr)
        return 255  # what a PBS client returns when it cannot reach its server
    sys.stdout.write(reply["stdout"])
    sys.stderr.write(reply["stderr"])
    return reply["rc"]


# ---------------------------------------------------------------- blocks on the job's host
HOST_ENV = "PARSL_AURORA_HOST_LAUNCH"
HOST_SCRIPT = Path(__file__).resolve().parent / "in_job_host.sh"
HOST_HOW = ("run the driver from the job script on the host as examples/in_job.pbs does: "
            "`apptainer exec IMAGE parsl-aurora host-launcher > host.sh; "
            "bash host.sh IMAGE python3 workflow.py`")
# A request and its reply: plain words, so the host's bash reads them without a shell's help.
SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./+:=-")


def host_channel() -> str:
    """Inside the image, in a job: the host-side launcher's folder, or refuse before submit."""
    folder = os.environ.get(HOST_ENV, "")
    if not folder or not Path(folder, "requests").is_fifo():
        raise ConfigError(HOST_ENV, folder or None,
                          "the folder of the job host's launcher, holding its `requests` FIFO: "
                          "a driver in the image runs in_job's blocks on the host, where PALS's "
                          "mpiexec and apptainer are", HOST_HOW)
    return folder


def host_request(folder: str, verb: str, arg: str, wait: float = 120.0) -> str:
    """One request to the host's launcher; its reply line. The wait only stops a hang."""
    if not set(arg) <= SAFE:
        raise ValueError(f"{arg!r}: the host's launcher takes paths of letters, digits and "
                         "_./+:=- only (run the workflow from such a folder)")
    rid = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    reply = Path(folder, f"{rid}.reply")
    # Non-blocking: with nobody reading (the host's launcher gone) this fails at once.
    fd = os.open(Path(folder, "requests"), os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, f"{rid} {verb} {arg}\n".encode())  # one write below PIPE_BUF: atomic
    finally:
        os.close(fd)
    end = time.monotonic() + wait
    while not reply.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"no answer from the host's launcher in {folder} in {wait:.0f} s")
        time.sleep(0.01)
    text = reply.read_text().strip()
    reply.unlink()
    return text


def host_local_provider(folder: str, **kwargs):
    """Parsl's LocalProvider, its three shell commands (start a block, is it alive, cancel it)
    run on the job's host through `folder`; everything else (the block's script, its .ec,
    .out and .err files, which the host writes beside it) is Parsl's own."""
    from parsl.jobs.states import JobState, JobStatus
    from parsl.providers import LocalProvider
    from parsl.providers.errors import SubmitException

    class HostLocalProvider(LocalProvider):
        def submit(self, command, tasks_per_node, job_name="parsl.localprovider"):
            job_name = f"{job_name}.{time.time()}"
            script_path = os.path.abspath(f"{self.script_dir}/{job_name}.sh")
            self._write_submit_script(
                self.worker_init + f"\nexport JOBNAME={job_name}\n"
                + self.launcher(command, tasks_per_node, self.nodes_per_block), script_path)
            try:
                answer = host_request(folder, "submit", script_path)
            except (OSError, ValueError, TimeoutError) as e:
                raise SubmitException(job_name, f"the host's launcher: {e}") from None
            word, _, pid = answer.partition(" ")
            if word != "ok" or not pid.isdigit():
                raise SubmitException(job_name, f"the host's launcher said: {answer}")
            self.resources[pid] = {"job_id": pid, "status": JobStatus(JobState.RUNNING),
                                   "remote_pid": pid, "script_path": script_path}
            return pid

        def _is_alive(self, job_dict):
            try:
                return host_request(folder, "alive", job_dict["remote_pid"]) == "yes"
            except (OSError, TimeoutError):
                return False  # the host's launcher ended: so did its blocks

        def cancel(self, job_ids):
            for job in job_ids:
                self.resources[job]["cancelled"] = True
                try:
                    host_request(folder, "cancel", self.resources[job]["remote_pid"])
                except (OSError, TimeoutError):
                    pass
            return [True for _ in job_ids]

    return HostLocalProvider(**kwargs)


if __name__ == "__main__":
    sys.exit(client(sys.argv[1:]))
