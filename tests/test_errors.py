"""Bad input, end to end: every case runs a real entry point (the `parsl-aurora` command or an
example workflow) in a subprocess and must print one line naming the problem and the fix, exit
non-zero and leave nothing behind: no fake PBS job, no Parsl run, no file.

The table below is also docs/errors.md: `python tests/test_errors.py --write-doc` rewrites it,
and test_doc_lists_every_case fails when the two differ.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import LMOD_PKG, free_port, serve_registry, tiny_sif

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
BIN = Path(sys.executable).parent
APPTAINER = shutil.which("apptainer")
PARSL = version("parsl")
OTHER_PARSL = "2024.12.2"
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
OTHER_PYTHON = "3.12" if PYTHON != "3.12" else "3.11"
# What the placeholders in the table read as in docs/errors.md.
DOC_VALUES = {"dir": "$PWD", "parsl": PARSL, "python": PYTHON, "other_python": OTHER_PYTHON,
              "bin": "$VENV/bin", "fake_bin": "$FAKE/bin", "lmod": str(LMOD_PKG),
              "registry": "127.0.0.1:5000/parsl-aurora/aurora",
              "dead": "127.0.0.1:5999/parsl-aurora/aurora"}
PROGS = {"parsl-aurora": [str(BIN / "parsl-aurora")],
         "workflow.py": [sys.executable, str(ROOT / "examples" / "workflow.py")],
         "mpi_workflow.py": [sys.executable, str(ROOT / "examples" / "mpi_workflow.py")],
         "flow.py": [sys.executable, "flow.py"]}


@dataclass(frozen=True)
class Case:
    id: str
    did: str     # what the user did, in words
    cmd: str     # `parsl-aurora ...`, `workflow.py` or `mpi_workflow.py`, then arguments
    expect: str  # how the message starts, after "PROG: error: "
    fix: str     # the part of the message saying what to do
    env: dict = field(default_factory=dict)
    # Made in the working folder first: text, or @other (a SIF holding another Parsl),
    # @other_python (another Python), @bare (no version labels), @junk (bytes that are no SIF),
    # @good_pub / @stranger_pub (the publisher's / a stranger's key).
    files: dict = field(default_factory=dict)
    needs: str = ""  # "apptainer", "lmod" or "registry" (a loopback registry, apptainer too)
    # `pull` echoes each apptainer command it starts ("+ apptainer pull ..."): progress, kept
    # apart from the one error line.
    echo: bool = False
    prog: str = ""  # who speaks, when not the command's first word (argparse: "parsl-aurora render")
    nofile: int = 0  # the open-file limit the shell sets first (`ulimit -n`), 0: as it is
    # The refusal comes once Parsl runs: "pbs" (PBS refuses the first job; nothing is
    # submitted) or "task" (a task is refused before it reaches a worker; the run's first
    # block was submitted at start, as always, and is deleted when the run ends). Either
    # writes the run's folder runinfo/ (and the fake PBS's state).
    run: str = ""


NO_APPTAINER = {"PATH": "{bin}"}  # this interpreter's scripts only
NODEFILE = "--set nodefile=nodes.txt"
BLANK_LINE = {"nodes.txt": "x4102c0s0b0n0\n\nx4102c0s1b0n0\n"}
DRAIN_FIX = "Fix: ask for a longer walltime or a shorter drain_margin"
SITE_FIX = "Fix: pass site= or set PARSL_SITE to a known site"
ACCOUNT_FIX = "Fix: pass account=... or set PARSL_ACCOUNT"
CONTAINER_FIX = "Fix: build one with `make image` or fetch it with `make pull`"
OTHER_FIX = ("Fix: rebuild the image from this checkout (`make image`) or run the driver "
             "inside it")
INSTALL_FIX = "Install it: `sudo bash .ci/install-apptainer` (Debian 12), or `module load apptainer`"
VERIFY_FIX = "Fix: check --verify-key public.pem is the publisher's public key, or republish"
RUN_FIX = ("Fix: run this in the folder the workflow ran in, or name the run, e.g. "
           "`parsl-aurora status path/to/runinfo/003`")
NOT_A_SIF = "container='{dir}/junk.sif' is not valid: expected a SIF image"
# `python flow.py`: a workflow of one task, its config from site_configs.load(LOAD) as the
# case's row says, its end through run_main as in the examples.
FLOW = """import sys
import parsl
from parsl import bash_app
import site_configs
from parsl_aurora.errors import run_main

@bash_app
def app(parsl_resource_specification=None):
    return "touch ran"

def main():
    with parsl.load(site_configs.load({load})):
        app({task}).result()
    return 0

