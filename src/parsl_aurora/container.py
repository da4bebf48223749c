"""Run Parsl worker pools inside the Apptainer image, the way Globus Compute's container_* options do.

Pure functions build the `apptainer exec` prefix and the wrapped HTEX launch_cmd; the image's
Parsl and Python are checked against the driver's from the labels in the SIF file.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from parsl_aurora.errors import ConfigError, ImageError

# Host paths a worker inside the image needs on Aurora ("src" or "src:dest"). The block script
# binds those that exist on the compute node it runs on (see block_setup), not those that exist
# on the login node where the config is built.
AURORA_BINDS: tuple[str, ...] = (
    "/var/spool/pbs",     # PBS_NODEFILE=/var/spool/pbs/aux/<jobid>: MPI mode reads the node list
    "/var/run/palsd",     # PALS daemon sockets: mpiexec from inside a worker reaches the launcher
    "/opt/cray",          # PALS mpiexec and libpals, for MPI apps started from a worker
    "/opt/aurora",        # the programming environment: oneAPI runtime, SYCL, Aurora MPICH
    "/soft",              # ALCF's software tree, which modules point into (CR's MPI example)
    # Level Zero, the GPU driver and IGC live in the host's /usr/lib64, which in a Debian image
    # holds the image's own loader: bound elsewhere and named on LD_LIBRARY_PATH instead.
    "/usr/lib64:/host/lib64",
    "/home",              # users' code, configs and Parsl's run directories
    "/lus/flare",         # the Lustre project file system (data, outputs) ...
    "/flare",             # ... and the name users give it
)
AURORA_LIBRARY_DIRS: tuple[str, ...] = ("/host/lib64",)


@dataclass(frozen=True)
class HostStack:
    """What a site's compute nodes lend to workers that run in the image."""

    binds: tuple[str, ...] = ()
    # In-image folders appended to LD_LIBRARY_PATH, after the host's own LD_LIBRARY_PATH (the
    # modules loaded on the node, e.g. oneAPI's, whose folders the binds make visible).
    library_dirs: tuple[str, ...] = ()
    # Variables set inside the image only (Apptainer's APPTAINERENV_<NAME>).
    env: tuple[tuple[str, str], ...] = ()
    # Host lines run before the binds are decided (the fake sites start a PALS daemon here;
    # Aurora's runs on every compute node already).
    init: str = ""


AURORA_STACK = HostStack(binds=AURORA_BINDS, library_dirs=AURORA_LIBRARY_DIRS)


def block_setup(stack: HostStack, extra_binds: Iterable[str] = (), image: str | None = None) -> str:
    """Shell lines for a block whose workers run in the image, run on the compute node.

    Binds the stack's paths that exist there (and `extra_binds`, and what APPTAINER_BIND already
    names), puts the host's own `mpiexec`
    first on PATH inside the image (Apptainer resets PATH) and the host libraries on
    LD_LIBRARY_PATH; all through Apptainer's environment variables, so the worker command
    itself stays `apptainer exec IMAGE ...`. With `image`, apps get `$PARSL_AURORA_IMAGE_EXEC`:
    the host's `apptainer exec` with the same binds around `image`, for MPI ranks, which the
    host's PALS starts outside the container (`$PARSL_MPI_PREFIX $PARSL_AURORA_IMAGE_EXEC cmd`).
    """
    binds = " ".join(shlex.quote(b) for b in dict.fromkeys([*stack.binds, *extra_binds]))
    libs = ":".join(stack.library_dirs)
    lines = [stack.init] if stack.init else []
    lines += [
        'PARSL_AURORA_BINDS="${APPTAINER_BIND:-}"',
        f"for b in {binds}; do",
        '    [ -e "${b%%:*}" ] && PARSL_AURORA_BINDS="${PARSL_AURORA_BINDS:+$PARSL_AURORA_BINDS,}$b"',
        "done",
        "if PARSL_AURORA_MPIEXEC=$(command -v mpiexec); then",
        '    PARSL_AURORA_BINDS="${PARSL_AURORA_BINDS:+$PARSL_AURORA_BINDS,}${PARSL_AURORA_MPIEXEC%/*}"',
        '    export APPTAINERENV_PREPEND_PATH="${PARSL_AURORA_MPIEXEC%/*}"',
        "fi",
        'export APPTAINER_BIND="$PARSL_AURORA_BINDS"',
    ]
    if libs:
        lines.append(f'export APPTAINERENV_LD_LIBRARY_PATH="${{LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}}'
                     f'{libs}"')
    lines += [f"export APPTAINERENV_{k}={shlex.quote(v)}" for k, v in stack.env]
    if image:
        # A rank gets the caller's environment, whose PATH is the image's: name the host's
        # apptainer by its full path.
        lines.append('export APPTAINERENV_PARSL_AURORA_IMAGE_EXEC="$(command -v apptainer) exec'
                     '${PARSL_AURORA_BINDS:+ --bind $PARSL_AURORA_BINDS} '
                     f'{shlex.quote(image)}"')
    return "\n".join(lines)


# Labels written by container/aurora.def; the first one present names the image's Parsl.
PARSL_LABELS = ("org.parsl-project.parsl.version", "parsl.version")


def escape_braces(text: str, times: int) -> str:
    """Protect literal braces from `times` rounds of str.format (each round halves them)."""
    n = 2 ** times
    return text.replace("{", "{" * n).replace("}", "}" * n)


