"""Security: who may connect to the interchange, what file modes the bundle leaves, and that no
secret is baked into the image (docs/security.md).

The attack tests run real Parsl and real ZMQ: an interchange started by `parsl.load` on the fake
cluster, and Parsl's own process_worker_pool.py started by hand with the executor's real launch
command, once without keys, once with the wrong keys, once with the right ones.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import time
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq
import zmq.auth
from conftest import ROOT, needs_apptainer, no_leftovers

import site_configs
from parsl_aurora.image import build, inputs
from parsl_aurora.modes import MODES
from parsl_aurora.publish import publish, pull
from site_configs import local

APPTAINER = shutil.which("apptainer")
HB_PERIOD, HB_THRESHOLD = local.site(local.fake_node()).heartbeat
# Generous bounds for things that must happen (a pool starting, a task finishing): the tests
# wait for the event, never assert how fast it came.
EVENTUALLY_S = 120


# ---------------------------------------------------------------- 1. encrypted by default
def _required(site: str, mode: str, tmp_path: Path) -> dict:
    # Aurora's hsn0 is not here: name the interchange's address instead.
    where = {"address": "10.1.2.3"} if site == "aurora" else {}
    if mode == "in_job":
        if site == "local":
            return where  # the fake site writes its own node file
        nodefile = tmp_path / "nodefile"
        nodefile.write_text("x1000c0s0b0n0\n")
        return {"nodefile": str(nodefile), **where}
    return {"account": "fake_project", **where}


@pytest.mark.parametrize("site", site_configs.SITES)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_encrypted_unless_told_not_to(site, mode, tmp_path, restore_environ):
    kwargs = _required(site, mode, tmp_path)
    ex = site_configs.load(site, mode, **kwargs).executors[0]
    assert ex.encrypted is True
    assert site_configs.load(site, mode, encrypted=False, **kwargs).executors[0].encrypted is False


# ---------------------------------------------------------------- 2. the attack
@contextlib.contextmanager
def interchange_without_blocks(encrypted: bool, **options):
    """A loaded multi_job config on the fake cluster whose provider never starts a block, so the
    only worker pools are the ones a test starts by hand."""
    import parsl

    config = site_configs.load("local", "multi_job", encrypted=encrypted, **options)
    ex = config.executors[0]
    ex.provider.init_blocks = ex.provider.min_blocks = ex.provider.max_blocks = 0
    dfk = parsl.load(config)
    try:
        yield ex
    finally:
        dfk.cleanup()  # also clears parsl's loaded DFK


def leave_marker(path):
    """The task: leave a marker file and say which process ran it."""
    import os

    with open(path, "w") as f:
        f.write(str(os.getpid()))
    return os.getpid()


def _marker_app():
    """leave_marker as a python app the worker can load without importing this test module
    (not on its path): a copy with globals of its own, which dill ships by value."""
    from parsl import python_app

    func = types.FunctionType(leave_marker.__code__, {"__builtins__": builtins}, "leave_marker")
    func.__module__ = "__main__"
    return python_app(func)


def _pool_command(ex, block_id: str, cert_dir: str | os.PathLike | None = "keep") -> list[str]:
    """The executor's real launch command for BLOCK_ID, with --cert_dir replaced if asked."""
    words = shlex.split(ex._get_launch_command(block_id))
    words = words[words.index("&&") + 1:]  # after `cd <driver's folder> &&`: the pool itself
    at = words.index("--cert_dir") + 1
    if cert_dir != "keep":
        words[at] = str(cert_dir)  # None -> "None": the pool then talks without CurveZMQ
    return words


# Parsl 2025.1.13's pool attaches its connection monitor only after it has connected
# (executors/high_throughput/probe.py), so on a loaded machine it can miss the connection and
# exit after address_probe_timeout with this line (Parsl #1666 saw a tenth of managers do so
# at scale). These tests are not about that: such a pool is started again.
PROBE_MISSED = "No viable address found"


def _kill(proc: subprocess.Popen) -> None:
    """Kill a pool and everything it started."""
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(proc.pid)
        family = [*parent.children(recursive=True), parent]
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(family, timeout=10)
    proc.wait(timeout=10)


