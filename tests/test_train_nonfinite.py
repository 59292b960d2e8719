"""A loss or gradient norm that is NaN or infinite stops the run cleanly, or is skipped when asked."""

import math

import pytest
import torch

from foundry import hub
from foundry.cli import main
from foundry.train import loop
from foundry.train.checkpoint import load_trainer_state
from foundry.train.loss import CausalLMLoss, NonFiniteLoss
from foundry.train.metrics import read_metrics
from train_helpers import make_data_dir, pretrain_argv, tiny_cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_texts, tiny_tokenizer):
    return make_data_dir(tmp_path_factory, sample_texts[:12], tiny_tokenizer)


class _InfiniteGradient(torch.autograd.Function):
    """The identity going forward, an infinite gradient going back: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _poison(monkeypatch, bad_calls: set[int], gradient: bool = False) -> None:
    """Make the loss NaN (or its gradient infinite) on the given micro-batches (1-based, across runs)."""
    calls = [0]

    class Poisoned(CausalLMLoss):
        def forward(self, inputs, targets):
            calls[0] += 1
            loss = super().forward(inputs, targets)
            if calls[0] not in bad_calls:
                return loss
            return _InfiniteGradient.apply(loss) if gradient else loss * float("nan")

    monkeypatch.setattr(loop, "CausalLMLoss", Poisoned)


def test_a_nan_loss_stops_the_run_with_one_line_exit_2_and_keeps_the_last_good_checkpoint(
        tmp_path, data_dir, monkeypatch, capsys):
    _poison(monkeypatch, {5})
    run = tmp_path / "run"
    assert main(pretrain_argv(data_dir, run, 8, "--save-every", "2")[3:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    message = err[-1]
    assert message.startswith("foundry pretrain: error: step 5: the loss is nan"), message
    assert "last finite loss" in message and "at step 4" in message and "step-000004" in message
    assert "--lr" in message and "--skip-nonfinite" in message
    assert (run / "latest").read_text().strip() == "step-000004"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002", "step-000004"]  # nothing saved after
    assert all(torch.isfinite(t).all() for t in hub.load(run).model.state_dict().values())
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "nonfinite" in r] == [5]


def test_an_infinite_gradient_norm_stops_the_run_too(tmp_path, data_dir, monkeypatch):
    _poison(monkeypatch, {3}, gradient=True)
    with pytest.raises(NonFiniteLoss, match=r"step 3: the loss is \d.* and the gradient norm (inf|nan)"):
        loop.train(tiny_cfg(data_dir, tmp_path / "run", batch_size=2, seq_len=16))
    assert not (tmp_path / "run" / "latest").exists()  # no good checkpoint yet, and no bad one written


def test_skip_nonfinite_drops_the_bad_steps_updates_and_counts_them_across_a_resume(tmp_path, data_dir, monkeypatch):
    _poison(monkeypatch, {3, 6})
    run = tmp_path / "run"
    cfg = dict(batch_size=2, seq_len=16, save_every=1, keep_checkpoints=0, skip_nonfinite=1)
    first = loop.train(tiny_cfg(data_dir, run, steps=4, **cfg))
    assert first.step == 4 and first.skipped_steps == 1
    assert math.isnan(first.losses[2]) and math.isfinite(first.losses[3])
    # Step 3 changed no weight and no optimizer state: its gradients were dropped.
    before, after = (load_trainer_state(run / f"step-00000{s}") for s in (2, 3))
    assert all(torch.equal(a, b) for a, b in zip(hub.load(run / "step-000002").model.state_dict().values(),
                                                 hub.load(run / "step-000003").model.state_dict().values()))
    assert before["optimizer"]["state"][0]["step"] == after["optimizer"]["state"][0]["step"] == 2
    assert after["skipped_nonfinite"] == 1
    # The allowance is for the whole run: resumed, the second bad step (6) is one too many.
    with pytest.raises(NonFiniteLoss, match="step 6: .*1 bad step.*skipped before"):
        loop.train(tiny_cfg(data_dir, run, steps=8, resume=True, **cfg))
    assert (run / "latest").read_text().strip() == "step-000005"
