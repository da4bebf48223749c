"""Build aurora.sif: lock the Python packages, fetch them on the host, build with Apptainer.

Pure functions compute every file, command and build argument; `lock()` and `build()` run them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from parsl_aurora.errors import ImageError, run_main

if sys.version_info >= (3, 11):
    import tomllib
else:  # builds run on 3.11 (nox); 3.10 needs the backport
    import tomli as tomllib

DEF = "container/aurora.def"
REQUIREMENTS_IN = "container/requirements.in"
LOCK = "container/requirements.lock"
WHEELHOUSE = ".wheelhouse"
IMAGE = "aurora.sif"
# Debian 12's Python, which the lock targets; wheels are fetched for this interpreter and glibc.
PYTHON_VERSION = "3.11"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
             "linux_x86_64")
# Aurora's base: the digest is the builder's to give (`--base-digest`); docker references
# cannot carry both a tag and a digest, so a pinned base is `debian@sha256:...`.
BASE_TAG = "debian:12-slim"
BASE_REPO = "debian"
# What the image is built from, besides the def and the lock: a change here means a rebuild.
SOURCES = ("pyproject.toml", "README.md", "src/parsl_aurora/**/*", "site_configs/**/*",
           "container/scripts/*")
INSTALL_HINT = ("apptainer is not on PATH. Install it: `sudo bash .ci/install-apptainer` "
                "(Debian 12), or `module load apptainer` on an Aurora compute node.")
LABEL_PARSL = "org.parsl-project.parsl.version"
LABEL_STAMP = "parsl-aurora.stamp"
# An image every worker runs: readable and runnable (`./aurora.sif`) by all, writable by its
# owner only, whatever the umask or the tool that wrote it (anyone who can write it can swap the
# code every task runs).
IMAGE_MODE = 0o755


# ---------------------------------------------------------------- pure: versions and the lock
def parsl_pin(pyproject_text: str) -> str:
    """The Parsl version pinned in pyproject.toml's dependencies (the one place it is pinned)."""
    for dep in tomllib.loads(pyproject_text)["project"]["dependencies"]:
        m = re.fullmatch(r"([\w.-]+)(\[[\w,.-]*\])?==([^,;]+)", dep.replace(" ", ""))
        if m and m.group(1).lower() == "parsl":
            return m.group(3)
    raise ImageError("pyproject.toml: no `parsl==X` in [project] dependencies; the image lock "
                     "needs an exact Parsl pin there, e.g. \"parsl==2025.1.13\"")


def project_version(pyproject_text: str) -> str:
    return tomllib.loads(pyproject_text)["project"]["version"]


# Extras the image carries beyond the dependencies: the driver may run in it with monitoring on.
IMAGE_EXTRAS = ("monitoring",)


def requirements_in(pyproject_text: str) -> str:
    """container/requirements.in: the project's dependencies and IMAGE_EXTRAS, from pyproject."""
    project = tomllib.loads(pyproject_text)["project"]
    extras = project.get("optional-dependencies", {})
    deps = [*project["dependencies"], *(d for e in IMAGE_EXTRAS for d in extras.get(e, []))]
    head = ("# Generated from pyproject.toml by `python -m parsl_aurora.image lock`; edit the\n"
            "# dependencies there. The image installs container/requirements.lock made from this.\n")
    return head + "".join(f"{d}\n" for d in deps)


def exclude_newer(parsl_version: str) -> str:
    """The day after Parsl's release: nothing published later can enter the lock.

    Parsl versions are calendar dates (2025.1.13 was released on 2025-01-13).
    """
    year, month, day = (int(p) for p in parsl_version.split(".")[:3])
    return (dt.date(year, month, day) + dt.timedelta(days=1)).isoformat()


