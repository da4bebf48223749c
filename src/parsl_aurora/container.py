"""Run Parsl worker pools inside the Apptainer image, the way Globus Compute's container_* options do.

Pure functions build the `apptainer exec` prefix and the wrapped HTEX launch_cmd; two helpers read an image's Parsl version.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Iterable

from parsl_aurora.errors import ImageError

# Host paths a worker inside the image needs on Aurora. Callers drop the ones missing on their
# host (apptainer refuses to bind a missing source), which keeps these functions pure.
AURORA_BINDS: tuple[str, ...] = (
    "/var/spool/pbs",     # PBS_NODEFILE=/var/spool/pbs/aux/<jobid>: MPI mode reads the node list
    "/var/run/palsd",     # PALS daemon sockets: mpiexec from inside a worker reaches the launcher
    "/opt/cray/pe/pals",  # PALS mpiexec and libpals, for MPI apps started from a worker
    "/home",              # users' code, configs and Parsl's run directories
    "/lus/flare",         # the Lustre project file system (data, outputs)
)
# The name the rest of the bundle uses: Aurora's binds are the default.
DEFAULT_BINDS = AURORA_BINDS
# Labels written by container/aurora.def; the first one present names the image's Parsl.
PARSL_LABELS = ("org.parsl-project.parsl.version", "parsl.version")


def _escape_braces(text: str, times: int) -> str:
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
    return _escape_braces(apptainer_prefix(image, binds, options), 2) + " " + launch_cmd


# --- reading an image's Parsl version (runs apptainer) ---------------------------------------

def parsl_version_from_labels(labels: dict[str, str]) -> str | None:
    return next((labels[k] for k in PARSL_LABELS if labels.get(k)), None)


def image_parsl_version(image: str) -> str:
    """The Parsl inside `image`: its label if it has one, else what `import parsl` says."""
    from parsl_aurora.image import apptainer

    exe = apptainer()  # a missing runtime says how to install it, before any subprocess
    inspect = subprocess.run([exe, "inspect", "--json", "--labels", image],
                             capture_output=True, text=True, check=False)
    if inspect.returncode == 0:
        labels = json.loads(inspect.stdout)["data"]["attributes"].get("labels") or {}
        version = parsl_version_from_labels(labels)
        if version:
            return version
    run = subprocess.run([exe, "exec", image, "python", "-c",
                          "import parsl; print(parsl.__version__)"],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise ImageError(f"cannot read the Parsl version of image {image!r}: "
                         f"{(run.stderr or inspect.stderr).strip()}. Fix: check the path, or "
                         "rebuild it with `nox -s image`")
    return run.stdout.strip()


def same_version(a: str, b: str) -> bool:
    """Equal as release numbers: parsl.__version__ says "2025.01.13" where pip says "2025.1.13"."""
    def key(v: str) -> tuple:
        parts = v.strip().split(".")
        return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else (v.strip(),)
    return key(a) == key(b)


def check_image_parsl(image: str, expected: str | None = None) -> None:
    """ImageError unless the image's Parsl is `expected` (workers and driver must agree).

    `expected` defaults to the Parsl this workflow imports.
    """
    if expected is None:
        from importlib.metadata import version
        expected = version("parsl")
    found = image_parsl_version(image)
    if not same_version(found, expected):
        raise ImageError(
            f"image {image!r} holds parsl {found}, but this workflow runs parsl {expected}; "
            "workers and the driver must run the same Parsl. Fix: rebuild the image from this "
            "checkout (`nox -s image`) or run the driver inside it (`apptainer exec "
            f"{image} python workflow.py`)")
