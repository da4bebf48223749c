"""Environment modules in a block: the driver's, replayed before its venv as ALCF prescribes,
and what the module commands in worker_init set, asked of Lmod without running worker_init.
"""

from __future__ import annotations

import ast
import os
import shlex
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

HIERARCHY = "ZE_FLAT_DEVICE_HIERARCHY"
SELECTOR = "ONEAPI_DEVICE_SELECTOR"
# ALCF's fix for frameworks 2025.3.1, whose "opencl:gpu;level_zero:gpu" shows each tile twice.
LEVEL_ZERO = "level_zero:gpu"
# Lmod sub-commands that only change the environment: these are asked of Lmod (`module save`
# and the like write files, `list` and `avail` change nothing).
CHANGES = frozenset({"load", "add", "try-load", "try-add", "unload", "rm", "del", "swap", "sw",
                     "switch", "use", "unuse", "purge", "reset", "restore"})
# Words that open or continue a compound command: the command after them is read as if it ran.
KEYWORDS = frozenset({"if", "elif", "then", "else", "while", "until", "do", "!", "{", "(",
                      "time"})
PUNCTUATION = ";&|()"
# What Lmod keeps of its loaded modules; a query of what loading them sets starts without it.
STATE = ("LOADEDMODULES", "_LMFILES_")


class LmodError(Exception):
    """Lmod is not there, or refused a command; the message says which."""


def loaded(env: Mapping[str, str]) -> list[str]:
    """The driver's loaded modules, in load order (`$LOADEDMODULES`)."""
    return [m for m in env.get("LOADEDMODULES", "").split(":") if m]


def _home(env: Mapping[str, str]) -> str | None:
    return env.get("LMOD_PKG") or env.get("MODULESHOME") or None


def replay(env: Mapping[str, str], modules: bool, worker_init_uses: bool) -> list[str]:
    """The block's first lines: `module` made available where the job's shell has none (a
    non-login shell), the driver's MODULEPATH (its `module use` folders), and, when `modules`,
    the driver's modules loaded in order; a block that cannot load them ends. Nothing when no
    module is loaded and worker_init uses none."""
    names = loaded(env) if modules else []
    if not names and not worker_init_uses:
        return []
    lines = []
    home = _home(env)
    if home:
        init = shlex.quote(str(Path(home, "init", "bash")))
        lines.append(f"type module >/dev/null 2>&1 || source {init}")
    if env.get("MODULEPATH"):
        lines.append(f"export MODULEPATH={shlex.quote(env['MODULEPATH'])}")
    if names:
        lines.append(f"module load {' '.join(map(shlex.quote, names))} || exit 1")
    return lines


# ---------------------------------------------------------------- asking Lmod
def ask(env: Mapping[str, str], args: list[str]) -> dict[str, str | None]:
    """The variables `module ARGS` would set (None: unset) in a shell whose environment is
    `env`, as Lmod prints them for Python; nothing is run but Lmod."""
    home = _home(env)
    lmod = env.get("LMOD_CMD") or (str(Path(home, "libexec", "lmod")) if home else "")
    if not lmod or not os.access(lmod, os.X_OK):
        raise LmodError("Lmod is not set up where the config is built ($LMOD_CMD is not set)")
    out = subprocess.run([lmod, "python", *args], env=dict(env), capture_output=True,
                         text=True, check=False)
    changes, ok = _python_changes(out.stdout)
    if out.returncode or not ok:
        said = " ".join(line.strip() for line in out.stderr.splitlines() if line.strip())
        raise LmodError(f"Lmod refused `module {shlex.join(args)}`: {said[:300]}")
    return changes


def ml_commands(env: Mapping[str, str], args: list[str]) -> list[list[str]]:
    """The `module` commands Lmod's `ml ARGS` stands for (`ml x` loads x, `ml -x` unloads)."""
    home = _home(env)
    libexec = env.get("LMOD_DIR") or (str(Path(home, "libexec")) if home else "")
    ml = str(Path(libexec, "ml_cmd")) if libexec else ""
    if not ml or not os.access(ml, os.X_OK):
        raise LmodError("Lmod is not set up where the config is built ($LMOD_DIR is not set)")
    out = subprocess.run([ml, *args], env=dict(env), capture_output=True, text=True,
                         check=False)
    return [c[1:] for c in _commands(out.stdout) if c and c[0] == "module"]