def parse_pip_config(text: str) -> dict[str, str]:
    """`pip config list` output as {"global.index-url": "...", ...}; env entries count too."""
    conf: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            key = key.removeprefix(":env:")
            conf[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    return conf


def uv_index_args(pip_config: Mapping[str, str]) -> list[str]:
    """The index pip is configured with, in uv's words.

    Only http(s) indexes: local file indexes and find-links carry no upload times, and
    `--exclude-newer` rejects every package without one.
    """
    args = []
    if pip_config.get("index-url"):
        args += ["--index-url", pip_config["index-url"]]
    for url in pip_config.get("extra-index-url", "").split():
        if url.startswith(("http://", "https://")):
            args += ["--extra-index-url", url]
    return args


def lock_command(uv: str, parsl_version: str, index_args: Iterable[str] = ()) -> list[str]:
    return [uv, "pip", "compile", "--quiet", "--generate-hashes", "--no-header",
            "--exclude-newer", exclude_newer(parsl_version),
            "--python-version", PYTHON_VERSION, "--python-platform", "x86_64-manylinux_2_28",
            *index_args, REQUIREMENTS_IN, "-o", LOCK]


def download_command(python: str, lock: str, dest: str) -> list[str]:
    """Fetch the locked wheels for the image's Python and platform, checking every hash."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    return [python, "-m", "pip", "download", "--quiet", "--require-hashes", "--no-deps",
            "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
            "--abi", "cp" + PYTHON_VERSION.replace(".", ""), "--abi", "abi3", "--abi", "none",
            *platforms, "--platform", "any", "-r", lock, "-d", dest]


# ---------------------------------------------------------------- pure: build inputs
def apt_mirror(deb822_texts: Iterable[str], sources_list: str = "") -> str:
    """The host's main Debian mirror (not the security one), from its apt sources."""
    for text in deb822_texts:
        for line in text.splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if "security" not in uri:
                        return uri
    for line in sources_list.splitlines():
        words = line.split()
        if words and words[0] == "deb" and "security" not in line:
            for word in words[1:]:
                if "://" in word:
                    return word
    raise ImageError("no Debian mirror in /etc/apt/sources.list.d/*.sources (URIs:) or "
                     "/etc/apt/sources.list; add one, or build from docker with --base-digest")


def stamp(root: Path, extra: Iterable[str] = ()) -> str:
    """sha256 over the def, the lock, the project sources and the base choice."""
    h = hashlib.sha256()
    files = {root / DEF, root / LOCK}
    for pattern in SOURCES:
        files.update(Path(p) for p in glob.glob(str(root / pattern), recursive=True))
    for path in sorted(p for p in files if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    for item in extra:
        h.update(item.encode() + b"\0")
    return h.hexdigest()


def build_args(*, bootstrap: str, base: str, mirror: str, wheelhouse: str, pyproject_text: str,
               lock_text: bytes, git_commit: str, source_date_epoch: int,
               stamp: str) -> dict[str, str]:
    """The def's %arguments; together they make the labels."""
    created = dt.datetime.fromtimestamp(source_date_epoch, dt.timezone.utc)
    return {
        "BOOTSTRAP": bootstrap,
        "FROM": base,
        "MIRROR": mirror,
        "WHEELHOUSE": wheelhouse,
        "PARSL_VERSION": parsl_pin(pyproject_text),
        "PROJECT_VERSION": project_version(pyproject_text),
        "GIT_COMMIT": git_commit,
        "LOCK_SHA256": hashlib.sha256(lock_text).hexdigest(),
        "STAMP": stamp,
        "SOURCE_DATE_EPOCH": str(source_date_epoch),
        "BUILD_DATE": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def build_options(args: Mapping[str, str]) -> list[str]:
    """Options for `apptainer build`: fakeroot (what Aurora and this host allow), build args."""
    opts = ["--fakeroot", "--force"]
    for key, value in args.items():
        opts += ["--build-arg", f"{key}={value}"]
    return opts


def base_for(bootstrap: str, base_digest: str | None) -> str:
    if bootstrap == "debootstrap":
        return BASE_TAG  # unused by debootstrap; keeps the header well-formed
    if not base_digest or not base_digest.startswith("sha256:"):
        raise ImageError(f"--base-digest={base_digest!r}: a docker build needs the digest of "
                         f"{BASE_TAG} (sha256:...), e.g. from `skopeo inspect "
                         f"docker://{BASE_TAG}` on a login node; or use --bootstrap debootstrap")
    return f"{BASE_REPO}@{base_digest}"


def labels_from_inspect(json_text: str) -> dict[str, str]:
    """Labels out of `apptainer inspect --json --labels IMAGE`."""
    data = json.loads(json_text)
    return dict(data.get("data", {}).get("attributes", {}).get("labels") or {})


# ---------------------------------------------------------------- effects
def install_image(src: Path, dest: Path) -> None:
    """Give a finished image IMAGE_MODE and rename it to DEST (atomic on one filesystem)."""
    os.chmod(src, IMAGE_MODE)
    os.replace(src, dest)


def _run(cmd: list[str], cwd: Path) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


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


def image_labels(image: Path) -> dict[str, str]:
    out = subprocess.run([apptainer(), "inspect", "--json", "--labels", str(image)],
                         check=True, capture_output=True, text=True).stdout
    return labels_from_inspect(out)


def lock(root: Path) -> Path:
    """Regenerate requirements.in from pyproject.toml and compile the hashed lock with uv."""
    pyproject = (root / "pyproject.toml").read_text()
    (root / REQUIREMENTS_IN).write_text(requirements_in(pyproject))
    uv = shutil.which("uv")
    if not uv:
        raise ImageError("uv is not on PATH; `pip install uv` (nox's `lock` session does it)")
    pip_conf = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                              check=False, capture_output=True, text=True).stdout
    _run(lock_command(uv, parsl_pin(pyproject), uv_index_args(parse_pip_config(pip_conf))),
         root)
    return root / LOCK


def _git_commit(root: Path) -> str:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, check=False,
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "uncommitted"


def _source_date_epoch(root: Path) -> int:
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    r = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=root, check=False,
                       capture_output=True, text=True)
    return int(r.stdout) if r.returncode == 0 and r.stdout.strip() else int(time.time())


def _host_mirror() -> str:
    texts = [Path(p).read_text() for p in sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))]
    plain = Path("/etc/apt/sources.list")
    return apt_mirror(texts, plain.read_text() if plain.exists() else "")


