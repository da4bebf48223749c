"""docs/aurora.md, run: every command block and file of the guide, in order, on the fake
cluster, so the guide cannot fall behind the code.

Blocks whose info string says `aurora` hold lines that only work on Aurora; SUBSTITUTE says what
runs in their place and why (the guide prints the same table), and every entry must still match
a line of the guide. Blocks marked `image` need Apptainer and run in their own test. The test
waits where a person would (WAIT), and checks what a person would look at.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from clusters import wait_for
from conftest import LMOD_PKG, ROOT, copy_checkout, leftovers, serve_registry

from parsl_aurora import runs

GUIDE = ROOT / "docs" / "aurora.md"
FENCE = re.compile(r"^```(\S*)(.*)$")
# What runs on the fake cluster in place of what only works on Aurora: (a regex matching a whole
# command of an `aurora` block, what runs instead, why). {copy}, {registry}, {tag}, {key} and
# {fake_qstat} are filled in by the test.
SUBSTITUTE = [
    (r"module load python/3.12.12 apptainer", "true",
     "no such modules here: the machine's python3 and apptainer are on PATH"),
    (r"export WORK=/lus/flare/projects/\$PROJECT/\$USER", "export WORK=$HOME/flare",
     "no Flare here: a folder in the scratch HOME stands in for the project's"),
    (r"git clone <url-of-this-repository> \$WORK/parsl-aurora", "{copy}",
     ("a copy of the checkout under test (working tree, uncommitted changes included), and of "
      "the image the session built from it, so `make image` finds it up to date")),
    (r"pip install \$WORK/parsl-aurora", 'pip install -q "$WORK/parsl-aurora[fake]"',
     "the fake PALS mpiexec starts ranks with MPICH"),
    (r"qsub -I .*", "true", "this machine stands in for the compute node"),
    (r"exit", "true", "no interactive job to leave"),
    (r"export (HTTP_PROXY|http_proxy|no_proxy)=.*", "true",
     "this machine reaches its package registries directly; ALCF's proxy does not resolve here"),
    (r"make pull REGISTRY=oras://<registry>/<repo> TAG=<tag> VERIFY_KEY=<publisher.pem>",
     "make pull REGISTRY={registry} TAG={tag} VERIFY_KEY={key} INSECURE=1",
     "a loopback registry the test published the image to"),
    (r"export PARSL_SITE=aurora (.*)", r"export PARSL_SITE=local \1", "the fake cluster"),
    (r"parsl-aurora check --site aurora (.*)", r"parsl-aurora check --site local \1",
     "the fake cluster's site; this machine stands in for the compute node"),
    (r"qstat -u \$USER", "{fake_qstat} -u $USER",
     "the fake PBS is no command on PATH: the local site puts it on the driver's"),
]
SUM = sum(i * i for i in range(24))  # what campaign.py prints at the end


@dataclass
class Block:
    section: str
    tags: frozenset[str]
    text: str
    file: str = ""  # a python block with title="NAME": written to NAME


def blocks(markdown: str) -> list[Block]:
    """The guide's ```bash blocks and ```python title="..." files, in order."""
    out, section, current, lines = [], "", None, []
    for line in markdown.splitlines():
        if current is None:
            if line.startswith("## "):
                section = line[3:].split(".")[0]
            m = FENCE.match(line)
            if m:
                current, lines = (m.group(1), m.group(2).strip()), []
            continue
        if line.startswith("```"):
            lang, info = current
            title = re.search(r'title="([^"]+)"', info)
            if lang == "bash":
                out.append(Block(section, frozenset(info.split()), "\n".join(lines)))
            elif lang == "python" and title:
                out.append(Block(section, frozenset(), "\n".join(lines) + "\n", title.group(1)))
            current = None
            continue
        lines.append(line)
    return out


def commands(block: Block) -> list[str]:
    """One command per line (comments and blank lines left out)."""
    out = []
    for line in block.text.replace("\\\n", " ").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            out.append(line.strip())
    return out


