"""Build aurora.sif: lock the packages, fetch them on the host, build both layers with Apptainer
(effects only; the pure parts are in lock.py, inputs.py and sif.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import glob
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from parsl_aurora.errors import ConfigError, ImageError, run_main
from parsl_aurora.image.inputs import (
    BASE_DEF,
    CACHE,
    DEF,
    EXTRA_DEF,
    IMAGE,
    IMAGE_MODE,
    LABEL_PARSL,
    LABEL_PYTHON,
    LABEL_SDE,
    LABEL_STAMP,
    PYTHONS,
    SOURCES,
    SQUASHFS_ARGS,
    WHEELHOUSE,
    apt_mirror,
    base_build_args,
    base_for,
    base_key,
    base_path,
    build_args,
    build_options,
    check_python,
    default_bootstrap,
    extra_build_args,
    running_python,
    stamp,
)
from parsl_aurora.image.lock import (
    BUILD_TOOLS,
    REQUIREMENTS_IN,
    check_date,
    constraints_text,
    default_requirements,
    default_set_command,
    download_command,
    exclude_newer,
    extra_lock_command,
    extra_lock_date,
    extra_lock_is_current,
    extra_lock_path,
    extra_lock_text,
    lock_command,
    lock_entries,
    lock_path,
    parse_pip_config,
    parsl_pin,
    requirement_name,
    requirements_in,
    split_lock,
    uv_index_args,
    with_layout,
)
from parsl_aurora.image.sif import labels_from_inspect, normalise_sif

INSTALL_HINT = ("apptainer is not on PATH. Install it: `sudo bash .ci/install-apptainer` "
                "(Debian 12), or `module load apptainer` on an Aurora compute node.")

# Run-time configuration of where the base is pulled from (a mirror; a loopback one in CI).
BASE_REGISTRY_ENV = "PARSL_AURORA_BASE_REGISTRY"
NO_HTTPS_ENV = "PARSL_AURORA_BASE_REGISTRY_NO_HTTPS"

# debootstrap lives in /usr/sbin, which a user's login PATH on Debian leaves out.
SBIN = "/usr/sbin:/sbin"


def _debootstrap() -> str | None:
    return shutil.which("debootstrap", path=f"{os.environ.get('PATH', os.defpath)}:{SBIN}")


def _has_apt_sources() -> bool:
    try:
        _host_mirror()
    except (ImageError, OSError):
        return False
    return True


def install_image(src: Path, dest: Path) -> None:
    """Give a finished image IMAGE_MODE and rename it to DEST (atomic on one filesystem)."""
    os.chmod(src, IMAGE_MODE)
    os.replace(src, dest)


def _run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    print("+", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, cwd=cwd, check=True, **kw)


def find_root(start: Path | None = None) -> Path:
    for d in [start or Path.cwd(), *(start or Path.cwd()).parents]:
        if (d / DEF).is_file() and (d / "pyproject.toml").is_file():
            return d
    raise ImageError(f"no {DEF} in {start or Path.cwd()} or its parents; run from the "
                     "parsl-aurora checkout or pass --root")


def apptainer() -> str:
    exe = shutil.which("apptainer")
    if not exe:
        raise ImageError(INSTALL_HINT)
    return exe


def apptainer_version() -> str:
    return subprocess.run([apptainer(), "version"], check=True, capture_output=True,
                          text=True).stdout.strip()


def image_labels(image: Path) -> dict[str, str]:
    out = subprocess.run([apptainer(), "inspect", "--json", "--labels", str(image)],
                         check=True, capture_output=True, text=True).stdout
    return labels_from_inspect(out)


def _uv() -> str:
    uv = shutil.which("uv")
    if not uv:
        raise ImageError("uv is not on PATH; `pip install uv` (nox's `lock` session does it)")
    return uv


def _index_args() -> list[str]:
    pip_conf = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                              check=False, capture_output=True, text=True).stdout
    return uv_index_args(parse_pip_config(pip_conf))


def lock(root: Path, python: str) -> Path:
    """Regenerate requirements.in from pyproject.toml, compile PYTHON's hashed lock with uv, and
    record which packages only IMAGE_EXTRAS need (they go off the default import path)."""
    check_python(python)
    pyproject = (root / "pyproject.toml").read_text()
    (root / REQUIREMENTS_IN).write_text(requirements_in(pyproject))
    uv, parsl, index = _uv(), parsl_pin(pyproject), _index_args()
    out = root / lock_path(python)
    _run(lock_command(uv, python, parsl, index), root)
    locked = out.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        constraints, default = Path(tmp, "constraints.txt"), Path(tmp, "default.in")
        constraints.write_text(constraints_text(locked))
        default.write_text(default_requirements(pyproject))
        names = _run(default_set_command(uv, python, parsl, str(constraints), str(default),
                                         index), root, capture_output=True, text=True).stdout
    on_path = {requirement_name(line) for line in names.splitlines()
               if line and not line.startswith("#")}
    builds = {requirement_name(t) for t in BUILD_TOOLS}
    monitoring = set(lock_entries(locked)) - on_path - builds
    out.write_text(with_layout(locked, monitoring, builds))
    return out


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What the labels say an image was built from; equal provenance, equal bytes."""

    commit: str
    source_date_epoch: int
    base_source_date_epoch: int  # the last change to the base's own inputs


