"""Build aurora.sif: lock.py (the packages' lock, a user's own), inputs.py (what a build is made
of), sif.py (the SIF format: header, labels), build.py (the effects; `python -m` runs its main).

Two layers: a base (OS, Python, the locked packages), cached under a key of its inputs, and the
project built `From:` it. Pure functions compute every file, command, key and build argument and
normalise the SIF header; `build.lock()`, `build.build()` and `build.build_extra()` run them.
"""
