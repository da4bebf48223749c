"""The image: golden tests of the build's pure functions, then the real image built (or reused)
once per session with apptainer and run as root and as nobody.

Image tests are marked `apptainer`; skipped only where apptainer is not on PATH (CI installs it:
.ci/install-apptainer).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, needs_apptainer, tiny_sif

from parsl_aurora.errors import ConfigError, ImageError
from parsl_aurora.image import build, inputs, lock, sif
from parsl_aurora.image.lock import parsl_pin

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
    # The image carries the monitoring extra (the driver may run in it) and pip, used from its
    # wheel to install, not the test tools.
    assert lock.requirements_in(PYPROJECT).splitlines()[-4:] == [
        "parsl==2025.1.13", "rich>=13", "parsl[monitoring]", "pip"]
    assert lock.default_requirements(PYPROJECT) == "parsl==2025.1.13\nrich>=13\n"
    assert lock.exclude_newer("2025.1.13") == "2025-01-14"
    assert lock.exclude_newer("2024.12.31") == "2025-01-01"


def test_parsl_pin_missing_says_where_to_put_it():
    with pytest.raises(ImageError, match="parsl==2025.1.13"):
        parsl_pin(PYPROJECT.replace("==2025.1.13", ">=2025"))


def test_checked_in_requirements_in_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert (ROOT / lock.REQUIREMENTS_IN).read_text() == lock.requirements_in(text), \
        "container/requirements.in is stale: run `nox -s lock`"


def test_lock_commands_golden():
    conf = lock.parse_pip_config("global.index-url='https://idx.example/simple'\n"
                                "global.extra-index-url='file:///opt/local https://more.example'\n"
                                ":env:.find-links='/opt/wheels'\n")
    index = lock.uv_index_args(conf)
    common = ["uv", "pip", "compile", "--quiet", "--no-header", "--exclude-newer", "2025-01-14",
              "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28",
              "--index-url", "https://idx.example/simple", "--extra-index-url",
              "https://more.example"]
    assert lock.lock_command("uv", "3.11", "2025.1.13", index) == [
        *common, "--generate-hashes", "container/requirements.in", "-o",
        "container/requirements-3.11.lock"]
    assert lock.default_set_command("uv", "3.11", "2025.1.13", "c.txt", "d.in", index) == [
        *common, "--no-annotate", "-c", "c.txt", "d.in"]
    # One lock per Python: wheels (and so hashes) differ between Pythons.
    assert lock.lock_command("uv", "3.12", "2025.1.13", index)[7:9] == [
        "--python-version", "3.12"]
    assert lock.lock_command("uv", "3.12", "2025.1.13")[-1] == "container/requirements-3.12.lock"
    assert lock.download_command("py", "3.12", "r.txt", "d")[8:18] == [
        "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi",
        "abi3", "--abi", "none"]


LOCK_TEXT = """\
greenlet==3.1.1 \\
    --hash=sha256:aa
    # via sqlalchemy
parsl==2025.1.13 \\
    --hash=sha256:bb \\
    --hash=sha256:cc
    # via -r container/requirements.in
pip==24.3.1 \\
    --hash=sha256:dd
    # via -r container/requirements.in
SQLAlchemy==2.0.37 \\
    --hash=sha256:ee
    # via parsl
