"""The `parsl-aurora` command: dry-run renders of site configs, image tools, the PBS bridge, and
a run's status and cleanup.

Errors, usage mistakes included, print as one line and exit 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from parsl_aurora.errors import EXIT_STATUS, ConfigError, one_line, run_main

# `--set` words for a bool option; anything else is refused rather than guessed.
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def option_types(site: str, mode: str) -> dict[str, object]:
    """Each keyword option of SITE's MODE with its annotated type (the site's own win)."""
    import inspect

    import parsl_aurora.modes as m
    import site_configs

    make = site_configs.factory(site, mode)  # checks both names first
    types = {}
    for f in (getattr(m, mode), make):
        for name, p in inspect.signature(f, eval_str=True).parameters.items():
            if p.kind == p.KEYWORD_ONLY:
                types[name] = p.annotation
    return types


def parse_value(name: str, text: str, kind: object):
    """A `--set` value read as the option's annotated type, never guessed from its look.

    str stays text (account=12345 is a project name); int is read as one, or left as text for
    the factory to refuse by name; bool takes true/false; a tuple is comma-separated
    (binds=/a,/b); an optional value is None when written empty or as None.
    """
    import types
    import typing

    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        if text in ("", "None"):
            return None
        rest = [a for a in args if a is not type(None)]
        kind = rest[0] if len(rest) == 1 else kind
    if kind is str:
        return text
    if kind is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ConfigError(name, text, "true or false",
                          f"write --set {name}=true or --set {name}=false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            return text  # the factory's own check names what it expected
    if typing.get_origin(kind) is tuple and typing.get_args(kind)[:1] == (str,):
        return tuple(word.strip() for word in text.split(",") if word.strip())
    raise ConfigError(name, text, "an option the command line can set (text, integers, "
                      "true/false, comma-separated lists)",
                      f"{name} is a {getattr(kind, '__name__', kind)}: pass it from Python, "
                      f"e.g. site_configs.load({name}=...)")


def settings(pairs: list[str], site: str, mode: str) -> dict:
    """`--set KEY=VALUE` pairs as keyword arguments for SITE's MODE factory."""
    kinds = option_types(site, mode) if pairs else {}
    out = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--set", pair, "key=value", "write e.g. --set queue=debug")
        # An unknown key stays text: load() refuses it, listing the options there are.
        out[key] = parse_value(key, val, kinds[key]) if key in kinds else val
    return out


def cmd_render(args) -> int:
    import site_configs
    from parsl_aurora.render import render

    given = settings(args.set, args.site, args.mode)
    if "interface" not in given and "address" not in given:
        # A dry run works anywhere: the interface's address is only looked up where it runs.
        given["address"] = "<interchange-address>"
    config = site_configs.load(args.site, args.mode, **given)
    sys.stdout.write(render(config))
    return 0


def cmd_pull(args) -> int:
    from pathlib import Path

    from parsl_aurora.publish import pull

    sha = pull(args.registry, args.tag, Path(args.verify_key), out=Path(args.out),
               insecure=args.insecure)
    print(f"{args.out}: signature and sha256 {sha} verified")
    return 0


def cmd_inspect(args) -> int:
    from pathlib import Path

    from parsl_aurora.publish import inspect

    key = Path(args.verify_key) if args.verify_key else None
    sys.stdout.write(inspect(Path(args.image), key))
    return 0


def cmd_pbs_bridge(args) -> int:
    from parsl_aurora.bridge import HOW, run_bridged

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("command", None, "the command to run with PBS reachable",
                          f"write it after --, e.g. `{HOW}`")
    _image_runs_here(command)
    return run_bridged(command)


