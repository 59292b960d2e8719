"""`foundry pretrain` as a user meets it: every setting a flag, defaults in --help, checked choices, a summary."""

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from foundry.cli import main
from foundry.cli.main import build_parser
from foundry.cli.pretrain import summary_lines, train_config_from_args
from foundry.core.errors import UserError
from foundry.eval.perplexity import Perplexity
from foundry.train.config import TrainConfig

# A value unlike the default for each setting (a test below fails when a new field is missing here).
OTHER_VALUES = {
    "model": "mini", "data": "d", "out": "o", "tokenizer": "t", "steps": 7, "batch_size": 3, "seq_len": 17,
    "grad_accum": 2, "lr": 0.0015, "min_lr_ratio": 0.05, "warmup": 4, "weight_decay": 0.01, "beta1": 0.8,
    "beta2": 0.99, "grad_clip": 0.5, "seed": 11, "eval_every": 9, "eval_batches": 3, "final_eval_batches": 5,
    "save_every": 6, "keep_checkpoints": 4, "log_every": 2, "time_budget": 12.5, "skip_nonfinite": 3,
    "compile": True, "activation_checkpointing": "selective", "precision": "bf16", "fast_fp32": "off",
    "device": "cpu", "parallel": "ddp", "tp": 2, "dp": 3, "ep": 2, "reshard_after_forward": False, "dist_timeout": 30.0,
    "resume": True, "overwrite": True, "allow_changes": True,
    "moe_aux_loss_coef": 0.05, "moe_z_loss_coef": 0.001, "moe_bias_update_rate": 0.01,
    "val_fraction": 0.3, "augment_shift": 1,
}


def _argv(values: dict) -> list[str]:
    argv = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return argv


def _parse(argv: list[str]):
    return build_parser().parse_args(["pretrain", *argv])