sys.exit(run_main(main))
"""


def flow(load: str, task: str = "") -> dict:
    return {"flow.py": FLOW.format(load=load, task=task)}


QSUB_191 = "#!/bin/sh\necho 'qsub: Job rejected by all possible destinations' >&2\nexit 191\n"

CASES = [
    # ------------------------------------------------ the command line
    Case("cli-missing-argument", "left out the mode", "parsl-aurora render aurora",
         "the following arguments are required: mode", "Fix: see `parsl-aurora render --help`",
         prog="parsl-aurora render"),
    Case("cli-unknown-command", "mistyped the command", "parsl-aurora show aurora",
         "argument COMMAND: invalid choice: 'show'",
         "Fix: see `parsl-aurora --help`"),
    Case("cli-set-syntax", "wrote --set without =", "parsl-aurora render local multi_job --set queue",
         "--set='queue' is not valid: expected key=value.", "Fix: write e.g. --set queue=debug"),
    # ------------------------------------------------ choosing a config
    Case("site-unknown", "named a site there is no config for",
         "parsl-aurora render polaris multi_job",
         "site='polaris' is not valid: expected aurora, local, pbs.", SITE_FIX),
    Case("mode-unknown", "named a mode that does not exist", "parsl-aurora render aurora htex",
         "mode='htex' is not valid: expected multi_job, mpi_ensemble, in_job.",
         "Fix: pass mode= or set PARSL_MODE to a known mode"),
    Case("option-unknown", "passed an option the mode does not take",
         "parsl-aurora render local multi_job --set nodes=4",
         "option='nodes' is not valid: expected account,",
         "Fix: local.multi_job does not take 'nodes'; use one of the above"),
    Case("account-missing", "left out the project to charge", "parsl-aurora render aurora multi_job",
         "account=None is not valid: expected a value (aurora.multi_job requires it).",
         ACCOUNT_FIX),
    Case("set-bool-word", "wrote a yes/no option as neither",
         "parsl-aurora render local multi_job --set monitoring=maybe",
         "monitoring='maybe' is not valid: expected true or false.",
         "Fix: write --set monitoring=true or --set monitoring=false"),
    Case("set-python-only", "set an option only Python can pass",
         "parsl-aurora render local multi_job --set node=x4102c0s0b0n0",
         "node='x4102c0s0b0n0' is not valid: expected an option the command line can set",
         "Fix: node is a Node: pass it from Python, e.g. site_configs.load(node=...)"),
    # ------------------------------------------------ walltime, queues, sizes
    Case("walltime-format", "wrote the walltime as 30m",
         "parsl-aurora render local multi_job --set walltime=30m",
         "walltime='30m' is not valid: expected H:MM:SS, e.g. '0:30:00'.",
         "Fix: write hours, minutes and seconds separated by colons"),
    Case("walltime-zero", "asked for no time", "parsl-aurora render local multi_job "
         "--set walltime=0:00:00", "walltime='0:00:00' is not valid: expected a duration above "
         "0:00:00.", "Fix: ask for some time"),
    Case("walltime-under-drain", "asked for a walltime shorter than the drain period",
         "parsl-aurora render local multi_job --set walltime=0:05:00 --set drain_margin=0:10:00",
         "drain_margin='0:10:00' is not valid: expected less than the walltime (0:05:00).",
         DRAIN_FIX),
    Case("queue-walltime", "asked the debug queue for two hours",
         "parsl-aurora render local multi_job --set queue=debug --set walltime=2:00:00",
         "walltime='2:00:00' is not valid: expected at most 1:00:00 for 1-node jobs in queue 'debug'.",
         "Fix: shorten walltime or pick a queue with longer jobs"),
    Case("queue-nodes", "asked the debug queue for 4-node jobs",
         "parsl-aurora render aurora multi_job --set account=P --set nodes_per_job=4",
         "nodes_per_job=4 is not valid: expected 1-2 nodes in queue 'debug'.",
         "Fix: use a queue that takes 4 nodes (debug-scaling, capacity) or change nodes_per_job"),
    Case("not-a-number", "wrote a count in words", "parsl-aurora render local multi_job "
         "--set max_jobs=two", "max_jobs='two' is not valid: expected an integer >= 1.",
         "Fix: pass max_jobs=1 or more"),
    Case("retries-negative", "asked for -1 retries",
         "parsl-aurora render local multi_job --set retries=-1",
         "retries=-1 is not valid: expected an integer >= 0.",
         "Fix: pass retries=1 (each task runs at most twice)"),
    Case("ensemble-one-node", "asked the MPI ensemble for 1-node tasks",
         "parsl-aurora render local mpi_ensemble --set nodes_per_task=1",
         "nodes_per_task=1 is not valid: expected 2 or more.",
         "Fix: MPIExecutor is for multi-node tasks; run single-node work with multi_job"),
    Case("ensemble-task-too-big", "asked for tasks bigger than the job",
         "parsl-aurora render local mpi_ensemble --set nodes_per_task=16",
         "nodes_per_task=16 is not valid: expected at most nodes_per_job (10).",
         "Fix: raise nodes_per_job or lower nodes_per_task"),
    Case("queue-min-walltime", "asked an Aurora queue for less than its 5 minutes",
         "parsl-aurora render aurora multi_job --set account=P --set walltime=0:04:00",
         "walltime='0:04:00' is not valid: expected at least 0:05:00 in queue 'debug'.",
         "Fix: ask for walltime='0:05:00' or more"),
    Case("prod-project-jobs", "asked prod for more jobs than a project may have there",
         "parsl-aurora render aurora multi_job --set account=P --set queue=prod "
         "--set nodes_per_job=256 --set max_jobs=101",
         "max_jobs=101 is not valid: expected at most 100 in queue 'prod' (ALCF lets a project "
         "have 100 queued or running jobs there).", "Fix: pass max_jobs=100"),
    Case("open-file-limit", "asked for more worker pools than the driver may open files for",
         "parsl-aurora render aurora multi_job --set account=P --set queue=debug-scaling "
         "--set nodes_per_job=256", "nodes_per_job=256 is not valid: expected at most 206 worker pools "
         "in all (256 asked for: one per node, two connections each, and the interchange may "
         "open 512 files, the driver's hard open-file limit).",
         "Fix: ask for fewer nodes, split them over two executors", nofile=512),
    Case("ensemble-idle-nodes", "asked for jobs that tasks cannot fill",
         "parsl-aurora render local mpi_ensemble --set nodes_per_job=9",
         "nodes_per_job=9 is not valid: expected a multiple of nodes_per_task (2).",
         "Fix: use nodes_per_job=8 so no node sits idle"),
    Case("monitoring-missing", "asked for monitoring where sqlalchemy is not installed",
         "parsl-aurora render local multi_job --set monitoring=True",
         "monitoring=True is not valid: expected Parsl's monitoring extra installed.",
         "Fix: pip install 'parsl-aurora[monitoring]' or run in the image",
         env={"PYTHONPATH": "{dir}/block"},
         files={"block/sqlalchemy.py": "raise ImportError('No module named sqlalchemy')\n"}),
    Case("ranks-uneven", "gave an MPI task ranks that do not divide over its nodes "
         "(`parsl_resource_specification={'num_nodes': 2, 'num_ranks': 5}`)", "flow.py",
         "Invalid Resource Specification Supplied: {{'num_ranks'}}. num_ranks=5 does not divide "
         "evenly over num_nodes=2", "Fix: pass ranks_per_node, or a num_ranks that is a "
         "multiple of num_nodes", run="task", files=flow(
             '"local", "mpi_ensemble"',
             "parsl_resource_specification={'num_nodes': 2, 'num_ranks': 5}")),
    # ------------------------------------------------ GPU hierarchy and modules
    Case("hierarchy-against-modules", "passed a GPU hierarchy the module in worker_init "
         "contradicts", "parsl-aurora render aurora multi_job --set account=P "
         "--set hierarchy=COMPOSITE --set 'worker_init=module load frameworks'",
         "hierarchy='COMPOSITE' is not valid: expected 'FLAT', what worker_init sets", "Fix: "
         "drop hierarchy=, or end "
         "worker_init with `export ZE_FLAT_DEVICE_HIERARCHY=COMPOSITE`",
         env={"MODULEPATH": "{dir}/modulefiles", "LMOD_PKG": "{lmod}"}, needs="lmod",
         files={"modulefiles/frameworks/2025.3.1.lua":
                'setenv("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")\n'}),
    # ------------------------------------------------ in-job node files
    Case("nodefile-none", "ran in_job outside a PBS job", "parsl-aurora render aurora in_job",
         "nodefile=None is not valid: expected a PBS node file.",
         "Fix: run inside a PBS job (which sets $PBS_NODEFILE) or pass nodefile="),
    Case("nodefile-missing", "named a node file that does not exist",
         f"parsl-aurora render aurora in_job {NODEFILE}",
         "nodefile='nodes.txt' is not valid: expected a readable file listing one host per line.",
         "Fix: check the path (No such file or directory)"),
    Case("nodefile-empty", "named an empty node file", f"parsl-aurora render aurora in_job "
         f"{NODEFILE}", "nodefile='nodes.txt' is not valid: expected at least one host name.",
         "Fix: the node file is empty", files={"nodes.txt": ""}),
    Case("nodefile-blank-line", "named a node file with a blank line",
         f"parsl-aurora render local in_job {NODEFILE}",
         "nodefile='nodes.txt' is not valid: expected one host name per line.",
         "Fix: line 2 is '': remove blank lines and spaces", files=BLANK_LINE),
    # ------------------------------------------------ images for the workers
    Case("container-missing", "named an image that does not exist",
         "parsl-aurora render local multi_job --set container=nope.sif",
         "container='nope.sif' is not valid: expected a path to an existing .sif image.",
         CONTAINER_FIX),
    Case("container-not-a-sif", "named a file that is no image",
         "parsl-aurora render local multi_job --set container=junk.sif", NOT_A_SIF,
         "Fix: check the path, or rebuild it", files={"junk.sif": "@junk"}, env=NO_APPTAINER),
    # Checked from the labels in the SIF file: no apptainer needed (a login node has none).
    Case("container-other-parsl", "named an image holding another Parsl",
         "parsl-aurora render local multi_job --set container=other.sif",
         "container='{dir}/other.sif' is not valid: expected an image holding this driver's "
         f"Parsl ({{parsl}}); it holds parsl {OTHER_PARSL}", OTHER_FIX, env=NO_APPTAINER,
         files={"other.sif": "@other"}, needs="apptainer"),
    Case("container-other-python", "named an image of another Python",
         "parsl-aurora render local multi_job --set container=other.sif",
         "container='{dir}/other.sif' is not valid: expected an image holding this driver's "
         "Python ({python}); it holds Python {other_python}", "Fix: make the driver's "
         "environment with Python {other_python}", env=NO_APPTAINER, files={"other.sif": "@other_python"},
         needs="apptainer"),
    Case("container-no-labels-no-apptainer", "named an image without version labels where "
         "apptainer is not on PATH", "parsl-aurora render local multi_job --set "
         "container=bare.sif", "image '{dir}/bare.sif' has no parsl-aurora.python and "
         "org.parsl-project.parsl.version labels, so only running it can tell", INSTALL_FIX,
         env=NO_APPTAINER, files={"bare.sif": "@bare"}, needs="apptainer"),
    # Apptainer sets APPTAINER_CONTAINER in every process of a container; the driver is not
    # started in one here (that needs the full image), only told so as Apptainer tells it.
    Case("in-job-image-no-host-launcher", "ran in_job's driver in the image without the job "
         "host's launcher", "parsl-aurora render aurora in_job --set nodefile=nodes.txt",
         "PARSL_AURORA_HOST_LAUNCH=None is not valid: expected the folder of the job host's "
         "launcher", "Fix: run the driver from the job script on the host as "
         "examples/in_job.pbs does: `apptainer exec IMAGE parsl-aurora host-launcher > host.sh; "
         "bash host.sh IMAGE python3 workflow.py`",
         env={"APPTAINER_CONTAINER": "{dir}/aurora.sif"}, files={"nodes.txt": "x4102c0s0b0n0\n"}),
    # ------------------------------------------------ the driver in the image, PBS through the bridge
    Case("bridge-image-does-not-run", "ran the driver through the PBS bridge in an image that "
         "does not run here", "parsl-aurora pbs-bridge -- apptainer exec junk.sif python "
         "workflow.py", "command='apptainer exec junk.sif python' is not valid: expected an "
         "image that runs on this node.", "ALCF runs containers on compute nodes only: run the "
         "driver from a venv (docs/aurora.md, routes), or here only where `parsl-aurora check "
         "--image IMAGE` says route (d) works", files={"junk.sif": "@junk"}, needs="apptainer"),
    # ------------------------------------------------ PBS refusing the first job
    Case("qsub-174", "submitted to a queue that takes jobs only from its routing queue "
         "(`load('local', 'multi_job', queue='small', allow_unlisted_queue=True)`: the fake's "
         "small, as Aurora's under prod)", "flow.py", "PBS will not take this workflow's jobs:",
         "`qsub: Access to queue is denied` (qsub exit 174). Fix: submit to the routing queue "
         "(prod), not to the queues it routes to", run="pbs",
         files=flow('"local", "multi_job", queue="small", allow_unlisted_queue=True')),
    # Neither the fake nor OpenPBS refuses at qsub here (both route after qsub returned); a
    # qsub that answers as ALCF quotes Aurora's stands in for PBS.
    Case("qsub-191", "asked prod for jobs none of its destinations takes (`load('local', "
         "'multi_job', queue='prod')`, a qsub answering as Aurora's)", "flow.py",
         "PBS will not take this workflow's jobs:", "`qsub: Job rejected by all possible "
         "destinations` (qsub exit 191). Fix: ask for a node count and walltime one of the "
         "routing queue's destinations takes", run="pbs",
         env={"PATH": "{dir}/bin:{fake_bin}:{bin}:/usr/bin:/bin"},
         files={**flow('"local", "multi_job", queue="prod"'), "bin/qsub": QSUB_191}),
    # ------------------------------------------------ the example workflows
    Case("workflow-no-site", "ran a workflow without PARSL_SITE", "workflow.py",
         "site='' is not valid: expected aurora, local, pbs.", SITE_FIX),
    Case("workflow-unknown-mode", "set PARSL_MODE to a mode that does not exist", "workflow.py",
         "mode='gpu' is not valid: expected multi_job, mpi_ensemble, in_job.",
         "Fix: pass mode= or set PARSL_MODE", env={"PARSL_SITE": "local", "PARSL_MODE": "gpu"}),
    Case("workflow-no-account", "ran on Aurora without PARSL_ACCOUNT", "workflow.py",
         "account=None is not valid: expected a value (aurora.multi_job requires it).",
         ACCOUNT_FIX, env={"PARSL_SITE": "aurora", "PARSL_MODE": "multi_job"}),
    Case("workflow-container-missing", "set PARSL_CONTAINER to a missing image", "workflow.py",
         "container='nope.sif' is not valid: expected a path to an existing .sif image.",
         CONTAINER_FIX, env={"PARSL_SITE": "local", "PARSL_MODE": "multi_job",
                             "PARSL_CONTAINER": "nope.sif"}),
    Case("workflow-container-other-parsl", "set PARSL_CONTAINER to an image holding another "
         "Parsl", "workflow.py", "container='{dir}/other.sif' is not valid: expected an image "
         f"holding this driver's Parsl ({{parsl}}); it holds parsl {OTHER_PARSL}",
         OTHER_FIX, env={"PARSL_SITE": "local", "PARSL_MODE": "multi_job",
                         "PARSL_CONTAINER": "other.sif"},
         files={"other.sif": "@other"}, needs="apptainer"),
    Case("workflow-nodefile-blank-line", "ran in_job with a blank line in $PBS_NODEFILE",
         "workflow.py", "nodefile='nodes.txt' is not valid: expected one host name per line.",
         "Fix: line 2 is '': remove blank lines and spaces", files=BLANK_LINE,
         env={"PARSL_SITE": "local", "PARSL_MODE": "in_job", "PBS_NODEFILE": "nodes.txt"}),
    Case("mpi-workflow-no-site", "ran the MPI workflow without PARSL_SITE", "mpi_workflow.py",
         "site='' is not valid: expected aurora, local, pbs.", SITE_FIX),
    Case("mpi-workflow-no-account", "ran the MPI workflow on Aurora without PARSL_ACCOUNT",
         "mpi_workflow.py", "account=None is not valid: expected a value "
         "(aurora.mpi_ensemble requires it).", ACCOUNT_FIX, env={"PARSL_SITE": "aurora"}),
    Case("mpi-workflow-container-not-a-sif", "set PARSL_CONTAINER to a file that is no image",
         "mpi_workflow.py", NOT_A_SIF, "Fix: check the path, or rebuild it",
         env={"PARSL_SITE": "local", "PARSL_CONTAINER": "junk.sif"},
         files={"junk.sif": "@junk"}),
    # ------------------------------------------------ inspecting and pulling images
    Case("inspect-missing", "inspected an image that is not there", "parsl-aurora inspect nope.sif",
         "nope.sif does not exist;", "build it (`nox -s image`) or pull it (`parsl-aurora pull "
         "REGISTRY TAG --verify-key PUBLIC.pem`)",
         needs="apptainer"),
    Case("pull-no-apptainer", "pulled where apptainer is not on PATH",
         "parsl-aurora pull {registry} t1 --verify-key public.pem", "apptainer is not on PATH.",
         INSTALL_FIX, env=NO_APPTAINER),
    Case("pull-no-key", "pulled with a key file that does not exist",
         "parsl-aurora pull {dead} t1 --verify-key public.pem",
         "--verify-key='public.pem' is not valid: expected an existing public PEM file.",
         "Fix: create a pair with `openssl genrsa -out private.pem 3072 && openssl rsa -in "
         "private.pem -pubout -out public.pem`", needs="apptainer"),
    Case("pull-bad-tag", "pulled a tag with a space in it",
         "parsl-aurora pull {dead} 'v1 final' --verify-key public.pem",
         "TAG='v1 final' is not valid: expected letters, digits,",
         "Fix: pick a tag like parsl-2025.1.13-8d5a104", files={"public.pem": "PEM\n"},
         needs="apptainer"),
    Case("pull-no-repository", "named a registry but no repository",
         "parsl-aurora pull 127.0.0.1:5000 t1 --verify-key public.pem",
         "REGISTRY='127.0.0.1:5000' is not valid: expected HOST[:PORT]/REPO.",
         "Fix: name a repository too", files={"public.pem": "PEM\n"}, needs="apptainer"),
    Case("pull-host-without-dot", "named a registry host with neither a dot nor a port",
         "parsl-aurora pull registry/parsl-aurora t1 --verify-key public.pem",
         "REGISTRY='registry/parsl-aurora' is not valid: expected HOST[:PORT]/REPO with a HOST "
         "that has a '.' or a :PORT (apptainer would read 'registry' as part of a Docker Hub "
         "repository).", "Fix: write the port (registry:5000/parsl-aurora, or "
         "registry:443/parsl-aurora for https) or the host's full name",
         files={"public.pem": "PEM\n"}, needs="apptainer"),
    Case("pull-repo-too-short", "named a one-letter repository",
         "parsl-aurora pull localhost:5000/x t1 --verify-key public.pem",
         "REGISTRY='localhost:5000/x' is not valid: expected a REPO of lowercase letters,",
         "Fix: rename the repository, e.g. localhost:5000/parsl-aurora/aurora",
         files={"public.pem": "PEM\n"}, needs="apptainer"),
    Case("pull-out-folder-missing", "pulled into a folder that does not exist",
         "parsl-aurora pull {dead} t1 --verify-key public.pem --out images/aurora.sif",
         "--out='{dir}/images/aurora.sif' is not valid: expected a path in an existing "
         "directory.", "Fix: create {dir}/images first", files={"public.pem": "PEM\n"},
         needs="apptainer"),
    Case("pull-unreachable", "pulled from a registry that is down",
         "parsl-aurora pull {dead} t1 --verify-key public.pem --insecure",
         "cannot pull the published digest oras://{dead}:t1.sha256: FATAL:",
         "Fix: check REGISTRY and TAG, that the registry is up",
         files={"public.pem": "PEM\n"}, needs="apptainer", echo=True),
    Case("pull-unsigned", "pulled a tag someone overwrote with an unsigned image",
         "parsl-aurora pull {registry} unsigned --verify-key public.pem --insecure",
         "signature check failed: oras://{registry}:unsigned: it is not signed", VERIFY_FIX,
         files={"public.pem": "@good_pub"}, needs="registry", echo=True),
    Case("pull-altered", "pulled a tag whose image was altered after signing",
         "parsl-aurora pull {registry} altered --verify-key public.pem --insecure",
         "signature check failed: oras://{registry}:altered: its signed content does not "
         "match its signature (altered)", VERIFY_FIX,
         files={"public.pem": "@good_pub"}, needs="registry", echo=True),
    Case("pull-wrong-key", "pulled with a key that is not the publisher's",
         "parsl-aurora pull {registry} good --verify-key public.pem --insecure",
         "signature check failed: the published digest oras://{registry}:good.sha256: it is "
         "not signed by this key",
         VERIFY_FIX, files={"public.pem": "@stranger_pub"}, needs="registry", echo=True),
    # ------------------------------------------------ watching and cleaning up runs
    Case("status-no-run", "asked for a run's status in a folder where no workflow ran",
         "parsl-aurora status", "RUN_DIR='runinfo' is not valid: expected a Parsl run "
         "directory (runinfo/NNN, holding parsl.log) or a folder of them.", RUN_FIX),
    Case("cleanup-not-a-run", "named a folder that holds no run to clean up",
         "parsl-aurora cleanup output", "RUN_DIR='output' is not valid: expected a Parsl run "
         "directory", RUN_FIX, files={"output/result.txt": "42\n"}),
]


# ---------------------------------------------------------------- docs/errors.md
def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def command_line(case: Case, values: dict) -> str:
    """The case's command as a user types it (test plumbing such as PATH left out)."""
    prog, _, args = case.cmd.format(**values).partition(" ")
    # Test plumbing left out: PATH and PYTHONPATH, and LMOD_PKG, which a login shell sets.
    env = " ".join(f"{k}={v.format(**values)}" for k, v in case.env.items()
                   if k not in ("PATH", "PYTHONPATH", "LMOD_PKG"))
    word = {"workflow.py": "python examples/workflow.py",
            "mpi_workflow.py": "python examples/mpi_workflow.py",
            "flow.py": "python flow.py"}.get(prog, prog)
    limit = f"ulimit -n {case.nofile};" if case.nofile else ""
    return " ".join(w for w in (limit, env, word, args) if w)


