"""Build aurora.sif: lock the Python packages, fetch them on the host, build with Apptainer.

Two layers: a base (OS, Python, the locked packages), cached under a key of its inputs, and the
project built `From:` it. Pure functions compute every file, command, key and build argument and
normalise the SIF header; `lock()`, `build()` and `build_extra()` run them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from parsl_aurora.errors import ConfigError, ImageError, run_main

if sys.version_info >= (3, 11):
    import tomllib
else:  # builds run on 3.11 (nox); 3.10 needs the backport
    import tomli as tomllib

DEF = "container/aurora.def"  # the project layer, built From: the base
BASE_DEF = "container/base.def"
EXTRA_DEF = "container/extra.def"  # a user's own packages on top of aurora.sif
REQUIREMENTS_IN = "container/requirements.in"
LOCK = "container/requirements.lock"
# Every path a definition names is relative to the checkout: an absolute host path would end up
# in the image (its stored definition and labels), and two checkouts would build different bytes.
WHEELHOUSE = ".wheelhouse"  # base/, project/, extra/: what each layer's %files copies
CACHE = ".image-cache"  # base-<key>.sif
IMAGE = "aurora.sif"
# Debian 12's Python, which the lock targets; wheels are fetched for this interpreter and glibc.
PYTHON_VERSION = "3.11"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
             "linux_x86_64")
UV_PLATFORM = "x86_64-manylinux_2_28"
# The base where debootstrap cannot work (Aurora's SLES): Debian 12 slim pinned by digest, the
# multi-arch index of the dated tag debian:bookworm-20260918-slim as Docker's official-images
# record it (docker-library/repo-info, repos/debian/remote/bookworm-20260918-slim.md).
# `--base-digest` names another; docker references cannot carry both a tag and a digest, so a
# pinned base is `debian@sha256:...`.
BASE_TAG = "debian:12-slim"
BASE_REPO = "debian"
BASE_DIGEST = "sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251"
# What the project layer is built from, besides the defs and the lock.
SOURCES = ("pyproject.toml", "README.md", "src/parsl_aurora/**/*", "site_configs/**/*",
           "container/scripts/*")
# gzip, as every apptainer and squashfuse reads. Level 6 instead of mksquashfs's 9: a third of
# the CPU time of every build for 0.6% more bytes. -all-root: the base is unpacked again for
# each project build, and unsquashfs can only give files to root in the namespace some
# apptainer setups unpack in (apptainer#3186); nothing in the image needs another owner.
SQUASHFS_ARGS = "-comp gzip -Xcompression-level 6 -all-root"
INSTALL_HINT = ("apptainer is not on PATH. Install it: `sudo bash .ci/install-apptainer` "
                "(Debian 12), or `module load apptainer` on an Aurora compute node.")
LABEL_PARSL = "org.parsl-project.parsl.version"
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
# Their packages live off the default import path (see container/base.def).
IMAGE_EXTRAS = ("monitoring",)
# Locked and hash-checked like the rest, used from their wheels while building, never installed.
BUILD_TOOLS = ("pip",)


def requirements_in(pyproject_text: str) -> str:
    """container/requirements.in: the dependencies, IMAGE_EXTRAS and BUILD_TOOLS, from pyproject."""
    project = tomllib.loads(pyproject_text)["project"]
    extras = project.get("optional-dependencies", {})
    deps = [*project["dependencies"], *(d for e in IMAGE_EXTRAS for d in extras.get(e, []))]
    head = ("# Generated from pyproject.toml by `python -m parsl_aurora.image lock`; edit the\n"
            "# dependencies there. The image installs container/requirements.lock made from this.\n")
    return head + "".join(f"{d}\n" for d in [*deps, *BUILD_TOOLS])


def default_requirements(pyproject_text: str) -> str:
    """What the default import path needs: the project's dependencies alone."""
    return "".join(f"{d}\n" for d in tomllib.loads(pyproject_text)["project"]["dependencies"])


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


def _compile(uv: str, date: str, index_args: Iterable[str]) -> list[str]:
    return [uv, "pip", "compile", "--quiet", "--no-header", "--exclude-newer", date,
            "--python-version", PYTHON_VERSION, "--python-platform", UV_PLATFORM, *index_args]


