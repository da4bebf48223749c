"""Fake PALS daemon: `mpiexec` called inside the image starts its ranks on the host, as PALS's
daemons do on Aurora (they run on the hosts, whatever container the caller is in).

A block whose workers run in the image starts one on its host (HostStack.init, the
fake sites'), on an abstract Unix socket (`@name`: no file to leave behind when the block is
killed; Apptainer shares the host's network namespace, where such names live). The fake
`mpiexec` inside the image then hands its arguments, folder, environment and its stdin, stdout
and stderr (the descriptors themselves, over the socket) to the daemon, which runs the host's
fake `mpiexec` with them and sends back its exit status. Only connections from the daemon's own
user are served (an abstract socket has no file permissions: the peer's uid is checked); the
daemon ends with the block that started it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time

ENV = "PARSL_AURORA_PALSD"
# The fake's own variables, which the image sets for itself (its python3, no hydra): the host's
# launch uses the daemon's.
OWN = ("PARSL_AURORA_PYTHON", "PARSL_AURORA_HYDRA", ENV)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            return
        # The three descriptors come with one byte, the request after it as one line.
        _, fds, _, _ = socket.recv_fds(self.request, 1, 3)
        try:
            request = json.loads(self.rfile.readline() or "{}")
            if len(fds) != 3 or not isinstance(request.get("argv"), list):
                return
            cwd = request.get("cwd")
            env = {k: v for k, v in dict(request.get("env", {})).items() if k not in OWN}
            env.update({k: os.environ[k] for k in OWN[:2] if k in os.environ})
            launch = subprocess.Popen(
                [sys.executable, "-m", "parsl_aurora.fake.mpiexec", *request["argv"]],
                stdin=fds[0], stdout=fds[1], stderr=fds[2], env=env,
                cwd=cwd if isinstance(cwd, str) and os.path.isdir(cwd) else None)
        finally:
            for fd in fds:
                os.close(fd)
        # The caller gone (killed with its task) ends the launch, as PALS ends an application
        # whose mpiexec is killed.
        watch = threading.Thread(target=self._end_if_caller_goes, args=(launch,), daemon=True)
        watch.start()
        code = launch.wait()
        self.wfile.write(f"{128 - code if code < 0 else code}\n".encode())

    def _end_if_caller_goes(self, launch: subprocess.Popen) -> None:
        while launch.poll() is None:
            try:
                if self.request.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    launch.terminate()
                    return
            except BlockingIOError:
                pass
            except OSError:
                return
            time.sleep(0.2)


class Daemon(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


def serve(path: str) -> None:
    """Serve `path` until the process that started this daemon (the block) ends."""
    parent = os.getppid()
    # A block's end (qdel, walltime, Parsl's cancel) signals its whole process group.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = Daemon(_address(path), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        while os.getppid() == parent:
            time.sleep(1)
    finally:
        server.shutdown()


def forward(path: str, argv: list[str]) -> int:
    """Inside the image: have the host's daemon run `mpiexec ARGV`; its exit status."""
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        end = time.monotonic() + 30  # the block starts the daemon beside its pools
        while True:
            try:
                s.connect(_address(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if time.monotonic() > end:
                    print(f"mpiexec: cannot reach the PALS daemon at {path}: {e}",
                          file=sys.stderr)
                    return 255
                time.sleep(0.1)
        fds = [fd if _is_open(fd) else os.open(os.devnull, os.O_RDWR) for fd in (0, 1, 2)]
        try:
            socket.send_fds(s, [b"."], fds)
            s.sendall(json.dumps(request).encode() + b"\n")
            reply = s.makefile("rb").readline()
        except (BrokenPipeError, ConnectionResetError):
            # Refused unanswered: the daemon serves its own user only. Whether the close
            # reaches us as a broken pipe or a reset depends on timing.
            reply = b""
    if not reply.strip().isdigit():
        print(f"mpiexec: the PALS daemon at {path} closed the connection unanswered (is it "
              "another user's?)", file=sys.stderr)
        return 255
    return int(reply)


def _address(name: str) -> str:
    """`@name` is Linux's abstract socket `\\0name`; anything else a path."""
    return "\0" + name[1:] if name.startswith("@") else name


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


if __name__ == "__main__":
    serve(sys.argv[1])
