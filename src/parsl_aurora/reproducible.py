"""Are two builds of one commit the same image? Compared at three levels: (a) the installed
Python packages, (b) every file of the root file system (path, mode, sha256), (c) the SIF's bytes.

`nox -s reproducible` builds twice from clean, each in its own folder; `-- --against IMAGE`
rebuilds this checkout once and says whether IMAGE (e.g. a pulled one) is what it builds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from parsl_aurora.errors import ImageError, run_main
from parsl_aurora.image import build, inputs
from parsl_aurora.publish import sha256_file

PACKAGES = ("import importlib.metadata as m; "
            "print('\\n'.join(sorted(f'{d.name}=={d.version}' for d in m.distributions())))")
LEVELS = (("packages", "(a) installed packages"),
          ("files", "(b) every file (path, mode, sha256)"),
          ("bytes", "(c) the SIF's bytes (sha256)"))


def squashfs_id(sif_list: str) -> str:
    """The descriptor id of the root file system in `apptainer sif list` output."""
    for line in sif_list.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 5 and cells[0].isdigit() and cells[4].startswith("FS"):
            return cells[0]
    raise ValueError("no FS partition in the image")


def manifest(root: Path) -> dict[str, str]:
    """path -> 'mode sha256' (or link target, or mode for other entries) below root."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath, name)
            st = full.lstat()
            rel = str(full.relative_to(root))
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
    """Packages, file manifest, labels, squashfs digest and sha256 of one image."""
    listing = subprocess.run(["apptainer", "sif", "list", str(image)], check=True,
                             capture_output=True, text=True).stdout
    part = work / "root.squashfs"
    with open(part, "wb") as f:
        subprocess.run(["apptainer", "sif", "dump", squashfs_id(listing), str(image)],
                       check=True, stdout=f)
    tree = work / "root"
    subprocess.run(["unsquashfs", "-no-progress", "-quiet", "-no-xattrs", "-d", str(tree),
                    str(part)], check=True, capture_output=True)
    packages = subprocess.run(["apptainer", "exec", str(image), "python", "-c", PACKAGES],
                              check=True, capture_output=True, text=True).stdout.split()
    return {"packages": packages, "manifest": manifest(tree), "squashfs": sha256_file(part),
            "labels": build.image_labels(image), "sha256": sha256_file(image)}


def compare(first: dict, second: dict) -> dict:
    """Which levels hold, with what differs where they do not."""
    files = diff(first["manifest"], second["manifest"])
    labels = diff(first["labels"], second["labels"])
    return {
        "packages": first["packages"] == second["packages"],
        "files": not files,
        "bytes": first["sha256"] == second["sha256"],
        "sha256": [first["sha256"], second["sha256"]],
        "squashfs_equal": first["squashfs"] == second["squashfs"],
        "differing_labels": {k: [first["labels"].get(k), second["labels"].get(k)]
                             for k in labels},
        "differing_files": files[:50],
        "differing_count": len(files),
    }


def verdict(result: dict) -> str:
    """One line per level: holds, or does not."""
    return "".join(f"{name}: {'holds' if result[key] else 'DOES NOT HOLD'}\n"
                   for key, name in LEVELS)


def check_against(labels: dict[str, str], prov: build.Provenance) -> tuple[str, str | None]:
    """The bootstrap and base digest to rebuild an image with, from its labels; an ImageError
    when this checkout is not the commit the image was built from."""
    built_from = labels.get(inputs.LABEL_COMMIT, "(no revision label)")
    if built_from != prov.commit:
        raise ImageError(f"the image was built from commit {built_from}, this checkout is at "
                         f"{prov.commit}. Fix: `git checkout {built_from}` (or `git worktree "
                         f"add ../at-{built_from[:7]} {built_from}`) and run it there")
    bootstrap = labels.get("parsl-aurora.base-bootstrap", "debootstrap")
    base_from = labels.get("parsl-aurora.base-from", "")
    digest = base_from.split("@", 1)[1] if bootstrap == "docker" and "@" in base_from else None
    return bootstrap, digest


def clean_build(root: Path, folder: Path, prov: build.Provenance, **build_kw) -> Path:
    """Build in FOLDER from a copy of what the build reads: no cached base, no wheelhouse."""
    build.copy_sources(root, folder)
    return build.build(folder, folder / inputs.IMAGE, prov=prov, **build_kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parsl_aurora.reproducible", description=__doc__)
    p.add_argument("images", nargs="*", type=Path,
                   help="two images to compare (default: build twice from clean)")
    p.add_argument("--against", type=Path, default=None, metavar="IMAGE",
                   help="rebuild this checkout from clean and compare with IMAGE")
    p.add_argument("--keep", action="store_true", help="keep the build folders")
    args = p.parse_args(argv)

    def run() -> int:
        tmp = Path(tempfile.mkdtemp(prefix="parsl-aurora-reproducible-"))
        try:
            images = list(args.images)
            if args.against is not None or not images:
                root = build.find_root()
                if args.against is not None:
                    if not args.against.is_file():
                        raise ImageError(f"--against {args.against}: no such image")
                    labels = build.image_labels(args.against)
                    python = labels.get(inputs.LABEL_PYTHON) or inputs.running_python()
                    prov = build.provenance(root, python)
                    bootstrap, digest = check_against(labels, prov)
                    images = [args.against.resolve(),
                              clean_build(root, tmp / "build", prov, python=python,
                                          bootstrap=bootstrap, base_digest=digest)]
                else:
                    prov = build.provenance(root, inputs.running_python())
                    images = [clean_build(root, tmp / f"build{i}", prov) for i in (1, 2)]
            if len(images) != 2:
                p.error("give two images, --against IMAGE, or nothing to build twice")
            seen = []
            for i, image in enumerate(images):
                work = tmp / f"describe{i}"
                work.mkdir()
                seen.append(describe(image, work))
            result = compare(*seen)
        finally:
            if args.keep:
                print(f"build folders kept in {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(result, indent=2))
        print(verdict(result), end="")
        if args.against is not None:
            print(f"{args.against}: " + ("the same bytes as this checkout builds"
                                         if result["bytes"] else
                                         "NOT what this checkout builds (see above)"))
        return 0 if result["bytes"] else 1

    return run_main(run, p.prog)


if __name__ == "__main__":
    sys.exit(main())
