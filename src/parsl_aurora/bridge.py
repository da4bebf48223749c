"""PBS for a driver inside the image: the login node runs `qsub`, `qstat` and `qdel` for it.

PBS clients authenticate through a setuid helper (`pbs_iff`) that cannot gain privileges in an
unprivileged container, so the image's own clients cannot reach the server. Instead

    parsl-aurora pbs-bridge -- apptainer exec aurora.sif python workflow.py

serves a Unix socket in a private folder under /tmp (which Apptainer binds) for as long as the
command runs, and the image's `qsub`/`qstat`/`qdel` (small shims, put first on PATH by the site
config when it finds the socket) send their arguments and working directory through it. The
bridge runs only those three commands, without a shell, as the user who started it, for
connections from that same user.
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


if __name__ == "__main__":
    sys.exit(client(sys.argv[1:]))
