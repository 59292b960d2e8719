"""The one training loop: pretraining and every fine-tuning recipe run through `train()`."""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from foundry.core.version import __version__
from foundry.eval.perplexity import Perplexity, evaluate
from foundry.hub.directory import iter_state
from foundry.hub.sharded import is_sharded
from foundry.train.budget import TimeBudget
from foundry.train.checkpoint import load_trainer_state, restore_rng_states, rng_states, save_checkpoint
from foundry.train.config import TrainConfig
from foundry.train.loss import CausalLMLoss, NonFiniteLoss
from foundry.train.metrics import MetricsLog, plot_expert_load, plot_losses, plot_title, read_metrics
from foundry.train.moe_balance import MoETraining
from foundry.train.parallel.apply import data_parallel_strategy, parallelize
from foundry.train.parallel.checkpoint import (load_full_optimizer_state, load_sharded_checkpoint,
                                               save_sharded_checkpoint)
from foundry.train.parallel.expert_checkpoint import full_optimizer_state, gathered_experts, load_optimizer_state
from foundry.train.parallel.gradients import clip_grad_norm
from foundry.train.parallel.materialize import is_on_meta, materialize
from foundry.train.parallel.world import DistributedFailure, World, first_sentence, is_communication_error
from foundry.train.progress import TrainReporter
from foundry.train.schedule import lr_at
from foundry.train.setup import RunSetup, prepare_run
from foundry.train.speed import matmul_peak, peak_memory


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
    stop_signal: int | None        # the SIGINT / SIGTERM that stopped the run (on any rank)
    world_size: int = 1            # processes the run trained in (tokens_per_second is over all of them)
    layout: str = "one process"    # how they shared the work, in words
    peak_memory: int | None = None  # bytes: CUDA's peak allocation on rank 0's GPU, else rank 0's peak RSS
    peak_memory_source: str = ""


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
    setup = setup or prepare_run(cfg)
    result = _Run(cfg, setup, reporter or TrainReporter(), started).run()
    if setup.world is not None:
        setup.world.close()
    return result