def lock_command(uv: str, parsl_version: str, index_args: Iterable[str] = ()) -> list[str]:
    return [*_compile(uv, exclude_newer(parsl_version), index_args), "--generate-hashes",
            REQUIREMENTS_IN, "-o", LOCK]


def default_set_command(uv: str, parsl_version: str, constraints: str, requirements: str,
                        index_args: Iterable[str] = ()) -> list[str]:
    """Resolve the default path alone, held to the lock: its names, one per line, on stdout."""
    return [*_compile(uv, exclude_newer(parsl_version), index_args), "--no-annotate",
            "-c", constraints, requirements]


def lock_entries(lock_text: str) -> dict[str, str]:
    """{normalised name: the entry's lines (pin, hashes, `# via`)} of a pip requirements lock."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in lock_text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            current = _name(line)
            entries[current] = [line]
        elif current and line.startswith((" ", "\t")):
            entries[current].append(line)
    return {k: "\n".join(v) + "\n" for k, v in entries.items()}


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pinned_versions(lock_text: str) -> dict[str, str]:
    return {name: entry.split("==", 1)[1].split()[0]
            for name, entry in lock_entries(lock_text).items() if "==" in entry}


LAYOUT_RE = re.compile(r"^# image layout: monitoring=(\S*) build=(\S*)$", re.MULTILINE)


def with_layout(lock_text: str, monitoring: Iterable[str], build: Iterable[str]) -> str:
    """The lock with a first line saying which packages live off the default path."""
    head = (f"# image layout: monitoring={','.join(sorted(monitoring))} "
            f"build={','.join(sorted(build))}\n"
            "# (written by `python -m parsl_aurora.image lock`; see container/base.def)\n")
    return head + LAYOUT_RE.sub("", lock_text).lstrip("\n")


def split_lock(lock_text: str) -> dict[str, str]:
    """The lock as three requirement files: default (the venv), monitoring (off the default
    path) and build (tools used from their wheels), per its `# image layout:` line."""
    m = LAYOUT_RE.search(lock_text)
    if not m:
        raise ImageError(f"{LOCK} has no `# image layout:` line; regenerate it with "
                         "`nox -s lock`")
    places = {n: "monitoring" for n in m.group(1).split(",") if n}
    places.update({n: "build" for n in m.group(2).split(",") if n})
    parts = {"default": "", "monitoring": "", "build": ""}
    for name, entry in lock_entries(lock_text).items():
        parts[places.get(name, "default")] += entry
    return parts


def constraints_text(lock_text: str) -> str:
    """The lock's pins without hashes or comments: what uv takes as constraints."""
    return "".join(f"{n}=={v}\n" for n, v in sorted(pinned_versions(lock_text).items()))


def download_command(python: str, requirements: str, dest: str) -> list[str]:
    """Fetch locked wheels for the image's Python and platform, checking every hash."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    return [python, "-m", "pip", "download", "--quiet", "--require-hashes", "--no-deps",
            "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
            "--abi", "cp" + PYTHON_VERSION.replace(".", ""), "--abi", "abi3", "--abi", "none",
            *platforms, "--platform", "any", "-r", requirements, "-d", dest]


# ---------------------------------------------------------------- pure: a user's own packages
EXTRA_HEAD_RE = re.compile(r"^# extra lock: input=(\w+) image-lock=(\w+) exclude-newer=(\S+)$",
                           re.MULTILINE)


def extra_lock_path(requirements: Path) -> Path:
    """Where the lock of a user's requirements file goes: beside it, `.lock` for its suffix."""
    if requirements.suffix == ".lock":
        raise ConfigError("EXTRA", str(requirements), "a requirements file (.txt or .in)",
                          f"pass the file the lock is made from; {requirements.name} is "
                          "the lock itself")
    return requirements.with_suffix(".lock")


def check_date(value: str, image_date: str) -> str:
    """An --extra-date: a calendar date no earlier than the image's own lock."""
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise ConfigError("EXTRA_DATE", value, "a date YYYY-MM-DD",
                          "e.g. EXTRA_DATE=2025-06-01 (packages published after it are "
                          "left out)") from None
    if day.isoformat() < image_date:
        raise ConfigError("EXTRA_DATE", value, f"{image_date} or later",
                          f"the image's own packages are locked as of {image_date}; an "
                          "earlier date cannot see them")
    return day.isoformat()


