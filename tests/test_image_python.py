"""The image for another Python (3.12) by the path Aurora takes: a base that already holds it,
pulled by digest from a registry (here a loopback one), no apt-get, built by an unprivileged user.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, project_wheel, serve_registry
from test_image import WORKERS_IN_IMAGE, labels, run

from parsl_aurora.image import build, inputs, lock

pytestmark = [pytest.mark.slow, pytest.mark.needs("apptainer", "registry", "python312")]
PYTHON = "3.12"
# One source date for every build here: equal inputs must give equal bytes whoever builds.
SDE = "1764900000"


@pytest.fixture(scope="session")
def base_312(tmp_path_factory):
    """(registry, digest): the python:3.12-slim-bookworm stand-in served on loopback."""
    import python_base

    sif = python_base.standin_sif(PYTHON)
    with serve_registry(tmp_path_factory.mktemp("base-registry")) as repo:
        registry = repo.split("/", 1)[0]
        yield registry, python_base.push(sif, registry, f"python:{PYTHON}-slim-bookworm")


@pytest.fixture(scope="session")
def nobody_venv(tmp_path_factory) -> Path:
    """The build's own tools (this project with [image]) where nobody can run them: the tests'
    interpreter lives in root's home. A venv of the system Python, as a user would make one."""
    wheel = project_wheel(tmp_path_factory.mktemp("wheel"))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()[:12]
    venv = Path("/tmp/parsl-aurora-build-tools") / f"venv-{digest}"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(mode=0o755, exist_ok=True)
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[image]"],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        (venv / ".complete").touch()
    return venv


def _checkout(owner: str) -> Path:
    """A clean copy of what the build reads, owned by OWNER, where OWNER can reach it."""
    folder = Path(tempfile.mkdtemp(prefix="parsl-aurora-py-build-", dir="/tmp"))
    folder.chmod(0o755)
    build.copy_sources(ROOT, folder / "checkout")
    (folder / "home").mkdir()
    shutil.chown(folder, owner)
    for path in folder.rglob("*"):
        shutil.chown(path, owner)
    return folder