RUNS = "tests/test_errors.py::test_bad_input_is_one_line_and_submits_nothing"


def doc_text() -> str:
    rows = [f"| {i} | {_cell(c.did)} | `{_cell(command_line(c, DOC_VALUES))}` | "
            f"`{_cell(c.prog or c.cmd.split()[0])}: error: {_cell(c.expect.format(**DOC_VALUES))}` | "
            f"{_cell(c.fix.format(**DOC_VALUES))} |"
            for i, c in enumerate(CASES, 1)]
    return "\n".join([
        "# Errors you may see, and their fixes",
        "",
        "Every refusal is one line on stderr, `PROG: error: MESSAGE`, where the message names the",
        "option or input, the bad value, what would be valid and the fix; the exit status is 2",
        "and nothing has been submitted, started or written (but for the empty folders",
        "`./output/running*` that `examples/workflow.py` makes first, and the run's folder",
        "`runinfo/NNN` where the refusal comes once Parsl runs: PBS refusing the first job, or",
        "a task refused before it reaches a worker, which leaves the run's first block to be",
        f"deleted when the run ends). <!-- claim: {RUNS} -->",
        "`parsl-aurora --debug` (or `PARSL_AURORA_DEBUG=1` for a workflow script) shows the",
        ("traceback instead. <!-- claim: tests/test_cli.py::test_the_commands_debug_flag_shows_"
         "the_traceback tests/test_cli.py::test_debug_shows_the_traceback -->"),
        "`parsl-aurora pull` also prints each apptainer command it starts (`+ apptainer pull",
        f"...`) above the error line. <!-- claim: {RUNS} -->",
        "",
        "Your own workflow scripts print these errors the same way, as one line, with no code",
        "of yours: the first such error a process creates installs a `sys.excepthook` that",
        "prints it (and an error Parsl's `BadStateException` carries) as one line and hands",
        ("every other exception to the hook there was. <!-- claim: tests/test_cli.py::test_a_"
         "users_script_prints_our_error_as_one_line tests/test_cli.py::test_other_exceptions_"
         "reach_the_hook_there_was -->"),
        "The exit status is then 1, Python's for",
        "an uncaught exception; for 2, like the examples, end your script with",
        ("`sys.exit(parsl_aurora.errors.run_main(main))`. <!-- claim: tests/test_cli.py::test_a_"
         "users_script_prints_our_error_as_one_line tests/test_cli.py::test_run_main_prints_a_"
         "bad_state_error_as_one_line -->"),
        "",
        "`python flow.py` is a workflow of one `bash_app` task, its config from",
        "`site_configs.load(...)` as the row says. `$PWD` is the folder the command ran in; on",
        "the fake cluster a stand-in `qsub` answers as Aurora's where neither the fake nor",
        "OpenPBS refuses at submission. This page is generated from the cases in",
        "`tests/test_errors.py`, which runs every one: `python tests/test_errors.py --write-doc`.",
        f"<!-- claim: tests/test_errors.py::test_doc_lists_every_case {RUNS} -->",
        "",
        "| # | What you did | Command | The message starts | The fix it names |",
        "|---|--------------|---------|--------------------|------------------|",
        *rows,
        "",
    ])


