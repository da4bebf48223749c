"""The command line and the one-line errors, through real processes: `--set` values read as
the factory's declared types, registry names checked the way apptainer reads them, and an
AuroraError in a user's own script printed as one line without a `run_main` wrapper.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import serve_registry, tiny_sif

BIN = Path(sys.executable).parent
CLI = str(BIN / "parsl-aurora")


def run(*cmd: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PARSL_")}
    return subprocess.run(list(cmd), cwd=cwd, env={**full, **env}, capture_output=True,
                          text=True, timeout=300, check=False)


# ---------------------------------------------------------------- --set reads declared types
def test_set_account_of_digits_stays_a_project_name(tmp_path):
    r = run(CLI, "render", "aurora", "multi_job", "--set", "account=12345", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "# qsub  -q debug -A 12345 <script_dir>/parsl.htex_tiles.block-0"


def test_set_reads_integers_and_booleans_by_type(tmp_path):
    r = run(CLI, "render", "aurora", "multi_job", "--set", "account=P", "--set", "max_jobs=3",
            "--set", "queue=capacity", "--set", "encrypted=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # encrypted=false: no CurveZMQ keys for the pools (a string 'false' would be truthy).
    assert "--cert_dir None" in r.stdout, r.stdout


@pytest.fixture(scope="session")
def matching_image(tmp_path_factory) -> Path:
    """A tiny SIF whose labels say it holds this Parsl and Python, so a config may run
    workers in it."""
    return tiny_sif(tmp_path_factory.mktemp("matching-image"), {
        "org.parsl-project.parsl.version": version("parsl"),
        "parsl-aurora.python": f"{sys.version_info[0]}.{sys.version_info[1]}"})


@pytest.mark.needs("apptainer")
@pytest.mark.parametrize("value,binds", [
    ("/opt/aurora", ["/opt/aurora"]),  # one path is one bind, not one per character
    ("/opt/aurora,/scratch:/data", ["/opt/aurora", "/scratch:/data"]),
])
def test_set_binds_one_path_or_comma_separated(tmp_path, matching_image, value, binds):
    shutil.copyfile(matching_image, tmp_path / "ok.sif")
    r = run(CLI, "render", "local", "multi_job", "--set", "container=ok.sif",
            "--set", f"binds={value}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # The block binds, of these, what its compute node has.
    words = next(line for line in r.stdout.splitlines() if line.startswith("for b in "))
    assert words == f"for b in {tmp_path / 'runinfo'} {tmp_path} {' '.join(binds)}; do", words
    assert f"apptainer exec {tmp_path / 'ok.sif'} " in r.stdout, r.stdout


# ---------------------------------------------------------------- registry names
@pytest.mark.needs("apptainer", "registry")
def test_pull_from_a_host_without_a_dot(tmp_path, data_keys, data_tiny_sif):
    """`localhost:PORT/REPO` is a registry of its own, not a Docker Hub repository."""
    from parsl_aurora.publish import publish

    priv, pub = data_keys["good"]
    image = tmp_path / "aurora.sif"
    shutil.copyfile(data_tiny_sif, image)
    (tmp_path / "registry").mkdir()
    with serve_registry(tmp_path / "registry") as repo:
        local = repo.replace("127.0.0.1:", "localhost:").split("/")[0] + "/aurora"
        publish(image, local, priv, tag="t1", insecure=True)
        r = run(CLI, "pull", local, "t1", "--verify-key", str(pub), "--out", "pulled.sif",
                "--insecure", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "pulled.sif").read_bytes() == image.read_bytes()


# ---------------------------------------------------------------- errors in users' scripts
SCRIPTS = {
    # What a user writes: load() without the account it needs.
    "load": """
        import site_configs
        site_configs.load("aurora", "multi_job")
    """,
    # README's way: a site's factory called directly, outside load().
    "factory": """
        from site_configs import aurora
        aurora.multi_job(account="P", queue="debug", nodes_per_job=4)
    """,
    # A workflow's own check, with the bundle's error class.
    "own": """
        from parsl_aurora.errors import ConfigError
        raise ConfigError("samples", 0, "1 or more", "pass --samples 10")
    """,
    # A task future of an executor that an AuroraError put in a bad state.
    "bad-state": """
        from parsl.executors import HighThroughputExecutor
        from parsl.executors.errors import BadStateException
        from parsl_aurora.errors import ImageError
        executor = HighThroughputExecutor(label="htex_tiles")
        executor.set_bad_state_and_fail_all(ImageError("image x.sif vanished; rebuild it"))
        raise BadStateException(executor, executor.executor_exception)
    """,
}
FIRST_LINES = {
    "load": "account=None is not valid: expected a value (aurora.multi_job requires it). "
            "Fix: pass account=... or set PARSL_ACCOUNT",
    "factory": "nodes_per_job=4 is not valid: expected 1-2 nodes in queue 'debug'.",
    "own": "samples=0 is not valid: expected 1 or more. Fix: pass --samples 10",
    "bad-state": "image x.sif vanished; rebuild it",
}


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "my_workflow.py"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_users_script_prints_our_error_as_one_line(tmp_path, name):
    r = run(sys.executable, str(_script(tmp_path, SCRIPTS[name])), cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # Python's status for an uncaught exception
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"my_workflow.py: error: {FIRST_LINES[name]}"), \
        r.stderr


def test_debug_shows_the_traceback(tmp_path):
    r = run(sys.executable, str(_script(tmp_path, SCRIPTS["load"])), cwd=tmp_path,
            PARSL_AURORA_DEBUG="1")
    assert r.returncode == 1
    assert r.stderr.startswith("Traceback"), r.stderr
    assert r.stderr.rstrip().endswith(FIRST_LINES["load"]), r.stderr


def test_the_commands_debug_flag_shows_the_traceback(tmp_path):
    r = run(CLI, "--debug", "render", "polaris", "multi_job", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("Traceback"), r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith(
        "parsl_aurora.errors.ConfigError: site='polaris' is not valid"), r.stderr


def test_other_exceptions_reach_the_hook_there_was(tmp_path):
    """The script's own hook, set before the bundle's, still handles everything else."""
    script = _script(tmp_path, """
        import sys
        sys.excepthook = lambda kind, value, tb: print("my hook:", kind.__name__, value)
        from parsl_aurora.errors import ConfigError
        try:
            raise ConfigError("x", 1, "2", "pass x=2")
        except ConfigError:
            pass
        raise KeyError("k")
    """)
    r = run(sys.executable, str(script), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout == "my hook: KeyError 'k'\n" and r.stderr == "", (r.stdout, r.stderr)


def test_other_exceptions_keep_their_traceback(tmp_path):
    script = _script(tmp_path, """
        from parsl_aurora.errors import ConfigError
        try:
            raise ConfigError("x", 1, "2", "pass x=2")
        except ConfigError:
            pass
        raise KeyError("k")
    """)
    r = run(sys.executable, str(script), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("Traceback") and r.stderr.rstrip().endswith("KeyError: 'k'")


def test_run_main_prints_a_bad_state_error_as_one_line(tmp_path):
    body = textwrap.indent(textwrap.dedent(SCRIPTS["bad-state"]), "    ")
    script = _script(tmp_path, "import sys\nfrom parsl_aurora.errors import run_main\n"
                     f"def main():\n{body}\nsys.exit(run_main(main))\n")
    r = run(sys.executable, str(script), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"my_workflow.py: error: {FIRST_LINES['bad-state']}\n", r.stderr