def _build(folder: Path, python: Path, registry: str, digest: str, *, user: str | None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": str(folder / "home"), "SOURCE_DATE_EPOCH": SDE,
           "PARSL_AURORA_BASE_REGISTRY": registry, "PARSL_AURORA_BASE_REGISTRY_NO_HTTPS": "1",
           **(env or {})}
    cmd = [str(python), "-m", "parsl_aurora.image", "build", "--python", PYTHON,
           "--base-digest", digest]
    if user:
        cmd = ["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in env.items()), *cmd]
        env = None
    return subprocess.run(cmd, cwd=folder / "checkout", env=env, capture_output=True,
                          text=True, check=False, timeout=1200)


@pytest.fixture(scope="session")
def image_312(base_312, nobody_venv):
    """aurora.sif for 3.12 built as nobody: no /etc/subuid entry, and the fakeroot command
    ignored (Aurora's compute nodes may lack it), so only apptainer's root-mapped namespace."""
    registry, digest = base_312
    folder = _checkout("nobody")
    out = _build(folder, nobody_venv / "bin" / "python", registry, digest, user="nobody",
                 env={"APPTAINER_IGNORE_FAKEROOT_COMMAND": "1"})
    yield folder / "checkout" / inputs.IMAGE, out
    if not os.environ.get("KEEP_PY_BUILD"):
        shutil.rmtree(folder, ignore_errors=True)


def _built(image_312) -> Path:
    image, out = image_312
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return image


def test_an_unprivileged_user_builds_the_312_image_from_a_base_pulled_by_digest(image_312,
                                                                               base_312):
    image, out = _built(image_312), image_312[1]
    assert not any(line.startswith("nobody:") for line in
                   Path("/etc/subuid").read_text().splitlines())
    registry, digest = base_312
    got = labels(image)
    assert got["parsl-aurora.python"] == PYTHON
    assert got["parsl-aurora.base-from"] == f"{registry}/python@{digest}"
    assert got["parsl-aurora.base-bootstrap"] == "docker"
    assert got["parsl-aurora.lock-sha256"] == hashlib.sha256(
        (ROOT / lock.lock_path(PYTHON)).read_bytes()).hexdigest()
    assert "apt-get" not in out.stdout  # the base.def branch that runs it was not taken
    assert image.stat().st_size <= 60 * 10**6, image.stat().st_size
    assert run("apptainer", "test", str(image)).returncode == 0


def test_a_second_cold_build_of_the_312_image_is_the_same_bytes(image_312, base_312,
                                                                 nobody_venv):
    """Another folder, nothing cached (its own wheelhouse, base and apptainer cache): the same
    bytes. (Builds by root hold /dev placeholders a user's build lacks: compared as nobody.)"""
    image = _built(image_312)
    folder = _checkout("nobody")
    try:
        out = _build(folder, nobody_venv / "bin" / "python", *base_312, user="nobody",
                     env={"APPTAINER_IGNORE_FAKEROOT_COMMAND": "1"})
        assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        again = folder / "checkout" / inputs.IMAGE
        assert hashlib.sha256(again.read_bytes()).hexdigest() == \
            hashlib.sha256(image.read_bytes()).hexdigest()
    finally:
        if not os.environ.get("KEEP_PY_BUILD"):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def driver_312(tmp_path_factory) -> Path:
    """A 3.12 venv with this project, as a login node's `module load python/3.12.12` and
    `python -m venv` would give: made by uv from the fixed-up copy of pyenv's 3.12."""
    import python_base

    d = tmp_path_factory.mktemp("driver312")
    py = python_base.copy_python(python_base.pyenv_python(PYTHON), d / "python")
    venv = d / "venv"
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    subprocess.run([uv, "venv", "-q", "--python", str(py / "bin" / f"python{PYTHON}"),
                    str(venv)], check=True)
    for args in (["--require-hashes", "--no-deps", "-r", str(ROOT / lock.lock_path(PYTHON))],
                 ["--no-deps", str(project_wheel(d / "wheel"))]):
        done = subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin" /
                                                                           "python"), *args],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    return venv


def test_workers_in_the_312_image_serve_a_312_driver(image_312, driver_312, tmp_path):
    image = _built(image_312)
    python = driver_312 / "bin" / "python"
    script = WORKERS_IN_IMAGE.replace('sys.prefix', 'sys.prefix, "%d.%d" % sys.version_info[:2]')
    out = run(str(python), "-c", script, str(image), cwd=tmp_path,
              env={**os.environ, "PATH": f"{python.parent}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == str([(str(image), "/opt/aurora-env", PYTHON)])


def test_a_312_driver_refuses_the_311_image_before_submitting(built_image, driver_312, tmp_path):
    """The other way round: the 3.11 image's label names another Python than the driver's."""
    python = driver_312 / "bin" / "python"
    out = run(str(python), "-c", WORKERS_IN_IMAGE, str(built_image), cwd=tmp_path,
              env={**os.environ, "PATH": f"{python.parent}:{os.environ['PATH']}"})
    assert out.returncode != 0
    assert "Python (3.12); it holds Python 3.11" in out.stderr, out.stderr[-3000:]


def test_make_image_builds_for_the_python_make_runs_with():
    """`make image` passes the major.minor of $(PY) (python3: the loaded module's on Aurora)."""
    import python_base

    py312 = python_base.pyenv_python(PYTHON) / "bin" / f"python{PYTHON}"
    for py, want in ((sys.executable, inputs.running_python()), (py312, PYTHON)):
        out = run("make", "-n", "image", f"PY={py}", cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert f"-s image -- --python {want}" in out.stdout, out.stdout
    out = run("make", "-n", "image", "PYTHON=3.10", cwd=ROOT)
    assert "-s image -- --python 3.10" in out.stdout, out.stdout
