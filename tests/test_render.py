"""Golden tests of the dry run: the whole script each mode hands to PBS or runs in-job."""

import sys
from pathlib import Path

import pytest

from parsl_aurora import cli

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "aurora_multi_job": ["aurora", "multi_job", "--set", "account=MyProj"],
    "aurora_mpi_ensemble": ["aurora", "mpi_ensemble", "--set", "account=MyProj",
                            "--set", "nodes_per_job=4", "--set", "walltime=1:00:00"],
    "aurora_in_job": ["aurora", "in_job", "--set", "nodefile=NODEFILE"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_render_golden(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x4102c0s0b0n0\nx4102c0s1b0n0\n")
    args = [a.replace("NODEFILE", str(nodefile)) for a in CASES[name]]
    assert cli.main(["render", *args]) == 0
    out = as_golden(capsys.readouterr().out, tmp_path)
    assert out == (GOLDEN / f"{name}.txt").read_text()


def as_golden(text: str, folder: Path) -> str:
    """The render with this machine's paths named: the driver's folder and environment."""
    return (text.replace(str(folder / "nodes"), "<nodefile>").replace(str(folder), "<cwd>")
            .replace(sys.prefix, "<python-env>"))


def test_render_error_is_one_line(capsys):
    assert cli.main(["render", "aurora", "multi_job", "--set", "walltime=soon"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("parsl-aurora: error: ")


def test_bad_set_syntax(capsys):
    assert cli.main(["render", "aurora", "multi_job", "--set", "account"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in cli.parser()._subparsers._group_actions[0].choices:
        assert command in out