"""


def test_lock_layout_splits_the_lock_three_ways():
    text = lock.with_layout(LOCK_TEXT, {"sqlalchemy", "greenlet"}, {"pip"})
    assert text.splitlines()[0] == "# image layout: monitoring=greenlet,sqlalchemy build=pip"
    assert lock.with_layout(text, {"greenlet"}, {"pip"}).count("# image layout:") == 1
    assert lock.split_lock(text) == {
        "default": "parsl==2025.1.13 \\\n    --hash=sha256:bb \\\n    --hash=sha256:cc\n"
                   "    # via -r container/requirements.in\n",
        "monitoring": "greenlet==3.1.1 \\\n    --hash=sha256:aa\n    # via sqlalchemy\n"
                      "SQLAlchemy==2.0.37 \\\n    --hash=sha256:ee\n    # via parsl\n",
        "build": "pip==24.3.1 \\\n    --hash=sha256:dd\n    # via -r container/requirements.in\n",
    }
    assert lock.constraints_text(text) == (
        "greenlet==3.1.1\nparsl==2025.1.13\npip==24.3.1\nsqlalchemy==2.0.37\n")
    with pytest.raises(ImageError, match="no `# image layout:` line.*nox -s lock"):
        lock.split_lock(LOCK_TEXT)


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12"])
def test_checked_in_lock_keeps_sqlalchemy_off_the_default_path(python):
    parts = lock.split_lock((ROOT / lock.lock_path(python)).read_text())
    names = {k: set(lock.lock_entries(v)) for k, v in parts.items()}
    assert "parsl" in names["default"] and "sqlalchemy" in names["monitoring"]
    assert names["build"] == {"pip"}
    assert not names["default"] & {"sqlalchemy", "greenlet"}


def test_every_checked_in_lock_is_for_a_known_python_and_pins_the_same_parsl():
    locks = sorted((ROOT / "container").glob("requirements-*.lock"))
    pythons = [p.name.removeprefix("requirements-").removesuffix(".lock") for p in locks]
    assert set(pythons) == set(inputs.PYTHONS)  # every Python the build offers has its lock
    assert {lock.pinned_versions(p.read_text())["parsl"] for p in locks} == {PARSL}


def test_apt_mirror_prefers_deb822_and_skips_security():
    deb822 = ("Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n"
              "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n")
    assert inputs.apt_mirror([deb822]) == "http://mirror.example/debian"
    assert inputs.apt_mirror([], "deb [arch=amd64] http://one.example/debian bookworm main\n") \
        == "http://one.example/debian"
    with pytest.raises(ImageError, match="sources.list"):
        inputs.apt_mirror([], "")


def test_docker_base_is_pinned_by_digest_and_may_come_from_a_mirror():
    assert inputs.base_for("3.11", "docker", "sha256:" + "a" * 64) == "debian@sha256:" + "a" * 64
    with pytest.raises(ImageError, match="--base-digest"):
        inputs.base_for("3.11", "docker", "latest")
    d312 = inputs.PYTHONS["3.12"].digest
    assert inputs.base_for("3.12", "docker") == f"python@{d312}"
    assert inputs.base_for("3.12", "docker", None, "127.0.0.1:5000/") == \
        f"127.0.0.1:5000/python@{d312}"
    with pytest.raises(ConfigError, match="PYTHON='3.9'.*3.10, 3.11, 3.12"):
        inputs.base_for("3.9", "docker")
    with pytest.raises(ConfigError, match="Debian 12 has no Python 3.12"):
        inputs.base_for("3.12", "debootstrap")


def test_the_bases_docs_image_md_names_are_the_pinned_ones():
    doc = (ROOT / "docs" / "image.md").read_text()
    for python, base in inputs.PYTHONS.items():
        row = next(line for line in doc.splitlines() if line.startswith(f"| {python} | "))
        assert f"@{base.digest[:len('sha256:') + 8]}..." in row, (python, base.digest, row)


def test_no_pip_in_a_build_reaches_a_package_index():
    """Every pip install of the definitions reads the wheelhouse only (--no-index)."""
    for definition in (inputs.DEF, inputs.BASE_DEF, inputs.EXTRA_DEF):
        text = (ROOT / definition).read_text().replace("\\\n", " ")
        installs = [line for line in text.splitlines()
                    if "pip" in line and " install " in line and not line.lstrip().startswith("#")]
        assert installs, definition
        for line in installs:
            assert "--no-index" in line or ("$wheels" in line and 'wheels="--no-index ' in text), \
                (definition, line)


def test_the_pinned_base_is_the_default_where_debootstrap_cannot_work():
    """Aurora's SLES has neither debootstrap nor a Debian mirror: the pinned docker base; and
    a Python Debian 12 lacks always comes from its python:X.Y-slim base."""
    assert inputs.default_bootstrap("3.11", None, have_debootstrap=True, have_mirror=True) \
        == "debootstrap"
    assert inputs.default_bootstrap("3.11", None, have_debootstrap=False,
                                    have_mirror=False) == "docker"
    assert inputs.default_bootstrap("3.11", None, have_debootstrap=True,
                                    have_mirror=False) == "docker"
    assert inputs.default_bootstrap("3.11", "sha256:" + "b" * 64, True, True) == "docker"
    assert inputs.default_bootstrap("3.12", None, True, True) == "docker"
    for python, base in inputs.PYTHONS.items():
        assert len(base.digest) == len("sha256:") + 64, python
        assert base.apt == (python == "3.11"), python  # only Debian's own Python uses apt


def test_build_args_make_the_labels():
    args = inputs.build_args(python="3.11", base_sif=".image-cache/base-k.sif",
                             pyproject_text=PYPROJECT, lock_text=b"x", git_commit="abc",
                             source_date_epoch=1736812800, stamp="s")
    assert args == {
        "BASE": ".image-cache/base-k.sif", "WHEELHOUSE": ".wheelhouse/project",
        "PARSL_VERSION": "2025.1.13", "PYTHON_VERSION": "3.11", "PROJECT_VERSION": "0.1.0",
        "GIT_COMMIT": "abc",
        "LOCK_SHA256": "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881",
        "STAMP": "s", "SOURCE_DATE_EPOCH": "1736812800", "BUILD_DATE": "2025-01-14T00:00:00Z",
        "LABEL_SCHEMA_DATE": "Tuesday_14_January_2025_00:00:00_UTC"}
    assert inputs.build_args(python="3.12", base_sif="b", pyproject_text=PYPROJECT,
                             lock_text=b"x", git_commit="abc", source_date_epoch=0,
                             stamp="s")["PYTHON_VERSION"] == "3.12"
    assert inputs.base_build_args(python="3.11", bootstrap="debootstrap", base="debian",
                                  mirror="http://m/debian", key="k",
                                  source_date_epoch=1736812800) == {
        "BOOTSTRAP": "debootstrap", "FROM": "debian", "PYTHON": "3.11", "APT_PYTHON": "yes",
        "MIRROR": "http://m/debian", "WHEELHOUSE": ".wheelhouse/base", "BASE_KEY": "k",
        "SOURCE_DATE_EPOCH": "1736812800",
        "LABEL_SCHEMA_DATE": "Tuesday_14_January_2025_00:00:00_UTC"}
    # The path Aurora takes for 3.10 and 3.12: the base holds Python, nothing runs apt-get.
    for python in ("3.10", "3.12"):
        args = inputs.base_build_args(python=python, bootstrap="docker", base="python@sha256:x",
                                      mirror="-", key="k", source_date_epoch=0)
        assert (args["PYTHON"], args["APT_PYTHON"]) == (python, "no")
    assert inputs.build_options({"A": "1", "B": "x y"}) == [
        "--fakeroot", "--force", "--mksquashfs-args",
        "-comp gzip -Xcompression-level 6 -all-root", "--build-arg", "A=1", "--build-arg",
        "B=x y"]
    assert inputs.build_options({}, no_https=True)[-1] == "--no-https"


def test_base_key_covers_each_input_and_names_a_relative_path():
    key = inputs.base_key(b"def", b"lock", ["debootstrap", "1"])
    assert {inputs.base_key(b"def2", b"lock", ["debootstrap", "1"]),
            inputs.base_key(b"def", b"lock2", ["debootstrap", "1"]),
            inputs.base_key(b"def", b"lock", ["docker", "1"]),
            inputs.base_key(b"def", b"lock", ["debootstrap", "2"])} & {key} == set()
    # no concatenation ambiguity between the parts
    assert inputs.base_key(b"de", b"flock", ["x"]) != inputs.base_key(b"def", b"lock", ["x"])
    assert inputs.base_path("3.12", key) == f".image-cache/base-3.12-{key[:24]}.sif"


def test_definitions_name_no_absolute_host_path():
    """Two checkouts in different folders must build the same bytes: every host path a
    definition reads is a build argument given relative to the checkout."""
    for definition in (inputs.DEF, inputs.BASE_DEF, inputs.EXTRA_DEF):
        text = (ROOT / definition).read_text()
        files = text.split("%files", 1)[1].split("\n%", 1)[0]
        assert [ln.split()[0] for ln in files.splitlines()
                if ln.strip() and not ln.strip().startswith("#")] == ["{{"], definition
    args = inputs.build_args(python="3.11", base_sif=inputs.base_path("3.11", "k" * 64),
                             pyproject_text=PYPROJECT, lock_text=b"", git_commit="c",
                             source_date_epoch=0, stamp="s")
    assert not args["BASE"].startswith("/") and not args["WHEELHOUSE"].startswith("/")


def test_stamp_changes_with_sources_only(tmp_path):
    (tmp_path / "container" / "scripts").mkdir(parents=True)
    (tmp_path / "src" / "parsl_aurora").mkdir(parents=True)
    for rel in (inputs.DEF, inputs.BASE_DEF, lock.lock_path("3.11"), lock.lock_path("3.12"),
                "pyproject.toml", "src/parsl_aurora/a.py"):
        (tmp_path / rel).write_text(rel)
    first = inputs.stamp(tmp_path, "3.11")
    (tmp_path / "src" / "parsl_aurora" / "__pycache__").mkdir()
    (tmp_path / "src" / "parsl_aurora" / "__pycache__" / "a.pyc").write_bytes(b"junk")
    assert inputs.stamp(tmp_path, "3.11") == first
    (tmp_path / lock.lock_path("3.12")).write_text("another Python's lock")
    assert inputs.stamp(tmp_path, "3.11") == first
    (tmp_path / lock.lock_path("3.11")).write_text("changed")
    assert inputs.stamp(tmp_path, "3.11") != first
    (tmp_path / "src" / "parsl_aurora" / "a.py").write_text("changed")
    assert inputs.stamp(tmp_path, "3.11") != first
    (tmp_path / inputs.BASE_DEF).write_text("changed")
    assert inputs.stamp(tmp_path, "3.11", ["docker"]) != inputs.stamp(tmp_path, "3.11")


def test_labels_from_inspect():
    text = '{"data": {"attributes": {"labels": {"k": "v"}}}, "type": "container"}'
    assert sif.labels_from_inspect(text) == {"k": "v"}


# ---------------------------------------------------------------- pure: the SIF header
GOLDEN = ROOT / "tests" / "golden"


def test_normalise_sif_header_golden():
    """The header of a tiny SIF built by apptainer 1.4.5 (random ID, the build's clock), and
    the same header as the SIF library's deterministic mode writes it (nil ID, zero times);
    the normalised one was checked with `apptainer sif header`, `sif list`, `inspect`, `exec`."""
    head = (GOLDEN / "sif_header.bin").read_bytes()
    want = (GOLDEN / "sif_header.normalised.bin").read_bytes()
    assert sif.sif_header_size(head) == len(head) == 32176
    assert sif.normalise_sif_header(head) == want
    assert sif.normalise_sif_header(want) == want
    assert sif.normalise_sif_header(head + b"data that follows") == want


def test_normalise_sif_header_refuses_signed_images_and_non_sifs():
    head = bytearray((GOLDEN / "sif_header.bin").read_bytes())
    signature = 4096 + 3 * sif.SIF_DESCRIPTOR_SIZE  # the first free descriptor
    head[signature:signature + 5] = (0x4005).to_bytes(4, "little") + b"\x01"
    with pytest.raises(ImageError, match="signed: normalise it before signing"):
        sif.normalise_sif_header(bytes(head))
    with pytest.raises(ImageError, match="not a SIF image"):
        sif.normalise_sif_header(b"#!/bin/sh\n" + bytes(200))
    with pytest.raises(ImageError, match="cut short"):
        sif.normalise_sif_header((GOLDEN / "sif_header.bin").read_bytes()[:5000])


def test_normalise_sif_rewrites_only_the_header(tmp_path):
    path = tmp_path / "x.sif"
    path.write_bytes((GOLDEN / "sif_header.bin").read_bytes() + b"payload")
    sif.normalise_sif(path)
    assert path.read_bytes() == (GOLDEN / "sif_header.normalised.bin").read_bytes() + b"payload"


def test_sif_objects_and_the_metadata_object_golden():
    """The objects the golden header lists; apptainer's inspect metadata among them."""
    head = (GOLDEN / "sif_header.bin").read_bytes()
    assert sif.sif_objects(head) == [(0x4001, "", 32176, 89),
                                     (0x4006, "inspect-metadata.json", 32265, 1639),
                                     (0x4004, "", 36864, 4096)]
    assert sif.metadata_span(head) == (32265, 1639)
    unused = bytearray(head)
    unused[4096 + sif.SIF_DESCRIPTOR_SIZE + sif.SIF_DESCRIPTOR_USED_AT] = 0
    assert sif.metadata_span(bytes(unused)) is None
    with pytest.raises(ImageError, match="cut short"):
        sif.sif_objects(head[:5000])


# ------------------------------------------------ the driver checked without apptainer
DRIVER_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
OTHER_PYTHON = "3.12" if DRIVER_PYTHON != "3.12" else "3.11"


@pytest.fixture(scope="module")
def data_labelled_sifs(tmp_path_factory) -> dict[str, Path]:
    """Tiny SIFs made by apptainer whose labels name the driver's Parsl with the driver's
    Python (`same`), with another Python (`other`), or nothing (`bare`)."""
    labels = {"same": {inputs.LABEL_PARSL: PARSL, "parsl-aurora.python": DRIVER_PYTHON},
              "other": {inputs.LABEL_PARSL: PARSL, "parsl-aurora.python": OTHER_PYTHON},
              "bare": {}}
    return {k: tiny_sif(tmp_path_factory.mktemp(k), v) for k, v in labels.items()}


@needs_apptainer
def test_driver_checked_from_the_sif_labels_without_apptainer(data_labelled_sifs, monkeypatch,
                                                               tmp_path):
    """A login node has no apptainer: the image's Parsl and Python come from the SIF file
    itself, and an image of another Python is refused before anything is submitted."""
    from parsl_aurora.container import check_image

    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("apptainer") is None
    check_image(str(data_labelled_sifs["same"]))
    other = str(data_labelled_sifs["other"])
    with pytest.raises(ConfigError) as refused:
        check_image(other)
    assert (refused.value.field, refused.value.value) == ("container", other)
    assert (f"this driver's Python ({DRIVER_PYTHON}); it holds Python {OTHER_PYTHON}"
            in refused.value.choices)
    assert refused.value.fix.startswith(f"make the driver's environment with Python "
                                        f"{OTHER_PYTHON} ")
    # Only an image whose labels do not tell needs running, so apptainer.
    with pytest.raises(ImageError, match="no parsl-aurora.python and .* labels, so only "
                                         "running it can tell.*apptainer is not on PATH"):
        check_image(str(data_labelled_sifs["bare"]))
    junk = tmp_path / "junk.sif"
    junk.write_bytes(b"not a SIF\n" * 100)
    with pytest.raises(ConfigError, match="container=.*junk.sif.*Fix: check the path"):
        check_image(str(junk))


# ---------------------------------------------------------------- pure: a user's own packages
def test_extra_lock_path_and_date_checks():
    assert lock.extra_lock_path(Path("/p/requirements.txt")) == Path("/p/requirements.lock")
    with pytest.raises(ConfigError, match="EXTRA='requirements.lock'.*the lock itself"):
        lock.extra_lock_path(Path("requirements.lock"))
    assert lock.check_date("2025-06-01", "2025-01-14") == "2025-06-01"
    with pytest.raises(ConfigError, match="EXTRA_DATE='2025-13-01'.*YYYY-MM-DD"):
        lock.check_date("2025-13-01", "2025-01-14")
    with pytest.raises(ConfigError, match="EXTRA_DATE='2024-06-01'.*2025-01-14 or later"):
        lock.check_date("2024-06-01", "2025-01-14")


def test_extra_lock_command_golden():
    assert lock.extra_lock_command("uv", "3.11", "2025-06-01", "c.txt", "/p/req.txt", "/t/o.lock") == [
        "uv", "pip", "compile", "--quiet", "--no-header", "--exclude-newer", "2025-06-01",
        "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28",
        "--generate-hashes", "-c", "c.txt", "/p/req.txt", "-o", "/t/o.lock"]


def test_extra_lock_keeps_only_what_the_image_lacks():
    image_lock = lock.with_layout(LOCK_TEXT, {"sqlalchemy", "greenlet"}, {"pip"})
    resolved = ("parsl==2025.1.13 \\\n    --hash=sha256:bb\n    # via -r req.txt\n"
                "tabulate==0.9.0 \\\n    --hash=sha256:ff\n    # via -r req.txt\n")
    text = lock.extra_lock_text(resolved, image_lock, "tabulate\nparsl\n", "2025-06-01")
    head, body = text.split("\n", 1)
    assert head.startswith("# extra lock: input=") and head.endswith(
        " exclude-newer=2025-06-01")
    assert lock.lock_entries(body) == {
        "tabulate": "tabulate==0.9.0 \\\n    --hash=sha256:ff\n    # via -r req.txt\n"}
    assert lock.extra_lock_date(text) == "2025-06-01"
    assert lock.extra_lock_is_current(text, "tabulate\nparsl\n", image_lock, None)
    assert lock.extra_lock_is_current(text, "tabulate\nparsl\n", image_lock, "2025-06-01")
    assert not lock.extra_lock_is_current(text, "tabulate\n", image_lock, None)
    assert not lock.extra_lock_is_current(text, "tabulate\nparsl\n", image_lock + "#\n", None)
    assert not lock.extra_lock_is_current(text, "tabulate\nparsl\n", image_lock, "2025-07-01")


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
    prov = build.provenance(ROOT, "3.11")
    assert got["org.parsl-project.parsl.version"] == PARSL
    assert got["parsl-aurora.python"] == "3.11"
    assert got["org.opencontainers.image.version"] == "0.1.0"
    assert got["org.opencontainers.image.revision"] == prov.commit
    assert got["parsl-aurora.source-date-epoch"] == str(prov.source_date_epoch)
    assert got["org.opencontainers.image.created"] == inputs.iso_date(prov.source_date_epoch)
    # apptainer 1.4 writes its build clock here unless the definition's label wins
    assert got["org.label-schema.build-date"] == inputs.label_schema_date(prov.source_date_epoch)
    assert got["parsl-aurora.lock-sha256"] == hashlib.sha256(
        (ROOT / lock.lock_path("3.11")).read_bytes()).hexdigest()
    assert got["parsl-aurora.base-bootstrap"] in ("debootstrap", "docker")


@needs_apptainer
def test_size_under_60_mb(built_image):
    assert built_image.stat().st_size < 60 * 10**6, built_image.stat().st_size


@needs_apptainer
def test_header_is_normalised_and_apptainer_signs_verifies_and_runs_it(built_image, tmp_path):
    """Nil ID and zero times, as Apptainer 1.5's deterministic mode writes them; Apptainer 1.4
    still reads, signs, verifies and runs the image."""
    with open(built_image, "rb") as f:
        head = f.read(40000)
    size = sif.sif_header_size(head)
    assert sif.normalise_sif_header(head[:size]) == head[:size], "header not normalised"
    header = run("apptainer", "sif", "header", str(built_image))
    assert header.returncode == 0 and "Primary Architecture: amd64" in header.stdout, header
    key, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    run("openssl", "genrsa", "-out", str(key), "2048")
    run("openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub))
    signed = tmp_path / "signed.sif"
    shutil.copy(built_image, signed)
    out = run("apptainer", "sign", "--key", str(key), str(signed))
    assert out.returncode == 0, out.stderr
    out = run("apptainer", "verify", "--key", str(pub), str(signed))
    assert out.returncode == 0 and "Verified signature" in out.stderr, out.stderr
    out = run("apptainer", "exec", str(signed), "python", "-c", "import parsl_aurora")
    assert out.returncode == 0, out.stderr
    assert run("apptainer", "inspect", str(signed)).returncode == 0


@needs_apptainer
def test_sqlalchemy_is_in_the_image_but_off_the_default_path(built_image):
    """Monitoring stays available without any worker paying for importing SQLAlchemy."""
    probe = "import sys, parsl; print('sqlalchemy' in sys.modules)"
    out = run("apptainer", "exec", str(built_image), "python", "-c", probe)
    assert (out.returncode, out.stdout.strip()) == (0, "False"), out.stderr
    out = run("apptainer", "exec", str(built_image), "sh", "-c",
              'PYTHONPATH=$PARSL_AURORA_MONITORING_PATH python -c "import sqlalchemy"')
    assert out.returncode == 0, out.stderr


@needs_apptainer
def test_nothing_can_be_pip_installed_in_the_image(built_image):
    """pip runs from its locked wheel at build time and is never installed: no pip module and
    no pip command, so nothing can be installed into the image at run time."""
    out = run("apptainer", "exec", str(built_image), "sh", "-c",
              "command -v pip pip3 pip3.11; python -m pip --version")
    assert out.stdout == "" and "No module named pip" in out.stderr, out.stdout + out.stderr


# Every distribution a Python in the image finds: name (normalised as the lock's) and version.
INSTALLED = ("import importlib.metadata as m, json; from parsl_aurora.image.lock import "
             "requirement_name as n; print(json.dumps({n(d.metadata['Name']): d.version "
             "for d in m.distributions()}))")


@needs_apptainer
def test_the_images_packages_are_the_locks_pins(built_image):
    """Python packages come only from the lock: what the image's Python finds, on the default
    path and on the monitoring path, is the lock's pins, each at its version, and nothing else
    (but the project and pip, which the build runs from its wheel and never installs)."""
    found = {}
    for path in ("", "$PARSL_AURORA_MONITORING_PATH"):
        out = run("apptainer", "exec", str(built_image), "sh", "-c",
                  f'PYTHONPATH={path} exec python -c "$0"', INSTALLED)
        assert out.returncode == 0, out.stderr
        found.update(json.loads(out.stdout))
    assert found.pop("parsl-aurora")
    pins = lock.pinned_versions((ROOT / lock.lock_path("3.11")).read_text())
    assert found == {k: v for k, v in pins.items() if k != "pip"}


@needs_apptainer
def test_second_build_reuses_the_image(built_image):
    before = built_image.stat().st_mtime_ns
    out = run(sys.executable, "-m", "parsl_aurora.image", "build", cwd=built_image.parent)
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
def test_stage_image_starts_the_pools_from_a_node_local_copy(built_image, tmp_path):
    """stage_image=: the pool copies the image to the node's folder first and runs from it."""
    node = tmp_path / "node-tmp"
    script = WORKERS_IN_IMAGE.replace("container=sys.argv[1]",
                                      "container=sys.argv[1], stage_image=sys.argv[2]")
    out = run(sys.executable, "-c", script, str(built_image), str(node), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    copies = list(node.glob("aurora-*.sif"))
    assert len(copies) == 1 and copies[0].stat().st_size == built_image.stat().st_size
    assert out.stdout.strip() == str([(str(copies[0]), "/opt/aurora-env")])


@needs_apptainer
def test_image_with_another_parsl_fails_at_once(built_image):
    from parsl_aurora.container import image_versions, mismatch

    found = image_versions(str(built_image))
    assert found == (PARSL, "3.11")
    assert mismatch(str(built_image), found, (PARSL, "3.11")) is None
    assert "Parsl (2024.12.2); it holds parsl 2025.1.13" in str(mismatch(
        str(built_image), found, ("2024.12.2", "3.11")))
    assert "Python (3.12); it holds Python 3.11" in str(mismatch(
        str(built_image), found, (PARSL, "3.12")))


@needs_apptainer
def test_labels_read_from_the_sif_are_what_apptainer_inspect_shows(built_image, tmp_path):
    assert sif.sif_labels(built_image) == labels(built_image)
    signed = tmp_path / "signed.sif"  # a signature adds objects; the metadata stays
    shutil.copy(built_image, signed)
    key = tmp_path / "k.pem"
    run("openssl", "genrsa", "-out", str(key), "2048")
    assert run("apptainer", "sign", "--key", str(key), str(signed)).returncode == 0
    assert sif.sif_labels(signed) == labels(signed) == labels(built_image)


@needs_apptainer
def test_own_packages_in_a_derived_image(built_image, tmp_path):
    """EXTRA: a small real package the image lacks, locked with hashes against the image's lock
    as of a chosen date, fetched on the host, installed offline into an image built From:
    aurora.sif, whose own %test still passes."""
    assert run("apptainer", "exec", str(built_image), "python", "-c",
               "import tabulate").returncode != 0, "the image already has tabulate"
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("tabulate\n")
    derived = tmp_path / "derived.sif"
    cmd = (sys.executable, "-m", "parsl_aurora.image", "build", "--extra", str(reqs),
           "--extra-date", "2025-06-01", "--extra-image", str(derived))
    out = run(*cmd, cwd=built_image.parent)  # the checkout it was built in
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lock_file = tmp_path / "requirements.lock"
    entries = lock.lock_entries(lock_file.read_text())
    assert list(entries) == ["tabulate"], entries  # nothing the image already pins
    assert entries["tabulate"].startswith("tabulate==0.9.0 ") and "--hash=sha256:" in \
        entries["tabulate"]
    assert lock.extra_lock_date(lock_file.read_text()) == "2025-06-01"
    assert "/" not in lock_file.read_text().replace("# via -r requirements.txt", ""), \
        "the lock names a host folder: its sha256 would differ from one checkout to another"

    out = run("apptainer", "exec", str(derived), "python", "-c",
              "import tabulate, parsl; print(tabulate.__version__, parsl.__version__)")
    assert out.stdout.split() == ["0.9.0", "2025.01.13"], out.stderr
    out = run("apptainer", "test", str(derived))
    assert out.returncode == 0 and "parsl 2025.1.13" in out.stdout, out.stdout + out.stderr
    got = labels(derived)
    assert got["parsl-aurora.extra-lock-sha256"] == hashlib.sha256(lock_file.read_bytes()).hexdigest()
    assert got["parsl-aurora.extra-exclude-newer"] == "2025-06-01"
    assert got["org.opencontainers.image.revision"] == labels(built_image)[
        "org.opencontainers.image.revision"]

    before = (lock_file.stat().st_mtime_ns, derived.stat().st_mtime_ns)
    out = run(*cmd, cwd=built_image.parent)  # same inputs: the lock and the image are reused
    assert out.returncode == 0 and "is up to date" in out.stdout, out.stdout + out.stderr
    assert (lock_file.stat().st_mtime_ns, derived.stat().st_mtime_ns) == before


def test_build_without_apptainer_says_how_to_get_it(tmp_path):
    """No apptainer on PATH: one line naming the installer, non-zero exit, nothing built."""
    out = run(sys.executable, "-m", "parsl_aurora.image", "--root", str(ROOT), "build",
              "--image", str(tmp_path / "x.sif"), env={**os.environ, "PATH": str(tmp_path)})
    assert out.returncode != 0
    assert "apptainer is not on PATH" in out.stderr and ".ci/install-apptainer" in out.stderr
    assert not (tmp_path / "x.sif").exists()


MONITORED = """
import sqlite3, sys
import parsl
from parsl import python_app
import site_configs

@python_app
def imported_sqlalchemy():
    import sys
    return "sqlalchemy" in sys.modules

with parsl.load(site_configs.load("local", "in_job", run_dir="runinfo", monitoring=True)):
    workers = {imported_sqlalchemy().result() for _ in range(6)}
with sqlite3.connect("runinfo/monitoring.db") as db:
    tasks = db.execute("SELECT COUNT(*) FROM task WHERE task_func_name = 'imported_sqlalchemy'")
    tries = db.execute("SELECT COUNT(*) FROM try WHERE task_try_time_returned IS NOT NULL")
    print(sorted(workers), "sqlalchemy" in sys.modules, tasks.fetchone()[0], tries.fetchone()[0])
"""


@needs_apptainer
def test_monitoring_with_the_driver_in_the_image(built_image, tmp_path):
    """monitoring=True in the image: the driver finds SQLAlchemy off the default path, the
    database holds every task, and no worker imported SQLAlchemy."""
    (tmp_path / "monitored.py").write_text(MONITORED)
    out = run("apptainer", "exec", str(built_image), "python", "monitored.py", cwd=tmp_path,
              env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["[False]", "True", "6", "6"], out.stdout
