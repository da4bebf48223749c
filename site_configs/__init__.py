"""Site configs: one module per site, each with the factories multi_job, mpi_ensemble, in_job.

`load()` picks the site and mode from its arguments or from $PARSL_SITE / $PARSL_MODE, so one
workflow script runs unchanged on Aurora and on the fake cluster.
"""

from __future__ import annotations

import importlib
import inspect
import os

from parsl_aurora.errors import ConfigError
from parsl_aurora.modes import MODES

SITES = ("aurora", "local", "pbs")


def factory(site: str, mode: str):
    """The factory function for a site and mode, after checking both names."""
    if site not in SITES:
        raise ConfigError("site", site, SITES, "pass site= or set PARSL_SITE to a known site")
    if mode not in MODES:
        raise ConfigError("mode", mode, MODES, "pass mode= or set PARSL_MODE to a known mode")
    return getattr(importlib.import_module(f"site_configs.{site}"), mode)


def machine(site: str):
    """(Site, Node) of a site: what `parsl-aurora check` holds the machine to."""
    if site not in SITES:
        raise ConfigError("site", site, SITES, "pass --site or set PARSL_SITE to a known site")
    return importlib.import_module(f"site_configs.{site}").machine()


def options(site: str, mode: str) -> list[str]:
    """The keyword options a site's mode takes (including the shared ones from modes.py)."""
    import parsl_aurora.modes as m

    own = inspect.signature(factory(site, mode)).parameters
    shared = inspect.signature(getattr(m, mode)).parameters
    names = [n for n, p in {**shared, **own}.items() if p.kind == p.KEYWORD_ONLY]
    return sorted(set(names))


def load(site: str | None = None, mode: str | None = None, **kwargs):
    """A fresh Parsl Config for `site` and `mode` (default: $PARSL_SITE, $PARSL_MODE).

    `account` defaults to $PARSL_ACCOUNT and `container` (run workers in this image) to
    $PARSL_CONTAINER.
    """
    site = site or os.environ.get("PARSL_SITE") or ""
    mode = mode or os.environ.get("PARSL_MODE") or ""
    make = factory(site, mode)
    known = options(site, mode)
    # Strings a batch script or CI sets once for every workflow it runs.
    for name in ("account", "container"):
        value = os.environ.get(f"PARSL_{name.upper()}")
        if name in known and name not in kwargs and value:
            kwargs[name] = value
    return make(**kwargs)  # unknown or missing options: modes.build names them
