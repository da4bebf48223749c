"""The `parsl-aurora` command: dry-run renders of site configs (and, later, image tools).

Errors print as one line and exit 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import ast
import sys

from parsl_aurora.errors import AuroraError


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
            raise AuroraError(f"--set {pair!r} is not key=value; write e.g. --set queue=debug")
        out[key] = _value(val)
    return out


def cmd_render(args) -> int:
    import site_configs
    from parsl_aurora.render import render

    config = site_configs.load(args.site, args.mode, **_settings(args.set))
    sys.stdout.write(render(config))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except AuroraError as e:
        if args.debug:
            raise
        print(f"parsl-aurora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
