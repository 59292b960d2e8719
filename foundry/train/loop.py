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
from foundry.train.budget import TimeBudget
from foundry.train.checkpoint import load_trainer_state, restore_rng_states, rng_states, save_checkpoint
from foundry.train.config import TrainConfig
from foundry.train.loss import CausalLMLoss, NonFiniteLoss
from foundry.train.metrics import MetricsLog, plot_losses, plot_title, read_metrics
from foundry.train.progress import TrainReporter
from foundry.train.schedule import lr_at
from foundry.train.setup import RunSetup, prepare_run
from foundry.train.speed import matmul_peak


@dataclass
class TrainResult:
    """What a finished (or interrupted) run leaves behind, and the figures of its end-of-run summary."""

    run_dir: Path
    checkpoint: Path               # the newest complete checkpoint
    step: int
    total_steps: int
    val: Perplexity | None         # the final evaluation on final_eval_batches (by default the whole split)
    baseline: Perplexity | None    # the unigram baseline, over the whole validation split
    interrupted: bool
    losses: list[float]            # this invocation's per-step training losses
    tokens: int                    # tokens trained on in the whole run (earlier invocations included)
    wall_seconds: float            # this invocation, setup to return
    tokens_per_second: float       # this invocation's training steps (evaluation and saving excluded)
    mfu: float | None              # model FLOPs/s (train_flops_per_token * tokens/s) / peak_flops
    peak_flops: float | None
    peak_source: str | None        # where peak_flops comes from (a matmul measured on this device)
    best_val: Perplexity | None    # the lowest evaluation on the fixed sample (the plotted series), whole run
    val_sample: Perplexity | None  # the final evaluation on that fixed sample (comparable with best_val)
    skipped_steps: int             # steps skipped for a non-finite loss (--skip-nonfinite), whole run
    stop_signal: int | None        # the SIGINT / SIGTERM that stopped the run


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


def train(cfg: TrainConfig, reporter: TrainReporter | None = None, setup: RunSetup | None = None) -> TrainResult:
    """Run (or resume) a training run to `cfg.steps` optimizer steps; returns where it ended.

    setup: a fine-tuning recipe's prepared run (train.finetune.prepare_finetune); default pretraining's.

    Raises NonFiniteLoss (a UserError) when the loss or the gradient norm is not finite on more steps
    than cfg.skip_nonfinite allows; nothing is saved then, so `latest` stays the last good checkpoint."""
    started = time.perf_counter()
    return _Run(cfg, setup or prepare_run(cfg), reporter or TrainReporter(), started).run()