def apptainer_prefix(image: str, binds: Iterable[str] = (), options: Iterable[str] = ()) -> str:
    """`apptainer exec [--bind B]... [OPTIONS]... IMAGE`, shell-quoted, ready to prepend."""
    words = ["apptainer", "exec"]
    for bind in binds:
        words += ["--bind", bind]
    words += list(options)
    words.append(image)
    return " ".join(shlex.quote(w) for w in words)


def wrap_launch_cmd(launch_cmd: str, image: str, binds: Iterable[str] = (),
                    options: Iterable[str] = ()) -> str:
    """HTEX's launch_cmd with every worker pool started inside `image`.

    Parsl formats launch_cmd twice (executor fields at start, then `block_id` per block), so the
    prefix's literal braces are quadrupled while the template's own fields stay as they are.
    """
    return escape_braces(apptainer_prefix(image, binds, options), 2) + " " + launch_cmd


def staged_path(image: str, folder: str, size: int, mtime_ns: int) -> str:
    """Where a node keeps its copy of `image` in `folder`: named by the image's path, size and
    time, so a rebuilt image is copied afresh and an unchanged one reused."""
    key = hashlib.sha256(f"{image}\0{size}\0{mtime_ns}".encode()).hexdigest()[:12]
    name = image.rsplit("/", 1)[-1].removesuffix(".sif")
    return f"{folder.rstrip('/')}/{name}-{key}.sif"


def stage_command(image: str, staged: str) -> str:
    """Shell words, ready to prepend to a pool's command, that copy `image` to node-local
    `staged` unless it is there: one read of the shared file system per node instead of
    squashfuse's reads for every pool. The copy lands under a temporary name first, so a pool
    never starts from half an image."""
    q, part = shlex.quote, shlex.quote(staged + ".part") + ".$$"
    folder = q(staged.rsplit("/", 1)[0] or "/")
    return (f"{{ [ -f {q(staged)} ] || {{ mkdir -p {folder} && cp {q(image)} {part} && "
            f"mv -f {part} {q(staged)}; }}; }} &&")


# --- reading what an image holds: its labels, read from the SIF file (no apptainer) ----------
PYTHON_LABEL = "parsl-aurora.python"
PROBE = ("import sys, importlib.metadata as m; "
         "print(m.version('parsl'), '%d.%d' % sys.version_info[:2])")


def parsl_version_from_labels(labels: dict[str, str]) -> str | None:
    return next((labels[k] for k in PARSL_LABELS if labels.get(k)), None)


def image_versions(image: str, wanted_parsl: str | None = None) -> tuple[str, str]:
    """(Parsl version, Python major.minor) inside `image`: from the labels in the SIF file
    itself, so a login node without apptainer can check; only an image whose labels do not
    tell is run (which needs apptainer).

    When the labels name another Parsl than `wanted_parsl`, that is answer enough.
    """
    from parsl_aurora.image.build import apptainer
    from parsl_aurora.image.sif import sif_labels

    try:
        labels = sif_labels(Path(image)) or {}
    except (ImageError, OSError) as e:
        raise ConfigError("container", image, "a SIF image built by `make image` or fetched "
                          "by `make pull`", f"check the path, or rebuild it. Reading it: {e}"
                          ) from None
    parsl, python = parsl_version_from_labels(labels), labels.get(PYTHON_LABEL)
    if parsl and (python or (wanted_parsl and not same_version(parsl, wanted_parsl))):
        return parsl, python or "unknown"
    try:
        exe = apptainer()
    except ImageError as e:
        raise ImageError(f"image {image!r} has no {PYTHON_LABEL} and "
                         f"{PARSL_LABELS[0]} labels, so only running it can tell which Python "
                         f"and Parsl it holds. {e}") from None
    run = subprocess.run([exe, "exec", image, "python", "-c", PROBE],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise ImageError(f"cannot read the Parsl version of image {image!r}: "
                         f"{run.stderr.strip()}. Fix: check the path, or rebuild it with "
                         "`make image`")
    parsl, python = run.stdout.split()
    return parsl, python


def same_version(a: str, b: str) -> bool:
    """Equal as release numbers: parsl.__version__ says "2025.01.13" where pip says "2025.1.13"."""
    def key(v: str) -> tuple:
        parts = v.strip().split(".")
        return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else (v.strip(),)
    return key(a) == key(b)


def mismatch(image: str, found: tuple[str, str], wanted: tuple[str, str]) -> ConfigError | None:
    """Why workers in `image` (holding `found` = (Parsl, Python)) cannot serve a driver running
    `wanted`, or None when they can."""
    fix = ("rebuild the image from this checkout (`make image`) or run the driver inside "
           f"it (`apptainer exec {image} python workflow.py`)")
    if not same_version(found[0], wanted[0]):
        return ConfigError("container", image, f"an image holding this driver's Parsl "
                           f"({wanted[0]}); it holds parsl {found[0]}, and workers and the "
                           "driver must run the same Parsl", fix)
    if found[1] != wanted[1]:
        return ConfigError("container", image, f"an image holding this driver's Python "
                           f"({wanted[1]}); it holds Python {found[1]}, and Parsl's "
                           "interchange refuses workers of another Python",
                           f"make the driver's environment with Python {found[1]} (a venv of "
                           f"that Python), or run the driver inside the image (`apptainer exec "
                           f"{image} python workflow.py`)")
    return None


def check_image(image: str) -> None:
    """ConfigError unless the image holds the driver's Parsl and Python major.minor: Parsl's
    interchange refuses other workers only after the queue wait."""
    import sys
    from importlib.metadata import version

    wanted = (version("parsl"), f"{sys.version_info[0]}.{sys.version_info[1]}")
    why = mismatch(image, image_versions(image, wanted[0]), wanted)
    if why:
        raise why