def _bare(command: str) -> str:
    # The command without its trailing comment, as the table's patterns read it.
    return re.sub(r"\s+#\s.*$", "", command)


def substitute(command: str, values: dict) -> str:
    """What runs for one command of an `aurora` block: the table's replacement, or itself."""
    bare = _bare(command)
    for pattern, instead, _ in SUBSTITUTE:
        m = re.fullmatch(pattern, bare)
        if m:
            return m.expand(instead).format(**values)
    return command


# ---------------------------------------------------------------- the guide, read
def test_substitutions_all_apply_and_only_in_aurora_blocks():
    """Each table entry matches a command of an `aurora` block, and none matches elsewhere:
    the marks in the guide say exactly where the test runs something else."""
    guide = blocks(GUIDE.read_text())
    used = set()
    for b in guide:
        for command in commands(b):
            hits = [p for p, _, _ in SUBSTITUTE if re.fullmatch(p, _bare(command))]
            assert len(hits) <= 1, (command, hits)
            if hits and "aurora" not in b.tags:
                pytest.fail(f"{command!r} only works on Aurora: mark its block `aurora`")
            used.update(hits)
    assert sorted({p for p, _, _ in SUBSTITUTE} - used) == [], "stale SUBSTITUTE entries"
    files = [b.file for b in guide if b.file]
    assert files == ["campaign.py"]
    # The table in the guide lists the same substitutions.
    assert "| On Aurora | On the fake cluster | Why |" in GUIDE.read_text()


# ---------------------------------------------------------------- running it
class Shell:
    """Commands run one at a time, each in a fresh bash that starts from the exported
    variables and working folder the previous one left (as one terminal session would)."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.state, self.cwd = folder / "shell.env", folder / "shell.cwd"
        self.env = env
        self.state.write_text("")
        self.cwd.write_text(env["HOME"])
        self.log: list[str] = []

    def run(self, command: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        script = (f'source {self.state}\ncd "$(cat {self.cwd})"\n{command}\nrc=$?\n'
                  f"export -p > {self.state}.new && mv {self.state}.new {self.state}\n"
                  f"pwd > {self.cwd}\nexit $rc\n")
        out = subprocess.run(["bash", "-c", script], env=self.env, capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        self.log.append(f"$ {command}\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        assert out.returncode == 0, "\n".join(self.log[-3:])
        return out

    @property
    def here(self) -> Path:
        return Path(self.cwd.read_text().strip())


def _environment(home: Path, scratch: Path) -> dict[str, str]:
    """A login shell's environment: this machine's own configuration for package indexes and
    nothing of the test's Python."""
    keep = {k: v for k, v in os.environ.items()
            if k.startswith(("PIP_", "UV_", "SSL_CERT_")) or k == "REQUESTS_CA_BUNDLE"
            or k.lower() in ("http_proxy", "https_proxy", "no_proxy")}
    user = os.environ.get("USER", "root")
    return {**keep, "HOME": str(home), "USER": user, "LOGNAME": user, "LANG": "C.UTF-8",
            "PATH": "/usr/local/bin:/usr/bin:/bin", "TMUX_TMPDIR": str(scratch),
            # Lmod, as Aurora's login shells have it (Debian's profile.d sets BASH_ENV so), with
            # the fake cluster's look-alike of ALCF's frameworks on MODULEPATH.
            "BASH_ENV": str(LMOD_PKG / "init" / "bash"),
            "MODULEPATH": str(ROOT / "src" / "parsl_aurora" / "fake" / "modulefiles"),
            # Progress lines every 2 s instead of 60, so they come within the test's minutes.
            "PARSL_AURORA_PROGRESS_EVERY": "2"}


def _fake_qstat() -> str:
    return ('PARSL_AURORA_FAKE_DIR=$PWD/runinfo/fake PARSL_AURORA_PYTHON=$VIRTUAL_ENV/bin/python '
            '"$(python -c "from parsl_aurora import fake; print(fake.bin_dir())")/qstat"')