def _past_probe(ex, block_id: str, proc: subprocess.Popen, misses: int) -> bool:
    """Wait until the pool has sent its registration (True), or until its manager.log, which
    every start of `block_id` appends to, holds `misses` probe misses (False)."""
    deadline = time.monotonic() + EVENTUALLY_S
    # Parsl's pool logs this right after its task thread sent the registration message.
    while "Manager threads started" not in (text := _manager_log(ex, block_id)):
        if text.count(PROBE_MISSED) >= misses:
            return False
        assert proc.poll() is None, f"{block_id} exited on start-up: {text[-2000:]}"
        assert time.monotonic() < deadline, f"{block_id} did not start: {text[-2000:]}"
        time.sleep(0.2)
    return True


@contextlib.contextmanager
def started(ex, block_id: str, words: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """Start a worker pool and wait until it is past the address probe (up to three starts);
    kill it and everything it started on the way out."""
    for attempt in range(1, 4):
        with open(log, "ab") as out:
            proc = subprocess.Popen(words, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        if _past_probe(ex, block_id, proc, misses=attempt):
            break
        _kill(proc)
    else:
        raise AssertionError(f"{block_id}: the address probe missed the interchange 3 times")
    try:
        yield proc
    finally:
        _kill(proc)


def _manager_log(ex, block_id: str) -> str:
    logs = list(Path(ex.worker_logdir).glob(f"block-{block_id}/*/manager.log"))
    return "\n".join(p.read_text() for p in logs)


def _rogue_cert_dir(ex, where: Path) -> Path:
    """What a stranger can make: a fresh client key pair, plus the server's *public* key (as if
    it had leaked) in the file layout Parsl's client reads. The real secrets stay unread."""
    where.mkdir(mode=0o700)
    where.chmod(0o700)  # Parsl refuses a certificates folder that is not 0700
    zmq.auth.create_certificates(where, "client")
    server_public, _ = zmq.auth.load_certificate(Path(ex.cert_dir) / "server.key")
    _, stranger_secret = zmq.curve_keypair()
    (where / "server.key_secret").write_text(
        f'curve\n    public-key = "{server_public.decode()}"\n'
        f'    secret-key = "{stranger_secret.decode()}"\n')
    assert (where / "client.key").read_text() != (Path(ex.cert_dir) / "client.key").read_text()
    return where


def _shut_out(ex, pool: subprocess.Popen, block_id: str, marker: Path, future) -> None:
    """POOL gets as far as sending its registration, then for several heartbeat thresholds
    it is never registered and never runs the task (`started` saw the registration sent)."""
    # An accepted pool is registered within one heartbeat period; watch for three thresholds.
    # (Shut out, Parsl's pool does not give up: its sends block on a handshake that never
    # completes, so it waits until it is killed.)
    watch_until = time.monotonic() + 3 * HB_THRESHOLD
    while time.monotonic() < watch_until:
        assert ex.connected_managers() == [], f"{block_id} registered as a manager"
        assert not marker.exists(), f"{block_id} ran the task"
        time.sleep(HB_PERIOD / 2)
    assert pool.poll() is None or "Missing contact with interchange" in _manager_log(
        ex, block_id), f"{block_id} crashed instead of waiting: {_manager_log(ex, block_id)}"
    assert ex.connected_blocks() == []
    assert not future.done()


def _runs_the_task(ex, pool: subprocess.Popen, block_id: str, marker: Path, future) -> None:
    """POOL registers and runs the task itself (the pid is one of its workers)."""
    try:
        pid = future.result(timeout=EVENTUALLY_S)
    except TimeoutError:  # say what the pool and the interchange saw
        interchange = Path(ex.logdir, "interchange.log")
        raise AssertionError(
            f"{block_id}: no result in {EVENTUALLY_S} s; alive={pool.poll() is None}; "
            f"managers={ex.connected_managers()}\nmanager.log: {_manager_log(ex, block_id)[-3000:]}"
            f"\ninterchange.log: {interchange.read_text()[-3000:] if interchange.exists() else '-'}"
        ) from None
    assert marker.read_text() == str(pid)
    assert pid in {p.pid for p in psutil.Process(pool.pid).children(recursive=True)}
    assert [m["block_id"] for m in ex.connected_managers()] == [block_id]


@pytest.mark.slow
def test_pools_without_the_runs_keys_are_shut_out(tmp_path, restore_environ):
    leave_marker = _marker_app()
    marker = tmp_path / "marker"
    with interchange_without_blocks(encrypted=True) as ex:
        assert Path(ex.cert_dir).is_dir()
        future = leave_marker(str(marker))

        # (a) No keys: Parsl's pool talks plain ZMQ to a CurveZMQ server.
        words = _pool_command(ex, "rogue-nokeys", cert_dir=None)
        assert words[words.index("--cert_dir") + 1] == "None"
        with started(ex, "rogue-nokeys", words, tmp_path / "nokeys.out") as pool:
            _shut_out(ex, pool, "rogue-nokeys", marker, future)

        # (b) Wrong keys: its own client pair, and the server's public key.
        rogue = _rogue_cert_dir(ex, tmp_path / "rogue-certs")
        words = _pool_command(ex, "rogue-wrongkeys", cert_dir=rogue)
        with started(ex, "rogue-wrongkeys", words, tmp_path / "wrongkeys.out") as pool:
            _shut_out(ex, pool, "rogue-wrongkeys", marker, future)

        # Control: the same command with this run's certificates registers and runs the task.
        with started(ex, "good", _pool_command(ex, "good"), tmp_path / "good.out") as pool:
            _runs_the_task(ex, pool, "good", marker, future)
    assert no_leftovers(tmp_path) == []


@pytest.mark.slow
def test_without_encryption_a_keyless_pool_gets_the_task(tmp_path, restore_environ):
    """The same keyless pool as above, against encrypted=False: it is let in, so the test
    above really tells encryption from a pool that cannot connect at all."""
    leave_marker = _marker_app()
    marker = tmp_path / "marker"
    with interchange_without_blocks(encrypted=False) as ex:
        assert ex.cert_dir is None
        future = leave_marker(str(marker))
        words = _pool_command(ex, "rogue-nokeys", cert_dir=None)
        with started(ex, "rogue-nokeys", words, tmp_path / "nokeys.out") as pool:
            _runs_the_task(ex, pool, "rogue-nokeys", marker, future)
    assert no_leftovers(tmp_path) == []


def test_the_interchange_listens_on_the_workers_address_only(tmp_path, restore_environ):
    """What the interchange exposes: two ports for pools, in 54000-55000, on the address
    workers connect to (Aurora: hsn0's), and nothing on any other address."""
    with interchange_without_blocks(encrypted=True, address="127.0.0.2"):
        interchange = next(p for p in psutil.Process().children(recursive=True)
                           if "interchange" in " ".join(p.cmdline()))
        # ZMQ listens on IPv6 sockets: an IPv4 address shows as ::ffff:a.b.c.d.
        listening = sorted((c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)
                           for c in interchange.net_connections("tcp")
                           if c.status == psutil.CONN_LISTEN)
    assert len(listening) == 2, listening  # tasks out, results in: nothing else
    assert all(ip == "127.0.0.2" and 54000 <= port <= 55000 for ip, port in listening), listening


def test_the_monitoring_router_listens_on_every_address(tmp_path, restore_environ):
    """What monitoring=True exposes, outside encryption: Parsl 2025.1.13's router takes UDP on
    0.0.0.0 and ZMQ on every address in 55050-56000, whatever the hub's address."""
    with interchange_without_blocks(encrypted=True, monitoring=True):
        sockets = [c for p in psutil.Process().children(recursive=True)
                   for c in p.net_connections("inet")
                   if c.status in (psutil.CONN_LISTEN, psutil.CONN_NONE)]
    udp = [c.laddr for c in sockets if c.type == socket.SOCK_DGRAM]
    tcp = [c.laddr for c in sockets
           if c.type == socket.SOCK_STREAM and 55050 <= c.laddr.port <= 56000]
    assert [a.ip for a in udp] == ["0.0.0.0"], sockets
    assert [a.ip for a in tcp] in (["::"], ["0.0.0.0"]), sockets


# ---------------------------------------------------------------- 3. file modes
@contextlib.contextmanager
def loose_umask() -> Iterator[None]:
    """Umask 000 here and in the tools started meanwhile: modes must not depend on it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certificates_folder_is_private(tmp_path, restore_environ):
    with interchange_without_blocks(encrypted=True) as ex:
        cert_dir = Path(ex.cert_dir)
        # Made per run: <run_dir>/<NNN>/<label>/certificates.
        assert cert_dir.parent == Path(ex.logdir)
        assert cert_dir.parent.parent.parent == (tmp_path / "runinfo")
        assert _mode(cert_dir) == 0o700
        assert cert_dir.stat().st_uid == os.getuid()
        names = sorted(p.name for p in cert_dir.iterdir())
        assert names == ["client.key", "client.key_secret", "server.key", "server.key_secret"]


@pytest.mark.parametrize("mode", [0o750, 0o755, 0o711])
def test_a_certificates_folder_others_can_enter_is_refused(tmp_path, mode):
    """Parsl's client (what a pool uses) reads keys only from a 0700 folder."""
    from parsl import curvezmq

    cert_dir = Path(curvezmq.create_certificates(tmp_path))
    context = curvezmq.ClientContext(cert_dir)
    try:
        context.socket(zmq.DEALER).close()  # 0700, as Parsl made it: the keys load
        cert_dir.chmod(mode)
        with pytest.raises(OSError, match="certificates directory must be private"):
            context.socket(zmq.DEALER)
    finally:
        context.term()


def test_each_run_makes_new_keys(tmp_path, restore_environ):
    runs = []
    for _ in range(2):  # runinfo/000, then runinfo/001
        with interchange_without_blocks(encrypted=True) as ex:
            # The key pairs, not the files (pyzmq writes its creation time into them).
            runs.append([zmq.auth.load_certificate(Path(ex.cert_dir) / f"{who}.key_secret")
                         for who in ("server", "client")])
    assert all(public and secret for public, secret in runs[0] + runs[1])
    assert not {key for pair in runs[0] for key in pair} & {key for pair in runs[1] for key in pair}


def test_secret_key_files_are_out_of_other_users_reach_whatever_the_umask(monkeypatch,
                                                                         restore_environ):
    # pyzmq writes *.key_secret with the process umask (0666 under 000, 0644 under 022): only
    # Parsl's 0700 folder keeps other users from them, so that must hold under umask 000 too.
    # The run goes where others may pass (pytest's own folders are private: they would hide
    # a readable key).
    import tempfile

    run = Path(tempfile.mkdtemp(prefix="parsl-aurora-keys-", dir="/tmp"))
    run.chmod(0o755)
    monkeypatch.chdir(run)
    try:
        _keys_out_of_reach()
    finally:
        shutil.rmtree(run, ignore_errors=True)


def _keys_out_of_reach() -> None:
    with loose_umask(), interchange_without_blocks(encrypted=True) as ex:
        cert_dir = Path(ex.cert_dir)
        secrets = sorted(cert_dir.glob("*.key_secret"))
        assert len(secrets) == 2
        # pyzmq writes the keys with the umask (0644 under the usual 022): the folder alone
        # keeps them private.
        assert {_mode(p) for p in secrets} == {0o666}
        assert _mode(cert_dir) == 0o700 and cert_dir.stat().st_uid == os.getuid()
        if os.geteuid() == 0:  # CI: ask as another user, as an attacker on the login node would
            for path in secrets:
                other = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(path)],
                                       capture_output=True, text=True, check=False)
                assert other.returncode != 0 and "Permission denied" in other.stderr, other


