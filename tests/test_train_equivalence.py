"""Ways of computing the same step give the same training: gradient accumulation, recomputation, compiling.

Tolerances: gradient accumulation sums the same per-token losses in another order (two means of 4 rows
instead of one of 8) and torch.compile fuses kernels (another rounding order), so losses agree to 1e-6
(accumulation) and 1e-5 (compile) relative, measured 4e-8 and 2e-7; weights to 2e-4 absolute after 3 AdamW
steps at lr 3e-3 (2% of the ~9e-3 the steps can move a weight; AdamW's normalisation magnifies rounding in
near-zero gradients: measured 7e-6 and 4e-5). Activation checkpointing recomputes the very same kernels,
so it is bit-for-bit on CPU.
"""

import pytest
import torch

from foundry import hub
from foundry.train.loop import train
from train_helpers import make_data_dir, tiny_cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_texts, tiny_tokenizer):
    return make_data_dir(tmp_path_factory, sample_texts[:12], tiny_tokenizer)


def _weights(result) -> dict[str, torch.Tensor]:
    return hub.load(result.checkpoint).model.state_dict()


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_gradient_accumulation_equals_the_large_batch(tmp_path, data_dir):
    # 2 micro-batches of 4 draw the same 8 windows as one batch of 8 (the loader counts windows).
    accumulated = train(tiny_cfg(data_dir, tmp_path / "accum", steps=3, batch_size=4, grad_accum=2))
    large = train(tiny_cfg(data_dir, tmp_path / "large", steps=3, batch_size=8, grad_accum=1))
    assert accumulated.tokens == large.tokens == 3 * 8 * 32
    assert accumulated.losses == pytest.approx(large.losses, rel=1e-6)
    assert _max_difference(_weights(accumulated), _weights(large)) < 2e-4
    # And a different batch is not the same training: the comparison can tell.
    other = train(tiny_cfg(data_dir, tmp_path / "other", steps=3, batch_size=8, grad_accum=1, seed=8))
    assert other.losses != pytest.approx(large.losses, rel=1e-3)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_eager_losses_and_weights(tmp_path, data_dir, mode):
    eager = train(tiny_cfg(data_dir, tmp_path / "eager", steps=3))
    recomputed = train(tiny_cfg(data_dir, tmp_path / "recomputed", steps=3, activation_checkpointing=mode))
    assert recomputed.losses == eager.losses
    assert _max_difference(_weights(recomputed), _weights(eager)) == 0.0


@pytest.mark.slow
def test_compile_gives_the_eager_losses(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager = train(tiny_cfg(data_dir, tmp_path / "eager", steps=3, batch_size=2, seq_len=16))
    compiled = train(tiny_cfg(data_dir, tmp_path / "compiled", steps=3, batch_size=2, seq_len=16, compile=True))
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    assert _max_difference(_weights(compiled), _weights(eager)) < 2e-4
