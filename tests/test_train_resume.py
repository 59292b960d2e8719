"""`pretrain --resume`: the run's saved settings are the defaults; a conflicting flag is refused or recorded."""

import os
import shutil
from pathlib import Path

import pytest
import yaml

from foundry.cli import main
from foundry.core.errors import UserError
from foundry.data.shards import prepare
from foundry.train.config import TrainConfig
from foundry.train.loop import train
from foundry.train.metrics import read_metrics

# Every setting here differs from TrainConfig's default, so a resume that falls back to defaults shows.
ORIGINAL = ["--model", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--lr", "0.01",
            "--warmup", "3", "--seed", "5", "--eval-every", "0", "--eval-batches", "1", "--final-eval-batches", "2",
            "--log-every", "1", "--save-every", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_texts, tiny_tokenizer):
    corpus = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(sample_texts[:12]):
        (corpus / f"doc{i:03d}.py").write_text(text)
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare([str(corpus)], tiny_tokenizer, out, val_fraction=0.15)
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(["pretrain", *ORIGINAL, "--data", str(data_dir), "--out", str(run)]) == 0
    return run


@pytest.fixture
def stopped(tmp_path, straight):
    """The same run as if it had stopped after its step-2 checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "step-000004")
    (run / "latest").write_text("step-000002\n")
    return run


def _settings(run: Path) -> dict:
    """run.yaml but its `out` (the copies under test live in other directories)."""
    settings = yaml.safe_load((run / "run.yaml").read_text())
    settings.pop("out")
    return settings


def _step_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _fails(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_bare_resume_keeps_every_saved_setting_and_gives_the_same_losses(stopped, straight):
    assert main(["pretrain", "--out", str(stopped), "--resume"]) == 0
    assert _settings(stopped) == _settings(straight)
    assert (stopped / "latest").read_text().strip() == "step-000004"
    assert _step_losses(stopped) == _step_losses(straight) and len(_step_losses(straight)) == 4


def test_a_conflicting_flag_is_refused_in_one_line_naming_both_values(stopped, capsys):
    before = {p: p.stat().st_mtime_ns for p in stopped.rglob("*")}
    err = _fails(capsys, ["pretrain", "--out", str(stopped), "--resume", "--lr", "0.001"])
    assert "--lr 0.001 conflicts with the run's saved lr 0.01" in err and "--allow-changes" in err
    err = _fails(capsys, ["pretrain", "--out", str(stopped), "--resume", "--batch-size", "8", "--warmup", "3"])
    assert "--batch-size 8 conflicts with the run's saved batch_size 2" in err and "warmup" not in err
    assert {p: p.stat().st_mtime_ns for p in stopped.rglob("*")} == before  # nothing touched


def test_a_run_yaml_given_as_config_conflicts_like_flags(stopped, tmp_path, capsys):
    changed = tmp_path / "changed.yaml"
    changed.write_text(f"warmup: 1\nout: {stopped}\n")
    err = _fails(capsys, ["pretrain", "--config", str(changed), "--resume"])
    assert "--warmup 1 conflicts with the run's saved warmup 3" in err


def test_allow_changes_applies_the_change_and_run_yaml_records_it(stopped, data_dir):
    assert main(["pretrain", "--out", str(stopped), "--resume", "--lr", "0.001", "--allow-changes"]) == 0
    saved = _settings(stopped)
    assert saved["lr"] == 0.001 and saved["batch_size"] == 2 and saved["warmup"] == 3
    assert saved["changes"] == [{"step": 2, "setting": "lr", "old": 0.01, "new": 0.001}]
    lrs = [r["lr"] for r in read_metrics(stopped / "metrics.jsonl") if "lr" in r]
    assert max(lrs[2:]) <= 0.001  # steps 3-4 ran at the new peak
    # run.yaml, history and all, is still a --config file; and the next bare resume keeps the change.
    assert TrainConfig(**TrainConfig.from_yaml(stopped / "run.yaml")).lr == 0.001
    assert main(["pretrain", "--out", str(stopped), "--resume", "--steps", "5"]) == 0
    saved = _settings(stopped)
    assert saved["lr"] == 0.001 and saved["steps"] == 5
    assert saved["changes"][-1] == {"step": 4, "setting": "steps", "old": 4, "new": 5}
    assert len(saved["changes"]) == 2


def test_steps_cadence_and_hardware_settings_may_change_without_allow_changes(stopped):
    assert main(["pretrain", "--out", str(stopped), "--resume", "--steps", "6", "--log-every", "2",
                 "--save-every", "0", "--activation-checkpointing", "off", "--device", "cpu"]) == 0
    assert (stopped / "latest").read_text().strip() == "step-000006"
    saved = _settings(stopped)
    assert saved["steps"] == 6 and saved["log_every"] == 2 and saved["lr"] == 0.01
    assert {c["setting"] for c in saved["changes"]} == {"steps", "log_every", "save_every", "device"}


def test_what_the_checkpoint_fixes_cannot_change_even_when_allowed(stopped, capsys):
    err = _fails(capsys, ["pretrain", "--out", str(stopped), "--resume", "--seq-len", "32", "--allow-changes"])
    assert "--seq-len 32 conflicts with the run's saved seq_len 16" in err and "cannot change" in err
    err = _fails(capsys, ["pretrain", "--out", str(stopped), "--resume", "--model", "mini", "--allow-changes"])
    assert "--model mini conflicts with the run's saved model tiny" in err
    err = _fails(capsys, ["pretrain", "--out", str(stopped), "--resume", "--steps", "1"])
    assert "--steps 1 is fewer than the 2 steps" in err


def test_an_older_run_yaml_with_invocation_switches_still_resumes(stopped, straight):
    with open(stopped / "run.yaml", "a") as handle:  # written before run.yaml left the switches out
        handle.write("resume: false\noverwrite: true\n")
    assert main(["pretrain", "--out", str(stopped), "--resume"]) == 0
    assert _settings(stopped) == _settings(straight)


def test_without_run_yaml_the_checkpoint_settings_are_the_defaults(stopped, straight):
    (stopped / "run.yaml").unlink()
    assert main(["pretrain", "--out", str(stopped), "--resume"]) == 0
    assert _settings(stopped) == _settings(straight)
    assert _step_losses(stopped) == _step_losses(straight)


def test_a_bare_resume_works_from_another_directory(tmp_path, data_dir, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    relative = os.path.relpath(data_dir, tmp_path / "a")
    assert main(["pretrain", *ORIGINAL, "--steps", "2", "--data", relative, "--out", "run"]) == 0
    assert _settings(tmp_path / "a" / "run")["data"] == str(Path(data_dir).resolve())
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--out", "a/run", "--resume", "--steps", "3"]) == 0
    assert (tmp_path / "a" / "run" / "latest").read_text().strip() == "step-000003"


def test_the_library_refuses_a_resume_that_differs_from_the_saved_settings(stopped, data_dir):
    saved = TrainConfig.from_yaml(stopped / "run.yaml")
    with pytest.raises(UserError, match="--warmup 50 conflicts with the run's saved warmup 3"):
        train(TrainConfig(**{**saved, "out": str(stopped), "warmup": 50, "resume": True}))
    assert train(TrainConfig(**{**saved, "out": str(stopped), "resume": True})).step == 4