def test_install_image_sets_owner_only_write(tmp_path):
    """The last step of `image build` and of `pull`: whatever mode the tool left."""
    src = tmp_path / ".aurora.sif.partial"
    src.write_bytes(b"SIF")
    src.chmod(0o777)
    dest = tmp_path / "aurora.sif"
    dest.write_bytes(b"old")
    dest.chmod(0o666)
    with loose_umask():
        build.install_image(src, dest)
    assert not src.exists()
    assert dest.read_bytes() == b"SIF"
    assert _mode(dest) == inputs.IMAGE_MODE == 0o755


@needs_apptainer
def test_built_image_is_not_group_or_world_writable(built_image):
    assert _mode(built_image) & 0o022 == 0, oct(_mode(built_image))


@pytest.mark.needs("apptainer", "registry")
@pytest.mark.needs("apptainer", "registry")
def test_pulled_and_published_images_are_not_world_writable(request, tmp_path):
    """Under umask 000 apptainer pull leaves a 0777 file; publish kept any mode it found."""
    registry = request.getfixturevalue("factory_registry")
    priv, pub = request.getfixturevalue("data_keys")["good"]
    image = request.getfixturevalue("data_image")
    out_dir = tmp_path / "pulled"
    out_dir.mkdir()
    out = out_dir / "aurora.sif"
    image.chmod(0o666)  # a world-writable image, signed in place by publish
    with loose_umask():
        _, sha = publish(image, registry, priv, tag="t1", insecure=True)
        assert _mode(image) == 0o664  # the owner's mode, less world-write
        assert pull(registry, "t1", pub, out=out, insecure=True) == sha
    assert _mode(out) == inputs.IMAGE_MODE
    # The signed sha256 (a side SIF) and the signing copy lived only in private temporary
    # folders, removed afterwards: nothing else is left beside either image.
    assert sorted(p.name for p in out_dir.iterdir()) == ["aurora.sif"]
    assert sorted(p.name for p in image.parent.iterdir()
                  if p.name.startswith(".") or "sha256" in p.name) == []


