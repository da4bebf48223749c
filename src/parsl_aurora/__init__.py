"""parsl-aurora: run Parsl on ALCF Aurora from one frozen environment.

Modules: topology (node model, affinity), modes (the three execution modes), fake (the local
stand-in for PBS and PALS), render and cli (dry runs), image and container (the Apptainer image).
"""


def __getattr__(name: str):
    # Lazy: every fake qsub and worker start imports this package; metadata lookups cost ~30 ms.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("parsl-aurora")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