def _python_changes(code: str) -> tuple[dict[str, str | None], bool]:
    """Lmod's Python output read, not run: os.environ[...] = '...', del os.environ[...],
    _mlstatus = True/False."""
    changes: dict[str, str | None] = {}
    ok = False
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return changes, False
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript):
            key = node.targets[0].slice
            if isinstance(key, ast.Constant) and isinstance(node.value, ast.Constant):
                changes[key.value] = node.value.value
        elif isinstance(node, ast.Delete) and isinstance(node.targets[0], ast.Subscript):
            key = node.targets[0].slice
            if isinstance(key, ast.Constant):
                changes[key.value] = None
        elif isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_mlstatus":
            ok = getattr(node.value, "value", False) is True
    return changes, ok


# ---------------------------------------------------------------- reading worker_init
def _commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, as argument lists (keywords dropped)."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=PUNCTUATION)
        lex.whitespace_split = True
        try:
            tokens = list(lex)
        except ValueError:  # an unterminated quote: nothing this reading can follow
            continue
        command: list[str] = []
        for token in [*tokens, ";"]:
            if all(c in PUNCTUATION for c in token):
                while command and command[0] in KEYWORDS:
                    command.pop(0)
                if command:
                    out.append(command)
                command = []
            else:
                command.append(token)
    return out


def uses_modules(script: str) -> bool:
    return any(c[0] in ("module", "ml") for c in _commands(script))


@dataclass(frozen=True)
class Setting:
    """A variable as worker_init leaves it: its value (None: unset), whether a literal
    assignment or a module set it, and the command that did."""

    value: str | None
    by: str  # "export" or "module"
    command: str


def _assignment(word: str) -> tuple[str, str] | None:
    name, eq, value = word.partition("=")
    return (name, value) if eq and name.isidentifier() else None


def read(script: str, env: Mapping[str, str], watched=(HIERARCHY, SELECTOR),
         lmod: Callable = ask, ml: Callable = ml_commands) -> dict[str, Setting]:
    """What worker_init sets of `watched`, in order: literal `export`s, assignments and
    `unset`s, and its `module`/`ml` commands as Lmod says they would run after the driver's
    environment `env`. Other lines are not read. Raises LmodError where Lmod cannot say."""
    env = dict(env)
    found: dict[str, Setting] = {}
    for words in _commands(script):
        text = shlex.join(words)
        pairs = [_assignment(w) for w in words]
        if all(pairs):  # NAME=value ... alone: shell assignments
            sets = dict(pairs)  # type: ignore[arg-type]
        elif words[0] in ("export", "declare", "typeset"):
            sets = dict(p for p in pairs[1:] if p)
        elif words[0] == "unset":
            sets = {w: None for w in words[1:] if not w.startswith("-")}
        else:
            while words and _assignment(words[0]):
                words = words[1:]  # VAR=x module load y: VAR only for that command
            if not words or words[0] not in ("module", "ml"):
                continue
            runs = ml(env, words[1:]) if words[0] == "ml" else [words[1:]]
            for args in runs:
                sub = next((a for a in args if not a.startswith("-")), "")
                if sub not in CHANGES:
                    continue
                for name, value in lmod(env, args).items():
                    _apply(env, name, value)
                    if name in watched:
                        found[name] = Setting(value, "module", text)
            continue
        for name, value in sets.items():
            _apply(env, name, value)
            if name in watched:
                found[name] = Setting(value, "export", text)
    return found


def _apply(env: dict, name: str, value: str | None) -> None:
    if value is None:
        env.pop(name, None)
    else:
        env[name] = value


def set_by_modules(env: Mapping[str, str], name: str, lmod: Callable = ask) -> bool:
    """Whether the driver's `name` is what its loaded modules set (not the user's own
    export): asked of Lmod by loading them afresh. True where Lmod cannot say."""
    names = loaded(env)
    if not names:
        return False
    fresh = {k: v for k, v in env.items()
             if k not in (*STATE, name) and not k.startswith(("_ModuleTable", "__LMOD_REF"))}
    try:
        return lmod(fresh, ["load", *names]).get(name) == env.get(name)
    except LmodError:
        return True