# ---------------------------------------------------------------- 4. no secret in the image
PEM_PRIVATE = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----[^-]{0,200}?"
                         rb"[A-Za-z0-9+/]{40}")
CURVE_SECRET = re.compile(rb'secret-key\s*=\s*"[^"\n]{40}"')
PUTTY_KEY = re.compile(rb"PuTTY-User-Key-File-\d+: ")
SECRET_NAMES = re.compile(r"(\.key_secret|^id_(rsa|dsa|ecdsa|ed25519)(_sk)?|^ssh_host_.*_key|"
                          r"^pgp-secret)$")
# Credentials in a URL (user:password@host), e.g. a proxy or mirror from the build host.
URL_CREDENTIALS = re.compile(rb"\b[a-z][a-z0-9+.-]*://[^/\s:@\"'<>]+:[^/\s@\"'<>]+@")

ALLOWED = {
    # GnuTLS's FIPS power-on self-tests (lib/crypto-selftests-pk.c) compile fixed, published
    # test-vector keys (RSA, DSA, EC, GOST) into the library: Debian's libgnutls30, pulled in
    # by apt itself; no key of ours. A new GnuTLS changes the name: look again, then update.
    "usr/lib/x86_64-linux-gnu/libgnutls.so.30.34.3",
}


def secrets_in(data: bytes, name: str) -> list[str]:
    found = [what for what, rx in (("PEM private key", PEM_PRIVATE),
                                   ("CurveZMQ secret key", CURVE_SECRET),
                                   ("PuTTY private key", PUTTY_KEY)) if rx.search(data)]
    if SECRET_NAMES.search(name):
        found.append("secret-key file name")
    return found


