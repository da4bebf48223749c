"""The reproducibility check's own logic: partition lookup, manifests, level-by-level compare."""

import os

from conftest import needs_apptainer

from parsl_aurora import reproducible as r

SIF_LIST = """------------------------------------------------------------------------------
ID   |GROUP   |LINK    |SIF POSITION (start-end)  |TYPE
------------------------------------------------------------------------------
1    |1       |NONE    |32176-36366               |Def.FILE
2    |1       |NONE    |36366-44745               |JSON.Generic
3    |1       |NONE    |45056-57761792            |FS (Squashfs/*System/amd64)
"""


def test_squashfs_partition_found():
    assert r.squashfs_id(SIF_LIST) == "3"


def tree(root, text, log):
    (root / "opt").mkdir(parents=True)
    (root / "opt" / "a.py").write_text(text)
    (root / "var" / "log").mkdir(parents=True)
    (root / "var" / "log" / "dpkg.log").write_text(log)
    os.symlink("opt/a.py", root / "link")


def test_volatile_files_are_ignored_and_real_changes_found(tmp_path):
    tree(tmp_path / "one", "x = 1\n", "installed at 10:00\n")
    tree(tmp_path / "two", "x = 1\n", "installed at 10:05\n")
    tree(tmp_path / "three", "x = 2\n", "installed at 10:00\n")
    one, two, three = (r.manifest(tmp_path / n) for n in ("one", "two", "three"))
    assert "var/log/dpkg.log" not in one and one["link"] == "link opt/a.py"
    assert r.diff(one, two) == []
    assert r.diff(one, three) == ["opt/a.py"]


def test_compare_reports_each_level():
    a = {"packages": ["parsl==2025.1.13"], "manifest": {"f": "1"}, "squashfs": "aa"}
    b = {"packages": ["parsl==2025.1.13"], "manifest": {"f": "1"}, "squashfs": "bb"}
    got = r.compare(a, b)
    assert (got["packages"], got["files"], got["squashfs"]) == (True, True, False)


@needs_apptainer
def test_two_builds_of_one_tree_match_in_packages_and_files(built_image, tmp_path):
    """A second clean build equals the session's image at levels (a) and (b) (see README)."""
    from pathlib import Path

    from parsl_aurora import image

    second = image.build(image.find_root(Path(__file__).parent), tmp_path / "again.sif",
                         force=True)
    seen = []
    for i, sif in enumerate((built_image, second)):
        (tmp_path / str(i)).mkdir()
        seen.append(r.describe(sif, tmp_path / str(i)))
    result = r.compare(*seen)
    assert result["packages"], seen[0]["packages"]
    assert result["files"], result["differing_files"]
