"""The Apptainer image: start-up overhead, shared-file-system pressure, size and build time.

- overhead: wall time of `apptainer exec aurora.sif python -c 'import parsl'` beside
  `python -c 'import parsl'` from a venv with the same Parsl, interleaved, medians of --runs.
- syscalls: `strace -f -e trace=%file,getdents64` of `import parsl` (and bigger imports),
  counting the calls whose path argument lies under a pretend shared folder (SHARED) that holds
  (a) a venv with parsl installed, (b) a copy of the SIF.
- image: SIF size; cold build time and the rebuild time after a change to the project's own
  code only, both in a copy of the repository (never the real tree).
A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIF = ROOT / "aurora.sif"
SHARED = Path("/tmp/shared")
STRACE = "/usr/bin/strace"
IMPORTS = {
    "import parsl": "import parsl",
    "worker pool": "import parsl.executors.high_throughput.process_worker_pool",
    "many modules": ("import parsl, parsl.executors.high_throughput.process_worker_pool, "
                     "parsl.executors.high_throughput.interchange, parsl.monitoring, "
                     "parsl.providers, parsl.launchers, json, email, "
                     "http.client, xml.dom.minidom, sqlite3, decimal, asyncio"),
}


def locked_venv(folder: Path, base: str) -> Path | None:
    """A venv of `base` holding the image's own package set (its lock, from the wheelhouse
    when there is one), so it and the image import the same code and only where it lives
    differs; made once. None if the lock cannot be installed."""
    py = folder / "bin" / "python"
    if py.exists():
        return py
    subprocess.run([base, "-m", "venv", str(folder)], check=True)
    wheels = ROOT / ".wheelhouse"
    src = ["--no-index", "--find-links", str(wheels)] if wheels.is_dir() else []
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--require-hashes",
                        *src, "-r", str(ROOT / "container" / "requirements.lock")], check=False)
    if r.returncode:
        shutil.rmtree(folder)
        return None
    return py


def _locked(folder: Path) -> Path:
    py = locked_venv(folder, base_python())
    if py is None:
        raise SystemExit("cannot install container/requirements.lock into a venv")
    return py


def _venv_python() -> str:
    """A venv of this interpreter holding the image's packages."""
    return str(_locked(LOCKED_VENV))


def base_python() -> str:
    return os.path.realpath(sys.executable)


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


# The image's interpreter is Debian 12's Python 3.11.2; a host with the same one gives a venv
# that differs from the image only by the container.
HOST_DEBIAN_PYTHON = Path("/usr/bin/python3.11")
DEBIAN_VENV = Path("/tmp/parsl-aurora-bench-debvenv")
LOCKED_VENV = Path("/tmp/parsl-aurora-bench-venv")


def debian_venv() -> Path | None:
    """A venv of the host's Debian Python with the same Parsl, or None without one."""
    if not HOST_DEBIAN_PYTHON.exists():
        return None
    return locked_venv(DEBIAN_VENV, str(HOST_DEBIAN_PYTHON))