def _git(root: Path, *args: str) -> str:
    r = subprocess.run(["git", *args], cwd=root, check=False, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def provenance(root: Path, python: str) -> Provenance:
    """From git: the commit and, per Reproducible Builds, the time of the last commit as
    SOURCE_DATE_EPOCH (the caller's SOURCE_DATE_EPOCH wins, for the base too)."""
    commit = _git(root, "rev-parse", "HEAD") or "uncommitted"
    if os.environ.get("SOURCE_DATE_EPOCH"):
        sde = int(os.environ["SOURCE_DATE_EPOCH"])
        return Provenance(commit, sde, sde)
    head = _git(root, "log", "-1", "--format=%ct")
    if not head:
        print("warning: not a git checkout and no SOURCE_DATE_EPOCH: the image records the "
              "build's clock, so no two builds will match", file=sys.stderr, flush=True)
        now = int(time.time())
        return Provenance(commit, now, now)
    base = _git(root, "log", "-1", "--format=%ct", "--", BASE_DEF, lock_path(python)) or head
    return Provenance(commit, int(head), int(base))


def _host_mirror() -> str:
    texts = [Path(p).read_text() for p in sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))]
    plain = Path("/etc/apt/sources.list")
    return apt_mirror(texts, plain.read_text() if plain.exists() else "")


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _download(root: Path, python: str, requirements_text: str, dest: Path) -> None:
    """Hash-checked wheels for PYTHON into DEST (pip's cache makes repeats quick)."""
    if not requirements_text.strip():
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=dest) as req:
        req.write(requirements_text)
        req.flush()
        _run(download_command(sys.executable, python, req.name, str(dest)), root)


def fill_base_wheelhouse(root: Path, python: str) -> Path:
    """.wheelhouse/base: every locked wheel (pip's too) and the lock split by where it goes."""
    dest = _fresh(root / WHEELHOUSE / "base")
    parts = split_lock((root / lock_path(python)).read_text())
    _download(root, python, "".join(parts.values()), dest)
    (dest / "default.txt").write_text(parts["default"])
    (dest / "monitoring.txt").write_text(parts["monitoring"])
    return dest


def _pip_wheel(root: Path, python: str, dest: Path) -> None:
    _download(root, python, split_lock((root / lock_path(python)).read_text())["build"], dest)


def fill_project_wheelhouse(root: Path, python: str, source_date_epoch: int) -> Path:
    """.wheelhouse/project: pip's locked wheel and this project's wheel, built from a clean copy
    of its sources (an in-tree build/ folder could carry deleted files into the wheel) by the
    setuptools pinned in the `image` extra (another setuptools writes other metadata)."""
    dest = _fresh(root / WHEELHOUSE / "project")
    _pip_wheel(root, python, dest)
    with tempfile.TemporaryDirectory(prefix="parsl-aurora-src-") as tmp:
        copy_sources(root, Path(tmp))
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
              "--no-build-isolation", "-w", str(dest), tmp], root,
             env={**os.environ, "SOURCE_DATE_EPOCH": str(source_date_epoch)})
    return dest


