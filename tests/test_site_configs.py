"""Parity with ALCF's reference configs, field by field, and the errors for bad requests."""

import dataclasses
import os
import sys
from pathlib import Path

import pytest
from parsl.executors import HighThroughputExecutor, MPIExecutor
from parsl.launchers import MpiExecLauncher, SimpleLauncher
from parsl.providers import LocalProvider, PBSProProvider
from test_topology import PAGE_AFFINITY

import site_configs
from parsl_aurora import topology
from parsl_aurora.errors import ConfigError
from parsl_aurora.topology import AURORA
from site_configs import aurora

PAGE_NODE = dataclasses.replace(AURORA, reserved_cores=())
# This machine has no hsn0: Aurora configs built here name the interchange's address.
AT = {"address": "10.1.2.3"}
PAGE_TILES = [f"{g}.{t}" for g in range(6) for t in range(2)]
USER_INIT = "source $HOME/_env/bin/activate; cd /home/me/run"
# Deliberately unlike the page (as MOFA's Aurora launchers): one pool that dies does not make
# PALS end every other pool of the block.
POOL_OVERRIDES = "--ppn 1 --no-abort-on-failure"
# The parsl page's header plus what ALCF's recommended PBS header has (running-jobs-aurora.md).
HEADER = "#PBS -l filesystems=home:flare\n#PBS -l place=scatter\n#PBS -k doe"


def provider_fields(p):
    fields = {
        "provider": parsl_class(p), "nodes_per_block": p.nodes_per_block, "min_blocks": p.min_blocks,
        "max_blocks": p.max_blocks, "init_blocks": p.init_blocks,
        "launcher": type(p.launcher),
        "launcher_opts": (getattr(p.launcher, "bind_cmd", None),
                          getattr(p.launcher, "overrides", None)),
    }
    if isinstance(p, PBSProProvider):
        fields.update(account=p.account, queue=p.queue, walltime=p.walltime,
                      scheduler_options=p.scheduler_options, select_options=p.select_options,
                      cpus_per_node=p.cpus_per_node)
    return fields


def parsl_class(obj):
    """The Parsl class ours derives from (ours only change how blocks are asked for)."""
    return next(c for c in type(obj).__mro__ if c.__module__.startswith("parsl."))


def htex_fields(ex):
    return {"executor": parsl_class(ex), "accelerators": ex.available_accelerators,
            "workers": ex.max_workers_per_node, "cpu_affinity": ex.cpu_affinity,
            "prefetch": ex.prefetch_capacity}


def test_multi_job_matches_page():
    page = HighThroughputExecutor(
        available_accelerators=PAGE_TILES, max_workers_per_node=12, cpu_affinity=PAGE_AFFINITY,
        prefetch_capacity=0,
        provider=PBSProProvider(
            account="Aurora_deployment", queue="debug", worker_init=USER_INIT,
            walltime="0:30:00", scheduler_options=HEADER,
            launcher=MpiExecLauncher(bind_cmd="--cpu-bind", overrides=POOL_OVERRIDES),
            select_options="", nodes_per_block=1, min_blocks=0, max_blocks=1,
            cpus_per_node=208))
    config = aurora.multi_job(account="Aurora_deployment", node=PAGE_NODE,
                              worker_init=USER_INIT, nodes_per_job=1, max_jobs=1, **AT)
    ours = config.executors[0]
    assert htex_fields(ours) == htex_fields(page)
    assert ours.address == "10.1.2.3"
    assert provider_fields(ours.provider) == provider_fields(page.provider)
    assert USER_INIT in ours.provider.worker_init
    assert config.retries == 1


def test_mpi_ensemble_matches_page():
    page = MPIExecutor(
        max_workers_per_block=10 // 2,
        provider=PBSProProvider(
            account="Aurora_deployment", worker_init=USER_INIT, walltime="0:30:00",
            queue="lustre_scaling", scheduler_options=HEADER,
            launcher=SimpleLauncher(), select_options="", nodes_per_block=10, max_blocks=1,
            cpus_per_node=208))
    config = aurora.mpi_ensemble(account="Aurora_deployment", queue="lustre_scaling",
                                 nodes_per_task=2, nodes_per_job=10, walltime="0:30:00",
                                 worker_init=USER_INIT, node=PAGE_NODE,
                                 allow_unlisted_queue=True, **AT)
    ours = config.executors[0]
    assert isinstance(ours, MPIExecutor)
    assert ours.max_workers_per_block == page.max_workers_per_block
    assert provider_fields(ours.provider) == provider_fields(page.provider)
    assert USER_INIT in ours.provider.worker_init
    assert config.retries == 1