def test_doc_lists_every_case():
    assert DOC.exists() and DOC.read_text() == doc_text(), (
        "docs/errors.md is out of date: run `python tests/test_errors.py --write-doc`")


def test_enough_distinct_cases():
    assert len(CASES) >= 22 and len({c.id for c in CASES}) == len(CASES)
    # The doc quotes each message in backticks and shows each fix as written.
    assert not [c.id for c in CASES if "`" in c.expect or c.fix.count("`") % 2]


# ---------------------------------------------------------------- fixtures
def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="session")
def other_image(tmp_path_factory) -> Path:
    """A tiny SIF whose labels say it holds another Parsl."""
    return tiny_sif(tmp_path_factory.mktemp("other-image"), {
        "org.parsl-project.parsl.version": OTHER_PARSL,
        "org.opencontainers.image.revision": "8d5a104d439cbedcee0a3bf7748812f6a2c708bb"})


@pytest.fixture(scope="session")
def other_python_image(tmp_path_factory) -> Path:
    """A tiny SIF whose labels say it holds this Parsl on another Python."""
    return tiny_sif(tmp_path_factory.mktemp("other-python-image"), {
        "org.parsl-project.parsl.version": PARSL, "parsl-aurora.python": OTHER_PYTHON})


@pytest.fixture(scope="session")
def bare_image(tmp_path_factory) -> Path:
    """A tiny SIF with none of our labels (an image built elsewhere)."""
    return tiny_sif(tmp_path_factory.mktemp("bare-image"), {})