def copy_sources(root: Path, dest: Path) -> list[Path]:
    """Copy everything the build reads (defs, lock, SOURCES) from ROOT to DEST."""
    files = {root / DEF, root / BASE_DEF, root / EXTRA_DEF, root / REQUIREMENTS_IN,
             *(Path(p) for p in glob.glob(str(root / lock_path("*"))))}
    for pattern in SOURCES:
        files.update(Path(p) for p in glob.glob(str(root / pattern), recursive=True))
    copied = []
    for src in sorted(p for p in files if p.is_file() and "__pycache__" not in p.parts):
        target = dest / src.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        copied.append(target)
    return copied


@contextlib.contextmanager
def _build_env(apptainer_exe: str, root: Path, source_date_epoch: int) -> Iterator[None]:
    """Run a build in ROOT (definitions name paths relative to it), with SOURCE_DATE_EPOCH for
    mksquashfs (it sets the squashfs time and clamps newer file times to it), and a
    `singularity` on PATH: spython 0.3.14 always runs `singularity`."""
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="spython-shim-") as shim:
        if not shutil.which("singularity"):
            os.symlink(apptainer_exe, Path(shim) / "singularity")
            os.environ["PATH"] = f"{shim}{os.pathsep}{os.environ['PATH']}"
        os.environ["PATH"] += f"{os.pathsep}{SBIN}"  # apptainer's debootstrap bootstrap
        os.environ["SOURCE_DATE_EPOCH"] = str(source_date_epoch)
        os.chdir(root)
        try:
            yield
        finally:
            os.chdir(old_cwd)
            os.environ.clear()
            os.environ.update(old_env)


def _apptainer_build(root: Path, definition: str, out: Path, args: Mapping[str, str],
                     source_date_epoch: int, *, no_https: bool = False) -> None:
    """`apptainer build` (through spython's Client.build) into a private partial file, then
    normalise the SIF header and rename it into place: readers never see half an image."""
    from spython.main import Client  # only needed to build; not a runtime dependency

    exe = apptainer()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    start = time.monotonic()
    try:
        with _build_env(exe, root, source_date_epoch):
            _, lines = Client.build(recipe=str(root / definition), image=str(tmp),
                                    options=build_options(args, no_https=no_https),
                                    sudo=False, stream=True)
            for line in lines:  # raises CalledProcessError when the build fails
                print(line, end="", flush=True)
        normalise_sif(tmp)
        install_image(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"built {out} from {definition} in {time.monotonic() - start:.0f} s, "
          f"{out.stat().st_size / 1e6:.1f} MB", flush=True)


def ensure_base(root: Path, *, python: str, bootstrap: str, base: str, mirror: str,
                source_date_epoch: int, no_https: bool = False) -> str:
    """The base SIF for these inputs, built only when its key has none; path relative to ROOT."""
    lock_bytes = (root / lock_path(python)).read_bytes()
    key = base_key((root / BASE_DEF).read_bytes(), lock_bytes,
                   [python, bootstrap, base, mirror, str(source_date_epoch), apptainer_version(),
                    SQUASHFS_ARGS])
    rel = base_path(python, key)
    if (root / rel).is_file():
        print(f"base {rel} is up to date (key of {BASE_DEF}, {lock_path(python)}, bootstrap)",
              flush=True)
        return rel
    fill_base_wheelhouse(root, python)
    _apptainer_build(root, BASE_DEF, root / rel,
                     base_build_args(python=python, bootstrap=bootstrap, base=base,
                                     mirror=mirror, key=key,
                                     source_date_epoch=source_date_epoch),
                     source_date_epoch, no_https=no_https)
    for old in (root / CACHE).glob(f"base-{python}-*.sif"):  # one base per Python is enough
        if old.name != Path(rel).name:
            old.unlink()
    return rel


