"""Python X.Y here as Aurora gets it from Docker Hub: a stand-in for python:X.Y-slim-bookworm
built from pyenv's copy in root's home and served by digest from a loopback registry (root only).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

# pyenv's CPython on every machine of this kind: root-only, its RUNPATH pointing into root's
# home; PYENV_ROOT names another pyenv.
PYENV = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"
STANDIN_DEF = ROOT / "tests" / "standin" / "python-slim.def"
# Kept between sessions (the debootstrap is most of a cold build), keyed by what makes it.
CACHE = Path("/tmp/parsl-aurora-standin")
# What the official image leaves out (its Dockerfile deletes test folders and static
# libraries) or cannot run here (Tk), and pyenv's own test modules.
DROP_DIRS = {"test", "tests", "idle_test", "__pycache__"}
DROP_GLOBS = ("libpython*.a", "_test*.so", "_tkinter*.so", "xxlimited*.so", "_xx*.so",
              "*.pyc")


def pyenv_python(version: str) -> Path:
    found = sorted(PYENV.glob(f"{version}.*"), key=lambda p: [int(x) for x in
                                                             p.name.split(".")])
    if not found:
        raise FileNotFoundError(f"no pyenv CPython {version} in {PYENV}")
    return found[-1]


def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True,
                         **kw)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


def copy_python(src: Path, dest: Path) -> Path:
    """SRC (a pyenv version folder) as /usr/local holds it in the official image: interpreter,
    libpython and the standard library, the interpreter's RUNPATH $ORIGIN/../lib (pyenv's
    points into root's home), extension modules without one, everything stripped."""
    minor = ".".join(src.name.split(".")[:2])
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(src / "bin" / f"python{minor}", dest / "bin")
    os.symlink(f"python{minor}", dest / "bin" / "python3")
    shutil.copytree(src / "include", dest / "include", symlinks=True)
    shutil.copytree(src / "lib", dest / "lib", symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in DROP_DIRS or n in
                                             ("site-packages", "pkgconfig", f"config-{minor}-x86_64-linux-gnu")
                                             or any(Path(n).match(g) for g in DROP_GLOBS)])
    (dest / "lib" / f"python{minor}" / "site-packages").mkdir()
    exe = dest / "bin" / f"python{minor}"
    _run("patchelf", "--set-rpath", "$ORIGIN/../lib", exe)
    sos = list((dest / "lib").rglob("*.so*"))
    for so in sos:
        if not so.is_symlink():
            _run("patchelf", "--remove-rpath", so)
    _run("strip", "--strip-unneeded", exe, *[s for s in sos if not s.is_symlink()])
    for path in [dest, *dest.rglob("*")]:  # readable by all, as in any image
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    return dest


def standin_sif(version: str) -> Path:
    """The stand-in image (built once per definition, pyenv version and mirror)."""
    sys.path.insert(0, str(ROOT / "src"))
    from parsl_aurora.image.build import _host_mirror

    src = pyenv_python(version)
    mirror = _host_mirror()
    key = hashlib.sha256(b"\0".join([STANDIN_DEF.read_bytes(), src.name.encode(),
                                     mirror.encode(), Path(__file__).read_bytes()])).hexdigest()
    out = CACHE / f"python-{version}-{key[:16]}.sif"
    if out.exists():
        return out
    CACHE.mkdir(mode=0o755, exist_ok=True)
    work = CACHE / f"work-{os.getpid()}"
    try:
        copy_python(src, work / "usr-local")
        tmp = out.with_suffix(".partial")
        _run("apptainer", "build", "--fakeroot", "--force", "--build-arg", f"MIRROR={mirror}",
             "--build-arg", "TREE=usr-local", tmp, STANDIN_DEF, cwd=work,
             env={**os.environ, "PATH": f"{os.environ['PATH']}:/usr/sbin:/sbin"})
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def push(sif: Path, registry: str, tag: str) -> str:
    """Push SIF to REGISTRY (host:port, plain HTTP) as an OCI image TAG; its manifest digest."""
    digest_file = sif.with_name(f"{sif.stem}.{os.getpid()}.digest")
    try:
        _run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--digestfile",
             digest_file, f"sif:{sif}", f"docker://{registry}/{tag}")
        return digest_file.read_text().strip()
    finally:
        digest_file.unlink(missing_ok=True)