@pytest.fixture(scope="session")
def registry(tmp_path_factory, other_image, data_keys):
    """A loopback registry with tags `good` (signed), `unsigned` and `altered` (overwritten
    after publishing), and the publisher's and a stranger's public keys."""
    from parsl_aurora.publish import oras_ref, publish, push_command

    d = tmp_path_factory.mktemp("registry")
    keys = {"good_pub": data_keys["good"][1], "stranger_pub": data_keys["other"][1]}
    with serve_registry(d) as repo:

        def push(image: Path, tag: str) -> None:
            _run(*push_command(APPTAINER, str(image), oras_ref(repo, tag), insecure=True))

        for tag in ("good", "unsigned", "altered"):
            image = d / f"{tag}.sif"
            shutil.copyfile(other_image, image)
            publish(image, repo, data_keys["good"][0], tag=tag, insecure=True)
        push(other_image, "unsigned")  # over the signed one; its signed digest stays
        # One byte flipped inside the signed squashfs partition.
        listing = _run(APPTAINER, "sif", "list", str(d / "altered.sif")).stdout
        start = int(next(ln for ln in listing.splitlines() if "|FS" in ln)
                    .split("|")[3].split("-")[0])
        data = bytearray((d / "altered.sif").read_bytes())
        data[start + 100] ^= 0xFF
        (d / "bad.sif").write_bytes(bytes(data))
        push(d / "bad.sif", "altered")
        yield {"registry": repo, **keys}