def build(root: Path, image: Path, *, python: str | None = None, bootstrap: str | None = None,
          base_digest: str | None = None, base_registry: str | None = None,
          no_https: bool = False, force: bool = False, prov: Provenance | None = None) -> Path:
    """Build IMAGE holding PYTHON (default: this interpreter's major.minor) unless its stamp
    label already matches the inputs; returns the image path.

    --force rebuilds the project layer; the base is reused whenever its key matches, which is
    sound because the key covers everything it is built from.
    """
    python = python or running_python()
    check_python(python)
    apptainer()
    lock_file = root / lock_path(python)
    if not lock_file.is_file():
        raise ImageError(f"{lock_file} is missing: run `make lock PYTHON={python}` "
                         f"(python -m parsl_aurora.image lock --python {python})")
    prov = prov or provenance(root, python)
    bootstrap = bootstrap or default_bootstrap(python, base_digest, bool(_debootstrap()),
                                               _has_apt_sources())
    base = base_for(python, bootstrap, base_digest, base_registry)
    mirror = _host_mirror() if bootstrap == "debootstrap" else "unused-by-docker"
    want = stamp(root, python, [python, bootstrap, base, mirror, prov.commit,
                                str(prov.source_date_epoch), str(prov.base_source_date_epoch),
                                apptainer_version(), SQUASHFS_ARGS])
    if image.exists() and not force and image_labels(image).get(LABEL_STAMP) == want:
        print(f"{image} is up to date (stamp {want[:12]}); --force rebuilds", flush=True)
        return image
    base_sif = ensure_base(root, python=python, bootstrap=bootstrap, base=base, mirror=mirror,
                           source_date_epoch=prov.base_source_date_epoch, no_https=no_https)
    fill_project_wheelhouse(root, python, prov.source_date_epoch)
    args = build_args(python=python, base_sif=base_sif,
                      pyproject_text=(root / "pyproject.toml").read_text(),
                      lock_text=lock_file.read_bytes(), git_commit=prov.commit,
                      source_date_epoch=prov.source_date_epoch, stamp=want)
    _apptainer_build(root, DEF, image, args, prov.source_date_epoch)
    return image


def lock_extra(root: Path, python: str, requirements: Path, date: str) -> Path:
    """Lock REQUIREMENTS (a user's packages) with hashes against the image's lock, as of DATE."""
    out = extra_lock_path(requirements)
    image_lock = (root / lock_path(python)).read_text()
    wanted = requirements.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        constraints, resolved = Path(tmp, "constraints.txt"), Path(tmp, "resolved.lock")
        constraints.write_text(constraints_text(image_lock))
        try:  # run beside the file: the lock's `# via -r NAME` then names no host folder
            _run(extra_lock_command(_uv(), python, date, str(constraints), requirements.name,
                                    str(resolved), _index_args()), requirements.parent)
        except subprocess.CalledProcessError:
            raise ImageError(f"EXTRA={requirements}: cannot be resolved as of {date} together "
                             f"with the image's packages ({lock_path(python)}; uv's reasons "
                             "above). Fix: "
                             "loosen the pins that clash, or choose another EXTRA_DATE") from None
        out.write_text(extra_lock_text(resolved.read_text(), image_lock, wanted, date))
    print(f"locked {requirements} -> {out} (as of {date}); keep it with your requirements",
          flush=True)
    return out