def scan_tree(root: Path) -> dict[str, list[str]]:
    """Relative path -> what looks secret, for every regular file below ROOT."""
    hits = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            if path.is_symlink() or not path.is_file():
                continue
            found = secrets_in(path.read_bytes(), name)
            if found:
                hits[str(path.relative_to(root))] = found
    return hits


def test_scanner_finds_real_keys(tmp_path):
    """The scanner is not vacuous: it flags keys made the way publish and Parsl make them."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    subprocess.run(["openssl", "genrsa", "-out", tree / "etc" / "sign.pem", "2048"],
                   check=True, capture_output=True)  # a publish signing key
    zmq.auth.create_certificates(tree / "etc", "server")  # what Parsl's certificates hold
    (tree / "etc" / "renamed.txt").write_text((tree / "etc" / "server.key_secret").read_text())
    if shutil.which("ssh-keygen"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        tree / "etc" / "id_ed25519"], check=True, capture_output=True)
    (tree / "etc" / "public.pem").write_bytes(subprocess.run(
        ["openssl", "rsa", "-in", tree / "etc" / "sign.pem", "-pubout"], check=True,
        capture_output=True).stdout)
    hits = scan_tree(tree)
    assert hits.pop("etc/sign.pem") == ["PEM private key"]
    assert hits.pop("etc/server.key_secret") == ["CurveZMQ secret key", "secret-key file name"]
    assert hits.pop("etc/renamed.txt") == ["CurveZMQ secret key"]
    if shutil.which("ssh-keygen"):
        assert hits.pop("etc/id_ed25519") == ["PEM private key", "secret-key file name"]
    assert hits == {}  # public keys are fine
    # Source that merely names the markers (cryptography, PyJWT) is not a key.
    assert secrets_in(b'_SK_START = b"-----BEGIN OPENSSH PRIVATE KEY-----"\n'
                      b'_SK_END = b"-----END OPENSSH PRIVATE KEY-----"\n', "ssh.py") == []


def _sif_object(sif: Path, kind: str) -> str:
    listing = subprocess.run([APPTAINER, "sif", "list", str(sif)], check=True,
                             capture_output=True, text=True).stdout
    return next(ln.split("|")[0].strip() for ln in listing.splitlines() if f"|{kind}" in ln)


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory, built_image) -> Path:
    """The built image's root file system, unpacked (read-only copy of nothing on the host).

    unsquashfs comes with squashfs-tools, which apptainer needs to build images at all.
    """
    work = tmp_path_factory.mktemp("image-fs")
    squashfs = work / "fs.squashfs"
    with open(squashfs, "wb") as out:
        subprocess.run([APPTAINER, "sif", "dump", _sif_object(built_image, "FS"),
                        str(built_image)],
                       stdout=out, check=True)
    subprocess.run(["unsquashfs", "-no-xattrs", "-q", "-d", str(work / "root"), str(squashfs)],
                   check=True, capture_output=True)
    squashfs.unlink()
    return work / "root"


@needs_apptainer
def test_image_file_system_holds_no_private_key(image_tree):
    assert (image_tree / "opt" / "aurora-env" / "bin" / "python").exists()  # really unpacked
    hits = scan_tree(image_tree)
    stale = ALLOWED - set(hits)
    assert {p: w for p, w in hits.items() if p not in ALLOWED} == {}, (
        "secret-looking files in aurora.sif: find out what each is; allow it by exact path "
        "above, with the reason, only if it is public")
    assert not stale, f"allowed but no longer present (drop from ALLOWED): {stale}"


@needs_apptainer
def test_image_metadata_holds_no_credentials(image_tree, built_image):
    """The def file (build arguments filled in), labels and environment, inside and beside
    the file system: no keys, no user:password@ in a mirror or proxy URL."""
    texts = {str(p.relative_to(image_tree)): p.read_bytes()
             for p in (image_tree / ".singularity.d").rglob("*") if p.is_file()}
    for kind in ("Def.FILE", "JSON.Generic"):
        texts[kind] = subprocess.run([APPTAINER, "sif", "dump", _sif_object(built_image, kind),
                                      str(built_image)], check=True, capture_output=True).stdout
    assert b"Bootstrap:" in texts["Def.FILE"]
    for name, data in texts.items():
        assert secrets_in(data, name) == [], name
        assert not URL_CREDENTIALS.search(data), f"{name}: {URL_CREDENTIALS.search(data)[0]!r}"


def test_build_copies_nothing_but_the_wheelhouse():
    """What a build can see of the host: each definition's %files (its wheelhouse only), no
    %setup (it would run on the host), no bind in the build options."""
    for definition in (inputs.DEF, inputs.BASE_DEF, inputs.EXTRA_DEF):
        sections: dict[str, list[str]] = {}
        current = None
        for line in (ROOT / definition).read_text().splitlines():
            if line.startswith("%"):
                current = line.split()[0]
                sections[current] = []
            elif current and line.strip() and not line.strip().startswith("#"):
                sections[current].append(line.strip())
        assert sections["%files"] == ["{{ WHEELHOUSE }} /opt/wheelhouse"], definition
        assert "%setup" not in sections, definition
        assert "rm -rf /opt/wheelhouse" in " ".join(sections["%post"]), definition
    args = inputs.build_args(python="3.11", base_sif=inputs.base_path("3.11", "0" * 64),
                          pyproject_text=(ROOT / "pyproject.toml").read_text(),
                          lock_text=b"", git_commit="c", source_date_epoch=0, stamp="s")
    options = inputs.build_options(args)
    assert not {"--bind", "-B", "--mount", "--writable-tmpfs"} & set(options)
    assert [o for o in options if o.startswith("--")] == (
        ["--fakeroot", "--force", "--mksquashfs-args"] + ["--build-arg"] * len(args))


def test_project_sources_hold_no_key_files():
    """The project wheel is made from these (image.SOURCES): no key may sit among them."""
    files = {Path(p) for pattern in inputs.SOURCES
             for p in ROOT.glob(pattern) if Path(p).is_file()}
    assert files, "no sources found"
    hits = {str(p.relative_to(ROOT)): secrets_in(p.read_bytes(), p.name)
            for p in files if "__pycache__" not in p.parts}
    assert {p: w for p, w in hits.items() if w} == {}


@needs_apptainer
def test_wheelhouse_holds_only_wheels_without_keys(built_image):
    """What %files copied into the last builds: locked wheels, the lock split by where each
    package goes, the project's wheel; no member of any wheel is a key."""
    wheelhouse = built_image.parent / inputs.WHEELHOUSE  # the checkout it was built in
    copied = [p for layer in ("base", "project", "extra") for p in wheelhouse.glob(f"{layer}/*")]
    entries = sorted(p.relative_to(wheelhouse).as_posix() for p in copied)
    assert [e for e in entries if not e.endswith(".whl") and e not in (
        "base/default.txt", "base/monitoring.txt", "extra/extra.lock")] == []
    assert any(e.startswith("project/parsl_aurora-") for e in entries)
    hits = {}
    for wheel in (p for p in copied if p.suffix == ".whl"):
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                found = secrets_in(z.read(member), Path(member).name)
                if found:
                    hits[f"{wheel.name}:{member}"] = found
    assert hits == {}