def test_in_job_matches_page(tmp_path, monkeypatch):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x4102c0s0b0n0\nx4102c0s1b0n0\nx4102c0s2b0n0\n")
    monkeypatch.setenv("PBS_NODEFILE", str(nodefile))
    page = HighThroughputExecutor(
        available_accelerators=PAGE_TILES, max_workers_per_node=12, cpu_affinity=PAGE_AFFINITY,
        prefetch_capacity=0,
        provider=LocalProvider(
            nodes_per_block=3, init_blocks=1, max_blocks=1,
            launcher=MpiExecLauncher(bind_cmd="--cpu-bind", overrides=POOL_OVERRIDES)))
    config = aurora.in_job(node=PAGE_NODE, **AT)
    ours = config.executors[0]
    assert htex_fields(ours) == htex_fields(page)
    assert provider_fields(ours.provider) == provider_fields(page.provider)
    # Deliberately unlike the page: a pool lost mid-task gets its tasks run once more.
    assert config.retries == 1


def test_factories_build_fresh_configs():
    a = aurora.multi_job(account="P", **AT)
    b = aurora.multi_job(account="P", **AT)
    assert a is not b and a.executors[0] is not b.executors[0]


def test_load_from_environment(monkeypatch):
    monkeypatch.setenv("PARSL_SITE", "aurora")
    monkeypatch.setenv("PARSL_MODE", "mpi_ensemble")
    monkeypatch.setenv("PARSL_ACCOUNT", "EnvProj")
    config = site_configs.load(nodes_per_job=4, **AT)
    assert isinstance(config.executors[0], MPIExecutor)
    assert config.executors[0].provider.account == "EnvProj"
    assert config.executors[0].provider.nodes_per_block == 4


def test_arguments_win_over_environment(monkeypatch):
    monkeypatch.setenv("PARSL_SITE", "nowhere")
    config = site_configs.load("aurora", "multi_job", account="P", **AT)
    assert config.executors[0].provider.account == "P"


