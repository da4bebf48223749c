"""Errors for people: each names the field, the bad value, the valid choices and the fix.

Every entry point (the CLI, the example workflows) runs through `run_main`, which prints an
AuroraError as one line and exits 2; tracebacks only with --debug or PARSL_AURORA_DEBUG=1.
The cases and their messages: docs/errors.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

# argparse's status for a usage error; every refusal of ours uses it too.
EXIT_STATUS = 2


class AuroraError(Exception):
    """Base of every error the bundle raises on purpose."""


class ConfigError(AuroraError, ValueError):
    """A configuration value is wrong; raised before anything reaches a scheduler."""

    def __init__(self, field: str, value: object, choices: object, fix: str):
        self.field, self.value, self.choices, self.fix = field, value, choices, fix
        if isinstance(choices, Iterable) and not isinstance(choices, str):
            choices = ", ".join(map(str, choices))
        super().__init__(f"{field}={value!r} is not valid: expected {choices}. Fix: {fix}")


class SchedulerError(AuroraError):
    """The scheduler will not run this workflow's blocks; the message names the cause."""


class ImageError(AuroraError):
    """An image is missing, unreadable, unsigned, altered or holds another Parsl."""


def one_line(prog: str, error: object) -> str:
    """`PROG: error: MESSAGE`, folded onto one line (a tool's stderr inside may span several)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{prog}: error: {text}"


def run_main(main: Callable[[], int], prog: str | None = None, debug: bool | None = None) -> int:
    """Run an entry point: an AuroraError becomes one line on stderr and exit status 2.

    `prog` defaults to the script's name; `debug` (re-raise instead) to $PARSL_AURORA_DEBUG.
    """
    if debug is None:
        debug = os.environ.get("PARSL_AURORA_DEBUG", "") not in ("", "0")
    try:
        return main()
    except AuroraError as e:
        if debug:
            raise
        print(one_line(prog or Path(sys.argv[0]).name, e), file=sys.stderr)
        return EXIT_STATUS
