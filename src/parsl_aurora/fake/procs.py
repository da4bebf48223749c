"""One scanner of /proc for the fake and the tests: who runs, under whom, where, doing what."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str  # "Z" for a zombie
    cmdline: str
    cwd: str  # "" where it cannot be read (another user's process)


def processes() -> Iterator[Proc]:
    """Every process visible now; those that vanish while being read are left out."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except OSError:
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            cwd = ""
        fields = stat[stat.rindex(")") + 2:].split()
        yield Proc(int(entry), int(fields[1]), fields[0], cmd, cwd)


def descendants(root: int) -> list[int]:
    """Live (non-zombie) processes below `root`."""
    children: dict[int, list[int]] = {}
    for p in processes():
        if p.state != "Z":
            children.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def become_subreaper() -> None:
    """Inherit every orphan below this process (prctl PR_SET_CHILD_SUBREAPER): hydra's proxies
    and ranks call setsid(), so a process whose parent died is found among our descendants
    instead of under init."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reaped() -> Iterator[tuple[int, int]]:
    """(pid, wait status) of each child that has ended, without waiting for any."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:  # ended meanwhile
            pass


def end_descendants(term_grace: float, kill_grace: float, poll: float = 0.1,
                    on_exit: Callable[[int, int], None] = lambda pid, status: None) -> None:
    """SIGTERM every process below this one, SIGKILL what is left after `term_grace` s (and
    again any forked meanwhile) for at most `kill_grace` s more; every child reaped on the way
    goes to `on_exit`. A subreaper (become_subreaper) finds orphans among its descendants."""
    me = os.getpid()
    for sig, wait in ((signal.SIGTERM, term_grace), (signal.SIGKILL, kill_grace)):
        deadline = time.monotonic() + wait
        _signal(descendants(me), sig)
        while time.monotonic() < deadline:
            for pid, status in reaped():
                on_exit(pid, status)
            left = descendants(me)
            if not left:
                return
            if sig == signal.SIGKILL:
                _signal(left, sig)  # children forked after the first round
            time.sleep(poll)
    for pid, status in reaped():
        on_exit(pid, status)