def extra_lock_command(uv: str, date: str, constraints: str, requirements: str, out: str,
                       index_args: Iterable[str] = ()) -> list[str]:
    return [*_compile(uv, date, index_args), "--generate-hashes", "-c", constraints,
            requirements, "-o", out]


def extra_lock_text(resolved: str, image_lock: str, requirements_text: str, date: str) -> str:
    """The user's lock: only what the image lacks (the rest is pinned the same in the image),
    headed by what it was made from, so a changed input or image lock is noticed."""
    have = pinned_versions(image_lock)
    new = {n: e for n, e in lock_entries(resolved).items()
           if have.get(n) != pinned_versions(e).get(n)}
    head = (f"# extra lock: input={hashlib.sha256(requirements_text.encode()).hexdigest()} "
            f"image-lock={hashlib.sha256(image_lock.encode()).hexdigest()} "
            f"exclude-newer={date}\n"
            "# Written by `python -m parsl_aurora.image build --extra`: the packages the image "
            "does\n# not have, resolved against its lock; installed offline with their hashes.\n")
    return head + "".join(new[n] for n in sorted(new))


def extra_lock_is_current(lock_text: str, requirements_text: str, image_lock: str,
                          date: str | None) -> bool:
    m = EXTRA_HEAD_RE.search(lock_text)
    return bool(m) and (
        m.group(1) == hashlib.sha256(requirements_text.encode()).hexdigest()
        and m.group(2) == hashlib.sha256(image_lock.encode()).hexdigest()
        and (date is None or m.group(3) == date))


def extra_lock_date(lock_text: str) -> str | None:
    m = EXTRA_HEAD_RE.search(lock_text)
    return m.group(3) if m else None


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
    """sha256 over the defs, the lock, the project sources and `extra` (choices, provenance)."""
    h = hashlib.sha256()
    files = {root / DEF, root / BASE_DEF, root / LOCK}
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


def base_path(key: str) -> str:
    return f"{CACHE}/base-{key[:24]}.sif"


def label_schema_date(epoch: int) -> str:
    """SOURCE_DATE_EPOCH in apptainer's own build-date format (Go: Monday_2_January_2006_...)."""
    t = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    return f"{t:%A}_{t.day}_{t:%B_%Y_%H:%M:%S}_UTC"


