"""Image build: a cold build beside a rebuild after a change to the project's code only; SIF size.

    python benchmarks/image_build.py [--builds 2]

Each round clones this checkout (with its uncommitted changes and its wheelhouse) into a fresh
folder, builds there from nothing, changes a file under src/ and builds again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import harness
from harness import ROOT, WORK, Target

BUILDS = 2
REBUILD_SECONDS = 15
REBUILD_OF_COLD = 0.2
MAX_MB = 60
CHANGED = "src/parsl_aurora/__init__.py"
ABOUT = f"""
`python benchmarks/image_build.py`: wall seconds of `python -m parsl_aurora.image build` (what
`make image` runs) in a fresh clone of this checkout (with its uncommitted changes). "Cold": no
image and no cached layer, in a fresh clone whose apptainer and XDG caches are empty folders of
its own; the locked wheels are copied in (`.wheelhouse`), so downloads are not timed.
"Code-only": right after, a comment is appended to `{CHANGED}` and the same command runs again.
The two are interleaved round by round. Target: a code-only rebuild of at most
{REBUILD_SECONDS} s or at most {REBUILD_OF_COLD:g} of a cold build (either is enough); the SIF
under {MAX_MB} MB.
"""


def clone(dest: Path) -> Path:
    """git clone of ROOT plus its uncommitted changes and its wheelhouse."""
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    changed = subprocess.run(["git", "status", "--porcelain", "-uall"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.splitlines()
    for line in changed:
        rel = line[3:].split(" -> ")[-1]
        src, dst = ROOT / rel, dest / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif not src.exists():
            dst.unlink(missing_ok=True)
    if (ROOT / ".wheelhouse").is_dir():
        shutil.copytree(ROOT / ".wheelhouse", dest / ".wheelhouse")
    return dest


def build(repo: Path) -> float:
    """Seconds of one `python -m parsl_aurora.image build` in repo, its caches inside repo."""
    cache = repo / ".bench-cache"
    env = {**os.environ, "APPTAINER_CACHEDIR": str(cache / "apptainer"),
           "XDG_CACHE_HOME": str(cache / "xdg")}
    return harness.timed([sys.executable, "-m", "parsl_aurora.image", "build"], cwd=repo,
                         env=env)


def measure(builds: int = BUILDS) -> dict:
    values: dict[str, list[float]] = {"cold": [], "code-only": [], "size": []}
    for i in range(builds):
        repo = clone(WORK / "repo")
        values["cold"].append(build(repo))
        changed = repo / CHANGED
        changed.write_text(changed.read_text() + f"# benchmark change {i} {time.time()}\n")
        values["code-only"].append(build(repo))
        values["size"].append((repo / "aurora.sif").stat().st_size / 1e6)
        print(f"image build: round {i + 1}/{builds} done", file=sys.stderr, flush=True)
    groups = [{"title": "Build", "unit": "s", "fmt": "{:.0f}", "baseline": "cold",
               "cases": ["cold", "code-only"], "labels": {
                   "cold": "cold build", "code-only": f"code-only rebuild (`{CHANGED}`)"},
               "targets": {"code-only": [Target(REBUILD_SECONDS).as_dict(),
                                         Target(REBUILD_OF_COLD, of="cold").as_dict()]}},
              {"title": "Size", "unit": "MB", "fmt": "{:.1f}", "baseline": None,
               "cases": ["size"], "labels": {"size": "`aurora.sif` after the code-only rebuild"},
               "targets": {"size": [Target(MAX_MB).as_dict()]}}]
    return {"about": ABOUT, "runs": builds, "values": values, "groups": groups}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builds", type=int, default=BUILDS, help="rounds of cold + code-only")
    a = p.parse_args()
    print(harness.report("Image build", measure(a.builds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