class _Run:
    """One invocation of a run: its state, and the step, evaluation and saving that advance it."""

    def __init__(self, cfg: TrainConfig, setup: RunSetup, progress: TrainReporter, started: float):
        self.cfg, self.setup, self.progress, self.started = cfg, setup, progress, started
        self.model, self.loader, self.device = setup.model, setup.loader, setup.device
        self.world = setup.world or World(setup.device)
        requested = setup.data_parallel if cfg.parallel == "auto" and setup.data_parallel else cfg.parallel
        self.strategy = data_parallel_strategy(requested, self.world)
        # FSDP and tensor parallel hold each weight in pieces: their checkpoints are written by every rank.
        self.sharded = self.strategy == "fsdp" or self.world.tp > 1
        objective = setup.objective if setup.objective is not None else CausalLMLoss(self.model)
        self.loss_of = parallelize(self.model, objective, self.world, self.strategy,
                                   activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                                   bf16=setup.bf16, reshard_after_forward=cfg.reshard_after_forward)
        if is_on_meta(self.model):  # a sharded layout's model gets its storage only now, each rank its share
            materialize(self.model, self.device, self._starting_weights())
        self.optimizer = _optimizer(self.model, cfg)  # over the laid-out (sharded) parameters
        # Mixture-of-experts layers: balancing losses, DeepSeek's bias update, expert loads (None: a dense model).
        self.moe = MoETraining.of(self.model, cfg.moe_aux_loss_coef, cfg.moe_z_loss_coef, cfg.moe_bias_update_rate)
        self.moe_figures: dict[str, Any] = {}  # the newest step's
        self.step, self.total_steps, self.tokens, self.elapsed_before = 0, cfg.steps, 0, 0.0
        self.budget_fitted, self.skipped = False, 0
        self.last_finite: tuple[int, float] | None = None  # (step, loss) of the newest finite loss
        if setup.resume_from is not None:
            self._restore(load_trainer_state(setup.resume_from))
        self.start_step, self.checkpoint = self.step, setup.resume_from
        self.saved_step = self.step if setup.resume_from is not None else None
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if setup.bf16 else nullcontext()
        self.metrics = MetricsLog(setup.run_dir / "metrics.jsonl",
                                  resume_step=self.step if setup.resume_from is not None else None,
                                  writer=self.world.is_main)
        self.losses: list[float] = []
        self.val: Perplexity | None = None
        self.val_sample: Perplexity | None = None
        self.train_seconds = 0.0  # this invocation's training steps
        self.unlogged: dict[str, Any] | None = None  # the newest step's metrics, until written
        self.stop_signal: int | None = None
        self.budget = self._time_budget() if cfg.time_budget else None

    def _starting_weights(self):
        """What a sharded run's model is filled with: a sharded checkpoint's shards (read in _restore, so None
        here), a model directory's tensors one at a time, or fresh draws."""
        source = self.setup.resume_from or self.setup.weights_dir
        if source is None:
            return self.model.initial_values(self.cfg.seed)
        if is_sharded(source):
            return None
        expected = {name: p.shape for name, p in self.model.named_parameters()}
        skip = ("lm_head.weight",) if self.model.config.tie_word_embeddings else ()
        return iter_state(source, self.model.config, expected, "cpu", torch.float32, skip=skip)

    def _restore(self, state: dict[str, Any]) -> None:
        if is_sharded(self.setup.resume_from):  # written by several ranks: resharded to this layout
            load_sharded_checkpoint(self.setup.resume_from, self.model, self.optimizer)
        elif self.sharded:  # a one-process or DDP checkpoint resumed sharded: the full state, by name
            load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:  # expert parallel: each rank keeps its experts' share
            load_optimizer_state(self.model, self.optimizer, state["optimizer"])
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
                if self.world.ep > 1:  # this rank holds only its share of the experts; all of them train
                    trainable = setup.param_count
                share = f" of {setup.param_count:,}" if trainable != setup.param_count else ""
                self.progress.note(f"training {trainable:,}{share} parameters on {self._where()} "
                                   f"({'bf16 autocast' if setup.bf16 else 'fp32'}), {cfg.tokens_per_step:,} "
                                   f"tokens/step, steps {self.step}->{ending}")
                with self._peers_watched():
                    while self.step < self.total_steps and not self._stopping(stop):
                        self._iteration()
                    self._write_unlogged()
                    self._finish(stop)
        finally:
            self.progress.close()
            self.metrics.close()
            if self.moe is not None:
                self.moe.close()
        return self._result()

    def _finish(self, stop: _StopRequest) -> None:
        """After the last step: a final evaluation (unless a signal stopped the run), then a checkpoint."""
        if self.stop_signal is None and stop.signal is not None:
            self.stop_signal = stop.signal
        if self.stop_signal is not None:
            self.progress.note(f"stopping on signal {self.stop_signal} at step {self.step}: saving a checkpoint")
        elif self.setup.has_validation:  # the loop never evaluates its last step: do it here
            self._final_eval()
        self._save()

    def _stopping(self, stop: _StopRequest) -> bool:
        """Whether to stop before the next step: a signal here, or (distributed) on any rank, so that every rank
        stops at the same step and saves the same checkpoint together."""
        if not self.world.distributed:
            return stop.signal is not None
        if self.world.any(stop.signal is not None):
            self.stop_signal = stop.signal or signal.SIGTERM  # another rank's signal stops this one too
            return True
        return False

    def _where(self) -> str:
        if not self.world.distributed:
            return self.device.type
        layout = f"{self.strategy} over {self.world.dp} data-parallel ranks" if self.strategy != "none" else ""
        if self.world.tp > 1:
            layout = f"{layout}{', ' if layout else ''}tensor parallel {self.world.tp}-way"
        if self.world.ep > 1:
            layout = f"{layout}, experts split {self.world.ep}-way"
        return f"{self.world.size} processes on {self.device.type} ({layout})"

    @contextmanager
    def _peers_watched(self) -> Iterator[None]:
        """Turn a collective that failed because another rank died or went silent into one clear line."""
        try:
            yield
        except (torch.distributed.DistError, RuntimeError) as exc:
            if not self.world.distributed or not is_communication_error(exc):
                raise
            kept = f"{self.checkpoint.name} is the newest complete checkpoint" if self.checkpoint else \
                "no checkpoint was saved yet"
            raise DistributedFailure(
                f"rank {self.world.rank} lost the other ranks at step {self.step} ({first_sentence(exc)}): another "
                f"rank died, or stopped answering for longer than --dist-timeout ({self.cfg.dist_timeout:g} s); "
                f"{kept}; start the job again with --resume") from None

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
            if self.world.from_main(self.budget.due(self.elapsed())):  # rank 0's clock decides for all
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
        if self.world.dp > 1:
            # Dropout draws its own numbers on each replica (one shared RNG state would drop the same units on
            # every rank), seeded by (seed, step, rank): a resumed run at this layout draws the same again.
            torch.manual_seed(hash((cfg.seed, self.step, self.world.dp_rank)) & 0x7FFF_FFFF_FFFF_FFFF)
        step_loss = 0.0
        # (x, y) for pretraining; a recipe's own tensors otherwise. All of a step's micro-batches first, to weigh them.
        batches = [[t.to(self.device) for t in next(self.loader)] for _ in range(cfg.grad_accum)]
        shares = self._loss_shares(batches)
        for micro, (batch, share) in enumerate(zip(batches, shares)):
            with self._gradient_sync(micro == cfg.grad_accum - 1), self.autocast:
                loss, objective = self._micro_batch_loss(batch)
                (objective / cfg.grad_accum if share is None else objective * share).backward()
            step_loss += loss.item() / cfg.grad_accum if share is None else loss.item() * share / self.world.dp
        step_loss = self.world.mean([step_loss])[0] * (1 if shares[0] is None else self.world.dp)
        grad_norm = clip_grad_norm(self.model.parameters(), cfg.grad_clip)
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.moe is not None:  # the step's loads over every rank; the routing biases move after an update
            self.moe_figures = self.moe.end_step(updated=finite)
        self.step += 1
        self.tokens += cfg.tokens_per_step
        self.losses.append(step_loss)
        return lr, step_loss, grad_norm, finite

    def _micro_batch_loss(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the objective's loss, what is differentiated): the same for a dense model; a mixture of experts adds
        its weighted balancing losses to the second (the logged loss stays the objective's)."""
        if self.moe is None:
            loss = self.loss_of(*batch)
            return loss, loss
        with self.moe.recording():
            loss = self.loss_of(*batch)
        extra = self.moe.extra_loss()
        return loss, loss if extra is None else loss + extra

    def _loss_shares(self, batches: list[list[torch.Tensor]]) -> list[float | None]:
        """Each micro-batch's factor on its mean loss so that the step's gradient is that of the mean over every
        scored target of the step, on every rank: weight * dp / (the step's total weight); data parallel then
        averages over the dp ranks. All None when the weights are equal (pretraining always): the plain mean of
        means, loss / grad_accum, is then exactly that."""
        weight_of = getattr(self.setup.objective, "loss_weight", None)
        if weight_of is None:
            return [None] * len(batches)
        weights = [weight_of(*batch) for batch in batches]
        total, squares = self.world.mean([sum(weights), sum(w * w for w in weights)])
        count = len(weights)  # micro-batches per rank: means over ranks of per-rank sums / count = global means
        if squares / count == (total / count) ** 2:  # every micro-batch on every rank weighs the same
            return [None] * len(batches)
        step_weight = total * self.world.dp
        return [w * self.world.dp / step_weight for w in weights]

    def _gradient_sync(self, last_micro_batch: bool):
        """Data parallel: synchronise gradients only after a step's last micro-batch (once per step)."""
        if self.strategy == "ddp" and not last_micro_batch:
            return self.loss_of.no_sync()
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last_micro_batch)
        return nullcontext()

    def _record(self, lr: float, loss: float, grad_norm: float, finite: bool) -> None:
        """Log the step that just ran; a non-finite one is skipped while --skip-nonfinite allows, else stops the run."""
        if finite:
            self.last_finite = (self.step, loss)
            self.unlogged = {"step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr,
                             "grad_norm": grad_norm, "elapsed": round(self.elapsed(), 3), **self.moe_figures}
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
        total = self.world.from_main(self.budget.fit(self.step, self.elapsed()))
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
                         "tokens": self.tokens, "elapsed": self.elapsed(), "loader": self.loader.state_dict(),
                         **rng_states(), "skipped_nonfinite": self.skipped, "last_finite": self.last_finite,
                         "train_config": cfg.to_dict(), "world_size": self.world.size, "layout": self._where()}
        if not self.sharded:  # a sharded run's optimizer state goes with its weights, each rank its share
            trainer_state["optimizer"] = full_optimizer_state(self.model, self.optimizer)  # whole on rank 0
        evaluation = {}
        if val is not None:
            evaluation = {"val_loss": val.loss, "val_perplexity": val.perplexity, "val_tokens": val.tokens,
                          **{f"val_{name}": value for name, value in getattr(val, "metrics", {}).items()}}
            if setup.baseline is not None:
                evaluation["unigram_loss"] = setup.baseline.loss
        meta = {"foundry_version": __version__, "stage": setup.stage, "step": self.step, "tokens": self.tokens,
                "train_config": cfg.to_dict(), **setup.meta, "data": setup.data_summary, "eval": evaluation}
        if self.sharded:
            self.checkpoint = save_sharded_checkpoint(setup.run_dir, self.step, self.model, self.optimizer,
                                                      setup.tokenizer, trainer_state, meta, cfg.keep_checkpoints,
                                                      self.world)
        else:  # one process, or DDP's identical replicas (expert parallel: the experts gathered): rank 0 writes
            with gathered_experts(self.model):
                self.checkpoint = Path(self.world.run_on_main(lambda: str(save_checkpoint(
                    setup.run_dir, self.step, self.model, setup.tokenizer, trainer_state, meta,
                    cfg.keep_checkpoints, setup.write_model))))
        self.saved_step = self.step
        if self.world.is_main:
            plot_losses(setup.run_dir / "metrics.jsonl", setup.run_dir / "loss.png",
                        setup.baseline.loss if setup.baseline else None,
                        title=plot_title(cfg.model, setup.param_count, self.tokens))
            if self.moe is not None:
                plot_expert_load(setup.run_dir / "metrics.jsonl", setup.run_dir / "expert_load.png",
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
            # Per device: the model FLOPs of the global token rate shared over every rank's peak.
            mfu = self.model.config.train_flops_per_token(cfg.seq_len) * tokens_per_second / (peak * self.world.size)
            if self.world.distributed:
                source = f"{source}, per device"
        memory, memory_source = peak_memory(self.device)
        return TrainResult(
            self.setup.run_dir, self.checkpoint, self.step, self.total_steps, self.val, self.setup.baseline,
            self.stop_signal is not None, self.losses, self.tokens, time.perf_counter() - self.started,
            tokens_per_second, mfu, peak, source, self._best_val(), self.val_sample, self.skipped, self.stop_signal,
            self.world.size, self._where(), memory, memory_source)

    def _best_val(self) -> Perplexity | None:
        """The lowest evaluation on the fixed sample in metrics.jsonl (earlier invocations included)."""
        sample = [r for r in read_metrics(self.metrics.path) if "val_loss" in r]
        if not sample:
            return None
        best = min(sample, key=lambda r: r["val_loss"])
        return Perplexity(best["val_loss"], best.get("val_tokens", 0))


__all__ = ["train", "TrainResult", "RunSetup", "NonFiniteLoss"]