def fill_wheelhouse(root: Path, dest: Path) -> None:
    """Locked wheels (hash-checked) plus this project's wheel, all fetched on the host."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("parsl_aurora-*.whl"):
        old.unlink()
    _run(download_command(sys.executable, str(root / LOCK), str(dest)), root)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest),
          str(root)], root)
    shutil.copy(root / LOCK, dest / "requirements.lock")


@contextlib.contextmanager
def _singularity_on_path(apptainer_exe: str) -> Iterator[None]:
    """spython 0.3.14 always runs `singularity`; where only `apptainer` exists, shim it."""
    if shutil.which("singularity"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="spython-shim-") as shim:
        os.symlink(apptainer_exe, Path(shim) / "singularity")
        old = os.environ["PATH"]
        os.environ["PATH"] = f"{shim}{os.pathsep}{old}"
        try:
            yield
        finally:
            os.environ["PATH"] = old


def build(root: Path, image: Path, *, bootstrap: str | None = None,
          base_digest: str | None = None, force: bool = False) -> Path:
    """Build IMAGE unless its stamp label already matches the inputs; returns the image path.

    Goes through spython's Client.build (it runs `singularity build`, a symlink to apptainer).
    """
    exe = apptainer()
    bootstrap = bootstrap or ("docker" if base_digest else "debootstrap")
    base = base_for(bootstrap, base_digest)
    want = stamp(root, [bootstrap, base])
    if image.exists() and not force:
        have = image_labels(image).get(LABEL_STAMP)
        if have == want:
            print(f"{image} is up to date (stamp {want[:12]}); --force rebuilds", flush=True)
            return image
    if not (root / LOCK).is_file():
        raise ImageError(f"{root / LOCK} is missing: run `nox -s lock` "
                         "(python -m parsl_aurora.image lock)")
    wheelhouse = root / WHEELHOUSE
    fill_wheelhouse(root, wheelhouse)
    args = build_args(
        bootstrap=bootstrap, base=base,
        mirror=_host_mirror() if bootstrap == "debootstrap" else "unused-by-docker",
        wheelhouse=str(wheelhouse), pyproject_text=(root / "pyproject.toml").read_text(),
        lock_text=(root / LOCK).read_bytes(), git_commit=_git_commit(root),
        source_date_epoch=_source_date_epoch(root), stamp=want)
    from spython.main import Client  # only needed to build; not a runtime dependency
    # Unique per build, renamed at the end: a concurrent build or reader never sees half a SIF.
    tmp = image.with_name(f".{image.name}.{os.getpid()}.partial")
    start = time.monotonic()
    try:
        with _singularity_on_path(exe):
            _, lines = Client.build(recipe=str(root / DEF), image=str(tmp),
                                    options=build_options(args), sudo=False, stream=True)
            for line in lines:  # raises CalledProcessError when the build fails
                print(line, end="", flush=True)
        install_image(tmp, image)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"built {image} in {time.monotonic() - start:.0f} s, "
          f"{image.stat().st_size / 1e6:.1f} MB", flush=True)
    return image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parsl_aurora.image", description=__doc__)
    p.add_argument("--root", type=Path, default=None, help="project checkout (default: found "
                   "from the current directory)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("lock", help="regenerate container/requirements.in and requirements.lock")
    b = sub.add_parser("build", help="build aurora.sif (skipped when up to date)")
    b.add_argument("--image", type=Path, default=None, help=f"output (default: ROOT/{IMAGE})")
    b.add_argument("--bootstrap", choices=("docker", "debootstrap"), default=None,
                   help="default: docker when --base-digest is given, else debootstrap")
    b.add_argument("--base-digest", default=None, help=f"sha256:... of {BASE_TAG}")
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    a = p.parse_args(argv)

    def run() -> int:
        root = a.root or find_root()
        try:
            if a.cmd == "lock":
                print(lock(root))
            else:
                build(root, a.image or root / IMAGE, bootstrap=a.bootstrap,
                      base_digest=a.base_digest, force=a.force)
        except subprocess.CalledProcessError as e:
            cmd = e.cmd if isinstance(e.cmd, str) else shlex.join(map(str, e.cmd))
            raise ImageError(f"`{cmd}` failed with exit code {e.returncode}. Fix: see "
                             "its output above") from None
        return 0

    return run_main(run, p.prog)


if __name__ == "__main__":
    sys.exit(main())