def build_extra(root: Path, requirements: Path, image: Path, out: Path, *,
                date: str | None = None, force: bool = False) -> Path:
    """OUT: IMAGE with the packages of REQUIREMENTS added, locked (or re-locked when the file,
    the image lock or the date changed), fetched on the host and installed offline."""
    labels = image_labels(image)
    python = labels.get(LABEL_PYTHON) or running_python()
    image_lock = (root / lock_path(python)).read_text()
    image_date = exclude_newer(labels.get(LABEL_PARSL) or parsl_pin(
        (root / "pyproject.toml").read_text()))
    if date is not None:
        date = check_date(date, image_date)
    lock_file = extra_lock_path(requirements)
    wanted = requirements.read_text()
    if not (lock_file.is_file() and extra_lock_is_current(lock_file.read_text(), wanted,
                                                          image_lock, date)):
        lock_extra(root, python, requirements, date or check_date(dt.date.today().isoformat(),
                                                          image_date))
    lock_text = lock_file.read_text()
    sde = int(labels.get(LABEL_SDE) or provenance(root, python).source_date_epoch)
    want = hashlib.sha256(b"\0".join([(root / EXTRA_DEF).read_bytes(), lock_text.encode(),
                                      labels.get(LABEL_STAMP, "").encode(),
                                      apptainer_version().encode()])).hexdigest()
    if out.exists() and not force and image_labels(out).get(LABEL_STAMP) == want:
        print(f"{out} is up to date (stamp {want[:12]}); --force rebuilds", flush=True)
        return out
    dest = _fresh(root / WHEELHOUSE / "extra")
    _pip_wheel(root, python, dest)
    try:
        _download(root, python, lock_text, dest)
    except subprocess.CalledProcessError:
        raise ImageError(f"EXTRA={requirements}: pip could not fetch every wheel of {lock_file} "
                         "(its reasons above). The image has no compiler: every package needs "
                         f"a wheel for CPython {python} on manylinux x86_64. Fix: pick "
                         "versions with wheels, or build the wheel yourself") from None
    shutil.copy(lock_file, dest / "extra.lock")
    args = extra_build_args(image=os.path.relpath(image, root), lock_text=lock_text.encode(),
                            date=extra_lock_date(lock_text) or "", stamp=want,
                            source_date_epoch=sde)
    _apptainer_build(root, EXTRA_DEF, out, args, sde)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parsl_aurora.image", description=__doc__)
    p.add_argument("--root", type=Path, default=None, help="project checkout (default: found "
                   "from the current directory)")
    sub = p.add_subparsers(dest="cmd", required=True)
    python_help = (f"the image's Python, major.minor: one of {', '.join(PYTHONS)} (default: "
                   f"this interpreter's, {running_python()})")
    lk = sub.add_parser("lock", help="regenerate container/requirements.in and "
                        "requirements-PYTHON.lock")
    lk.add_argument("--python", default=None, help=python_help)
    b = sub.add_parser("build", help="build aurora.sif (skipped when up to date)")
    b.add_argument("--python", default=None, help=python_help)
    b.add_argument("--image", type=Path, default=None, help=f"output (default: ROOT/{IMAGE})")
    b.add_argument("--bootstrap", choices=("docker", "debootstrap"), default=None,
                   help="default: debootstrap where the host has it and a Debian mirror "
                        "(this CI), else docker from the pinned base (Aurora's SLES)")
    b.add_argument("--base-digest", default=None,
                   help="sha256:... of the Python's base (default: pinned in PYTHONS)")
    b.add_argument("--base-registry", default=os.environ.get(BASE_REGISTRY_ENV) or None,
                   metavar="HOST[:PORT][/PATH]",
                   help="pull the base from this mirror of Docker Hub's official images "
                        f"instead (default: ${BASE_REGISTRY_ENV}, else Docker Hub)")
    b.add_argument("--no-https", action="store_true",
                   default=os.environ.get(NO_HTTPS_ENV, "") == "1",
                   help=f"the base registry speaks plain HTTP (a loopback one; ${NO_HTTPS_ENV}=1)")
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    b.add_argument("--extra", type=Path, default=None, metavar="REQUIREMENTS",
                   help="also build aurora-NAME.sif: the image plus these packages, locked "
                        "beside the file as NAME.lock")
    b.add_argument("--extra-date", default=None, metavar="YYYY-MM-DD",
                   help="resolve --extra as of this day (default: the lock's, or today)")
    b.add_argument("--extra-image", type=Path, default=None, metavar="PATH",
                   help="where the --extra image goes (default: aurora-NAME.sif beside the "
                        "image)")
    a = p.parse_args(argv)

    def run() -> int:
        root = (a.root or find_root()).resolve()
        try:
            if a.cmd == "lock":
                print(lock(root, a.python or running_python()))
                return 0
            image = (a.image or root / IMAGE).resolve()
            build(root, image, python=a.python, bootstrap=a.bootstrap,
                  base_digest=a.base_digest, base_registry=a.base_registry,
                  no_https=a.no_https, force=a.force)
            if a.extra:
                extra = a.extra.resolve()
                if not extra.is_file():
                    raise ConfigError("EXTRA", str(a.extra), "an existing requirements file",
                                      "e.g. EXTRA=requirements.txt, one package per line")
                out = (a.extra_image or image.with_name(f"{image.stem}-{extra.stem}.sif"))
                out = out.resolve()
                build_extra(root, extra, image, out, date=a.extra_date, force=a.force)
        except subprocess.CalledProcessError as e:
            cmd = e.cmd if isinstance(e.cmd, str) else shlex.join(map(str, e.cmd))
            raise ImageError(f"`{cmd}` failed with exit code {e.returncode}. Fix: see "
                             "its output above") from None
        return 0

    return run_main(run, p.prog)