def iso_date(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def base_build_args(*, bootstrap: str, base: str, mirror: str, key: str,
                    source_date_epoch: int) -> dict[str, str]:
    """base.def's %arguments."""
    return {
        "BOOTSTRAP": bootstrap,
        "FROM": base,
        "MIRROR": mirror,
        "WHEELHOUSE": f"{WHEELHOUSE}/base",
        "BASE_KEY": key,
        "SOURCE_DATE_EPOCH": str(source_date_epoch),
        "LABEL_SCHEMA_DATE": label_schema_date(source_date_epoch),
    }


def build_args(*, base_sif: str, pyproject_text: str, lock_text: bytes, git_commit: str,
               source_date_epoch: int, stamp: str) -> dict[str, str]:
    """aurora.def's %arguments; together they make the labels."""
    return {
        "BASE": base_sif,
        "WHEELHOUSE": f"{WHEELHOUSE}/project",
        "PARSL_VERSION": parsl_pin(pyproject_text),
        "PYTHON_VERSION": PYTHON_VERSION,
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


def build_options(args: Mapping[str, str]) -> list[str]:
    """Options for `apptainer build`: fakeroot (what Aurora and this host allow), --force (a
    definition's labels may then replace apptainer's generated build date), squashfs, args."""
    opts = ["--fakeroot", "--force", "--mksquashfs-args", SQUASHFS_ARGS]
    for key, value in args.items():
        opts += ["--build-arg", f"{key}={value}"]
    return opts


def default_bootstrap(base_digest: str | None, have_debootstrap: bool, have_mirror: bool) -> str:
    """debootstrap from the host's Debian mirror where the host has both (this CI); the pinned
    docker base everywhere else (Aurora's SLES compute nodes), or when a digest is given."""
    return "debootstrap" if have_debootstrap and have_mirror and not base_digest else "docker"


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


# ---------------------------------------------------------------- pure: the SIF header
# Layout of SIF 1 (github.com/sylabs/sif, pkg/sif): the header, then DescriptorsTotal
# descriptors of 585 bytes at DescriptorsOffset, little-endian.
SIF_MAGIC = b"SIF_MAGIC\0"
SIF_MAGIC_AT = 32
SIF_ID = slice(48, 64)
SIF_HEADER_TIMES = (64, 72)  # CreatedAt, ModifiedAt (int64 Unix seconds)
SIF_DESCRIPTORS_TOTAL_AT = 88
SIF_DESCRIPTORS_OFFSET_AT = 96
SIF_DESCRIPTOR_SIZE = 585
SIF_DESCRIPTOR_USED_AT = 4
SIF_DESCRIPTOR_TIMES = (41, 49)
SIF_DATATYPE_SIGNATURE = 0x4005
# Apptainer's metadata object: the JSON `apptainer inspect --json` prints (labels included),
# written at build time as a JSON.Generic object named inspect-metadata.json.
SIF_DATATYPE_GENERIC_JSON = 0x4006
SIF_METADATA_NAME = "inspect-metadata.json"
# A descriptor's DataType, Used, ID, GroupID, LinkedID, Offset, Size (Go's rawDescriptor);
# its Name, 128 bytes NUL-padded, is at 73.
SIF_DESCRIPTOR_HEAD = struct.Struct("<i?IIIqq")
SIF_DESCRIPTOR_NAME = slice(73, 201)
# What the SIF library's deterministic mode writes (Apptainer >= 1.5 with SOURCE_DATE_EPOCH):
# uuid.Nil and Go's time.Time{}, whose Unix() is this (0001-01-01T00:00:00Z).
SIF_ZERO_TIME = -62135596800


def sif_header_size(head: bytes) -> int:
    """How many leading bytes of a SIF the header and all its descriptors take."""
    if len(head) < 128 or head[SIF_MAGIC_AT:SIF_MAGIC_AT + len(SIF_MAGIC)] != SIF_MAGIC:
        raise ImageError("not a SIF image (no SIF_MAGIC at byte 32); build it with "
                         "`python -m parsl_aurora.image build`")
    total, offset = (struct.unpack_from("<q", head, at)[0]
                     for at in (SIF_DESCRIPTORS_TOTAL_AT, SIF_DESCRIPTORS_OFFSET_AT))
    return offset + total * SIF_DESCRIPTOR_SIZE


def normalise_sif_header(head: bytes) -> bytes:
    """The header and descriptors with the image ID and every time set as the SIF library's
    deterministic mode sets them, so that the same content gives the same bytes.

    Apptainer 1.4 writes a random ID and the build's clock there. Signatures cover the ID and
    the times: this must run before signing, and refuses an image that is already signed.
    """
    out = bytearray(head[:sif_header_size(head)])
    if len(out) < sif_header_size(head):
        raise ImageError(f"SIF header cut short: {len(out)} of {sif_header_size(head)} bytes")
    out[SIF_ID] = bytes(SIF_ID.stop - SIF_ID.start)
    for at in SIF_HEADER_TIMES:
        struct.pack_into("<q", out, at, SIF_ZERO_TIME)
    total, offset = (struct.unpack_from("<q", out, at)[0]
                     for at in (SIF_DESCRIPTORS_TOTAL_AT, SIF_DESCRIPTORS_OFFSET_AT))
    for i in range(total):
        d = offset + i * SIF_DESCRIPTOR_SIZE
        if not out[d + SIF_DESCRIPTOR_USED_AT]:
            continue
        if struct.unpack_from("<i", out, d)[0] == SIF_DATATYPE_SIGNATURE:
            raise ImageError("the image is signed: normalise it before signing (signatures "
                             "cover the header); rebuild it, then sign")
        for at in SIF_DESCRIPTOR_TIMES:
            struct.pack_into("<q", out, d + at, SIF_ZERO_TIME)
    return bytes(out)


def sif_objects(head: bytes) -> list[tuple[int, str, int, int]]:
    """(data type, name, offset, size) of every object a SIF's header lists as in use."""
    size = sif_header_size(head)
    if len(head) < size:
        raise ImageError(f"SIF header cut short: {len(head)} of {size} bytes")
    total, offset = (struct.unpack_from("<q", head, at)[0]
                     for at in (SIF_DESCRIPTORS_TOTAL_AT, SIF_DESCRIPTORS_OFFSET_AT))
    objects = []
    for i in range(total):
        d = offset + i * SIF_DESCRIPTOR_SIZE
        datatype, used, _, _, _, at, length = SIF_DESCRIPTOR_HEAD.unpack_from(head, d)
        if used:
            name = head[d + SIF_DESCRIPTOR_NAME.start:d + SIF_DESCRIPTOR_NAME.stop]
            objects.append((datatype, name.rstrip(b"\0").decode(errors="replace"), at, length))
    return objects


def metadata_span(head: bytes) -> tuple[int, int] | None:
    """(offset, size) of apptainer's inspect metadata in a SIF, or None when it has none."""
    for datatype, name, at, length in sif_objects(head):
        if datatype == SIF_DATATYPE_GENERIC_JSON and name == SIF_METADATA_NAME:
            return at, length
    return None


# ---------------------------------------------------------------- effects
def sif_labels(path: Path) -> dict[str, str] | None:
    """PATH's labels as `apptainer inspect --labels` shows them, read from the SIF file itself:
    no apptainer needed (a login node has none). None when the image carries no metadata."""
    with open(path, "rb") as f:
        head = f.read(128)
        size = sif_header_size(head)
        head += f.read(size - len(head))
        span = metadata_span(head)
        if span is None:
            return None
        f.seek(span[0])
        data = f.read(span[1])
    try:
        return labels_from_inspect(data.decode())  # the same JSON
    except (UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ImageError(f"{path}: its metadata object ({SIF_METADATA_NAME}) is not the JSON "
                         f"apptainer writes ({e}). Fix: rebuild it with `make image`") from None


def normalise_sif(path: Path) -> None:
    """Rewrite PATH's header in place with normalise_sif_header."""
    with open(path, "r+b") as f:
        size = sif_header_size(f.read(128))
        f.seek(0)
        head = f.read(size)
        f.seek(0)
        f.write(normalise_sif_header(head))


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


def lock(root: Path) -> Path:
    """Regenerate requirements.in from pyproject.toml, compile the hashed lock with uv, and
    record which packages only IMAGE_EXTRAS need (they go off the default import path)."""
    pyproject = (root / "pyproject.toml").read_text()
    (root / REQUIREMENTS_IN).write_text(requirements_in(pyproject))
    uv, parsl, index = _uv(), parsl_pin(pyproject), _index_args()
    _run(lock_command(uv, parsl, index), root)
    locked = (root / LOCK).read_text()
    with tempfile.TemporaryDirectory() as tmp:
        constraints, default = Path(tmp, "constraints.txt"), Path(tmp, "default.in")
        constraints.write_text(constraints_text(locked))
        default.write_text(default_requirements(pyproject))
        out = _run(default_set_command(uv, parsl, str(constraints), str(default), index), root,
                   capture_output=True, text=True).stdout
    on_path = {_name(line) for line in out.splitlines() if line and not line.startswith("#")}
    builds = {_name(t) for t in BUILD_TOOLS}
    monitoring = set(lock_entries(locked)) - on_path - builds
    (root / LOCK).write_text(with_layout(locked, monitoring, builds))
    return root / LOCK


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What the labels say an image was built from; equal provenance, equal bytes."""

    commit: str
    source_date_epoch: int
    base_source_date_epoch: int  # the last change to the base's own inputs


def _git(root: Path, *args: str) -> str:
    r = subprocess.run(["git", *args], cwd=root, check=False, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def provenance(root: Path) -> Provenance:
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
    base = _git(root, "log", "-1", "--format=%ct", "--", BASE_DEF, LOCK) or head
    return Provenance(commit, int(head), int(base))


def _host_mirror() -> str:
    texts = [Path(p).read_text() for p in sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))]
    plain = Path("/etc/apt/sources.list")
    return apt_mirror(texts, plain.read_text() if plain.exists() else "")


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _download(root: Path, requirements_text: str, dest: Path) -> None:
    """Hash-checked wheels for REQUIREMENTS_TEXT into DEST (pip's cache makes repeats quick)."""
    if not requirements_text.strip():
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=dest) as req:
        req.write(requirements_text)
        req.flush()
        _run(download_command(sys.executable, req.name, str(dest)), root)


def fill_base_wheelhouse(root: Path) -> Path:
    """.wheelhouse/base: every locked wheel (pip's too) and the lock split by where it goes."""
    dest = _fresh(root / WHEELHOUSE / "base")
    parts = split_lock((root / LOCK).read_text())
    _download(root, "".join(parts.values()), dest)
    (dest / "default.txt").write_text(parts["default"])
    (dest / "monitoring.txt").write_text(parts["monitoring"])
    return dest


def _pip_wheel(root: Path, dest: Path) -> None:
    _download(root, split_lock((root / LOCK).read_text())["build"], dest)


def fill_project_wheelhouse(root: Path, source_date_epoch: int) -> Path:
    """.wheelhouse/project: pip's locked wheel and this project's wheel, built from a clean copy
    of its sources (an in-tree build/ folder could carry deleted files into the wheel) by the
    setuptools pinned in the `image` extra (another setuptools writes other metadata)."""
    dest = _fresh(root / WHEELHOUSE / "project")
    _pip_wheel(root, dest)
    with tempfile.TemporaryDirectory(prefix="parsl-aurora-src-") as tmp:
        copy_sources(root, Path(tmp))
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
              "--no-build-isolation", "-w", str(dest), tmp], root,
             env={**os.environ, "SOURCE_DATE_EPOCH": str(source_date_epoch)})
    return dest


def copy_sources(root: Path, dest: Path) -> list[Path]:
    """Copy everything the build reads (defs, lock, SOURCES) from ROOT to DEST."""
    files = {root / DEF, root / BASE_DEF, root / EXTRA_DEF, root / LOCK, root / REQUIREMENTS_IN}
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
                     source_date_epoch: int) -> None:
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
                                    options=build_options(args), sudo=False, stream=True)
            for line in lines:  # raises CalledProcessError when the build fails
                print(line, end="", flush=True)
        normalise_sif(tmp)
        install_image(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"built {out} from {definition} in {time.monotonic() - start:.0f} s, "
          f"{out.stat().st_size / 1e6:.1f} MB", flush=True)