# (kwargs for aurora.<mode>, words the message must contain)
BAD = [
    ("multi_job", {}, ["account", "requires"]),
    ("multi_job", {"account": ""}, ["account=''", "project"]),
    ("multi_job", {"account": "  "}, ["account='  '"]),
    ("mpi_ensemble", {"account": None}, ["account=None"]),
    ("multi_job", {"account": "P", "walltime": "30 minutes"}, ["walltime='30 minutes'", "H:MM:SS"]),
    ("multi_job", {"account": "P", "walltime": "0:75:00"}, ["walltime='0:75:00'"]),
    ("multi_job", {"account": "P", "walltime": "0:00:00"}, ["walltime='0:00:00'"]),
    ("mpi_ensemble", {"account": "P", "nodes_per_task": 4, "nodes_per_job": 2},
     ["nodes_per_task=4", "at most nodes_per_job (2)"]),
    ("mpi_ensemble", {"account": "P", "nodes_per_task": 3, "nodes_per_job": 10},
     ["nodes_per_job=10", "multiple of nodes_per_task (3)", "nodes_per_job=9"]),
    ("mpi_ensemble", {"account": "P", "nodes_per_task": 1}, ["nodes_per_task=1", "2 or more",
                                                             "multi_job"]),
    ("multi_job", {"account": "P", "nodes_per_job": 0}, ["nodes_per_job=0", ">= 1"]),
    ("multi_job", {"account": "P", "max_jobs": "2"}, ["max_jobs='2'"]),
    ("multi_job", {"account": "P", "queue": "debug", "nodes_per_job": 3},
     ["nodes_per_job=3", "1-2 nodes in queue 'debug'", "debug-scaling"]),
    ("multi_job", {"account": "P", "queue": "debug", "walltime": "2:00:00"},
     ["walltime='2:00:00'", "at most 1:00:00 for 1-node jobs in queue 'debug'"]),
    ("mpi_ensemble", {"account": "P", "queue": "prod", "nodes_per_job": 10},
     ["nodes_per_job=10", ">= 256 nodes in queue 'prod'"]),
    ("multi_job", {"account": "P", "bogus": 1}, ["option='bogus'", "walltime"]),
    # Queue limits: ALCF lets one user have one job in debug, 100 per project in prod.
    ("multi_job", {"account": "P", "queue": "debug", "max_jobs": 4},
     ["max_jobs=4", "at most 1 in queue 'debug'", "pass max_jobs=1"]),
    ("mpi_ensemble", {"account": "P", "queue": "debug-scaling", "max_jobs": 2},
     ["max_jobs=2", "at most 1 in queue 'debug-scaling'"]),
    ("multi_job", {"account": "P", "queue": "prod", "nodes_per_job": 256, "max_jobs": 101},
     ["max_jobs=101", "at most 100 in queue 'prod'", "lets a project have 100"]),
    # Every Aurora queue takes jobs of 5 minutes or more.
    ("multi_job", {"account": "P", "queue": "debug", "walltime": "0:04:59"},
     ["walltime='0:04:59'", "at least 0:05:00 in queue 'debug'"]),
    ("mpi_ensemble", {"account": "P", "queue": "prod", "nodes_per_job": 256,
                      "walltime": "0:01:00"}, ["at least 0:05:00 in queue 'prod'"]),
    ("multi_job", {"account": "P", "queue": "capacity", "max_jobs": 6},
     ["max_jobs=6", "at most 5 in queue 'capacity'"]),
    ("multi_job", {"account": "P", "queue": "prod", "nodes_per_job": 512,
                   "walltime": "13:00:00"},
     ["walltime='13:00:00'", "at most 12:00:00 for 512-node jobs in queue 'prod'"]),
    # prod's walltime cap grows with the job: 12 h up to 1,024 nodes, 18 h to 1,999, 24 h beyond.
    ("multi_job", {"account": "P", "queue": "prod", "nodes_per_job": 1024,
                   "walltime": "12:00:01"}, ["at most 12:00:00 for 1024-node jobs"]),
    ("multi_job", {"account": "P", "queue": "prod", "nodes_per_job": 1999,
                   "walltime": "18:00:01"}, ["at most 18:00:00 for 1999-node jobs"]),
    ("multi_job", {"account": "P", "queue": "prod", "nodes_per_job": 2000,
                   "walltime": "24:00:01"}, ["at most 24:00:00 for 2000-node jobs"]),
    ("multi_job", {"account": "P", "queue": "debug-scaling", "nodes_per_job": 4,
                   "walltime": "1:30:00"},
     ["walltime='1:30:00'", "at most 1:00:00"]),
    ("multi_job", {"account": "P", "queue": "dbug"},
     ["queue='dbug'", "debug", "allow_unlisted_queue=True"]),
    ("multi_job", {"account": "P", "hierarchy": "flat"}, ["hierarchy='flat'", "COMPOSITE"]),
    ("multi_job", {"account": "P", "address": None, "interface": "hsn9"},
     ["interface='hsn9'", "lo", "address="]),
    ("multi_job", {"account": "P", "activate": "yes"}, ["activate='yes'", "True or False"]),
]


@pytest.mark.parametrize("mode,kwargs,words", BAD)
def test_bad_request_named(mode, kwargs, words):
    with pytest.raises(ConfigError) as e:
        site_configs.load("aurora", mode, **{**AT, **kwargs})
    for w in words:
        assert w in str(e.value)
    assert "Fix:" in str(e.value)


def test_an_unlisted_queue_needs_saying_so():
    with pytest.raises(ConfigError, match="queue='lustre_scaling'"):
        aurora.multi_job(account="P", queue="lustre_scaling", nodes_per_job=512, **AT)
    config = aurora.multi_job(account="P", queue="lustre_scaling", nodes_per_job=512,
                              allow_unlisted_queue=True, **AT)
    assert config.executors[0].provider.queue == "lustre_scaling"


def test_a_queue_wide_node_limit_counts_every_job():
    """capacity runs 512 nodes across everybody's jobs (not per user): a request whose own jobs
    exceed a queue-wide limit can never run whole."""
    from parsl_aurora.modes import Queue, Site, check_queue

    site = Site("s", queues={"q": Queue("q", max_nodes=16, max_queue_nodes=40)})
    check_queue(site, "q", 16, "1:00:00", 2)
    with pytest.raises(ConfigError, match="at most 2 jobs of 16 nodes in queue 'q' .it runs 40 "
                                          "nodes at once across everybody's jobs"):
        check_queue(site, "q", 16, "1:00:00", 3)
    assert aurora.QUEUES["capacity"].max_queue_nodes == 512
    assert aurora.QUEUES["capacity"].max_user_queued == 5