def overhead(runs: int = 10, sif: Path = SIF) -> dict[str, list[float]]:
    """Wall seconds per run, the cases interleaved run by run (one warm-up each first)."""
    img = ["apptainer", "exec", str(sif), "python"]
    deb = debian_venv()
    cases = {
        "venv": [_venv_python(), "-c", "import parsl"],
        "image": [*img, "-c", "import parsl"],
        **({"venv of the host's Debian Python 3.11.2 (the image's interpreter)":
            [str(deb), "-c", "import parsl"]} if deb else {}),
        # Diagnostics: "never" skips any pyc hash check; the image's unchecked-hash pycs should
        # make it no faster than the plain image row.
        "image, pycs unchecked": [*img, "--check-hash-based-pycs", "never", "-c", "import parsl"],
        "venv: python -c pass": [_venv_python(), "-c", "pass"],
        "image: python -c pass": [*img, "-c", "pass"],
        # One mount kept up: squashfs's cache of decompressed files stays warm between execs.
        INSTANCE_CASE: ["apptainer", "exec", f"instance://{INSTANCE}", "python", "-c",
                        "import parsl"],
    }
    subprocess.run(["apptainer", "instance", "start", str(sif), INSTANCE], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for cmd in cases.values():
            _wall(cmd)  # warm the page cache (and the instance's mount)
        out: dict[str, list[float]] = {c: [] for c in cases}
        for _ in range(runs):
            for c, cmd in cases.items():
                out[c].append(_wall(cmd))
    finally:
        subprocess.run(["apptainer", "instance", "stop", INSTANCE], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


INSTANCE = f"parsl-aurora-bench-{os.getpid()}"
INSTANCE_CASE = "image, in a running instance (`apptainer exec instance://...`)"


# 1234 openat(AT_FDCWD, "/path", ...) = 3   |   1234 stat("/path", ...   |   <... resumed> lines
_CALL = re.compile(r'^(?:\[pid\s+)?\d*\]?\s*(\w+)\((.*)$')
_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')


def count_under(trace: str, folder: Path) -> tuple[int, dict[str, int]]:
    """Syscalls whose (first) path argument lies under folder; and the count per syscall."""
    prefix = str(folder).rstrip("/")
    by_call: dict[str, int] = {}
    for line in trace.splitlines():
        if "resumed>" in line:
            continue  # the path was on the <unfinished ...> half
        m = _CALL.match(line.strip())
        if not m:
            continue
        s = _STR.search(m.group(2))
        if s and (s.group(1) == prefix or s.group(1).startswith(prefix + "/")):
            by_call[m.group(1)] = by_call.get(m.group(1), 0) + 1
    return sum(by_call.values()), by_call


def strace_count(cmd: list[str], folder: Path = SHARED) -> tuple[int, dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trace"
        subprocess.run([STRACE, "-f", "-e", "trace=%file,getdents64", "-o", str(out), *cmd],
                       check=True, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return count_under(out.read_text(errors="replace"), folder)


def prepare_shared(shared: Path = SHARED, sif: Path = SIF) -> tuple[Path, Path]:
    """A venv with the image's packages, and a copy of the SIF, under shared."""
    venv = shared / "venv"
    shared.mkdir(parents=True, exist_ok=True)
    _locked(venv)
    shared_sif = shared / "aurora.sif"
    if not shared_sif.exists() or shared_sif.stat().st_mtime < sif.stat().st_mtime:
        shutil.copy2(sif, shared_sif)
    return venv, shared_sif


def syscalls(shared: Path = SHARED, sif: Path = SIF) -> dict[str, dict[str, object]]:
    """{import label: {"venv": n, "image": n, "image_calls": {...}}}."""
    venv, shared_sif = prepare_shared(shared, sif)
    out: dict[str, dict[str, object]] = {}
    for label, code in IMPORTS.items():
        nv, _ = strace_count([str(venv / "bin" / "python"), "-c", code], shared)
        ni, calls = strace_count(["apptainer", "exec", str(shared_sif), "python", "-c", code],
                                 shared)
        out[label] = {"venv": nv, "image": ni, "image_calls": calls}
    return out


def _build(repo: Path, image: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "parsl_aurora.image", "build", "--force",
                    "--image", str(image)], cwd=repo, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def copy_repo(dest: Path) -> Path:
    """git clone of ROOT plus its uncommitted changes and its wheelhouse (cached wheels)."""
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    changed = subprocess.run(["git", "status", "--porcelain", "-uall"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.splitlines()
    for line in changed:
        rel = line[3:].split(" -> ")[-1]
        src, dst = ROOT / rel, dest / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif not src.exists() and dst.exists():
            dst.unlink()
    if (ROOT / ".wheelhouse").is_dir():
        shutil.copytree(ROOT / ".wheelhouse", dest / ".wheelhouse", dirs_exist_ok=True)
    return dest


def image(builds: int = 1, repo: Path = Path("/tmp/benchrepo")) -> dict[str, object]:
    """SIF size; cold build and code-only rebuild times (seconds), in a copy of the repo.

    The wheelhouse is copied in (cached), so "cold" means: no image yet, wheels on disk.
    The code-only change appends a comment to src/parsl_aurora/__init__.py in the copy.
    """
    copy_repo(repo)
    sif = repo / "bench.sif"
    cold, rebuild = [], []
    for i in range(builds):
        sif.unlink(missing_ok=True)
        cold.append(_build(repo, sif))
        init = repo / "src" / "parsl_aurora" / "__init__.py"
        init.write_text(init.read_text() + f"# benchmark rebuild {i} {time.time()}\n")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "parsl_aurora.image", "build", "--image", str(sif)],
                       cwd=repo, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rebuild.append(time.perf_counter() - start)
    return {"size": SIF.stat().st_size, "built_size": sif.stat().st_size,
            "cold": cold, "rebuild": rebuild}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--builds", type=int, default=0, help="cold builds to time (0: skip)")
    args = p.parse_args()
    oh = overhead(args.runs)
    v, i = statistics.median(oh["venv"]), statistics.median(oh["image"])
    print(f"import parsl: venv {v:.3f} s, image {i:.3f} s, ratio {i / v:.2f}")
    for label, r in syscalls().items():
        print(f"syscalls under {SHARED} ({label}): venv {r['venv']}, image {r['image']} "
              f"{r['image_calls']}")
    print(f"SIF {SIF.stat().st_size / 1e6:.1f} MB")
    if args.builds:
        print(json.dumps(image(args.builds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
