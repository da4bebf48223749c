"""The image's Python packages: the lock made from pyproject.toml, and a user's own packages
locked against it (pure functions; build.py runs them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from parsl_aurora.errors import ConfigError, ImageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # builds run on 3.11 (nox); 3.10 needs the backport
    import tomli as tomllib

REQUIREMENTS_IN = "container/requirements.in"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
             "linux_x86_64")
UV_PLATFORM = "x86_64-manylinux_2_28"


# ---------------------------------------------------------------- pure: versions and the lock
def lock_path(python: str) -> str:
    """The lock for the image holding Python PYTHON (major.minor): one per Python, since wheels
    (and even versions) differ between Pythons."""
    return f"container/requirements-{python}.lock"


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
            "# dependencies there. The image installs container/requirements-X.Y.lock made from this.\n")
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


def _compile(uv: str, python: str, date: str, index_args: Iterable[str]) -> list[str]:
    return [uv, "pip", "compile", "--quiet", "--no-header", "--exclude-newer", date,
            "--python-version", python, "--python-platform", UV_PLATFORM, *index_args]


def lock_command(uv: str, python: str, parsl_version: str,
                 index_args: Iterable[str] = ()) -> list[str]:
    return [*_compile(uv, python, exclude_newer(parsl_version), index_args),
            "--generate-hashes", REQUIREMENTS_IN, "-o", lock_path(python)]


def default_set_command(uv: str, python: str, parsl_version: str, constraints: str,
                        requirements: str, index_args: Iterable[str] = ()) -> list[str]:
    """Resolve the default path alone, held to the lock: its names, one per line, on stdout."""
    return [*_compile(uv, python, exclude_newer(parsl_version), index_args), "--no-annotate",
            "-c", constraints, requirements]


def lock_entries(lock_text: str) -> dict[str, str]:
    """{normalised name: the entry's lines (pin, hashes, `# via`)} of a pip requirements lock."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in lock_text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            current = requirement_name(line)
            entries[current] = [line]
        elif current and line.startswith((" ", "\t")):
            entries[current].append(line)
    return {k: "\n".join(v) + "\n" for k, v in entries.items()}


def requirement_name(requirement: str) -> str:
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
        raise ImageError("the lock has no `# image layout:` line; regenerate it with "
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


def download_command(pip_python: str, python: str, requirements: str, dest: str) -> list[str]:
    """Fetch locked wheels for the image's Python (PYTHON, major.minor) and platform, checking
    every hash; PIP_PYTHON runs pip."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    return [pip_python, "-m", "pip", "download", "--quiet", "--require-hashes", "--no-deps",
            "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            "--abi", "cp" + python.replace(".", ""), "--abi", "abi3", "--abi", "none",
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


def extra_lock_command(uv: str, python: str, date: str, constraints: str, requirements: str,
                       out: str, index_args: Iterable[str] = ()) -> list[str]:
    return [*_compile(uv, python, date, index_args), "--generate-hashes", "-c", constraints,
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