def ensure_base(root: Path, *, bootstrap: str, base: str, mirror: str,
                source_date_epoch: int) -> str:
    """The base SIF for these inputs, built only when its key has none; path relative to ROOT."""
    lock_bytes = (root / LOCK).read_bytes()
    key = base_key((root / BASE_DEF).read_bytes(), lock_bytes,
                   [bootstrap, base, mirror, str(source_date_epoch), apptainer_version(),
                    SQUASHFS_ARGS])
    rel = base_path(key)
    if (root / rel).is_file():
        print(f"base {rel} is up to date (key of {BASE_DEF}, {LOCK}, bootstrap)", flush=True)
        return rel
    fill_base_wheelhouse(root)
    _apptainer_build(root, BASE_DEF, root / rel,
                     base_build_args(bootstrap=bootstrap, base=base, mirror=mirror, key=key,
                                     source_date_epoch=source_date_epoch), source_date_epoch)
    for old in (root / CACHE).glob("base-*.sif"):  # one base per checkout is enough
        if old.name != Path(rel).name:
            old.unlink()
    return rel


def build(root: Path, image: Path, *, bootstrap: str | None = None,
          base_digest: str | None = None, force: bool = False,
          prov: Provenance | None = None) -> Path:
    """Build IMAGE unless its stamp label already matches the inputs; returns the image path.

    --force rebuilds the project layer; the base is reused whenever its key matches, which is
    sound because the key covers everything it is built from.
    """
    apptainer()
    if not (root / LOCK).is_file():
        raise ImageError(f"{root / LOCK} is missing: run `nox -s lock` "
                         "(python -m parsl_aurora.image lock)")
    prov = prov or provenance(root)
    bootstrap = bootstrap or default_bootstrap(base_digest, bool(_debootstrap()),
                                               _has_apt_sources())
    base = base_for(bootstrap, base_digest or BASE_DIGEST)
    mirror = _host_mirror() if bootstrap == "debootstrap" else "unused-by-docker"
    want = stamp(root, [bootstrap, base, mirror, prov.commit, str(prov.source_date_epoch),
                        str(prov.base_source_date_epoch), apptainer_version(), SQUASHFS_ARGS])
    if image.exists() and not force and image_labels(image).get(LABEL_STAMP) == want:
        print(f"{image} is up to date (stamp {want[:12]}); --force rebuilds", flush=True)
        return image
    base_sif = ensure_base(root, bootstrap=bootstrap, base=base, mirror=mirror,
                           source_date_epoch=prov.base_source_date_epoch)
    fill_project_wheelhouse(root, prov.source_date_epoch)
    args = build_args(base_sif=base_sif, pyproject_text=(root / "pyproject.toml").read_text(),
                      lock_text=(root / LOCK).read_bytes(), git_commit=prov.commit,
                      source_date_epoch=prov.source_date_epoch, stamp=want)
    _apptainer_build(root, DEF, image, args, prov.source_date_epoch)
    return image