def test_prods_running_limit_is_the_projects_and_a_note(capsys):
    aurora.multi_job(account="P", queue="prod", nodes_per_job=256, max_jobs=10, **AT)
    assert capsys.readouterr().err == ""
    aurora.multi_job(account="P", queue="prod", nodes_per_job=256, max_jobs=11, **AT)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at most 10 jobs of a project at once" in err
    assert "colleagues" in err


def test_the_look_alikes_take_short_jobs_and_scale_prod_to_two_nodes():
    from site_configs import local, pbs

    for site in (local.site(local.fake_node()), pbs.site(local.fake_node())):
        assert site.queues["debug"].min_walltime is None
        assert (site.queues["prod"].min_nodes, site.queues["prod"].max_nodes) == (1, 2)
    # Everything else is Aurora's.
    assert local.QUEUES["capacity"] == dataclasses.replace(aurora.QUEUES["capacity"], min_walltime=None)


def test_a_job_above_2048_nodes_gets_one_warning_line(capsys):
    aurora.multi_job(account="P", queue="prod", nodes_per_job=2049, walltime="1:00:00", **AT)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ALCF" in err and "Parsl #4149" in err
    # The same nodes as jobs of at most 2,048 (the options to pass).
    assert err.endswith("consider more, smaller jobs: nodes_per_job=1025, max_jobs=2 (2050 nodes "
                        "in all, for 2049)\n")
    aurora.multi_job(account="P", queue="prod", nodes_per_job=2048, walltime="1:00:00", **AT)
    assert capsys.readouterr().err == ""


def test_a_factory_called_directly_names_a_wrong_keyword():
    with pytest.raises(ConfigError, match="option='nodes'.*nodes_per_job"):
        aurora.multi_job(account="P", nodes=4, **AT)
    with pytest.raises(ConfigError, match="account=None.*requires"):
        aurora.mpi_ensemble(**AT)


@pytest.mark.parametrize("site,mode,choices", [
    ("perlmutter", "multi_job", "aurora, local"),
    ("aurora", "single_job", "multi_job, mpi_ensemble, in_job"),
])
def test_unknown_site_or_mode_lists_known(site, mode, choices):
    with pytest.raises(ConfigError, match=choices):
        site_configs.load(site, mode, account="P")


def test_in_job_missing_nodefile(tmp_path, monkeypatch):
    monkeypatch.delenv("PBS_NODEFILE", raising=False)
    with pytest.raises(ConfigError, match=r"nodefile=None.*\$PBS_NODEFILE"):
        aurora.in_job()
    with pytest.raises(ConfigError, match="nodefile=.*gone.*readable"):
        aurora.in_job(nodefile=str(tmp_path / "gone"))


def test_in_job_empty_nodefile(tmp_path):
    empty = tmp_path / "nodes"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="at least one host"):
        aurora.in_job(nodefile=str(empty))


def test_in_job_nodefile_argument_reaches_launcher(tmp_path):
    f = tmp_path / "nodes"
    f.write_text("a\nb\na\n")
    provider = aurora.in_job(nodefile=str(f), **AT).executors[0].provider
    assert provider.nodes_per_block == 2
    assert f"export PBS_NODEFILE={f}" in provider.worker_init


def test_in_job_refuses_blank_lines_in_nodefile(tmp_path):
    # The launcher would pass the blank line to mpiexec as a host name, after the queue wait.
    f = tmp_path / "nodes"
    f.write_text("a\n\nb\n")
    with pytest.raises(ConfigError, match="line 2 is '': remove blank lines"):
        aurora.in_job(nodefile=str(f))


def test_reliability_defaults(tmp_path):
    """Encrypted, drained before walltime, lost pools noticed in seconds, jobs polled often."""
    for config in (aurora.multi_job(account="P", walltime="1:00:00", **AT),
                   aurora.mpi_ensemble(account="P", walltime="1:00:00", **AT)):
        ex = config.executors[0]
        assert ex.encrypted is True
        assert ex.drain_period == 3600 - 300
        # Lost pools noticed within a minute (Parsl: two), ended jobs within 30 s (Parsl: 60).
        assert (ex.heartbeat_period, ex.heartbeat_threshold) == (10, 60)
        assert ex.provider.status_polling_interval == 30
    assert aurora.multi_job(account="P", walltime="0:10:00", **AT).executors[0].drain_period \
        == 540
    off = aurora.multi_job(account="P", drain_margin="0:00:00", **AT).executors[0]
    assert off.drain_period is None
    # in_job's walltime is the job script's, which started the driver: no draining.
    (tmp_path / "nodes").write_text("x1\n")
    assert aurora.in_job(nodefile=str(tmp_path / "nodes"), **AT).executors[0].drain_period is None
    # The fake cluster's heartbeats and qstat are cheap and local: seconds, not tens of them.
    for mode in ("multi_job", "mpi_ensemble"):
        ex = site_configs.load("local", mode).executors[0]
        assert (ex.heartbeat_period, ex.heartbeat_threshold) == (2, 15)
        assert ex.provider.status_polling_interval == 1
        assert ex.drain_period == 1800 - 180  # the same rule: a tenth of its 30 min walltime
    with pytest.raises(ConfigError, match=r"drain_margin='0:30:00'.*less than the walltime"):
        aurora.multi_job(account="P", walltime="0:30:00", drain_margin="0:30:00", **AT)


