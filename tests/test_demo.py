"""`foundry demo`, end to end on the real stdlib corpus with a few seconds of training."""

import pytest

from foundry.cli import main
from foundry.cli.demo import PROMPT, run_demo


@pytest.mark.slow
def test_demo_runs_the_whole_life_cycle(tmp_path, capsys):
    figures = run_demo(tmp_path / "demo", time_budget=3, preset_name="tiny")
    assert figures["val_loss"] < figures["baseline_loss"] + 2  # a few steps in: finite and sane
    assert (tmp_path / "demo" / "run" / "loss.png").is_file()
    assert (tmp_path / "demo" / "tokenizer" / "tokenizer.json").is_file()
    out = capsys.readouterr().out
    assert PROMPT in out and "unigram baseline" in out
    # A second demo into the same place needs --overwrite; another directory is never replaced.
    assert main(["demo", "--out", str(tmp_path / "demo"), "--time-budget", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "mine"), "--overwrite"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
