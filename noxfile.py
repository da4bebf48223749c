"""Sessions that build, test, benchmark and publish the bundle (`nox -l` lists them)."""

from __future__ import annotations

import shutil

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "tests"]
PYTHON = "3.11"  # the tools' Python (uv fetches it where missing) and Debian 12's, the tests' image
# Installed as users install it: bytecode compiled up front (uv does not by default, and a host
# with PYTHONDONTWRITEBYTECODE=1 would compile Parsl afresh in every process) and not editable
# (an editable install's import hook costs every Python process, each worker included).
COMPILED = {"UV_COMPILE_BYTECODE": "1"}


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (image tests run where apptainer is on PATH)."""
    # pip: the image fixture downloads the wheelhouse with it, and uv's venvs have none.
    session.install("pip", "-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Check style with ruff."""
    session.install("ruff")
    session.run("ruff", "check", "src", "site_configs", "tests", "examples", "benchmarks",
                "noxfile.py", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Run examples/workflow.py on the fake cluster and show where each task ran."""
    session.install(".[fake]", env=COMPILED)
    session.run("python", "examples/workflow.py", *session.posargs,
                env={"PARSL_SITE": "local", "PARSL_MODE": "multi_job"})


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmarks and rewrite docs/benchmarks.md (-- --quick; -- --only scheduler)."""
    # Installed as users install it, without the monitoring extra (see pyproject.toml); pip
    # because the image build and the benchmarks' own venvs use it.
    session.install("pip", ".[fake,image,bench]", env=COMPILED)
    session.run("python", "benchmarks/run_all.py", *session.posargs)


@nox.session(python=PYTHON, default=False)
def sharedfs(session: nox.Session) -> None:
    """Workers from a slow shared file system (root, FUSE, apptainer); rewrites docs/image.md."""
    # About 10 minutes with the defaults (3 runs x 4 cases x 4 latencies); -- --runs 1 for less.
    session.install("pip", ".[fake,image,bench]", env=COMPILED)
    session.run("python", "benchmarks/sharedfs.py", *session.posargs)


@nox.session(python=PYTHON, default=bool(shutil.which("apptainer")))
def image(session: nox.Session) -> None:
    """Build aurora.sif with apptainer (base layer cached; -- --python 3.12 --extra reqs.txt)."""
    # pip fetches the wheelhouses; [image] pins spython and the setuptools that builds our wheel
    session.install("pip", ".[image]")
    session.run("python", "-m", "parsl_aurora.image", "build", *session.posargs)


@nox.session(python=PYTHON, default=False)
def lock(session: nox.Session) -> None:
    """Recompile container/requirements-X.Y.lock from pyproject.toml (-- --python X.Y)."""
    session.install("uv", ".")
    session.run("python", "-m", "parsl_aurora.image", "lock", *session.posargs)


@nox.session(python=PYTHON, default=False)
def publish(session: nox.Session) -> None:
    """Sign aurora.sif and push it with its signed sha256: -- REGISTRY --key PRIVATE.pem."""
    session.install(".")
    session.run("python", "-m", "parsl_aurora.publish", *session.posargs)


@nox.session(python=PYTHON, default=False)
def pull(session: nox.Session) -> None:
    """Fetch a published aurora.sif; kept only if its signature and sha256 check out."""
    session.install(".")
    session.run("parsl-aurora", "pull", *session.posargs)


@nox.session(python=PYTHON, default=False)
def reproducible(session: nox.Session) -> None:
    """Build twice from clean and compare bytes (-- --against aurora.sif: rebuild, compare)."""
    session.install("pip", ".[image]")
    session.run("python", "-m", "parsl_aurora.reproducible", *session.posargs)


@nox.session(python=PYTHON, default=False)
def scale(session: nox.Session) -> None:
    """Thousands of simulated pools against the real interchange; rewrite docs/scale.md."""
    session.install(".[fake]", env=COMPILED)
    session.run("python", "benchmarks/scale.py", *session.posargs)