def _fails(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_every_train_config_field_is_a_flag_that_reaches_the_config():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(OTHER_VALUES) == sorted(names)
    for f in dataclasses.fields(TrainConfig):
        assert OTHER_VALUES[f.name] != f.default, f.name
    args = _parse(_argv(OTHER_VALUES))
    assert {name: getattr(args, name) for name in names} == OTHER_VALUES
    # Without the resume switches (they need a run on disk), the flags make the config as given.
    settings = {k: v for k, v in OTHER_VALUES.items() if k not in ("resume", "overwrite", "allow_changes")}
    assert train_config_from_args(_parse(_argv(settings))) == TrainConfig(**settings)
    assert train_config_from_args(_parse(["--skip-nonfinite", "5"])).skip_nonfinite == 5


def test_flags_left_out_are_not_given(monkeypatch):
    # "Given on the command line" must stay visible: every flag defaults to None, the config fills the rest.
    args = _parse([])
    assert all(getattr(args, f.name) is None for f in dataclasses.fields(TrainConfig))
    assert train_config_from_args(args) == TrainConfig()


def test_booleans_can_be_turned_off_again():
    assert _parse(["--no-compile", "--no-reshard-after-forward"]).compile is False
    assert _parse(["--compile"]).compile is True


def test_help_shows_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    starts, position = [], 0
    for f in dataclasses.fields(TrainConfig):  # each flag's entry, in order (help texts name other flags)
        position = re.compile(rf"--{f.name.replace('_', '-')}[ ,]").search(text, position).start() + 1
        starts.append(position - 1)
    for f, start, end in zip(dataclasses.fields(TrainConfig), starts, [*starts[1:], len(text)]):
        entry = text[start:end]
        shown = ("the one stored in DATA_DIR" if f.name == "tokenizer" else "none" if f.default is None
                 else ("on" if f.default else "off") if isinstance(f.default, bool)
                 else "required" if f.default == "" else str(f.default))
        assert re.search(rf"\((default: )?{re.escape(shown)}", entry), entry
    assert "--precision {auto,fp32,bf16}" in text and "--fast-fp32 {auto,on,off}" in text
    assert "--resume continues the run" in text  # the resume rules are documented where the flags are


def test_model_is_required(capsys, tmp_path):
    err = _fails(capsys, ["pretrain", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")])
    assert "--model is required" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--precision", "fp16", "--precision must be auto, fp32 or bf16, got 'fp16'"),
    ("--fast-fp32", "yes", "--fast-fp32 must be auto, on or off, got 'yes'"),
    ("--device", "gpu", "--device 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
    ("--device", "cuda:x", "--device 'cuda:x' is not a device"),
    ("--min-lr-ratio", "2", "--min-lr-ratio must be between 0 and 1"),
    ("--beta2", "1", "--beta2 must be in [0, 1)"),
])
def test_choices_are_checked_in_one_line(capsys, tmp_path, flag, value, message):
    argv = ["pretrain", "--model", "tiny", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), flag, value]
    assert message in _fails(capsys, argv)
    with pytest.raises(UserError, match=re.escape(message)):  # the library checks them too
        TrainConfig(**{flag[2:].replace("-", "_"): float(value) if flag in ("--min-lr-ratio", "--beta2") else value})


def test_resume_switches_that_contradict_are_refused(capsys, tmp_path):
    base = ["pretrain", "--model", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert "pass one of them" in _fails(capsys, base + ["--resume", "--overwrite"])
    assert "--allow-changes only applies with --resume" in _fails(capsys, base + ["--allow-changes"])


def test_a_config_value_is_read_as_its_setting_type(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("model: tiny\nlr: 3e-3\nsteps: '20'\ntime_budget: null\ncompile: true\n")  # YAML reads 3e-3 as text
    cfg = train_config_from_args(_parse(["--config", str(good)]))
    assert (cfg.lr, cfg.steps, cfg.time_budget, cfg.compile) == (0.003, 20, None, True)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: many\n")
    assert f"{bad}: steps must be a whole number, got 'many'" in _fails(capsys, ["pretrain", "--config", str(bad)])
    bad.write_text("compile: 1\n")
    assert "compile must be true or false" in _fails(capsys, ["pretrain", "--config", str(bad)])


@dataclass
class StandInResult:
    """TrainResult's fields, the loop's new ones included (tokens .. best_val); the summary reads only these."""

    run_dir: Path
    checkpoint: Path
    step: int
    total_steps: int
    val: Perplexity | None
    baseline: Perplexity | None
    interrupted: bool
    losses: list[float]
    tokens: int
    wall_seconds: float
    tokens_per_second: float
    mfu: float | None
    peak_flops: float | None
    peak_source: str | None
    best_val: Perplexity | None
    world_size: int = 1
    layout: str = "one process"
    peak_memory: int | None = None
    peak_memory_source: str = ""


def _result(**changes) -> StandInResult:
    values = dict(run_dir=Path("runs/a"), checkpoint=Path("runs/a/step-000800"), step=800, total_steps=800,
                  val=Perplexity(3.25, 10_000), baseline=Perplexity(5.5, 10_000), interrupted=False, losses=[],
                  tokens=26_214_400, wall_seconds=754.2, tokens_per_second=34_757.0, mfu=0.4213,
                  peak_flops=989e12, peak_source="hardware catalog: h100-sxm bf16", best_val=Perplexity(3.2, 10_000))
    values.update(changes)
    return StandInResult(**values)


def test_the_summary_names_every_figure_in_plain_lines():
    text = "\n".join(summary_lines(_result()))
    for expected in ("run finished: 800/800 steps", "26,214,400 tokens", "12m34s", "34,757 tokens/s",
                     "42.1% of a 989 TFLOP/s peak (hardware catalog: h100-sxm bf16)", "final loss 3.2500",
                     "best loss  3.2000", "unigram loss 5.5000", "runs/a/step-000800"):
        assert expected in text, (expected, text)
    assert "\x1b" not in text and "[bold" not in text  # no terminal codes, no rich markup: fit for a pipe
    assert "3.1% of a 52 GFLOP/s peak" in "\n".join(summary_lines(_result(mfu=0.031, peak_flops=5.2e10)))


def test_the_summary_says_what_it_does_not_know():
    text = "\n".join(summary_lines(_result(mfu=None, peak_flops=None, peak_source=None, val=None, best_val=None,
                                           baseline=None, interrupted=True, step=300, checkpoint=None)))
    assert "stopped by a signal at step 300: 300/800 steps" in text
    assert "MFU           unknown: no peak FLOP/s known for this device" in text
    assert "no validation split" in text and "foundry pretrain --out runs/a --resume" in text
    assert "checkpoint    none saved" in text


def test_the_summary_of_a_distributed_run_says_how_and_sets_memory_beside_the_plan():
    text = "\n".join(summary_lines(_result(world_size=4, layout="4 processes on cuda (fsdp over 4 data-parallel "
                                           "ranks)", peak_memory=3 * 2**30, peak_memory_source="peak CUDA allocation"),
                                   planned={"weights": 2**30, "activations": 2**30}))
    assert "34,757 tokens/s over 4 processes" in text
    assert "layout        4 processes on cuda (fsdp over 4 data-parallel ranks)" in text
    assert "memory        3.00 GiB measured (peak CUDA allocation, rank 0); planned 2.00 GiB per device" in text


def test_pretrain_prints_the_plan_then_the_summary_at_the_end(monkeypatch, capsys, tmp_path):
    import types

    import torch

    import foundry.train.loop
    import foundry.train.setup
    from foundry.cli.pretrain import planned_memory, planned_memory_line
    from foundry.config import PRESETS
    from foundry.train.parallel.world import World

    seen = []
    setup = types.SimpleNamespace(world=World(torch.device("cpu")), model=types.SimpleNamespace(config=PRESETS["tiny"]),
                                  bf16=False)
    monkeypatch.setattr(foundry.train.setup, "prepare_run", lambda cfg: setup)
    monkeypatch.setattr(foundry.train.loop, "train", lambda cfg, reporter, given: seen.append((cfg, given)) or _result())
    assert main(["pretrain", "--model", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    assert seen[0][0].model == "tiny" and seen[0][1] is setup
    plan = planned_memory(setup, seen[0][0])
    assert set(plan) == {"weights", "gradients", "optimizer", "activations"}
    assert capsys.readouterr().out.splitlines() == [planned_memory_line(plan), *summary_lines(_result(), plan)]
