"""The `parsl-aurora` command: dry-run renders of site configs (and, later, image tools).

Errors, usage mistakes included, print as one line and exit 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import ast
import sys

from parsl_aurora.errors import EXIT_STATUS, ConfigError, one_line, run_main


def _value(text: str):
    """`--set` values: Python literals where they parse (2, True, 'x'), plain strings otherwise."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _settings(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--set", pair, "key=value", "write e.g. --set queue=debug")
        out[key] = _value(val)
    return out


def cmd_render(args) -> int:
    import site_configs
    from parsl_aurora.render import render

    config = site_configs.load(args.site, args.mode, **_settings(args.set))
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
                    "inspect and fetch images.")
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
                   help="a factory option, e.g. --set account=MyProj --set nodes_per_job=4")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_main(lambda: args.func(args), "parsl-aurora", debug=args.debug or None)


if __name__ == "__main__":
    sys.exit(main())