def test_container_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"container=.*nope\.sif.*make image"):
        aurora.multi_job(account="P", container=str(tmp_path / "nope.sif"), **AT)


def test_container_from_environment_reaches_the_factory(tmp_path, monkeypatch):
    monkeypatch.setenv("PARSL_CONTAINER", str(tmp_path / "missing.sif"))
    (tmp_path / "nodes").write_text("x1\n")
    with pytest.raises(ConfigError, match="missing.sif"):
        site_configs.load("aurora", "in_job", nodefile=str(tmp_path / "nodes"), **AT)


def test_resume_and_monitoring_options(tmp_path):
    (tmp_path / "runinfo" / "000" / "checkpoint").mkdir(parents=True)
    for mode, kw in (("multi_job", {"account": "P"}), ("mpi_ensemble", {"account": "P"}),
                     ("in_job", {"nodefile": str(tmp_path / "nodes")})):
        (tmp_path / "nodes").write_text("x1\n")
        plain = site_configs.load("aurora", mode, **kw, **AT)
        assert plain.checkpoint_mode is None and not plain.checkpoint_files
        assert plain.monitoring is None
        config = site_configs.load("aurora", mode, resume=True, monitoring=True,
                                   run_dir=str(tmp_path / "runinfo"), **kw, **AT)
        assert config.app_cache is True and config.checkpoint_mode == "task_exit"
        assert config.checkpoint_files == [str(tmp_path / "runinfo" / "000" / "checkpoint")]
        assert config.monitoring.logging_endpoint == \
            f"sqlite:///{tmp_path / 'runinfo' / 'monitoring.db'}"


# ---------------------------------------------------------------- what a block runs
def test_block_lines_in_order(tmp_path, monkeypatch):
    """The driver's environment, the site's lines, the run directory (launcher files go
    there), the user's own lines, then the GPU settings, which the user's lines cannot change
    behind the masks' back; the pools start in the driver's folder."""
    monkeypatch.chdir(tmp_path)
    ex = aurora.multi_job(account="P", worker_init=USER_INIT, **AT).executors[0]
    assert ex.provider.worker_init.splitlines() == [
        f"source {sys.prefix}/bin/activate", "export TMPDIR=/tmp", f"cd {tmp_path}/runinfo",
        USER_INIT, "export ZE_FLAT_DEVICE_HIERARCHY=COMPOSITE",
        "export ONEAPI_DEVICE_SELECTOR=level_zero:gpu"]
    assert ex.launch_cmd.startswith(f"cd {tmp_path} && worker_pool_guard.sh process_worker_pool")
    quiet = aurora.multi_job(account="P", activate=False, **AT).executors[0]
    assert "activate" not in quiet.provider.worker_init


def test_mpi_ranks_get_a_binding_list_from_the_node_model():
    ex = aurora.mpi_ensemble(account="P", **AT).executors[0]
    bind = next(line for line in ex.provider.worker_init.splitlines()
                if "PARSL_AURORA_CPU_BIND" in line).split("=", 1)[1]
    assert bind == topology.rank_cpu_bind(AURORA)
    cpus = {c for entry in bind.removeprefix("list:").split(":")
            for part in entry.split(",") for c in range(int(part.split("-")[0]),
                                                        int(part.split("-")[-1]) + 1)}
    assert not cpus & {0, 52, 104, 156}  # the reserved cores and their hyperthreads


