"""Errors for people: each names the field, the bad value, the valid choices and the fix.

The CLI prints `str(error)` as one line and exits non-zero; tracebacks only with --debug.
"""

from __future__ import annotations

from collections.abc import Iterable


class AuroraError(Exception):
    """Base of every error the bundle raises on purpose."""


class ConfigError(AuroraError, ValueError):
    """A configuration value is wrong; raised before anything reaches a scheduler."""

    def __init__(self, field: str, value: object, choices: object, fix: str):
        self.field, self.value, self.choices, self.fix = field, value, choices, fix
        if isinstance(choices, Iterable) and not isinstance(choices, str):
            choices = ", ".join(map(str, choices))
        super().__init__(f"{field}={value!r} is not valid: expected {choices}. Fix: {fix}")


class ImageError(AuroraError):
    """An image is missing, unreadable, unsigned, altered or holds another Parsl."""
