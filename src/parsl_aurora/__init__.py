"""parsl-aurora: run Parsl on ALCF Aurora from one frozen environment.

Modules: topology (node model, affinity), modes (the three execution modes), fake (the local
stand-in for PBS and PALS), render and cli (dry runs, image tools).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("parsl-aurora")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"