@pytest.mark.parametrize("given,env,masks", [
    (None, None, [f"{g}.{t}" for g in range(6) for t in range(2)]),
    (None, "FLAT", [str(i) for i in range(12)]),
    ("COMPOSITE", "FLAT", [f"{g}.{t}" for g in range(6) for t in range(2)]),
    ("FLAT", None, [str(i) for i in range(12)]),
])
def test_masks_follow_the_gpu_hierarchy_the_block_exports(monkeypatch, given, env, masks):
    if env:
        monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", env)
    else:
        monkeypatch.delenv("ZE_FLAT_DEVICE_HIERARCHY", raising=False)
    ex = aurora.multi_job(account="P", hierarchy=given, **AT).executors[0]
    assert ex.available_accelerators == masks
    flat = masks[0] == "0"
    assert f"export ZE_FLAT_DEVICE_HIERARCHY={'FLAT' if flat else 'COMPOSITE'}" \
        in ex.provider.worker_init.splitlines()


def test_the_driver_environment_is_activated_whatever_its_kind(tmp_path, monkeypatch):
    from parsl_aurora.modes import driver_environment

    venv, conda, plain = tmp_path / "venv", tmp_path / "conda", tmp_path / "plain"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "bin" / "activate").write_text("")
    (conda / "conda-meta").mkdir(parents=True)
    plain.mkdir()
    monkeypatch.setattr(sys, "prefix", str(venv))
    assert driver_environment() == f"source {venv}/bin/activate"
    monkeypatch.setattr(sys, "prefix", str(conda))
    monkeypatch.setenv("CONDA_EXE", "/opt/conda/bin/conda")
    assert driver_environment() == ('eval "$(/opt/conda/bin/conda shell.bash hook)" && '
                                    f"conda activate {conda}")
    monkeypatch.delenv("CONDA_EXE")
    assert driver_environment() == f"export PATH={conda}/bin:$PATH"
    monkeypatch.setattr(sys, "prefix", str(plain))
    assert driver_environment() == f"export PATH={Path(sys.executable).parent}:$PATH"


def test_inside_the_image_pbs_needs_the_bridge(monkeypatch, tmp_path):
    """Apptainer sets APPTAINER_CONTAINER in the image: without the bridge's socket, the PBS
    modes refuse before submitting, saying how to run the driver."""
    monkeypatch.setenv("APPTAINER_CONTAINER", str(tmp_path / "aurora.sif"))
    monkeypatch.delenv("PARSL_AURORA_PBS_BRIDGE", raising=False)
    with pytest.raises(ConfigError, match="pbs-bridge -- apptainer exec aurora.sif"):
        aurora.multi_job(account="P", **AT)


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0,
                    reason="a network namespace of the test's own needs root on Linux (CI is)")
def test_aurora_workers_connect_over_hsn0_by_default(tmp_path):
    """Aurora's default interface, through a real interface of that name: this machine has no
    Slingshot, so a veth called hsn0 in a network namespace the test makes (gone with it)."""
    import shlex
    import subprocess

    probe = ("from site_configs import aurora\n"
             "for mode in (aurora.multi_job, aurora.mpi_ensemble):\n"
             "    print(mode(account='P').executors[0].address)\n")
    script = ("ip link add hsn0 type veth peer name hsn0peer && "
              "ip addr add 10.201.7.5/24 dev hsn0 && ip link set hsn0 up && "
              f"exec {shlex.quote(sys.executable)} -c {shlex.quote(probe)}")
    out = subprocess.run(["unshare", "--net", "sh", "-c", script], cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert out.stdout.split() == ["10.201.7.5", "10.201.7.5"], out.stderr[-2000:]


def test_in_job_in_the_image_on_real_pbs_needs_a_run_dir_the_host_can_read(tmp_path,
                                                                          monkeypatch):
    """A driver in the image hands block scripts to the job host's launcher by path, which
    bash reads without a shell: a run directory with other characters is refused first."""
    from site_configs import pbs

    channel = tmp_path / "channel"
    channel.mkdir()
    os.mkfifo(channel / "requests")
    nodes = tmp_path / "nodes"
    nodes.write_text("x4102c0s0b0n0\n")
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/aurora.sif")
    monkeypatch.setenv("PARSL_AURORA_HOST_LAUNCH", str(channel))
    with pytest.raises(ConfigError) as e:
        pbs.in_job(nodefile=str(nodes), run_dir=str(tmp_path / "my runs"))
    assert (e.value.field, e.value.value) == ("run_dir", str(tmp_path / "my runs"))
    monkeypatch.delenv("PARSL_AURORA_HOST_LAUNCH")
    with pytest.raises(ConfigError) as e:
        pbs.in_job(nodefile=str(nodes), run_dir=str(tmp_path / "runs"))
    assert (e.value.field, e.value.value) == ("PARSL_AURORA_HOST_LAUNCH", None)
