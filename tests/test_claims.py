"""The claims ledger: each claim in README.md and docs/*.md names the check that holds it.

`python tests/test_claims.py` lists the ledger; the tests fail when a marker names no check.

A sentence that says what the software does or how fast ends with a marker on its last line:
`<!-- claim: tests/test_x.py::test_y -->` (a test function, `Class::test_y`, or a
parametrised test's base name), `<!-- claim: benchmarks/x.py -->` (the script that measures
it), `<!-- claim: docs/benchmarks.md -->` (every number in the sentence is one the benchmarks
rendered there), or `<!-- unchecked: why nothing here can check it -->`. One marker may name
several checks, separated by spaces.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BENCH_DOC = "docs/benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results.json"
MARKER = re.compile(r"<!--\s*(claim|unchecked):\s*(.*?)\s*-->")
# Anything that looks meant as a marker but does not parse is an error, not a silent non-claim.
LOOKS_LIKE = re.compile(r"<!--\s*(claim|uncheck)", re.IGNORECASE)
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\d])")


@dataclass(frozen=True)
class Marker:
    doc: str  # path relative to the root
    line: int
    kind: str  # "claim" or "unchecked"
    text: str  # the checks (claim) or the reason (unchecked)
    sentence: str  # the sentence the marker ends, markdown as written

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def markers(text: str, name: str) -> list[Marker]:
    """Every marker in one markdown text, with the sentence each one ends."""
    found = []
    for m in MARKER.finditer(text):
        before = MARKER.sub("", text[:m.start()]).rstrip()
        # The sentence: a table's row whole, else back to the previous sentence end, blank line
        # or colon.
        row = before.rfind("\n") + 1
        start = row - 1 if before[row:].startswith("|") else max(
            before.rfind(". "), before.rfind(".\n"), before.rfind("\n\n"), before.rfind(": "))
        found.append(Marker(name, text.count("\n", 0, m.start()) + 1, m[1], m[2],
                            " ".join(before[start + 1:].split())))
    return found


def malformed(text: str, name: str) -> list[str]:
    """Comments that look meant as markers but do not parse: a typo must not drop a claim."""
    good = {m.start() for m in MARKER.finditer(text)}
    return [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: "
            f"not a marker: {text[m.start():text.find('-->', m.start()) + 3]!r}"
            for m in LOOKS_LIKE.finditer(text) if m.start() not in good]


def _name(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def ledger() -> list[Marker]:
    return [m for doc in DOCS for m in markers(doc.read_text(), _name(doc))]


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def problem(target: str) -> str | None:
    """Why `target` names no check here, or None when it does."""
    file, _, names = target.partition("::")
    path = ROOT / file
    if not path.is_file():
        return f"{file} does not exist"
    if not names:
        return None
    if not (file.startswith("tests/") and path.name.startswith("test_")):
        return f"{file} is not a test module, so it has no test to name"
    body = _tree(path).body
    parts = names.split("::")
    for i, name in enumerate(parts):
        base = name.split("[")[0]  # a parametrised test's id names its base function
        kinds = (ast.ClassDef,) if i < len(parts) - 1 else (ast.FunctionDef, ast.AsyncFunctionDef)
        node = next((n for n in body if isinstance(n, kinds) and n.name == base), None)
        if node is None:
            return f"{file} has no {'class' if i < len(parts) - 1 else 'function'} {base}"
        if not base.startswith("Test" if i < len(parts) - 1 else "test"):
            return f"{file}::{base} is not a test pytest collects"
        body = node.body
    return None


def figures_missing(sentence: str, rendered: str) -> list[str]:
    """Numbers in `sentence` (code spans aside) that `rendered` does not hold as a number."""
    held = set(NUMBER.findall(rendered))
    return [n for n in NUMBER.findall(re.sub(r"`[^`]*`", "", sentence)) if n not in held]


def problems(found: list[Marker], bench: str | None = None) -> list[str]:
    """What is wrong with each marker; `bench`: the benchmarks page's text (default: the
    committed docs/benchmarks.md)."""
    bench = (ROOT / BENCH_DOC).read_text() if bench is None else bench
    out = []
    for m in found:
        if m.kind == "unchecked":
            if len(m.text.split()) < 3:
                out.append(f"{m.where()}: unchecked needs its reason in words: {m.text!r}")
            continue
        if not m.text:
            out.append(f"{m.where()}: a claim marker names no check")
        for target in m.text.replace(",", " ").split():
            if why := problem(target):
                out.append(f"{m.where()}: {target}: {why}")
            elif target == BENCH_DOC and (
                    missing := figures_missing(m.sentence, bench)):
                out.append(f"{m.where()}: {', '.join(missing)} not in {BENCH_DOC}: "
                           f"{m.sentence!r}")
    return out


def test_every_marker_names_a_check_that_exists(capsys):
    found = ledger()
    assert not (p := problems(found)), "\n".join(p)
    claims = [m for m in found if m.kind == "claim"]
    with capsys.disabled():
        print(f"\nclaims ledger: {len(claims)} claims name their check, "
              f"{len(found) - len(claims)} are marked unchecked")


def test_every_marker_parses():
    assert [p for doc in DOCS for p in malformed(doc.read_text(), _name(doc))] == []


def test_a_marker_to_a_missing_check_is_reported():
    # The ledger's own failure modes, on a document written here.
    doc = (
        "It retries. <!-- claim: tests/test_claims.py::test_every_marker_parses -->\n"
        "It is encrypted. <!-- claim: tests/test_security.py::test_no_such_test -->\n"
        "It scales. <!-- claim: benchmarks/gone.py -->\n"
        "It runs a class. <!-- claim: tests/test_claims.py::TestNone::test_x -->\n"
        "Helpers are no tests. <!-- claim: tests/test_claims.py::problem -->\n"
        "Rebuilds take 11 s\nagainst 56 s (`python3.11`). <!-- claim: docs/benchmarks.md -->\n"
        "Rebuilds take 17 s. <!-- claim: docs/benchmarks.md -->\n"
        "Nobody knows. <!-- unchecked: no -->\n"
        "Bad. <!-- claims: tests/test_claims.py -->\n"
        "| 11 s | 0.20x | 12 |\n| a row | 16 s | <!-- claim: docs/benchmarks.md -->\n")
    found = markers(doc, "doc.md")
    assert found[5].sentence == "Rebuilds take 11 s against 56 s (`python3.11`)."
    # A benchmarks page of its own: the test does not move with the committed figures.
    p = problems(found, "| cold build | 56 | 52-66 |\n| rebuild | 11 | 0.20 |\n")
    assert found[-1].sentence == "| a row | 16 s |"
    assert [line.split(":")[1] for line in p] == ["2", "3", "4", "5", "8", "9", "12"], p
    assert p[0].endswith("tests/test_security.py has no function test_no_such_test")
    assert p[1].endswith("benchmarks/gone.py does not exist")
    assert p[3].endswith("tests/test_claims.py::problem is not a test pytest collects")
    assert "17 not in docs/benchmarks.md" in p[4]
    assert malformed(doc, "doc.md") == [
        "doc.md:10: not a marker: '<!-- claims: tests/test_claims.py -->'"]


def rendering_differs(render, results: Path, doc: Path) -> list[str]:
    """[] when `doc` is, whole, what `render` makes of the results file; else a diff."""
    rendered = render(json.loads(results.read_text())).splitlines()
    return list(difflib.unified_diff(doc.read_text().splitlines(), rendered, str(doc),
                                     f"rendered from {results}", lineterm="", n=0))


def _run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("run_all")


def test_benchmarks_doc_is_what_the_committed_results_render(monkeypatch):
    run_all = _run_all(monkeypatch)
    assert (run_all.RESULTS, run_all.DOC) == (RESULTS, ROOT / BENCH_DOC)
    # Until the first `nox -s bench` on the lead's quiet machine commits benchmarks/results.json
    # beside the document it writes, there is nothing to compare (and CI takes no skipped test);
    # from then on the document is its rendering, whole.
    if RESULTS.exists():
        assert not (d := rendering_differs(run_all.render, RESULTS, ROOT / BENCH_DOC)), \
            "\n".join(d[:40])


def test_scale_doc_is_what_the_committed_scale_runs_render(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    scale = importlib.import_module("scale")
    assert (scale.RESULTS, scale.DOC) == (ROOT / "benchmarks" / "scale.json",
                                          ROOT / "docs" / "scale.md")
    assert not (d := rendering_differs(scale.render, scale.RESULTS, scale.DOC)), \
        "\n".join(d[:40])


def test_the_shared_file_system_section_is_what_the_committed_runs_render(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sharedfs = importlib.import_module("sharedfs")
    text = sharedfs.DOC.read_text()
    section = sharedfs.BEGIN + text.split(sharedfs.BEGIN, 1)[1].split(sharedfs.END, 1)[0] \
        + sharedfs.END
    rendered = sharedfs.render(json.loads(sharedfs.RESULTS.read_text()))
    assert section == rendered, "\n".join(difflib.unified_diff(
        section.splitlines(), rendered.splitlines(), "docs/image.md", "rendered", lineterm=""))


def test_a_benchmarks_doc_edited_by_hand_is_reported(monkeypatch, tmp_path):
    # The comparison above, on results written here and rendered by run_all's own command line.
    run_all = _run_all(monkeypatch)
    result = {"about": "About.", "runs": 3, "measured": "2026-01-01 00:00", "seconds": 12.0,
              "load": 1.5, "machine": "test machine", "values": {
                  "tuned_pbs": [1.0, 2.0, 1.0], "multi_job": [1.0, None, 0.9]},
              "groups": [{"title": "Many PBS jobs", "unit": "s", "baseline": "tuned_pbs",
                          "cases": ["tuned_pbs", "multi_job"], "targets": {"multi_job": [
                              {"limit": 1.05, "of": "tuned_pbs", "better": "lower"}]}}]}
    results, doc = tmp_path / "results.json", tmp_path / "benchmarks.md"
    results.write_text(json.dumps({"first_result": result}))
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--from-json", "--json", str(results),
                                      "--doc", str(doc)])
    assert run_all.main() == 0
    assert rendering_differs(run_all.render, results, doc) == []
    assert "| `multi_job` | 0.95 | 0.90-1.00 | 1.00 failed 0.90 | 0.95 |" in doc.read_text()
    doc.write_text(doc.read_text().replace("1.00 failed 0.90", "1.00 0.90"))
    d = rendering_differs(run_all.render, results, doc)
    assert [line[0] for line in d[3:]] == ["-", "+"] and "failed" in d[-1], d


# ---------------------------------------------------------------- claims about the suite itself
NEEDS_LMOD = "tests/test_modules.py::test_hierarchy_against_what_worker_init_sets_is_refused"


def _suite(ci: bool, tmp_path: Path) -> subprocess.CompletedProcess:
    """One test that needs Lmod, run by pytest where Lmod is missing (CI=true or not)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PARSL_AURORA_LMOD_PKG=str(tmp_path / "no-lmod"), PYTHONDONTWRITEBYTECODE="1",
               **({"CI": "true"} if ci else {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "basetemp"), NEEDS_LMOD],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=300)


def test_a_missing_component_skips_with_how_to_get_it_and_fails_in_ci(tmp_path):
    # README: `make test` ends with one line for each missing component and how to get it;
    # CI (.ci/run sets CI=true) fails if any test is skipped.
    out = _suite(False, tmp_path)
    assert out.returncode == 0 and "1 skipped" in out.stdout, out.stdout[-2000:]
    assert ("not run: tests that need lmod. Lmod is missing: `sudo apt-get install lmod` "
            "(Debian 12)") in out.stdout
    out = _suite(True, tmp_path)
    assert out.returncode != 0 and "CI=true requires lmod" in out.stdout, out.stdout[-2000:]


if __name__ == "__main__":
    for m in ledger():
        print(f"{m.where()}\t{m.kind}\t{m.text}")