def _image_runs_here(command: list[str]) -> None:
    """The driver in the image on a login node is opt-in: ALCF runs containers on compute
    nodes only. Before serving PBS to `apptainer exec IMAGE ...`, check that the image runs
    here at all, and refuse in one line if not."""
    import shutil
    from pathlib import Path

    from parsl_aurora import selfcheck

    if Path(command[0]).name != "apptainer" or command[1:2] != ["exec"]:
        return
    image = next((w for w in command[2:] if w.endswith(".sif") or Path(w).is_file()), None)
    exe = shutil.which(command[0])
    check = selfcheck.image_mounts(image, exe, selfcheck.LOGIN)
    if check.ok is False:
        raise ConfigError("command", " ".join(command[:4]), "an image that runs on this node",
                          f"{check.detail}. ALCF runs containers on compute nodes only: run the "
                          "driver from a venv (docs/aurora.md, routes), or here only where "
                          "`parsl-aurora check --image IMAGE` says route (d) works")


def cmd_host_launcher(args) -> int:
    from parsl_aurora.bridge import HOST_SCRIPT

    sys.stdout.write(HOST_SCRIPT.read_text())
    return 0


def cmd_status(args) -> int:
    from parsl_aurora import runs

    runs.render(runs.status(args.run_dir), runs.console())
    return 0


def cmd_cleanup(args) -> int:
    from parsl_aurora import runs

    for line in runs.cleanup_lines(runs.cleanup(args.run_dir, force=args.force)):
        print(line)
    return 0


