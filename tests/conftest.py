"""Shared fixtures: every test runs in its own folder; Parsl's tools come from this interpreter."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def copy_checkout(dest: Path) -> Path:
    """The working tree as git sees it (tracked and new files, not ignored ones: no image,
    wheelhouse or cache of an earlier run), in DEST with a .git of its own at the same commit:
    a build there records the commit, as a user's build in a clone does. ROOT may be a git
    worktree (its .git is a file naming a folder of the main repository's)."""
    def git(*args: str, cwd: Path = ROOT) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout

    head = git("rev-parse", "HEAD").strip()
    git("clone", "-q", "--no-checkout", "--shared", str(ROOT), str(dest))
    git("reset", "-q", head, cwd=dest)  # the index at HEAD: `git status` sees what ROOT's does
    for name in filter(None, git("ls-files", "-co", "--exclude-standard", "-z").split("\0")):
        src = ROOT / name
        if src.is_file():  # not a file deleted but not yet committed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)
    return dest


@pytest.fixture(autouse=True)
def _own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Parsl starts interchange.py and process_worker_pool.py from PATH.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    # The GPU settings and modules of the shell that runs the tests are not the tests' own.
    for var in ("PARSL_SITE", "PARSL_MODE", "PARSL_ACCOUNT", "PBS_NODEFILE", "LOADEDMODULES",
                "ZE_FLAT_DEVICE_HIERARCHY", "ONEAPI_DEVICE_SELECTOR"):
        monkeypatch.delenv(var, raising=False)


def leftovers(folder: Path) -> list[str]:
    """Processes still running whose command line or working folder is inside `folder`.

    Real PBS's own per-user qsub daemon (it lingers 60 s after a plain qsub, with the submit
    folder as its working folder) is PBS's, not a leftover of ours.
    """
    from parsl_aurora.fake.procs import processes

    return [f"{p.pid}: {p.cmdline[:120]}" for p in processes()
            if p.pid != os.getpid() and p.state != "Z"
            and (str(folder) in p.cmdline or p.cwd.startswith(str(folder)))
            and not _pbs_qsub_daemon(p.pid)]


def _pbs_qsub_daemon(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe") == str(PBS_BIN / "qsub")
    except OSError:
        return False


def no_leftovers(folder: Path) -> list[str]:
    # Parsl's shutdown cancels blocks asynchronously; give the kills a moment to land.
    for _ in range(50):
        if not (left := leftovers(folder)):
            return []
        time.sleep(0.2)
    return left


# ---------------------------------------------------------------- components some tests need
# `@pytest.mark.needs("apptainer", "fuse")`: the test runs where every named component works.
# On a newcomer's machine a missing one skips the test and `make test` ends with one line per
# component saying how to get it; in CI (CI=true) it is a failure, and so is any other skip.
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PBS_USER = os.environ.get("PARSL_AURORA_PBS_USER", "pbsuser")
PBS_BIN = Path(os.environ.get("PARSL_AURORA_PBS_PREFIX", "/opt/pbs")) / "bin"


def _ok(*cmd: str) -> bool:
    try:
        return subprocess.run(list(cmd), capture_output=True, timeout=60,
                              check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _as_nobody(script: str) -> bool:
    """Run `script` as nobody when root can switch users (CI), else as the current user."""
    if os.geteuid() == 0:
        return _ok("runuser", "-u", "nobody", "--", "/bin/sh", "-c", script)
    return _ok("/bin/sh", "-c", script)


def _apptainer() -> str | None:
    if shutil.which("apptainer") and _ok("apptainer", "version"):
        return None
    return "apptainer is not installed: run `sudo bash .ci/install-apptainer` (Debian 12)"


def _fuse() -> str | None:
    # What an unprivileged `apptainer exec` of a SIF needs: squashfuse opens /dev/fuse
    # read-write inside a user namespace. Checked as nobody, not with root's os.access.
    if _as_nobody("exec 3<>/dev/fuse && unshare --user true"):
        return None
    return ("an unprivileged user cannot mount images (needs /dev/fuse read-write for all and "
            "user namespaces): `sudo chmod 666 /dev/fuse`")


def _registry() -> str | None:
    if shutil.which("docker-registry") or Path("/usr/bin/docker-registry").exists():
        return None
    return "no OCI registry to push to: `sudo apt-get install docker-registry`"


def _mpi() -> str | None:
    from parsl_aurora import fake

    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is missing: `pip install 'parsl-aurora[fake]'`"
    if fake.hydra():
        return None
    return "MPICH's mpiexec.hydra is missing: `pip install 'parsl-aurora[fake]'`"


def _pbs() -> str | None:
    how = ("`sudo bash ../shared/tools/install-openpbs.sh "
           "../shared/vendor/openpbs-*.tar.gz` (a real OpenPBS server for the real-PBS tests)")
    if not (PBS_BIN / "qstat").exists():
        return f"no real PBS server here: {how}"
    if os.geteuid() != 0:
        return f"the real-PBS tests switch to the test user {PBS_USER}: run them as root"
    if not _ok("id", PBS_USER):
        return f"the test user {PBS_USER} is missing: {how}"
    if not _ok(str(PBS_BIN / "qstat"), "-B"):
        return "the PBS server is not answering: `sudo bash ../shared/tools/install-openpbs.sh start`"
    return None


# Lmod where Debian's `lmod` package puts it (what .ci/run installs).
LMOD_PKG = Path(os.environ.get("PARSL_AURORA_LMOD_PKG", "/usr/share/lmod/lmod"))


def _lmod() -> str | None:
    if (LMOD_PKG / "libexec" / "lmod").exists() and (LMOD_PKG / "init" / "bash").exists():
        return None
    return "Lmod is missing: `sudo apt-get install lmod` (Debian 12)"


def module_environment(base: dict[str, str], *commands: str) -> dict[str, str]:
    """`base` as a shell leaves it after Lmod's init and `commands` (e.g. `module load x`)."""
    script = f"source {LMOD_PKG / 'init' / 'bash'}\n" + "\n".join(commands) + "\nenv -0"
    out = subprocess.run(["bash", "-c", script], env=base, capture_output=True, check=True)
    pairs = (item.split(b"=", 1) for item in out.stdout.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


def _python312() -> str | None:
    """The stand-in for python:3.12-slim-bookworm (tests/python_base.py) and its tools."""
    how = "`sudo apt-get install skopeo patchelf binutils` (.ci/run does)"
    missing = [t for t in ("skopeo", "patchelf", "strip") if not shutil.which(t)]
    if missing:
        return f"{', '.join(missing)} missing: {how}"
    if os.geteuid() != 0:
        return "it copies pyenv's CPython 3.12 from root's home and builds as nobody: run as root"
    pyenv = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"
    if not list(pyenv.glob("3.12.*")):
        return f"no pyenv CPython 3.12 in {pyenv} (set PYENV_ROOT to a pyenv that has one)"
    return None


COMPONENTS = {"apptainer": _apptainer, "fuse": _fuse, "registry": _registry, "mpi": _mpi,
              "pbs": _pbs, "lmod": _lmod, "python312": _python312}
_missing: dict[str, str | None] = {}


def missing(component: str) -> str | None:
    """Why `component` cannot be used here (how to get it), or None when it works."""
    if component not in _missing:
        _missing[component] = COMPONENTS[component]()
    return _missing[component]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"needs(*components): runs only where each works ({', '.join(COMPONENTS)})")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        for component in mark.args:
            why = missing(component)
            if why:
                if CI:
                    pytest.fail(f"CI=true requires {component}: {why}", pytrace=False)
                pytest.skip(f"needs {component}: {why}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for component, why in _missing.items():
        if why:
            terminalreporter.write_line(f"not run: tests that need {component}. {why}")
    if written := config.stash.get(_CHECKOUT_WRITTEN, []):
        terminalreporter.write_sep("=", "the tests wrote into the checkout", red=True)
        terminalreporter.write_line(f"{ROOT}: tests write only into their own temporary "
                                    "folders (git status of each file; a file edited by hand "
                                    "during the run shows here too):", red=True)
        for line in written:
            terminalreporter.write_line(f"  {line}", red=True)
    skipped = terminalreporter.stats.get("skipped", [])
    if CI and skipped:
        terminalreporter.write_line(f"CI=true: {len(skipped)} skipped tests count as failures",
                                    red=True)


def pytest_sessionstart(session):
    session.config.stash[_CHECKOUT_BEFORE] = checkout_state()


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if CI and reporter is not None and reporter.stats.get("skipped") and exitstatus == 0:
        session.exitstatus = 1
    before, after = session.config.stash.get(_CHECKOUT_BEFORE, None), checkout_state()
    if before is not None and after is not None and (written := checkout_changes(before, after)):
        session.config.stash[_CHECKOUT_WRITTEN] = written  # the terminal summary, next, says so
        session.exitstatus = 1


# ---------------------------------------------------------------- the checkout stays as it was
# What the runner itself makes in the checkout: make's and nox's environments (with the editable
# install's metadata, made before pytest starts) and the tools' caches.
RUNNER_MADE = (".tools", ".nox", ".pytest_cache", ".ruff_cache")
_CHECKOUT_BEFORE = pytest.StashKey[dict[str, tuple[str, int]] | None]()
_CHECKOUT_WRITTEN = pytest.StashKey[list[str]]()


def checkout_state(root: Path = ROOT) -> dict[str, tuple[str, int]] | None:
    """Path -> (git's two status letters, mtime) of every modified, new or ignored file below
    ROOT, one by one (not folded into its folder), bar RUNNER_MADE and __pycache__; None
    outside a git checkout."""
    spec = [f":(exclude){d}" for d in RUNNER_MADE] + [":(exclude,glob)**/__pycache__/**"]
    out = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--ignored",
                          "--untracked-files=all", "--", ".", *spec], cwd=root,
                         capture_output=True, check=False)
    if out.returncode != 0:
        return None
    state, entries = {}, iter(out.stdout.decode(errors="replace").split("\0"))
    for entry in entries:
        if not entry:
            continue
        code, path = entry[:2], entry[3:]
        if code[0] in "RC":  # a staged rename or copy: its source path follows
            next(entries, None)
        try:
            state[path] = (code, (root / path).lstat().st_mtime_ns)
        except OSError:  # deleted
            state[path] = (code, 0)
    return state


def checkout_changes(before: dict[str, tuple[str, int]],
                     after: dict[str, tuple[str, int]]) -> list[str]:
    """`XY path` for every file whose status is new since BEFORE, and every file git does not
    track (new or ignored) written since: an image, a wheelhouse, a run folder of a test."""
    return [f"{code} {path}" for path, (code, mtime) in sorted(after.items())
            if path not in before or before[path][0] != code
            or (code in ("??", "!!") and before[path][1] != mtime)]


needs_apptainer = pytest.mark.needs("apptainer")


@pytest.fixture
def restore_environ():
    """Local configs put the fake's commands into os.environ; put it back afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def image_for_nobody(built_image) -> Path:
    """A copy nobody can read: /root (where the checkout may live) is not traversable.

    Not under pytest's tmp folders: pytest makes them private (0700) and may do so again.
    """
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="parsl-aurora-nobody-", dir="/tmp"))
    folder.chmod(0o755)
    copy = folder / "aurora.sif"
    shutil.copy(built_image, copy)
    copy.chmod(0o755)
    yield copy
    shutil.rmtree(folder, ignore_errors=True)


# The base layer (a debootstrap: most of a cold build) kept between sessions and checkouts as
# the build keys it (its file name holds the key: definition, lock, bootstrap, apptainer), each
# in a folder with the wheelhouse it was built from (the security tests scan what %files copied).
IMAGE_CACHE = Path("/tmp/parsl-aurora-image-cache")
KEEP_BASES = 3  # per Python: the newest used, for checkouts at other commits


@pytest.fixture(scope="session")
def built_image(tmp_path_factory) -> Path:
    """aurora.sif built by the command users run, in a copy of the checkout (with its .git, so
    the image records the commit) in this session's temporary folder; the base layer comes
    from IMAGE_CACHE when its key is there, and a new one goes back to it."""
    from parsl_aurora.image import build, inputs

    checkout = copy_checkout(tmp_path_factory.mktemp("image") / "checkout")
    (checkout / inputs.CACHE).mkdir()
    for entry in IMAGE_CACHE.glob("base-*/base.sif"):  # a build replaces files, never writes
        with contextlib.suppress(FileNotFoundError):  # into one; dropped by another session
            _link_or_copy(entry, checkout / inputs.CACHE / f"{entry.parent.name}.sif")
    out = subprocess.run([sys.executable, "-m", "parsl_aurora.image", "build"], cwd=checkout,
                         check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"image build failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    image = checkout / inputs.IMAGE
    labels = build.image_labels(image)
    base = checkout / inputs.base_path(labels[inputs.LABEL_PYTHON], labels["parsl-aurora.base-key"])
    wheelhouse = checkout / inputs.WHEELHOUSE / "base"
    # The cache only saves time: a session that cannot write it (another user's) goes on.
    with contextlib.suppress(OSError):
        if wheelhouse.exists():  # this build made the base
            _keep_base(base, wheelhouse)
        else:
            shutil.copytree(IMAGE_CACHE / base.stem / "wheelhouse", wheelhouse)
            os.utime(IMAGE_CACHE / base.stem)  # used
    return image


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system
        shutil.copy2(src, dest)


def _keep_base(base: Path, wheelhouse: Path) -> None:
    """Put BASE and its WHEELHOUSE into IMAGE_CACHE as one folder, whole or not at all
    (sessions of other checkouts read it), and drop all but the KEEP_BASES newest used of
    each Python there."""
    IMAGE_CACHE.mkdir(mode=0o755, exist_ok=True)
    part = IMAGE_CACHE / f".{base.stem}.{os.getpid()}.part"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    _link_or_copy(base, part / "base.sif")
    shutil.copytree(wheelhouse, part / "wheelhouse")
    try:
        part.rename(IMAGE_CACHE / base.stem)
    except OSError:  # another session put the same base there first
        shutil.rmtree(part)
    by_python: dict[str, list[Path]] = {}
    for entry in IMAGE_CACHE.glob("base-*"):
        by_python.setdefault(entry.name.split("-")[1], []).append(entry)
    for entries in by_python.values():
        for old in sorted(entries, key=lambda e: e.stat().st_mtime, reverse=True)[KEEP_BASES:]:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- PBS: the fake and the real one
@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.needs("pbs"))])
def cluster(request, tmp_path):
    """Each test using it runs twice: on the fake PBS and on the real OpenPBS server."""
    from clusters import fake_cluster, real_cluster

    c = fake_cluster(tmp_path) if request.param == "fake" else real_cluster(PBS_USER, PBS_BIN)
    yield c
    c.cleanup()


@pytest.fixture
def real_pbs():
    """The real OpenPBS server alone (mark the test `needs("pbs")`)."""
    from clusters import real_cluster

    c = real_cluster(PBS_USER, PBS_BIN)
    yield c
    c.cleanup()


def project_wheel(folder: Path) -> Path:
    """This checkout's wheel, made in FOLDER from a copy of its sources: pip builds in the tree
    it is given, leaving build/ and *.egg-info there."""
    from parsl_aurora.image.build import copy_sources

    copy_sources(ROOT, folder / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder),
                    str(folder / "src")], check=True, capture_output=True)
    return next(folder.glob("parsl_aurora-*.whl"))


@pytest.fixture(scope="session")
def user_venv(tmp_path_factory) -> Path:
    """A venv of the system Python with this checkout installed ([fake]: MPI for the fake
    PALS), where the PBS test user can run it: as users install, not editable.

    Reused between sessions while the project's wheel is the same.
    """
    import hashlib

    wheel = project_wheel(tmp_path_factory.mktemp("wheel"))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()[:12]
    venv = Path("/tmp/parsl-aurora-pbs-tests") / f"venv-{digest}"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(mode=0o755, exist_ok=True)
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--compile",
                               f"{wheel}[fake]"], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        (venv / ".complete").touch()
    return venv


# ---------------------------------------------------------------- images and registries
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_registry(root: Path) -> Iterator[str]:
    """A docker-registry on 127.0.0.1:<free port>, storing under root; stopped afterwards."""
    port = free_port()
    config = root / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {root / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    with open(root / "registry.log", "wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"docker-registry did not start: {(root / 'registry.log')}")
                time.sleep(0.1)
        yield f"127.0.0.1:{port}/parsl-aurora/aurora"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def factory_registry(tmp_path_factory):
    with serve_registry(tmp_path_factory.mktemp("registry")) as repo:
        yield repo


@pytest.fixture(scope="session")
def data_keys(tmp_path_factory):
    """Two PEM RSA key pairs made with openssl: `good` signs, `other` is a stranger's."""
    d = tmp_path_factory.mktemp("keys")
    keys = {}
    for name in ("good", "other"):
        priv, pub = d / f"{name}.pem", d / f"{name}.pub.pem"
        subprocess.run(["openssl", "genrsa", "-out", priv, "2048"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", priv, "-pubout", "-out", pub], check=True,
                       capture_output=True)
        keys[name] = (priv, pub)
    return keys


def tiny_sif(folder: Path, labels: dict[str, str]) -> Path:
    """A 40 kB SIF (scratch and one file: nothing runs in it) carrying `labels`."""
    (folder / "hello.txt").write_text("hello from a tiny image\n")
    (folder / "tiny.def").write_text(
        "Bootstrap: scratch\n%files\n    hello.txt /hello.txt\n%labels\n"
        + "".join(f"    {k} {v}\n" for k, v in labels.items()))
    subprocess.run(["apptainer", "build", "--fakeroot", "tiny.sif", "tiny.def"], cwd=folder,
                   check=True, capture_output=True, timeout=300)
    return folder / "tiny.sif"


@pytest.fixture(scope="session")
def data_tiny_sif(tmp_path_factory):
    """A tiny SIF carrying the labels the default tag is made from."""
    return tiny_sif(tmp_path_factory.mktemp("tiny"), {
        "org.parsl-project.parsl.version": "2025.1.13",
        "org.opencontainers.image.revision": "8d5a104d439cbedcee0a3bf7748812f6a2c708bb",
        "parsl-aurora.stamp": "b79ef748", "parsl-aurora.source-date-epoch": "1736812800"})


@pytest.fixture
def data_image(data_tiny_sif, tmp_path):
    img = tmp_path / "aurora.sif"
    shutil.copyfile(data_tiny_sif, img)
    return img