def lock_extra(root: Path, requirements: Path, date: str) -> Path:
    """Lock REQUIREMENTS (a user's packages) with hashes against the image's lock, as of DATE."""
    out = extra_lock_path(requirements)
    image_lock = (root / LOCK).read_text()
    wanted = requirements.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        constraints, resolved = Path(tmp, "constraints.txt"), Path(tmp, "resolved.lock")
        constraints.write_text(constraints_text(image_lock))
        try:  # run beside the file: the lock's `# via -r NAME` then names no host folder
            _run(extra_lock_command(_uv(), date, str(constraints), requirements.name,
                                    str(resolved), _index_args()), requirements.parent)
        except subprocess.CalledProcessError:
            raise ImageError(f"EXTRA={requirements}: cannot be resolved as of {date} together "
                             f"with the image's packages ({LOCK}; uv's reasons above). Fix: "
                             "loosen the pins that clash, or choose another EXTRA_DATE") from None
        out.write_text(extra_lock_text(resolved.read_text(), image_lock, wanted, date))
    print(f"locked {requirements} -> {out} (as of {date}); keep it with your requirements",
          flush=True)
    return out


def build_extra(root: Path, requirements: Path, image: Path, out: Path, *,
                date: str | None = None, force: bool = False) -> Path:
    """OUT: IMAGE with the packages of REQUIREMENTS added, locked (or re-locked when the file,
    the image lock or the date changed), fetched on the host and installed offline."""
    image_lock = (root / LOCK).read_text()
    labels = image_labels(image)
    image_date = exclude_newer(labels.get(LABEL_PARSL) or parsl_pin(
        (root / "pyproject.toml").read_text()))
    if date is not None:
        date = check_date(date, image_date)
    lock_file = extra_lock_path(requirements)
    wanted = requirements.read_text()
    if not (lock_file.is_file() and extra_lock_is_current(lock_file.read_text(), wanted,
                                                          image_lock, date)):
        lock_extra(root, requirements, date or check_date(dt.date.today().isoformat(),
                                                          image_date))
    lock_text = lock_file.read_text()
    sde = int(labels.get(LABEL_SDE) or provenance(root).source_date_epoch)
    want = hashlib.sha256(b"\0".join([(root / EXTRA_DEF).read_bytes(), lock_text.encode(),
                                      labels.get(LABEL_STAMP, "").encode(),
                                      apptainer_version().encode()])).hexdigest()
    if out.exists() and not force and image_labels(out).get(LABEL_STAMP) == want:
        print(f"{out} is up to date (stamp {want[:12]}); --force rebuilds", flush=True)
        return out
    dest = _fresh(root / WHEELHOUSE / "extra")
    _pip_wheel(root, dest)
    try:
        _download(root, lock_text, dest)
    except subprocess.CalledProcessError:
        raise ImageError(f"EXTRA={requirements}: pip could not fetch every wheel of {lock_file} "
                         "(its reasons above). The image has no compiler: every package needs "
                         f"a wheel for CPython {PYTHON_VERSION} on manylinux x86_64. Fix: pick "
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
    sub.add_parser("lock", help="regenerate container/requirements.in and requirements.lock")
    b = sub.add_parser("build", help="build aurora.sif (skipped when up to date)")
    b.add_argument("--image", type=Path, default=None, help=f"output (default: ROOT/{IMAGE})")
    b.add_argument("--bootstrap", choices=("docker", "debootstrap"), default=None,
                   help="default: debootstrap where the host has it and a Debian mirror "
                        "(this CI), else docker from the pinned base (Aurora's SLES)")
    b.add_argument("--base-digest", default=None,
                   help=f"sha256:... of {BASE_TAG} (default: {BASE_DIGEST[:19]}..., pinned)")
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
                print(lock(root))
                return 0
            image = (a.image or root / IMAGE).resolve()
            build(root, image, bootstrap=a.bootstrap, base_digest=a.base_digest, force=a.force)
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


if __name__ == "__main__":
    sys.exit(main())
