"""Shared pieces of the training-loop tests: a small data directory, settings, and metric readers."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from foundry.data.shards import prepare
from foundry.train.config import TrainConfig
from foundry.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def make_data_dir(tmp_path_factory, texts, tokenizer) -> Path:
    """Token shards of the given texts (one file each), 15% held out for validation."""
    corpus = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(texts):
        (corpus / f"doc{i:03d}.py").write_text(text)
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare([str(corpus)], tokenizer, out, val_fraction=0.15)
    return out


def tiny_cfg(data_dir, out, **changes) -> TrainConfig:
    """A tiny run: 8 steps of 4 x 32 tokens, validation on a 2-batch sample (final: the same sample)."""
    settings = dict(model="tiny", data=str(data_dir), out=str(out), steps=8, batch_size=4, seq_len=32,
                    lr=3e-3, warmup=2, eval_every=0, eval_batches=2, final_eval_batches=2, save_every=0,
                    log_every=1, seed=7)
    settings.update(changes)
    return TrainConfig(**settings)


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step, as metrics.jsonl logged it."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def same_losses(run: Path, reference: Path, steps) -> None:
    """The two runs logged the same loss at each of `steps` (within summation-order rounding)."""
    import pytest

    got, want = step_losses(run), step_losses(reference)
    assert [got[s] for s in steps] == pytest.approx([want[s] for s in steps], rel=1e-5)


def rolled_back(run: Path, to: Path, step: int) -> Path:
    """A copy of `run` as a run stopped after `step` would be: checkpoints past it gone, `latest` naming it."""
    shutil.copytree(run, to)
    for checkpoint in to.glob("step-*"):
        if int(checkpoint.name.removeprefix("step-")) > step:
            shutil.rmtree(checkpoint)
    (to / "latest").write_text(f"step-{step:06d}\n")
    return to


def pretrain_argv(data_dir, out, steps, *extra) -> list[str]:
    """`python -m foundry.cli pretrain ...` for a tiny run (the final evaluation on 2 batches)."""
    return [sys.executable, "-m", "foundry.cli", "pretrain", "--model", "tiny", "--data", str(data_dir),
            "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--seq-len", "32",
            "--eval-every", "0", "--final-eval-batches", "2", "--log-every", "1", *extra]


def temp_files(run_dir: Path) -> list[Path]:
    """Everything a write in progress leaves under a temp name (`.NAME.*.tmp`), at any depth."""
    return sorted(p for p in run_dir.rglob(".*") if p.name.endswith(".tmp"))


class FakeClock:
    """Stands in for the loop module's `time`: its perf_counter moves only when a test says work cost time."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def charge(monkeypatch, clock: FakeClock, micro_batch_seconds, eval_batch_seconds: float = 0.0,
           save_seconds: float = 0.0) -> None:
    """Make the loop's work cost fake time: micro_batch_seconds(n) for the n-th training micro-batch
    (1-based, counting across runs), and fixed costs per evaluation batch and per checkpoint save."""
    from foundry.train import loop
    from foundry.train.loss import CausalLMLoss

    calls = [0]

    class TimedLoss(CausalLMLoss):
        def forward(self, inputs, targets):
            calls[0] += 1
            clock.now += micro_batch_seconds(calls[0])
            return super().forward(inputs, targets)

    real_evaluate, real_save = loop.evaluate, loop.save_checkpoint

    def timed_evaluate(model, shards, batch_size, seq_len, *args, **kwargs):
        result = real_evaluate(model, shards, batch_size, seq_len, *args, **kwargs)
        clock.now += eval_batch_seconds * -(-result.tokens // (batch_size * seq_len))
        return result

    def timed_save(*args, **kwargs):
        clock.now += save_seconds
        return real_save(*args, **kwargs)

    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(loop, "CausalLMLoss", TimedLoss)
    monkeypatch.setattr(loop, "evaluate", timed_evaluate)
    monkeypatch.setattr(loop, "save_checkpoint", timed_save)
