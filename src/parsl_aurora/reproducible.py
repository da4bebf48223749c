"""Are two builds of the same commit the same image? Compared at three levels.

(a) the installed Python packages, (b) every file of the root file system (path, mode, sha256)
except a documented list of volatile files, (c) the squashfs partition's sha256.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

# Files that differ between builds by nature; everything else must match for level (b).
VOLATILE = (
    ".singularity.d/labels.json",  # apptainer adds its own build-date label at every build
    "var/cache/ldconfig/aux-cache",  # ldconfig's cache records file times
    "var/log/*",  # dpkg, bootstrap and alternatives logs carry timestamps
)
PACKAGES = ("import importlib.metadata as m; "
            "print('\\n'.join(sorted(f'{d.name}=={d.version}' for d in m.distributions())))")


def squashfs_id(sif_list: str) -> str:
    """The descriptor id of the root file system in `apptainer sif list` output."""
    for line in sif_list.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 5 and cells[0].isdigit() and cells[4].startswith("FS"):
            return cells[0]
    raise ValueError("no FS partition in the image")


def manifest(root: Path) -> dict[str, str]:
    """path -> 'mode sha256' (or link target) for every entry below root, volatile ones left out."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath, name)
            rel = str(full.relative_to(root))
            if any(fnmatch.fnmatch(rel, v) for v in VOLATILE):
                continue
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"link {os.readlink(full)}"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = f"{st.st_mode:o} {hashlib.sha256(full.read_bytes()).hexdigest()}"
            else:
                out[rel] = f"{st.st_mode:o}"
    return out


def diff(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def describe(image: Path, work: Path) -> dict:
    """Packages, file manifest and squashfs digest of one image."""
    listing = subprocess.run(["apptainer", "sif", "list", str(image)], check=True,
                             capture_output=True, text=True).stdout
    part = work / "root.squashfs"
    with open(part, "wb") as f:
        subprocess.run(["apptainer", "sif", "dump", squashfs_id(listing), str(image)],
                       check=True, stdout=f)
    digest = hashlib.sha256(part.read_bytes()).hexdigest()
    tree = work / "root"
    subprocess.run(["unsquashfs", "-no-progress", "-quiet", "-no-xattrs", "-d", str(tree),
                    str(part)], check=True, capture_output=True)
    packages = subprocess.run(["apptainer", "exec", str(image), "python", "-c", PACKAGES],
                              check=True, capture_output=True, text=True).stdout.split()
    return {"packages": packages, "manifest": manifest(tree), "squashfs": digest}


def compare(first: dict, second: dict) -> dict:
    """Which levels hold, with the differing files for level (b)."""
    files = diff(first["manifest"], second["manifest"])
    return {
        "packages": first["packages"] == second["packages"],
        "files": not files,
        "squashfs": first["squashfs"] == second["squashfs"],
        "differing_files": files[:50],
        "differing_count": len(files),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parsl_aurora.reproducible", description=__doc__)
    p.add_argument("images", nargs="*", type=Path,
                   help="two images to compare (default: build twice from clean)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        images = args.images
        if not images:
            from parsl_aurora import image as img

            root = img.find_root()
            images = [Path(tmp) / f"build{i}.sif" for i in (1, 2)]
            for out in images:
                img.build(root, out, force=True)
        if len(images) != 2:
            p.error("give two images, or none to build twice")
        seen = []
        for i, image in enumerate(images):
            work = Path(tmp, f"x{i}")
            work.mkdir()
            seen.append(describe(image, work))
        result = compare(*seen)
    print(json.dumps(result, indent=2))
    return 0 if result["packages"] and result["files"] else 1


if __name__ == "__main__":
    sys.exit(main())