class _Run:
    """One invocation of a run: its state, and the step, evaluation and saving that advance it."""

    def __init__(self, cfg: TrainConfig, setup: RunSetup, progress: TrainReporter, started: float):
        self.cfg, self.setup, self.progress, self.started = cfg, setup, progress, started
        self.model, self.loader, self.device = setup.model, setup.loader, setup.device
        self.optimizer = _optimizer(self.model, cfg)
        self.step, self.total_steps, self.tokens, self.elapsed_before = 0, cfg.steps, 0, 0.0
        self.budget_fitted, self.skipped = False, 0
        self.last_finite: tuple[int, float] | None = None  # (step, loss) of the newest finite loss
        if setup.resume_from is not None:
            self._restore(load_trainer_state(setup.resume_from))
        self.start_step, self.checkpoint = self.step, setup.resume_from
        self.saved_step = self.step if setup.resume_from is not None else None
        objective = setup.objective if setup.objective is not None else CausalLMLoss(self.model)
        self.loss_of = torch.compile(objective) if cfg.compile else objective
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if setup.bf16 else nullcontext()
        self.metrics = MetricsLog(setup.run_dir / "metrics.jsonl",
                                  resume_step=self.step if setup.resume_from is not None else None)
        self.losses: list[float] = []
        self.val: Perplexity | None = None
        self.val_sample: Perplexity | None = None
        self.train_seconds = 0.0  # this invocation's training steps
        self.unlogged: dict[str, Any] | None = None  # the newest step's metrics, until written
        self.stop_signal: int | None = None
        self.budget = self._time_budget() if cfg.time_budget else None

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        restore_rng_states(state)
        self.step, self.tokens, self.elapsed_before = state["step"], state["tokens"], state["elapsed"]
        self.budget_fitted = bool(state.get("budget_fitted"))
        if self.budget_fitted:  # continue at the fitted length; the budget refits it after a few steps
            self.total_steps = min(self.cfg.steps, state["total_steps"])
        self.skipped = state.get("skipped_nonfinite", 0)
        self.last_finite = tuple(state["last_finite"]) if state.get("last_finite") else None

    def elapsed(self) -> float:
        """Wall-clock seconds of the whole run: earlier invocations, then this one from its setup on."""
        return self.elapsed_before + time.perf_counter() - self.started

    # ---- the run -----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to the end (or a signal), evaluate, save; returns the result."""
        cfg, setup = self.cfg, self.setup
        self.model.train()
        fitting = self.budget is not None and not self.budget_fitted
        time_left = max(cfg.time_budget - self.elapsed(), 0.0) if cfg.time_budget else None
        self.progress.start(None if fitting else self.total_steps, self.step, cfg.tokens_per_step, time_left)
        try:
            with _StopRequest() as stop:
                ending = (f"? (as many as {cfg.time_budget:g}s allow, at most {self.total_steps})" if fitting
                          else self.total_steps)
                trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
                share = f" of {setup.param_count:,}" if trainable != setup.param_count else ""
                self.progress.note(f"training {trainable:,}{share} parameters on {self.device.type} "
                                   f"({'bf16 autocast' if setup.bf16 else 'fp32'}), {cfg.tokens_per_step:,} "
                                   f"tokens/step, steps {self.step}->{ending}")
                while self.step < self.total_steps and stop.signal is None:
                    self._iteration()
                self._write_unlogged()
                self.stop_signal = stop.signal
                if stop.signal is not None:
                    self.progress.note(f"stopping on signal {stop.signal} at step {self.step}: saving a checkpoint")
                elif setup.has_validation:  # the loop never evaluates its last step: do it here
                    self._final_eval()
                self._save()
        finally:
            self.progress.close()
            self.metrics.close()
        return self._result()

    def _iteration(self) -> None:
        """One optimizer step, then what falls due after it: a refit, an evaluation, a checkpoint."""
        began = time.perf_counter()
        lr, loss, grad_norm, finite = self._step()
        self._record(lr, loss, grad_norm, finite)
        took = time.perf_counter() - began
        self.train_seconds += took
        if self.budget is not None:
            if self.step > self.start_step + 1:  # an invocation's first step pays for compiling and warm-up
                self.budget.timed_step(took)
            if self.budget.due(self.elapsed()):
                self._refit()
        if self._due(self.cfg.eval_every) and self.setup.has_validation:
            self.val = self._evaluate(self.cfg.eval_batches, "val")
            self.progress.note(f"step {self.step}: {self._val_words(self.val)}")
        if self._due(self.cfg.save_every):
            self._save()

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0 and self.step < self.total_steps

    def _step(self) -> tuple[float, float, float, bool]:
        """One optimizer step over grad_accum micro-batches: (lr, loss, gradient norm, whether finite).

        A step whose loss or gradient norm is not finite changes no weight: its gradients are dropped."""
        cfg = self.cfg
        # A run fitted to a time budget may be short: keep warm-up within its first tenth.
        warmup = min(cfg.warmup, max(self.total_steps // 10, 1)) if self.budget_fitted else cfg.warmup
        lr = lr_at(self.step, cfg.lr, warmup, self.total_steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = [t.to(self.device) for t in next(self.loader)]  # (x, y) for pretraining; a recipe's own
            with self.autocast:
                loss = self.loss_of(*batch)
            (loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).item()
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += cfg.tokens_per_step
        self.losses.append(step_loss)
        return lr, step_loss, grad_norm, finite

    def _record(self, lr: float, loss: float, grad_norm: float, finite: bool) -> None:
        """Log the step that just ran; a non-finite one is skipped while --skip-nonfinite allows, else stops the run."""
        if finite:
            self.last_finite = (self.step, loss)
            self.unlogged = {"step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr,
                             "grad_norm": grad_norm, "elapsed": round(self.elapsed(), 3)}
            if self.step % max(self.cfg.log_every, 1) == 0 or self.step == self.total_steps:
                self._write_unlogged()
        else:
            self._skip_or_stop(loss, grad_norm)
        self.progress.update(self.step, loss, lr)

    def _write_unlogged(self) -> None:
        # The last step of a run is always logged, also when a refit made it the last one after it ran.
        if self.unlogged is not None:
            self.metrics.write(self.unlogged)
            self.unlogged = None

    def _skip_or_stop(self, loss: float, grad_norm: float) -> None:
        cfg = self.cfg
        self.metrics.write({"step": self.step, "tokens": self.tokens,
                            "nonfinite": f"loss {loss}, grad norm {grad_norm}"})
        what = f"step {self.step}: the loss is {loss} and the gradient norm {grad_norm}"
        if self.skipped < cfg.skip_nonfinite:
            self.skipped += 1
            self.progress.note(f"{what}: update skipped ({self.skipped} of --skip-nonfinite {cfg.skip_nonfinite})")
            return
        last = (f"last finite loss {self.last_finite[1]:.4f} at step {self.last_finite[0]}" if self.last_finite
                else "no finite loss before it")
        skipped = f", {self.skipped} bad step(s) skipped before" if self.skipped else ""
        kept = (f"{self.checkpoint.name}, the last good checkpoint, stays latest" if self.checkpoint
                else "no checkpoint was saved yet")
        raise NonFiniteLoss(f"{what} ({last}{skipped}); stopped without saving: {kept}. Lower --lr, lengthen "
                            f"--warmup or lower --grad-clip and start again or --resume, or pass "
                            f"--skip-nonfinite N to skip up to N such steps")

    # ---- the time budget ----------------------------------------------------------------------

    def _time_budget(self) -> TimeBudget:
        cfg, val = self.cfg, self.setup.has_validation
        sample = self._eval_size(cfg.eval_batches) if val else (0, 0)
        final = self._eval_size(cfg.final_eval_batches) if val else (0, 0)
        final_batches = sample[1] + (final[1] if final != sample else 0)
        return TimeBudget(cfg.time_budget, cfg.steps, cfg.grad_accum, cfg.eval_every, sample[1],
                          cfg.save_every, final_batches)

    def _refit(self) -> None:
        total = self.budget.fit(self.step, self.elapsed())
        if total != self.total_steps or not self.budget_fitted:
            self.total_steps, self.budget_fitted = total, True
            self.progress.set_total(total)

    # ---- evaluation ---------------------------------------------------------------------------

    def _eval_size(self, batches: int) -> tuple[int, int]:
        """(windows, batches) an evaluation of `batches` batches (0: the whole split) scores; see eval_batches.

        A recipe's validation (setup.validate) always scores its whole held-out set: one unit of time."""
        if self.setup.validate is not None:
            return 0, 1
        windows = (len(self.setup.val_shards) - 1) // self.cfg.seq_len
        if batches:
            windows = min(windows, batches * self.cfg.batch_size)
        return windows, -(-windows // self.cfg.batch_size)

    def _evaluate(self, batches: int, series: str) -> Perplexity:
        """Validation loss on `batches` batches (0: the whole split), logged as `{series}_loss`."""
        began = time.perf_counter()
        if self.setup.validate is not None:
            result = self.setup.validate(self.model)
            self.model.train()
        else:
            result = evaluate(self.model, self.setup.val_shards, self.cfg.batch_size, self.cfg.seq_len,
                              batches or None, self.device, self.autocast if self.setup.bf16 else None)
        if self.budget is not None:
            self.budget.timed_eval(time.perf_counter() - began, self._eval_size(batches)[1])
        record = {"step": self.step, "tokens": self.tokens, f"{series}_loss": result.loss,
                  f"{series}_ppl": result.perplexity, f"{series}_tokens": result.tokens,
                  **{f"{series}_{name}": value for name, value in getattr(result, "metrics", {}).items()}}
        if series == "val_full":
            record["whole_split"] = not batches
        self.metrics.write(record)
        return result

    def _final_eval(self) -> None:
        """The fixed sample once more (the plotted series' last point), and the full evaluation set."""
        cfg = self.cfg
        self.val_sample = self._evaluate(cfg.eval_batches, "val")
        if self._eval_size(cfg.final_eval_batches) == self._eval_size(cfg.eval_batches):
            self.val = self.val_sample  # the sample is the whole evaluation set: one evaluation is both
            self.progress.note(f"step {self.step}: {self._val_words(self.val)}")
            return
        self.val = self._evaluate(cfg.final_eval_batches, "val_full")
        where = "the whole split" if not cfg.final_eval_batches else f"{cfg.final_eval_batches} batches"
        self.progress.note(f"step {self.step}: validation loss {self.val.loss:.4f}, perplexity "
                           f"{self.val.perplexity:.2f} on {where} ({self.val.tokens:,} tokens; "
                           f"{self.val_sample.loss:.4f} on the fixed sample; {self._baseline_words()})")

    def _val_words(self, result: Perplexity) -> str:
        """A periodic evaluation in words: loss and perplexity on what it scored, or a recipe's own figures."""
        if self.setup.validate is not None:
            extra = "".join(f", {name.replace('_', ' ')} {value:.4g}"
                            for name, value in getattr(result, "metrics", {}).items())
            return f"validation loss {result.loss:.4f}{extra} (the whole held-out set)"
        return (f"validation loss {result.loss:.4f}, perplexity {result.perplexity:.2f} ({self._sample_words()}; "
                f"{self._baseline_words()})")

    def _sample_words(self) -> str:
        if not self.cfg.eval_batches:
            return "the whole split"
        return f"fixed sample of {self._eval_size(self.cfg.eval_batches)[0] * self.cfg.seq_len:,} tokens"

    def _baseline_words(self) -> str:
        base = self.setup.baseline
        return f"unigram baseline {base.loss:.4f} / {base.perplexity:.1f} on the whole split"

    # ---- saving -------------------------------------------------------------------------------

    def _save(self) -> None:
        """A checkpoint of this step (unless it has one already), and the loss plot."""
        if self.step == self.saved_step:
            return
        began = time.perf_counter()
        cfg, setup, val = self.cfg, self.setup, self.val
        trainer_state = {"step": self.step, "total_steps": self.total_steps, "budget_fitted": self.budget_fitted,
                         "tokens": self.tokens, "elapsed": self.elapsed(), "optimizer": self.optimizer.state_dict(),
                         "loader": self.loader.state_dict(), **rng_states(), "skipped_nonfinite": self.skipped,
                         "last_finite": self.last_finite, "train_config": cfg.to_dict()}
        evaluation = {}
        if val is not None:
            evaluation = {"val_loss": val.loss, "val_perplexity": val.perplexity, "val_tokens": val.tokens,
                          **{f"val_{name}": value for name, value in getattr(val, "metrics", {}).items()}}
            if setup.baseline is not None:
                evaluation["unigram_loss"] = setup.baseline.loss
        meta = {"foundry_version": __version__, "stage": setup.stage, "step": self.step, "tokens": self.tokens,
                "train_config": cfg.to_dict(), **setup.meta, "data": setup.data_summary, "eval": evaluation}
        self.checkpoint = save_checkpoint(setup.run_dir, self.step, self.model, setup.tokenizer, trainer_state,
                                          meta, cfg.keep_checkpoints, setup.write_model)
        self.saved_step = self.step
        plot_losses(setup.run_dir / "metrics.jsonl", setup.run_dir / "loss.png",
                    setup.baseline.loss if setup.baseline else None,
                    title=plot_title(cfg.model, setup.param_count, self.tokens))
        if self.budget is not None:
            self.budget.timed_save(time.perf_counter() - began)

    # ---- the result ---------------------------------------------------------------------------

    def _result(self) -> TrainResult:
        cfg = self.cfg
        trained = (self.step - self.start_step) * cfg.tokens_per_step
        tokens_per_second = trained / self.train_seconds if trained and self.train_seconds > 0 else 0.0
        peak, source, mfu = None, None, None
        if tokens_per_second:
            peak, source = matmul_peak(self.device, torch.bfloat16 if self.setup.bf16 else torch.float32)
            mfu = self.model.config.train_flops_per_token(cfg.seq_len) * tokens_per_second / peak
        return TrainResult(
            self.setup.run_dir, self.checkpoint, self.step, self.total_steps, self.val, self.setup.baseline,
            self.stop_signal is not None, self.losses, self.tokens, time.perf_counter() - self.started,
            tokens_per_second, mfu, peak, source, self._best_val(), self.val_sample, self.skipped, self.stop_signal)

    def _best_val(self) -> Perplexity | None:
        """The lowest evaluation on the fixed sample in metrics.jsonl (earlier invocations included)."""
        sample = [r for r in read_metrics(self.metrics.path) if "val_loss" in r]
        if not sample:
            return None
        best = min(sample, key=lambda r: r["val_loss"])
        return Perplexity(best["val_loss"], best.get("val_tokens", 0))


__all__ = ["train", "TrainResult", "RunSetup", "NonFiniteLoss"]
