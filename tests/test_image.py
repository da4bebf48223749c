"""The image: golden tests of the build's pure functions, then the real image built (or reused)
once per session with apptainer and run as root and as nobody.

Image tests are marked `apptainer`; skipped only where apptainer is not on PATH (CI installs it:
.ci/install-apptainer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, needs_apptainer

from parsl_aurora import image as img
from parsl_aurora.errors import ImageError
from parsl_aurora.image import parsl_pin

PARSL = parsl_pin((ROOT / "pyproject.toml").read_text())

# ---------------------------------------------------------------- pure: no apptainer needed
PYPROJECT = """
[project]
name = "parsl-aurora"
version = "0.1.0"
dependencies = ["parsl==2025.1.13", "rich>=13"]
[project.optional-dependencies]
monitoring = ["parsl[monitoring]"]
test = ["pytest>=8"]
"""


def test_parsl_pin_and_lock_inputs_come_from_pyproject():
    assert parsl_pin(PYPROJECT) == "2025.1.13"
    # The image carries the monitoring extra (the driver may run in it), not the test tools.
    assert img.requirements_in(PYPROJECT).splitlines()[-3:] == [
        "parsl==2025.1.13", "rich>=13", "parsl[monitoring]"]
    assert img.exclude_newer("2025.1.13") == "2025-01-14"
    assert img.exclude_newer("2024.12.31") == "2025-01-01"


def test_parsl_pin_missing_says_where_to_put_it():
    with pytest.raises(ImageError, match="parsl==2025.1.13"):
        parsl_pin(PYPROJECT.replace("==2025.1.13", ">=2025"))


def test_checked_in_requirements_in_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert (ROOT / img.REQUIREMENTS_IN).read_text() == img.requirements_in(text), \
        "container/requirements.in is stale: run `nox -s lock`"


def test_lock_command_golden():
    conf = img.parse_pip_config("global.index-url='https://idx.example/simple'\n"
                                "global.extra-index-url='file:///opt/local https://more.example'\n"
                                ":env:.find-links='/opt/wheels'\n")
    assert img.lock_command("uv", "2025.1.13", img.uv_index_args(conf)) == [
        "uv", "pip", "compile", "--quiet", "--generate-hashes", "--no-header",
        "--exclude-newer", "2025-01-14", "--python-version", "3.11",
        "--python-platform", "x86_64-manylinux_2_28",
        "--index-url", "https://idx.example/simple", "--extra-index-url", "https://more.example",
        "container/requirements.in", "-o", "container/requirements.lock"]


def test_apt_mirror_prefers_deb822_and_skips_security():
    deb822 = ("Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n"
              "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n")
    assert img.apt_mirror([deb822]) == "http://mirror.example/debian"
    assert img.apt_mirror([], "deb [arch=amd64] http://one.example/debian bookworm main\n") \
        == "http://one.example/debian"
    with pytest.raises(ImageError, match="sources.list"):
        img.apt_mirror([], "")


def test_docker_base_needs_a_digest():
    assert img.base_for("docker", "sha256:" + "a" * 64) == "debian@sha256:" + "a" * 64
    with pytest.raises(ImageError, match="--base-digest"):
        img.base_for("docker", None)


def test_build_args_make_the_labels():
    args = img.build_args(bootstrap="debootstrap", base="debian:12-slim", mirror="http://m/debian",
                          wheelhouse="/w", pyproject_text=PYPROJECT, lock_text=b"x",
                          git_commit="abc", source_date_epoch=1736812800, stamp="s")
    assert args["PARSL_VERSION"] == "2025.1.13" and args["PROJECT_VERSION"] == "0.1.0"
    assert args["BUILD_DATE"] == "2025-01-14T00:00:00Z"
    assert args["LOCK_SHA256"] == \
        "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    assert img.build_options({"A": "1", "B": "x y"}) == [
        "--fakeroot", "--force", "--build-arg", "A=1", "--build-arg", "B=x y"]


def test_stamp_changes_with_sources_only(tmp_path):
    (tmp_path / "container" / "scripts").mkdir(parents=True)
    (tmp_path / "src" / "parsl_aurora").mkdir(parents=True)
    for rel in (img.DEF, img.LOCK, "pyproject.toml", "src/parsl_aurora/a.py"):
        (tmp_path / rel).write_text(rel)
    first = img.stamp(tmp_path)
    (tmp_path / "src" / "parsl_aurora" / "__pycache__").mkdir()
    (tmp_path / "src" / "parsl_aurora" / "__pycache__" / "a.pyc").write_bytes(b"junk")
    assert img.stamp(tmp_path) == first
    (tmp_path / "src" / "parsl_aurora" / "a.py").write_text("changed")
    assert img.stamp(tmp_path) != first
    assert img.stamp(tmp_path, ["docker"]) != img.stamp(tmp_path)


def test_labels_from_inspect():
    text = '{"data": {"attributes": {"labels": {"k": "v"}}}, "type": "container"}'
    assert img.labels_from_inspect(text) == {"k": "v"}


# ---------------------------------------------------------------- the real image


def run(*cmd: str, user: str | None = None, **kw) -> subprocess.CompletedProcess:
    if user:
        cmd = ("runuser", "-u", user, "--", *cmd)
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, **kw)


def labels(image: Path) -> dict[str, str]:
    out = run("apptainer", "inspect", "--json", "--labels", str(image))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["data"]["attributes"]["labels"]


@needs_apptainer
def test_apptainer_test_section_passes(built_image):
    out = run("apptainer", "test", str(built_image))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_apptainer
def test_parsl_version_inside_is_the_pinned_one(built_image):
    out = run("apptainer", "exec", str(built_image), "python", "-c",
              "import importlib.metadata as m, parsl; print(m.version('parsl'), parsl.__version__)")
    assert out.returncode == 0, out.stderr
    dist, module = out.stdout.split()
    assert dist == PARSL == "2025.1.13"
    assert module == "2025.01.13"  # Parsl's own spelling of the same release


@needs_apptainer
def test_helpers_are_on_path_inside(built_image):
    out = run("apptainer", "exec", str(built_image), "sh", "-c",
              "for c in hello-affinity set_affinity_gpu_aurora.sh process_worker_pool.py; "
              "do command -v $c; done")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 3
    out = run("apptainer", "exec", "--env", "PALS_LOCAL_RANKID=3", str(built_image),
              "set_affinity_gpu_aurora.sh", "hello-affinity")
    assert out.returncode == 0, out.stderr
    assert "ze_affinity_mask=1.1" in out.stdout


@needs_apptainer
def test_labels_record_versions_and_provenance(built_image):
    got = labels(built_image)
    assert got["org.parsl-project.parsl.version"] == PARSL
    assert got["org.opencontainers.image.version"] == "0.1.0"
    assert got["org.opencontainers.image.revision"] not in ("", "unknown")
    assert got["org.opencontainers.image.created"] not in ("", "unknown")
    lock_labels = [v for k, v in got.items() if "lock" in k and "sha256" in k]
    assert lock_labels and len(lock_labels[0]) == 64


@needs_apptainer
def test_size_under_100_mb(built_image):
    assert built_image.stat().st_size < 100 * 10**6


@needs_apptainer
def test_second_build_reuses_the_image(built_image):
    before = built_image.stat().st_mtime_ns
    out = run(sys.executable, "-m", "parsl_aurora.image", "build", cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert built_image.stat().st_mtime_ns == before


@pytest.mark.needs("apptainer", "fuse")
def test_unprivileged_user_runs_the_image(image_for_nobody):
    if os.geteuid() != 0:
        user = None  # already unprivileged
    else:
        user = "nobody"
    out = run("apptainer", "exec", str(image_for_nobody), "python", "-c",
              "import os, importlib.metadata as m; print(os.geteuid(), m.version('parsl'))",
              user=user, cwd="/tmp",
              env={**os.environ, "HOME": "/tmp"})
    assert out.returncode == 0, out.stderr
    uid, version = out.stdout.split()
    assert uid != "0" and version == PARSL


# ------------------------------------------------ workers in the image, on the fake cluster
WORKERS_IN_IMAGE = """
import os, sys
import parsl
from parsl import python_app
import site_configs

