"""Errors for people: each names the field, the bad value, the valid choices and the fix.

The CLI and the example workflows run through `run_main`: an AuroraError is one line and exit
status 2. Any other script gets the one line too (exit status 1, Python's for an uncaught
exception): the first AuroraError a process creates installs a sys.excepthook that prints ours
as one line and hands every other exception to the hook it replaced. Tracebacks only with
--debug or PARSL_AURORA_DEBUG=1. The cases and their messages: docs/errors.md.
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

    def __init__(self, *args):
        # Here rather than at import or in load(): a user's script that never calls load()
        # (factories called directly, its own `raise ConfigError(...)`) gets one line too.
        install_excepthook()
        super().__init__(*args)


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


def ours(error: BaseException) -> AuroraError | None:
    """The AuroraError an exception is or carries: itself, or the one Parsl's
    BadStateException (what every task future of a broken executor raises) was made from."""
    if isinstance(error, AuroraError):
        return error
    parsl_errors = sys.modules.get("parsl.executors.errors")  # no Parsl import for this
    if parsl_errors and isinstance(error, parsl_errors.BadStateException):
        cause = getattr(error.executor, "executor_exception", None)
        if isinstance(cause, AuroraError):
            return cause
    return None


# Set by run_main(debug=True) (`parsl-aurora --debug`): the error it re-raises reaches the
# hook below, which must then show the traceback too.
_debugging = False


def _debug() -> bool:
    return _debugging or os.environ.get("PARSL_AURORA_DEBUG", "") not in ("", "0")


def _prog() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name not in ("", "-c") else "python"


_previous_hook = None


def _excepthook(kind, value, tb) -> None:
    error = ours(value) if isinstance(value, Exception) else None
    if error is None or _debug():
        (_previous_hook or sys.__excepthook__)(kind, value, tb)
        return
    print(one_line(_prog(), error), file=sys.stderr)


def install_excepthook() -> None:
    """Print an uncaught AuroraError as one line; other exceptions go to the hook there was.

    Installed once per process, so a hook a script sets later stays in charge.
    """
    global _previous_hook
    if _previous_hook is None:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook


def run_main(main: Callable[[], int], prog: str | None = None, debug: bool | None = None) -> int:
    """Run an entry point: an AuroraError becomes one line on stderr and exit status 2.

    `prog` defaults to the script's name; `debug` (re-raise instead) to $PARSL_AURORA_DEBUG.
    """
    global _debugging
    if debug is None:
        debug = _debug()
    elif debug:
        _debugging = True
    try:
        return main()
    except Exception as e:
        error = ours(e)
        if error is None or debug:
            raise
        print(one_line(prog or _prog(), error), file=sys.stderr)
        return EXIT_STATUS
