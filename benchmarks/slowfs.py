"""A stand-in for a shared file system under load: a read-only FUSE passthrough (mfusepy) that
delays each metadata operation, caps their rate like one busy metadata server, and counts them.

    python benchmarks/slowfs.py STORE MOUNTPOINT [--latency-ms 1] [--rate 0] [--no-cache]

`mounted()` runs it for one measurement: unmounting drops every cache the kernel kept for it
(dentries, attributes, pages), and the daemon then writes what reached it to a JSON file.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Round trips to a metadata server on Lustre or NFS: each waits for its slot and the latency.
# flush/release (close) are counted but not delayed (the kernel sends release asynchronously),
# and so are reads: the data servers are the bandwidth side, which the model handles.
METADATA = ("getattr", "open", "opendir", "readdir", "readlink", "access", "statfs",
            "getxattr", "listxattr")
# How long the kernel may trust a reply when caching is on: a Lustre client keeps dentries,
# attributes and pages while it holds the server's locks, so a node's second process to import
# a module asks the servers nothing; --no-cache makes every lookup and stat a round trip.
CACHE_SECONDS = 600


def _server(latency: float, rate: float):
    """A function that blocks its caller as one metadata server would: at most `rate`
    operations a second (0: no cap) in arrival order, each answered `latency` s after its
    turn comes."""
    lock, slot = threading.Lock(), [0.0]

    def wait() -> None:
        with lock:
            start = max(time.monotonic(), slot[0])
            if rate:
                slot[0] = start + 1 / rate
        left = start + latency - time.monotonic()
        if left > 0:
            time.sleep(left)
    return wait


def operations(store: str, latency: float, rate: float, stats: str):
    """The mfusepy Operations of the passthrough (imported here: only the daemon needs it)."""
    import mfusepy

    class SlowFS(mfusepy.Operations):
        use_ns = True

        def __init__(self) -> None:
            self.counts: Counter[str] = Counter()
            self.wait = _server(latency, rate)
            self._mutex = threading.Lock()

        def _meta(self, name: str, path: str) -> str:
            with self._mutex:
                self.counts[name] += 1
            self.wait()
            return store + path

        def _call(self, fn, *args):
            try:
                return fn(*args)
            except OSError as e:
                raise mfusepy.FuseOSError(e.errno or errno.EIO) from None

        def getattr(self, path, fh=None):
            st = self._call(os.lstat, self._meta("getattr", path))
            return {k: getattr(st, k) for k in (
                "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino",
                "st_blocks")} | {k: getattr(st, k + "_ns") for k in (
                "st_atime", "st_mtime", "st_ctime")}

        def access(self, path, amode):
            if not os.access(self._meta("access", path), amode):
                raise mfusepy.FuseOSError(errno.EACCES)
            return 0

        def open(self, path, flags):
            return self._call(os.open, self._meta("open", path), flags)

        def opendir(self, path):
            self._meta("opendir", path)
            return 0

        def readdir(self, path, fh):
            return [".", "..", *self._call(os.listdir, self._meta("readdir", path))]

        def readlink(self, path):
            return self._call(os.readlink, self._meta("readlink", path))

        def statfs(self, path):
            sv = self._call(os.statvfs, self._meta("statfs", path))
            return {k: getattr(sv, k) for k in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")}

        def getxattr(self, path, name, position=0):
            full = self._meta("getxattr", path)
            return self._call(lambda: os.getxattr(full, name, follow_symlinks=False))

        def listxattr(self, path):
            full = self._meta("listxattr", path)
            return self._call(lambda: os.listxattr(full, follow_symlinks=False))

        def read(self, path, size, offset, fh):
            data = os.pread(fh, size, offset)
            with self._mutex:
                self.counts["read"] += 1
                self.counts["bytes"] += len(data)
            return data

        def flush(self, path, fh):
            with self._mutex:
                self.counts["flush"] += 1
            return 0

        def release(self, path, fh):
            with self._mutex:
                self.counts["release"] += 1
            os.close(fh)
            return 0

        def releasedir(self, path, fh):
            return 0

        def destroy(self, path):
            Path(stats).write_text(json.dumps(dict(self.counts)))

    return SlowFS()


def fuse_options(cache: bool) -> dict:
    """Mount options: read-only, open to every user (workers run as the job's user, the
    daemon as root), permissions checked by the kernel as on a real file system."""
    t = CACHE_SECONDS if cache else 0
    return {"ro": True, "allow_other": True, "default_permissions": True,
            "entry_timeout": t, "attr_timeout": t, "negative_timeout": t,
            **({"kernel_cache": True} if cache else {})}


def serve(store: str, mountpoint: str, latency: float, rate: float, cache: bool,
          stats: str) -> None:
    import mfusepy

    mfusepy.FUSE(operations(os.path.realpath(store), latency, rate, stats), mountpoint,
                 foreground=True, fsname="slowfs", **fuse_options(cache))


@dataclass
class Mount:
    """A running slowfs; `counts` is filled in when it is unmounted."""

    path: Path
    latency_ms: float
    counts: dict = field(default_factory=dict)

    def metadata(self) -> int:
        return sum(self.counts.get(k, 0) for k in METADATA)


@contextmanager
def mounted(store: Path, mountpoint: Path, latency_ms: float = 0.0, rate: float = 0.0,
            cache: bool = True):
    """slowfs of `store` on `mountpoint` for the block; fresh caches; counts after."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    stats = mountpoint.parent / f".{mountpoint.name}.stats.json"
    stats.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, str(store), str(mountpoint), "--latency-ms",
           str(latency_ms), "--rate", str(rate), "--stats", str(stats),
           *([] if cache else ["--no-cache"])]
    proc = subprocess.Popen(cmd)
    m = Mount(mountpoint, latency_ms)
    try:
        deadline = time.monotonic() + 120  # only stops a hang
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"slowfs did not mount {mountpoint} (exit {proc.poll()})")
            time.sleep(0.05)
        yield m
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], check=False)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if stats.exists():
        m.counts = json.loads(stats.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    p.add_argument("mountpoint")
    p.add_argument("--latency-ms", type=float, default=1.0, help="per metadata operation")
    p.add_argument("--rate", type=float, default=0.0,
                   help="metadata operations a second at most (0: no cap)")
    p.add_argument("--no-cache", action="store_true", help="the kernel caches nothing")
    p.add_argument("--stats", default="/dev/null", help="JSON counts written on unmount")
    a = p.parse_args()
    serve(a.store, a.mountpoint, a.latency_ms / 1000, a.rate, not a.no_cache, a.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
