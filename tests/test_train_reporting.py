"""What a run reports: validation on the same tokens at every point, the plot, the end-of-run figures."""

from types import SimpleNamespace

import matplotlib.figure
import pytest
import torch

from foundry import hub
from foundry.core.units import human_count
from foundry.train import speed
from foundry.train.loop import train
from foundry.train.metrics import read_metrics
from train_helpers import FakeClock, charge, make_data_dir, tiny_cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_texts, tiny_tokenizer):
    return make_data_dir(tmp_path_factory, sample_texts[:12], tiny_tokenizer)


@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib figure saved while the test runs."""
    saved, real = [], matplotlib.figure.Figure.savefig

    def capture(self, *args, **kwargs):
        saved.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    return saved


def test_every_evaluation_scores_the_same_sample_and_the_final_one_also_the_whole_split(tmp_path, data_dir, figures):
    run = tmp_path / "run"
    result = train(tiny_cfg(data_dir, run, steps=8, eval_every=3, eval_batches=2, final_eval_batches=0))
    records = read_metrics(run / "metrics.jsonl")
    sample = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in sample] == [3, 6, 8]
    assert {r["val_tokens"] for r in sample} == {2 * 4 * 32}  # the final point too: no jump from a bigger set
    full = [r for r in records if "val_full_loss" in r]
    assert [r["step"] for r in full] == [8] and full[0]["whole_split"]
    assert full[0]["val_full_tokens"] == result.val.tokens > 10 * 2 * 4 * 32
    assert result.val.loss == full[0]["val_full_loss"] and result.val_sample.loss == sample[-1]["val_loss"]
    assert result.best_val.loss == min(r["val_loss"] for r in sample) and result.best_val.tokens == 256
    assert hub.load(run).meta["eval"]["val_tokens"] == result.val.tokens
    # The plot: two named validation series, and a title naming the model, its size and the tokens trained.
    axes = figures[-1].axes[0]
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "validation loss, fixed sample (256 tokens)" in labels
    assert f"validation loss, whole split ({human_count(result.val.tokens)} tokens)" in labels
    params = sum(p.numel() for p in hub.load(run).model.parameters())
    assert axes.get_title() == f"tiny · {human_count(params)} parameters · 1.0K tokens trained"


def test_the_result_carries_the_end_of_run_figures_resumed_too(tmp_path, data_dir, monkeypatch):
    clock = FakeClock()  # each micro-batch costs 0.1 s on the loop's clock: 4 x 32 tokens per 0.1 s
    charge(monkeypatch, clock, lambda n: 0.1)
    first = train(tiny_cfg(data_dir, tmp_path / "run", steps=4, eval_every=2))
    started = clock.now
    result = train(tiny_cfg(data_dir, tmp_path / "run", steps=8, eval_every=2, resume=True))
    assert result.tokens == 8 * 128 and first.tokens == 4 * 128  # the whole run's
    assert result.wall_seconds == pytest.approx(clock.now - started) == pytest.approx(0.4)  # this invocation's 4 steps
    assert result.tokens_per_second == pytest.approx(128 / 0.1)  # its training steps only
    model = hub.load(result.checkpoint).model
    assert result.peak_source.startswith("measured fp32 512x512 matmul on CPU") and result.peak_flops > 0
    assert result.mfu == pytest.approx(model.config.train_flops_per_token(32) * 1280 / result.peak_flops)
    # The best of the fixed-sample evaluations of the whole run, the first invocation's included.
    sample = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in sample] == [2, 4, 6, 8]
    assert result.best_val.loss == min(r["val_loss"] for r in sample)
    assert result.skipped_steps == 0 and result.stop_signal is None


def test_the_matmul_peak_is_flops_over_the_best_time(monkeypatch):
    ticks = iter(range(1000))  # every clock reading 10 ms after the last: each timed matmul takes 10 ms
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=lambda: next(ticks) * 0.01))
    speed._measured_peak.cache_clear()
    try:
        peak, source = speed.matmul_peak(torch.device("cpu"), torch.bfloat16)
    finally:
        speed._measured_peak.cache_clear()
    assert peak == pytest.approx(2 * 512**3 / 0.01)
    threads = torch.get_num_threads()
    assert source == f"measured bf16 512x512 matmul on CPU, {threads} thread{'s' * (threads > 1)} (best of 3)"
