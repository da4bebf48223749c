"""The reproducibility check: its own logic (partition lookup, manifests, the three levels),
then a real clean build elsewhere compared byte for byte with the session's image."""

import os

import pytest
from conftest import ROOT, needs_apptainer

from parsl_aurora import reproducible as r
from parsl_aurora.errors import ImageError
from parsl_aurora.image import build, inputs

SIF_LIST = """------------------------------------------------------------------------------
ID   |GROUP   |LINK    |SIF POSITION (start-end)  |TYPE
------------------------------------------------------------------------------
1    |1       |NONE    |32176-36366               |Def.FILE
2    |1       |NONE    |36366-44745               |JSON.Generic
3    |1       |NONE    |45056-57761792            |FS (Squashfs/*System/amd64)
"""


def test_squashfs_partition_found():
    assert r.squashfs_id(SIF_LIST) == "3"


def tree(root, text):
    (root / "opt").mkdir(parents=True)
    (root / "opt" / "a.py").write_text(text)
    os.symlink("opt/a.py", root / "link")


def test_manifest_finds_every_change(tmp_path):
    tree(tmp_path / "one", "x = 1\n")
    tree(tmp_path / "two", "x = 1\n")
    tree(tmp_path / "three", "x = 2\n")
    one, two, three = (r.manifest(tmp_path / n) for n in ("one", "two", "three"))
    assert one["link"] == "link opt/a.py" and set(one) == {"opt", "opt/a.py", "link"}
    assert r.diff(one, two) == []
    assert r.diff(one, three) == ["opt/a.py"]
    (tmp_path / "two" / "opt" / "a.py").chmod(0o600)
    assert r.diff(one, r.manifest(tmp_path / "two")) == ["opt/a.py"]


def side(sha, labels=None, manifest=None):
    return {"packages": ["parsl==2025.1.13"], "manifest": manifest or {"f": "1"},
            "squashfs": "aa", "labels": labels or {"k": "v"}, "sha256": sha}


def test_compare_reports_each_level():
    got = r.compare(side("s1"), side("s1"))
    assert (got["packages"], got["files"], got["bytes"]) == (True, True, True)
    assert r.verdict(got) == ("(a) installed packages: holds\n"
                              "(b) every file (path, mode, sha256): holds\n"
                              "(c) the SIF's bytes (sha256): holds\n")
    got = r.compare(side("s1"), side("s2", {"k": "w"}, {"f": "2"}))
    assert (got["packages"], got["files"], got["bytes"]) == (True, False, False)
    assert got["differing_labels"] == {"k": ["v", "w"]} and got["differing_files"] == ["f"]
    assert "(c) the SIF's bytes (sha256): DOES NOT HOLD" in r.verdict(got)


def test_against_needs_the_commit_the_image_was_built_from():
    prov = build.Provenance("c" * 40, 1, 1)
    labels = {"org.opencontainers.image.revision": "c" * 40,
              "parsl-aurora.base-bootstrap": "docker",
              "parsl-aurora.base-from": "debian@sha256:" + "d" * 64}
    assert r.check_against(labels, prov) == ("docker", "sha256:" + "d" * 64)
    assert r.check_against({**labels, "parsl-aurora.base-bootstrap": "debootstrap",
                            "parsl-aurora.base-from": "debian:12-slim"}, prov) == (
        "debootstrap", None)
    with pytest.raises(ImageError, match=f"built from commit {'e' * 40}, this checkout is at "
                                         f"{'c' * 40}. Fix: `git checkout {'e' * 40}`"):
        r.check_against({**labels, "org.opencontainers.image.revision": "e" * 40}, prov)


@needs_apptainer
def test_a_clean_build_elsewhere_gives_the_same_bytes(built_image, tmp_path):
    """Level (c) with one extra build from scratch, not two.

    One side is the session's image. Reusing it is sound: `build` reused or made it from this
    checkout's inputs (its stamp label covers every input file, the commit and
    SOURCE_DATE_EPOCH), and the other side shares nothing with it: another folder, its own
    wheelhouse, and its own base built from scratch here, minutes (or, on a developer's
    machine, days) later. In that folder a code change is built first, from scratch; reverting
    it then rebuilds only the project layer on that base, so the match also shows that the
    cached-base path gives the same bytes as a cold build.
    """
    prov = build.provenance(ROOT, "3.11")
    folder = tmp_path / "elsewhere"
    build.copy_sources(ROOT, folder)
    hello = folder / "src" / "parsl_aurora" / "hello.py"
    original = hello.read_text()
    hello.write_text(original + "\n# a code-only change\n")
    changed = build.build(folder, folder / "aurora.sif", prov=prov)
    changed_sha = r.sha256_file(changed)
    (base,) = (folder / inputs.CACHE).glob("base-*.sif")
    base_before = (base.stat().st_mtime_ns, r.sha256_file(base))

    hello.write_text(original)
    again = build.build(folder, folder / "aurora.sif", prov=prov)
    assert (base.stat().st_mtime_ns, r.sha256_file(base)) == base_before, "base rebuilt"
    assert changed_sha != r.sha256_file(again), "the code change did not reach the image"
    assert r.sha256_file(again) == r.sha256_file(built_image), (
        "a clean build elsewhere differs from the session's image: run "
        "`nox -s reproducible -- --against aurora.sif` to see where")
