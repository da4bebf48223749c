"""What a build is made from, as pure functions: definitions, sources, the base's cache key,
the build arguments (which become the labels), apptainer's options, the bootstrap.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import hashlib
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from parsl_aurora.container import PYTHON_LABEL
from parsl_aurora.errors import ConfigError, ImageError
from parsl_aurora.image.lock import lock_path, parsl_pin, project_version

DEF = "container/aurora.def"  # the project layer, built From: the base
BASE_DEF = "container/base.def"
EXTRA_DEF = "container/extra.def"  # a user's own packages on top of aurora.sif
# Every path a definition names is relative to the checkout: an absolute host path would end up
# in the image (its stored definition and labels), and two checkouts would build different bytes.
WHEELHOUSE = ".wheelhouse"  # base/, project/, extra/: what each layer's %files copies
CACHE = ".image-cache"  # base-<key>.sif
IMAGE = "aurora.sif"


@dataclasses.dataclass(frozen=True)
class PythonBase:
    """The docker base an image holding one Python is built from where debootstrap cannot work
    (Aurora's SLES), pinned by the digest of its multi-arch index."""

    tag: str  # what the digest was recorded for (messages, docs); never pulled by tag
    digest: str
    # True: the base is plain Debian and %post installs Debian's python3 with apt-get, which
    # needs a fakeroot that can setgroups (a /etc/subuid entry or the fakeroot command).
    # False: the base already holds the Python in /usr/local; nothing is installed with apt.
    apt: bool

    @property
    def repo(self) -> str:
        return self.tag.split(":")[0]


# Every Python an image can hold: the one place their versions and bases live. Digests as
# Docker's official images record them (docker-library/repo-info, repos/<repo>/remote/<tag>.md):
# docker references cannot carry both a tag and a digest, so a pinned base is `repo@sha256:...`.
# Adding one: a line here, then `make lock PYTHON=X.Y` for its lock.
PYTHONS = {
    "3.10": PythonBase("python:3.10-slim-bookworm",
                       "sha256:673f009e3763f8d03953b525c89b03a9ee8ca315bf6b8006979b5c4a4e2e4d68",
                       apt=False),
    # Debian 12's own Python (debootstrap where the host has it: this CI).
    "3.11": PythonBase("debian:bookworm-20260918-slim",
                       "sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251",
                       apt=True),
    "3.12": PythonBase("python:3.12-slim-bookworm",
                       "sha256:0f5b26b9518d002b6173fd61daad821fa340635ebfec5bba471013f9ca114579",
                       apt=False),
}


def running_python() -> str:
    """major.minor of this interpreter: the default image Python (the driver's venv)."""
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def check_python(python: str) -> PythonBase:
    if python not in PYTHONS:
        raise ConfigError("PYTHON", python, ", ".join(PYTHONS),
                          "drivers and workers must run one Python major.minor; load a module "
                          "with one of these, or add a line to PYTHONS in "
                          "src/parsl_aurora/image/inputs.py")
    return PYTHONS[python]
# What the project layer is built from, besides the defs and the lock.
SOURCES = ("pyproject.toml", "README.md", "src/parsl_aurora/**/*", "site_configs/**/*",
           "container/scripts/*")
# gzip, as every apptainer and squashfuse reads. Level 6 instead of mksquashfs's 9: a third of
# the CPU time of every build for 0.6% more bytes. -all-root: the base is unpacked again for
# each project build, and unsquashfs can only give files to root in the namespace some
# apptainer setups unpack in (apptainer#3186); nothing in the image needs another owner.
SQUASHFS_ARGS = "-comp gzip -Xcompression-level 6 -all-root"
LABEL_PARSL = "org.parsl-project.parsl.version"
LABEL_PYTHON = PYTHON_LABEL  # what a driver's Python is checked against
LABEL_STAMP = "parsl-aurora.stamp"
LABEL_COMMIT = "org.opencontainers.image.revision"
LABEL_LOCK = "parsl-aurora.lock-sha256"
LABEL_SDE = "parsl-aurora.source-date-epoch"
LABEL_EXTRA_LOCK = "parsl-aurora.extra-lock-sha256"
LABEL_EXTRA_DATE = "parsl-aurora.extra-exclude-newer"
LABEL_BOOTSTRAP = "org.label-schema.usage.singularity.deffile.bootstrap"
LABEL_FROM = "org.label-schema.usage.singularity.deffile.from"
# An image every worker runs: readable and runnable (`./aurora.sif`) by all, writable by its
# owner only, whatever the umask or the tool that wrote it (anyone who can write it can swap the
# code every task runs).
IMAGE_MODE = 0o755


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


def stamp(root: Path, python: str, extra: Iterable[str] = ()) -> str:
    """sha256 over the defs, PYTHON's lock, the project sources and `extra` (choices,
    provenance)."""
    h = hashlib.sha256()
    files = {root / DEF, root / BASE_DEF, root / lock_path(python)}
    for pattern in SOURCES:
        files.update(Path(p) for p in glob.glob(str(root / pattern), recursive=True))
    for path in sorted(p for p in files if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    for item in extra:
        h.update(item.encode() + b"\0")
    return h.hexdigest()


def base_key(base_def: bytes, lock_text: bytes, choices: Iterable[str]) -> str:
    """The base's cache key: its definition, the lock, and how it is built."""
    h = hashlib.sha256()
    for part in (base_def, lock_text, *(c.encode() for c in choices)):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def base_path(python: str, key: str) -> str:
    return f"{CACHE}/base-{python}-{key[:24]}.sif"


def label_schema_date(epoch: int) -> str:
    """SOURCE_DATE_EPOCH in apptainer's own build-date format (Go: Monday_2_January_2006_...)."""
    t = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    return f"{t:%A}_{t.day}_{t:%B_%Y_%H:%M:%S}_UTC"


def iso_date(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def base_build_args(*, python: str, bootstrap: str, base: str, mirror: str, key: str,
                    source_date_epoch: int) -> dict[str, str]:
    """base.def's %arguments."""
    return {
        "BOOTSTRAP": bootstrap,
        "FROM": base,
        "PYTHON": python,
        # debootstrap gives plain Debian: Debian's python3 comes with apt there too.
        "APT_PYTHON": "yes" if bootstrap == "debootstrap" or PYTHONS[python].apt else "no",
        "MIRROR": mirror,
        "WHEELHOUSE": f"{WHEELHOUSE}/base",
        "BASE_KEY": key,
        "SOURCE_DATE_EPOCH": str(source_date_epoch),
        "LABEL_SCHEMA_DATE": label_schema_date(source_date_epoch),
    }


def build_args(*, python: str, base_sif: str, pyproject_text: str, lock_text: bytes,
               git_commit: str, source_date_epoch: int, stamp: str) -> dict[str, str]:
    """aurora.def's %arguments; together they make the labels."""
    return {
        "BASE": base_sif,
        "WHEELHOUSE": f"{WHEELHOUSE}/project",
        "PARSL_VERSION": parsl_pin(pyproject_text),
        "PYTHON_VERSION": python,
        "PROJECT_VERSION": project_version(pyproject_text),
        "GIT_COMMIT": git_commit,
        "LOCK_SHA256": hashlib.sha256(lock_text).hexdigest(),
        "STAMP": stamp,
        "SOURCE_DATE_EPOCH": str(source_date_epoch),
        "BUILD_DATE": iso_date(source_date_epoch),
        "LABEL_SCHEMA_DATE": label_schema_date(source_date_epoch),
    }


def extra_build_args(*, image: str, lock_text: bytes, date: str, stamp: str,
                     source_date_epoch: int) -> dict[str, str]:
    """extra.def's %arguments."""
    return {
        "IMAGE": image,
        "WHEELHOUSE": f"{WHEELHOUSE}/extra",
        "EXTRA_LOCK_SHA256": hashlib.sha256(lock_text).hexdigest(),
        "EXTRA_DATE": date,
        "STAMP": stamp,
        "SOURCE_DATE_EPOCH": str(source_date_epoch),
        "LABEL_SCHEMA_DATE": label_schema_date(source_date_epoch),
    }


def build_options(args: Mapping[str, str], *, no_https: bool = False) -> list[str]:
    """Options for `apptainer build`: fakeroot (what Aurora and this host allow), --force (a
    definition's labels may then replace apptainer's generated build date), squashfs, args;
    --no-https for a base registry served over plain HTTP (a loopback mirror)."""
    opts = ["--fakeroot", "--force", "--mksquashfs-args", SQUASHFS_ARGS]
    if no_https:
        opts.append("--no-https")
    for key, value in args.items():
        opts += ["--build-arg", f"{key}={value}"]
    return opts


def default_bootstrap(python: str, base_digest: str | None, have_debootstrap: bool,
                      have_mirror: bool) -> str:
    """debootstrap from the host's Debian mirror where the host has both and Debian has the
    Python (3.11, this CI); the pinned docker base everywhere else (Aurora's SLES compute
    nodes, a Python Debian 12 lacks), or when a digest is given."""
    plain = have_debootstrap and have_mirror and not base_digest and PYTHONS[python].apt
    return "debootstrap" if plain else "docker"


def base_for(python: str, bootstrap: str, base_digest: str | None = None,
             registry: str | None = None) -> str:
    """The base's reference: REPO@DIGEST (Docker Hub, the default registry) or, with REGISTRY
    (host[:port][/path] of a mirror of Docker Hub's official images), REGISTRY/REPO@DIGEST."""
    base = check_python(python)
    if bootstrap == "debootstrap":
        if not base.apt:
            raise ConfigError("--bootstrap", bootstrap, "docker",
                              f"Debian 12 has no Python {python}; its base is {base.tag}, "
                              "pulled by digest")
        return base.repo  # unused by debootstrap; keeps the header well-formed
    digest = base_digest or base.digest
    if not digest.startswith("sha256:"):
        raise ImageError(f"--base-digest={digest!r}: a docker build needs the digest of "
                         f"{base.tag} (sha256:...), e.g. from `skopeo inspect "
                         f"docker://{base.tag}` on a login node")
    repo = f"{registry.rstrip('/')}/{base.repo}" if registry else base.repo
    return f"{repo}@{digest}"


