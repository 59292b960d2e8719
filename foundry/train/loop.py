"""The one training loop: pretraining and every fine-tuning recipe run through `train()`."""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from foundry.core.version import __version__
from foundry.eval.perplexity import Perplexity, evaluate
from foundry.train.checkpoint import load_trainer_state, save_checkpoint
from foundry.train.config import TrainConfig
from foundry.train.loss import CausalLMLoss
from foundry.train.metrics import MetricsLog, plot_losses
from foundry.train.progress import TrainReporter
from foundry.train.schedule import lr_at
from foundry.train.setup import RunSetup, prepare_run


@dataclass
class TrainResult:
    """What a finished (or interrupted) run leaves behind."""

    run_dir: Path
    checkpoint: Path
    step: int
    total_steps: int
    val: Perplexity | None
    baseline: Perplexity | None
    interrupted: bool
    losses: list[float]


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, the loop still runs
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-D tensors): decaying them only hurts.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def train(cfg: TrainConfig, reporter: TrainReporter | None = None) -> TrainResult:
    """Run (or resume) a training run to `cfg.steps` optimizer steps; returns where it ended."""
    progress = reporter or TrainReporter()
    run = prepare_run(cfg)
    model, loader, device = run.model, run.loader, run.device
    optimizer = _optimizer(model, cfg)
    step, total_steps, tokens, elapsed_before = 0, cfg.steps, 0, 0.0
    if run.resume_from is not None:
        state = load_trainer_state(run.resume_from)
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng_cpu"])
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        total_steps = min(cfg.steps, state["total_steps"]) if state.get("budget_fitted") else cfg.steps
    budget_fitted = run.resume_from is not None and state.get("budget_fitted", False)
    objective = CausalLMLoss(model)
    loss_of = torch.compile(objective) if cfg.compile else objective
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if run.bf16 else nullcontext())
    metrics = MetricsLog(run.run_dir / "metrics.jsonl", resume_step=step if run.resume_from else None)
    losses: list[float] = []
    val: Perplexity | None = None
    start_step, started = step, time.perf_counter()
    # A time budget is fitted twice: on steps 2-5, then again once throughput has settled.
    fit_at = start_step + 5 if cfg.time_budget and not budget_fitted else None
    timed_from = (start_step, 0.0)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    def run_eval(batches: int) -> Perplexity:
        result = evaluate(model, run.val_shards, cfg.batch_size, cfg.seq_len, batches or None,
                          device, autocast if run.bf16 else None)
        metrics.write({"step": step, "tokens": tokens, "val_loss": result.loss, "val_ppl": result.perplexity})
        progress.note(f"step {step}: validation loss {result.loss:.4f}, perplexity {result.perplexity:.2f}"
                      f" (unigram baseline {run.baseline.loss:.4f} / {run.baseline.perplexity:.1f})")
        return result

    def save() -> Path:
        trainer_state = {"step": step, "total_steps": total_steps, "budget_fitted": budget_fitted,
                         "tokens": tokens, "elapsed": elapsed(), "optimizer": optimizer.state_dict(),
                         "loader": loader.state_dict(), "rng_cpu": torch.get_rng_state(),
                         "train_config": cfg.to_dict()}
        meta = {"foundry_version": __version__, "stage": "pretrain", "step": step, "tokens": tokens,
                "train_config": cfg.to_dict(), "data": run.data_summary,
                "eval": ({"val_loss": val.loss, "val_perplexity": val.perplexity,
                          "unigram_loss": run.baseline.loss} if val else {})}
        path = save_checkpoint(run.run_dir, step, model, run.tokenizer, trainer_state, meta, cfg.keep_checkpoints)
        plot_losses(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png", run.baseline.loss)
        return path

    model.train()
    checkpoint = None
    progress.start(total_steps, step, cfg.tokens_per_step)
    try:
        with _StopRequest() as stop:
            progress.note(f"training {run.param_count:,} parameters on {device.type} "
                          f"({'bf16 autocast' if run.bf16 else 'fp32'}), {cfg.tokens_per_step:,} tokens/step, "
                          f"steps {step}->{total_steps}")
            while step < total_steps and stop.signal is None:
                # A run fitted to a time budget may be short: keep warm-up within its first tenth.
                warmup = min(cfg.warmup, max(total_steps // 10, 1)) if budget_fitted else cfg.warmup
                lr = lr_at(step, cfg.lr, warmup, total_steps, cfg.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss = 0.0
                for _ in range(cfg.grad_accum):
                    x, y = next(loader)
                    with autocast:
                        loss = loss_of(x.to(device), y.to(device))
                    (loss / cfg.grad_accum).backward()
                    step_loss += loss.item() / cfg.grad_accum
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += cfg.tokens_per_step
                losses.append(step_loss)
                if not math.isfinite(step_loss):
                    progress.note(f"step {step}: loss is {step_loss}; lower --lr or raise --warmup")
                if step == start_step + 1:
                    timed_from = (step, elapsed())  # the first step pays for compilation and warm-up
                if step == fit_at:
                    total_steps = _fit_to_budget(cfg, step, elapsed(), *timed_from)
                    progress.set_total(total_steps)
                    fit_at = None if budget_fitted else step + max(5, (total_steps - step) // 10)
                    timed_from, budget_fitted = (step, elapsed()), True
                if step % max(cfg.log_every, 1) == 0 or step == total_steps:
                    metrics.write({"step": step, "tokens": tokens, "loss": step_loss, "lr": lr,
                                   "grad_norm": grad_norm, "elapsed": round(elapsed(), 3)})
                progress.update(step, step_loss, lr)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    val = run_eval(cfg.eval_batches)
                if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                    checkpoint = save()
            interrupted = stop.signal is not None
            if interrupted:
                progress.note(f"stopping on signal {stop.signal} at step {step}: saving a checkpoint")
            elif run.val_shards is not None:  # the loop never evaluates its last step: do it here
                val = run_eval(cfg.final_eval_batches)
            checkpoint = save()
    finally:
        progress.close()
    metrics.close()
    return TrainResult(run.run_dir, checkpoint, step, total_steps, val, run.baseline, interrupted, losses)


def _fit_to_budget(cfg: TrainConfig, step: int, elapsed: float, since_step: int, since: float) -> int:
    """Total steps that fit the time budget at the pace since `since_step` (10% kept for evaluation, saving)."""
    per_step = (elapsed - since) / max(step - since_step, 1)
    fitted = step + int((0.9 * cfg.time_budget - elapsed) / per_step)
    return max(step, min(cfg.steps, fitted))


__all__ = ["train", "TrainResult", "RunSetup"]