@dataclass
class Guide:
    shell: Shell
    home: Path
    values: dict
    outputs: dict  # command -> its stdout, the last time it ran

    def run(self, block: Block, waits: dict | None = None) -> None:
        if block.file:
            (self.shell.here / block.file).write_text(block.text)
            return
        for command in commands(block):
            for key, wait in (waits or {}).items():
                if command.startswith(key):
                    wait(self)
            line = substitute(command, self.values) if "aurora" in block.tags else command
            self.outputs[command] = self.shell.run(line).stdout


@pytest.fixture
def guide(tmp_path) -> Guide:
    scratch = tmp_path
    home = scratch / "home"
    home.mkdir(parents=True)
    copy = home / "flare" / "parsl-aurora"
    values = {"copy": f"mkdir -p {copy} && cp -a {tmp_path / 'checkout'}/. {copy}/",
              "fake_qstat": _fake_qstat(), "registry": "", "tag": "", "key": ""}
    (tmp_path / "checkout").mkdir()
    g = Guide(Shell(scratch, _environment(home, scratch)), home, values, {})
    yield g
    # Whatever the guide started and a failed run left behind: the tmux server, drivers, jobs.
    subprocess.run(["tmux", "kill-server"], env=g.shell.env, capture_output=True, check=False)
    for line in leftovers(scratch):
        os.kill(int(line.split(":")[0]), signal.SIGKILL)


def submitted(run_dir: Path) -> str:
    """The first PBS script a run submitted."""
    tag = runs.read_record(run_dir)["run_tag"]
    return next(p for p in sorted((run_dir / "submit_scripts").glob(f"{tag}.*"))
                if not p.suffix[1:].startswith("std")).read_text()


def checkpointed(run_dir: Path) -> int:
    """Task results in one run's checkpoint (a record being appended is not counted yet)."""
    import pickle

    count = 0
    try:
        with (run_dir / "checkpoint" / "tasks.pkl").open("rb") as f:
            while True:
                try:
                    pickle.load(f)
                except (EOFError, pickle.UnpicklingError, ValueError):
                    return count
                count += 1
    except OSError:
        return count


def _progress_started(g: Guide) -> None:
    log = g.shell.here / "campaign.log"

    def started() -> bool:
        text = log.read_text() if log.exists() else ""
        assert ": error: " not in text and "Traceback" not in text, text[-3000:]
        return " tasks: " in text

    wait_for(started, "a progress line", 600)


def _twelve_done(g: Guide) -> None:
    run_dir = g.shell.here / "runinfo" / "000"
    wait_for(lambda: checkpointed(run_dir) >= 12, "12 finished tasks", 600)


def _driver_gone(g: Guide) -> None:
    pid = runs.read_record(g.shell.here / "runinfo" / "000")["pid"]
    wait_for(lambda: runs.process_start(pid) is None, "the stopped driver gone", 60)


def _driver_ended(g: Guide) -> None:
    log = g.shell.here / "campaign.log"
    wait_for(lambda: log.exists() and log.read_text().rstrip().endswith(
        f"24 results, sum {SUM}"), "the workflow's last line", 900)