# ---------------------------------------------------------------- the PBS bridge
# `parsl-aurora pbs-bridge` runs PBS commands for whoever reaches its socket: it must run only
# qsub, qstat and qdel, never through a shell, and only for the user who started it.
STAND_IN_QSUB = '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "{log}"\necho 1.server\n'
# The image-side client's protocol, in Debian's own python3 (nobody cannot run this venv's).
RAW_CLIENT = """import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
try:
    s.sendall(json.dumps({"argv": ["qsub", "job.sh"], "cwd": "/"}).encode() + b"\\n")
    print(s.makefile("rb").readline().decode() or "no reply")
except (BrokenPipeError, ConnectionResetError):  # closed unread: refused
    print("no reply")
"""


@pytest.fixture
def bridged_qsub(tmp_path, monkeypatch) -> Path:
    """A stand-in qsub first on the bridge's PATH, logging its arguments one a line."""
    log = tmp_path / "qsub.args"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "qsub").write_text(STAND_IN_QSUB.format(log=log))
    (bin_dir / "qsub").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_bridge_passes_arguments_to_pbs_without_a_shell(tmp_path, bridged_qsub, monkeypatch,
                                                        capsys):
    from parsl_aurora import bridge

    server = bridge.serve(str(tmp_path / "pbs.sock"))
    monkeypatch.setenv(bridge.ENV, str(tmp_path / "pbs.sock"))
    try:
        tricks = ["job.sh; touch pwned1", "$(touch pwned2)", "`touch pwned3`", "a|touch pwned4"]
        assert bridge.client(["qsub", *tricks]) == 0
        assert capsys.readouterr().out == "1.server\n"
        assert bridged_qsub.read_text().splitlines() == tricks  # each argument as it was
        assert bridge.client(["sh", "-c", "touch pwned5"]) == 2
        assert "only qsub, qstat, qdel" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()
    assert not list(tmp_path.rglob("pwned*")) and not list(Path.cwd().rglob("pwned*"))


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root (CI is)")
def test_bridge_serves_only_the_user_who_started_it(bridged_qsub):
    import tempfile

    from parsl_aurora import bridge

    # A socket anyone could reach, so that only the bridge's own check turns nobody away.
    folder = Path(tempfile.mkdtemp(prefix="parsl-aurora-bridge-test-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        sock = folder / "pbs.sock"
        server = bridge.serve(str(sock))
        sock.chmod(0o777)
        try:
            ask = ["/usr/bin/python3", "-c", RAW_CLIENT, str(sock)]
            other = subprocess.run(["runuser", "-u", "nobody", "--", *ask], capture_output=True,
                                   text=True, check=False)
            assert other.stdout.strip() == "no reply", other.stdout + other.stderr
            assert not bridged_qsub.exists()  # nothing was run for nobody
            me = subprocess.run(ask, capture_output=True, text=True, check=False)
            assert '"rc": 0' in me.stdout and bridged_qsub.read_text() == "job.sh\n"
        finally:
            server.shutdown()
            server.server_close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_bridge_socket_folder_is_private_whatever_the_umask():
    from parsl_aurora import bridge

    probe = ('d=$(dirname "$PARSL_AURORA_PBS_BRIDGE"); test -S "$PARSL_AURORA_PBS_BRIDGE" && '
             'test "$APPTAINERENV_PARSL_AURORA_PBS_BRIDGE" = "$PARSL_AURORA_PBS_BRIDGE" && '
             'stat -c "%a %u" "$d" > seen && echo "$d" >> seen')
    with loose_umask():
        assert bridge.run_bridged(["sh", "-c", probe]) == 0
    mode_owner, folder = Path("seen").read_text().splitlines()
    assert mode_owner == f"700 {os.getuid()}"
    assert not Path(folder).exists()  # gone with the command