@python_app
def where():
    import os, sys
    return os.environ.get("APPTAINER_CONTAINER", ""), sys.prefix

with parsl.load(site_configs.load("local", "multi_job", container=sys.argv[1])):
    print(sorted({f.result() for f in [where() for _ in range(12)]}))
"""


@needs_apptainer
def test_container_option_puts_host_driven_workers_in_the_image(built_image, tmp_path):
    """The driver runs here; `container=` makes every worker pool start inside the image."""
    out = run(sys.executable, "-c", WORKERS_IN_IMAGE, str(built_image), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == str([(str(built_image), "/opt/aurora-env")])


@needs_apptainer
def test_image_with_another_parsl_fails_at_once(built_image):
    from parsl_aurora.container import image_versions, mismatch

    found = image_versions(str(built_image))
    assert found == (PARSL, "3.11")
    assert mismatch(str(built_image), found, (PARSL, "3.11")) is None
    assert "holds parsl 2025.1.13, but this workflow runs parsl 2024.12.2" in mismatch(
        str(built_image), found, ("2024.12.2", "3.11"))
    assert "holds Python 3.11, but this workflow runs Python 3.12" in mismatch(
        str(built_image), found, (PARSL, "3.12"))


def test_build_without_apptainer_says_how_to_get_it(tmp_path):
    """No apptainer on PATH: one line naming the installer, non-zero exit, nothing built."""
    out = run(sys.executable, "-m", "parsl_aurora.image", "--root", str(ROOT), "build",
              "--image", str(tmp_path / "x.sif"), env={**os.environ, "PATH": str(tmp_path)})
    assert out.returncode != 0
    assert "apptainer is not on PATH" in out.stderr and ".ci/install-apptainer" in out.stderr
    assert not (tmp_path / "x.sif").exists()
