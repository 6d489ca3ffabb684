"""The main job, end to end at a small size."""

import json

import pytest

from lemoe_easyedit import cli
from lemoe_easyedit.testbed import is_available


@pytest.mark.slow
@pytest.mark.skipif(not is_available(), reason="the shipped testbed model is missing")
def test_demo_runs_end_to_end(tmp_path, capsys):
    assert cli.main(["demo", "--num-edits", "30", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| Rel (token) |" in printed and "rephrase" in printed
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["num_edits"] == 30
    assert res["before"]["rel_em"] < 0.2
    assert res["after"]["rel"] >= 0.95 and res["after"]["loc"] >= 0.95
    assert (tmp_path / "before_after.png").stat().st_size > 1000


def test_cli_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in cli.SUBCOMMANDS)