@pytest.mark.slow
@pytest.mark.needs("mpi", "lmod")
def test_the_guide_on_the_fake_cluster(guide, tmp_path):
    """Steps 1 and 3-7: set up, run the campaign in tmux, watch it, stop it after 12 of 24
    tasks, clean up, resume with nohup: the rest runs, the 12 finished ones do not."""
    copy_checkout(tmp_path / "checkout")
    for block in blocks(GUIDE.read_text()):
        if "image" in block.tags:
            continue
        guide.run(block, {"parsl-aurora status": _progress_started,
                          "tmux kill-session": _twelve_done,
                          "parsl-aurora cleanup": _driver_gone})
        if block.text.startswith("nohup python campaign.py"):
            _driver_ended(guide)
    out = guide.outputs
    campaign = guide.home / "flare" / "campaign"
    first, second = campaign / "runinfo" / "000", campaign / "runinfo" / "001"
    assert "config ok" in out["parsl-aurora render aurora multi_job --set account=$PROJECT "
                              "> /dev/null && echo config ok"]
    listing = out["qstat -u $USER"]
    assert re.search(r" pa[0-9a-f]{6}\.\* ", listing), listing
    # tmux ends the session's whole process group, the driver's interchange with it: there
    # is a job to delete and nothing else.
    cleanup = out["parsl-aurora cleanup"]
    assert re.search(r"deleted 1 job .*\n  block \d+ ", cleanup), cleanup
    # The resumed run took the 12 (or more) finished results from the checkpoints and ran the
    # rest: every task ran once in all, none twice.
    done_first = checkpointed(first)
    resumed, _, cleaned = runs.task_states(runs.read_chunks(second / "parsl.log"))
    assert cleaned and resumed == {"memo_done": done_first, "exec_done": 24 - done_first}, \
        resumed
    # ALCF's order in every block: the frameworks module the driver had loaded, then its venv;
    # the module's FLAT hierarchy and ALCF's device selector after the user's lines.
    for run_dir in (first, second):
        script = submitted(run_dir)
        lines = [x for x in script.splitlines() if x.startswith(("module load ", "source "))]
        assert lines == ["module load frameworks/2025.3.1 || exit 1",
                         f"source {guide.home}/flare/parsl-aurora-env/bin/activate"], script
        assert ("export ZE_FLAT_DEVICE_HIERARCHY=FLAT\n"
                "export ONEAPI_DEVICE_SELECTOR=level_zero:gpu") in script
    assert "driver: ended" in out["parsl-aurora status"]
    assert out["tail -n 1 campaign.log"].strip() == f"24 results, sum {SUM}"
    for run_dir in (first, second):
        ledger = runs.read_ledger((run_dir / runs.LEDGER).read_text())
        assert ledger and all(s.name.startswith(runs.read_record(run_dir)["run_tag"] + ".")
                              for s in ledger)
    wait_for(lambda: not leftovers(guide.home), "no process of the campaign left", 120)


@pytest.mark.slow
@pytest.mark.needs("apptainer", "fuse", "registry", "mpi", "lmod")
def test_the_guide_image_steps(guide, tmp_path, built_image, data_keys):
    """Steps 1-3 with the image: `make image` (up to date), `apptainer test`, `make pull` of
    the same image published to a loopback registry; then the campaign with its driver in the
    image, through the PBS bridge."""
    from parsl_aurora.publish import publish

    shutil.copy2(built_image, copy_checkout(tmp_path / "checkout") / "aurora.sif")
    private, public = data_keys["good"]
    (tmp_path / "registry").mkdir()
    with serve_registry(tmp_path / "registry") as repo:
        published = tmp_path / "published.sif"
        shutil.copyfile(built_image, published)
        publish(published, repo, private, tag="guide", insecure=True)
        guide.values.update(registry=f"oras://{repo}", tag="guide", key=str(public))
        for block in blocks(GUIDE.read_text()):
            if block.section >= "4" and "image" not in block.tags and "aurora" not in block.tags:
                continue
            if block.section >= "5":
                break
            guide.run(block)
    _driver_ended(guide)
    out = guide.outputs
    assert "is up to date" in out["make image"], out["make image"]
    assert "signature and sha256" in out["make pull REGISTRY=oras://<registry>/<repo> "
                                         "TAG=<tag> VERIFY_KEY=<publisher.pem>"]
    # The driver ran in the image: its blocks activate the image's Python, not the venv's.
    run_dir = guide.home / "flare" / "campaign" / "runinfo" / "000"
    tag = runs.read_record(run_dir)["run_tag"]
    scripts = [p for p in (run_dir / "submit_scripts").glob(f"{tag}.*") if not p.suffix[1:]
               .startswith("std")]
    assert scripts and all("source " in p.read_text() and "parsl-aurora-env" not in
                           p.read_text() for p in scripts), scripts
    wait_for(lambda: not leftovers(guide.home), "no process of the campaign left", 120)