def cmd_check(args) -> int:
    import os

    import site_configs
    from parsl_aurora import selfcheck

    site, node = site_configs.machine(args.site or os.environ.get("PARSL_SITE") or "aurora")
    checks = selfcheck.run(site, node, image=args.image, in_job=args.in_job, pools=args.pools)
    sys.stdout.write(selfcheck.report(checks, selfcheck.COMPUTE if args.in_job
                                      else selfcheck.LOGIN))
    return 1 if any(c.ok is False for c in checks) else 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line with the fix, like every other error here.

    Subcommands' parsers are made from the same class (add_subparsers' default).
    """

    def error(self, message: str):
        self.exit(EXIT_STATUS, one_line(self.prog, f"{message}. Fix: see `{self.prog} --help`")
                  + "\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="parsl-aurora",
        description="Run Parsl on ALCF Aurora from one frozen environment: render site configs, "
                    "inspect and fetch images, watch and clean up runs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser(
        "render", help="print the PBS script (or in-job launch script) a config would submit",
        description="Dry run: build the config for SITE and MODE and print the exact script "
                    "Parsl's provider would hand to qsub (PBS modes) or run (in_job). "
                    "Nothing is submitted.")
    r.add_argument("site", help="aurora or local")
    r.add_argument("mode", help="multi_job, mpi_ensemble or in_job")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a factory option, read as the type the factory declares: e.g. "
                        "--set account=12345 (text) --set nodes_per_job=4 --set monitoring=true "
                        "--set binds=/opt/aurora,/scratch:/data (comma-separated)")
    r.set_defaults(func=cmd_render)
    pl = sub.add_parser(
        "pull", help="fetch a published image, keeping it only if signature and sha256 match",
        description="Pull oras://REGISTRY:TAG next to --out, check its signature against "
                    "--verify-key and its sha256 against the one published at TAG.sha256, and "
                    "only then move it into place. A failed check leaves nothing behind.")
    pl.add_argument("registry", help="HOST[:PORT]/REPO, e.g. 127.0.0.1:5000/parsl-aurora/aurora")
    pl.add_argument("tag", help="e.g. parsl-2025.1.13-8d5a104")
    pl.add_argument("--verify-key", required=True, metavar="PUBLIC.pem",
                    help="the publisher's public key")
    pl.add_argument("--insecure", action="store_true", help="plain-http registry (--no-https)")
    pl.add_argument("--out", default="aurora.sif", help="where to put it (default: aurora.sif)")
    pl.set_defaults(func=cmd_pull)
    ins = sub.add_parser(
        "inspect", help="print an image's provenance labels and whether it is signed",
        description="Print the image's provenance from its labels (Parsl version, git commit, "
                    "lock sha256, SOURCE_DATE_EPOCH; a user's extra lock), its sha256, its "
                    "signatures (checked with --verify-key), and how to check that a checkout "
                    "of that commit builds the same bytes.")
    ins.add_argument("image", nargs="?", default="aurora.sif")
    ins.add_argument("--verify-key", default=None, metavar="PUBLIC.pem",
                     help="also check the signature with this public key")
    ins.set_defaults(func=cmd_inspect)
    br = sub.add_parser(
        "pbs-bridge", help="run a command (the driver in the image) that can reach PBS",
        description="Serve qsub, qstat and qdel of this login node to COMMAND, typically "
                    "`apptainer exec aurora.sif python workflow.py`, whose image cannot "
                    "authenticate to PBS itself; the bridge ends with the command.")
    br.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    br.set_defaults(func=cmd_pbs_bridge)
    hl = sub.add_parser(
        "host-launcher", help="print the job-host script that runs an in_job driver in the image",
        description="Print the bash script a PBS job runs on its host as `bash SCRIPT IMAGE "
                    "COMMAND...`: COMMAND (the in_job driver) runs in IMAGE, and the blocks it "
                    "asks for start on the host, where PALS's mpiexec and apptainer are "
                    "(examples/in_job.pbs). Run it in the image: `apptainer exec IMAGE "
                    "parsl-aurora host-launcher > host.sh`.")
    hl.set_defaults(func=cmd_host_launcher)
    st = sub.add_parser(
        "status", help="a run's PBS jobs and their states, its tasks, where its logs are",
        description="Show a workflow run: its PBS jobs (blocks) with their states from one "
                    "`qstat -x` call, its tasks done/failed/pending from parsl.log, whether its "
                    "driver still runs, and where its logs are. Works while the driver runs and "
                    "after it died.")
    st.add_argument("run_dir", nargs="?", default="runinfo", metavar="RUN_DIR",
                    help="runinfo/NNN, or a folder of runs for its newest (default: runinfo)")
    st.set_defaults(func=cmd_status)
    cl = sub.add_parser(
        "cleanup", help="qdel the jobs of a run that are still queued or running",
        description="Delete (qdel) exactly the jobs of RUN_DIR's run that are queued or "
                    "running: those in its pbs_jobs.txt and those named with its tag; no other "
                    "job. Refuses while the run's driver still runs. Running it again deletes "
                    "nothing more.")
    cl.add_argument("run_dir", nargs="?", default="runinfo", metavar="RUN_DIR",
                    help="runinfo/NNN, or a folder of runs for its newest (default: runinfo)")
    cl.add_argument("--force", action="store_true",
                    help="delete even when the driver seems to run (on another login node)")
    cl.set_defaults(func=cmd_cleanup)
    ck = sub.add_parser(
        "check", help="check in a minute what the bundle assumes of this machine, and which "
                      "routes work here",
        description="Check, where it runs, each assumption the bundle makes: apptainer and an "
                    "unprivileged mount of the image, what an image build needs, the "
                    "interchange's interface and open-file limit, the driver's Python against "
                    "the image's, the modules a block will load, the queue table against "
                    "`qstat -Qf`, and with --in-job (inside a one-node job) PALS taking the "
                    "launcher's lines; then which routes work. Exit 1 when a check fails.")
    ck.add_argument("--site", default=None, help="aurora, local or pbs (default: $PARSL_SITE, "
                                                 "else aurora)")
    ck.add_argument("--image", default=None, metavar="SIF", help="the image workers would use")
    ck.add_argument("--in-job", action="store_true",
                    help="run inside a PBS job: also check PALS and the compute node's side")
    ck.add_argument("--pools", type=int, default=2048, metavar="N",
                    help="worker pools (nodes) one interchange should hold (default: 2048)")
    ck.set_defaults(func=cmd_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: args.func(args), "parsl-aurora", debug=args.debug or None)


if __name__ == "__main__":
    sys.exit(main())