# ---------------------------------------------------------------- the cases
def _marks(case: Case) -> list:
    if not case.needs:
        return []
    if case.needs == "lmod":
        return [pytest.mark.needs("lmod")]
    return [pytest.mark.needs("apptainer", *(["registry"] if case.needs == "registry" else []))]


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CASES])
def test_bad_input_is_one_line_and_submits_nothing(case, tmp_path, request):
    from parsl_aurora import fake

    here = tmp_path.resolve()
    values = {**DOC_VALUES, "dir": str(here), "bin": str(BIN), "fake_bin": str(fake.bin_dir()),
              "dead": f"127.0.0.1:{free_port()}/parsl-aurora/aurora"}
    if case.needs == "registry":
        values.update(request.getfixturevalue("registry"))
    for name, text in case.files.items():
        path = here / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if text == "@other":
            shutil.copyfile(request.getfixturevalue("other_image"), path)
        elif text in ("@other_python", "@bare"):
            shutil.copyfile(request.getfixturevalue(f"{text[1:]}_image"), path)
        elif text == "@junk":
            path.write_bytes(b"not a SIF image\n" * 256)
        elif text.startswith("@"):
            shutil.copyfile(request.getfixturevalue("registry")[text[1:]], path)
        else:
            path.write_text(text)
            if path.parent.name == "bin":
                path.chmod(0o755)
    before = _tree(here)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PARSL_") and k not in ("PBS_NODEFILE", "PYTHONPATH")}
    # The fake's qsub first on PATH, its state in this folder: a job submitted would show.
    env.update(PATH=os.pathsep.join([str(fake.bin_dir()), str(BIN), env["PATH"]]),
               PARSL_AURORA_FAKE_DIR=str(here / "fake-state"), PYTHONDONTWRITEBYTECODE="1")
    env.update({k: v.format(**values) for k, v in case.env.items()})
    prog, *args = shlex.split(case.cmd.format(**values))
    def limit() -> None:  # what `ulimit -n N` in the user's shell does
        if case.nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (case.nofile, case.nofile))

    out = subprocess.run(PROGS[prog] + args, cwd=here, env=env, capture_output=True, text=True,
                         timeout=120, check=False, preexec_fn=limit)

    lines = [ln for ln in out.stderr.strip().splitlines()
             if not (case.echo and ln.startswith("+ "))]
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"{case.prog or prog}: error: {case.expect.format(**values)}"), \
        lines[0]
    assert case.fix.format(**values) in lines[0], lines[0]
    # Nothing submitted, started or written: no fake job, no Parsl run folder, no file at all
    # (workflow.py makes its ./output folder before it loads the config; a refusal once Parsl
    # runs leaves the run's folder and the fake PBS's empty state).
    if case.run != "task":
        assert not list(here.rglob("jobs/*.json"))
    kept = {"output", *(("runinfo", "fake-state") if case.run else ())}
    assert {p for p in _tree(here) - before if p.split(os.sep)[0] not in kept} == set()
    assert (here / "runinfo").is_dir() is bool(case.run)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-doc"]:
        sys.exit("usage: python tests/test_errors.py --write-doc")
    DOC.write_text(doc_text())
    print(f"wrote {DOC.relative_to(ROOT)} ({len(CASES)} cases)")
