"""TrainConfig: every setting of a training run, loadable from YAML and overridden by flags.

Each field carries its own --help text (and allowed values) in its metadata, so the `pretrain` flags are
derived from the dataclass and a new setting cannot be left without one. This module also holds the rules
of `--resume`: which settings may differ from the run's saved ones, and how run.yaml records a change.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundry.core.errors import UserError
from foundry.core.files import atomic_file


def _setting(default: Any, help: str, *, choices: tuple[str, ...] = (), shown: str | None = None,
             metavar: str | None = None) -> Any:
    """A TrainConfig field: its default, its --help text, its allowed values and how --help shows the default."""
    return field(default=default, metadata={"help": help, "choices": choices, "shown": shown, "metavar": metavar})


@dataclass
class TrainConfig:
    """One training run (pretraining or a fine-tuning recipe)."""

    model: str = _setting("", "preset (tiny, mini, small, ...), model config YAML, model directory or run "
                          "directory", shown="required; with --resume, the run's own", metavar="MODEL")
    data: str = _setting("", "DATA_DIR written by `foundry prepare`", shown="required; with --resume, the run's own",
                         metavar="DATA_DIR")
    out: str = _setting("", "the run directory: checkpoints, metrics.jsonl, loss.png, run.yaml", shown="required",
                        metavar="RUN_DIR")
    tokenizer: str | None = _setting(None, "tokenizer directory", shown="the one stored in DATA_DIR", metavar="DIR")
    steps: int = _setting(1000, "optimizer steps in the whole run (a resumed run continues up to it)")
    batch_size: int = _setting(8, "sequences per micro-batch, over all data-parallel ranks (each takes "
                               "batch-size / dp)")
    seq_len: int = _setting(256, "tokens per sequence")
    grad_accum: int = _setting(1, "micro-batches per optimizer step")
    lr: float = _setting(3e-3, "peak learning rate")
    min_lr_ratio: float = _setting(0.1, "the cosine schedule decays to lr x this ratio")
    warmup: int = _setting(50, "linear warm-up steps")
    weight_decay: float = _setting(0.1, "AdamW weight decay (never on norms and biases)")
    beta1: float = _setting(0.9, "AdamW beta1")
    beta2: float = _setting(0.95, "AdamW beta2")
    grad_clip: float = _setting(1.0, "gradient-norm clipping threshold")
    moe_aux_loss_coef: float | None = _setting(None, "mixture of experts: weight of the load-balancing loss added "
                                               "to the training loss (none: the model config's "
                                               "router_aux_loss_coef)", metavar="X")
    moe_z_loss_coef: float = _setting(0.0, "mixture of experts: weight of the router z-loss (ST-MoE suggests 1e-3)")
    moe_bias_update_rate: float = _setting(0.001, "mixture of experts with a routing correction bias (DeepSeek-V3): "
                                           "its step towards balanced loads after each optimizer step (0: off)")
    seed: int = _setting(1337, "seed for initialisation and data order")
    val_fraction: float = _setting(0.2, "vision models: the share of each label's images held out for validation "
                                   "(token data has DATA_DIR's own split)")
    augment_shift: int = _setting(0, "vision models: shift each training image by up to N pixels (drawn per image "
                                  "and step; the border black)")
    eval_every: int = _setting(100, "steps between validation evaluations (0: only at the end)")
    eval_batches: int = _setting(20, "validation batches per periodic evaluation (0: the whole split)")
    final_eval_batches: int = _setting(0, "validation batches at the end (0: the whole split, like the baseline)")
    save_every: int = _setting(500, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _setting(2, "complete checkpoints to keep; older ones are deleted (0: keep all)")
    log_every: int = _setting(10, "steps between lines of metrics.jsonl")
    time_budget: float | None = _setting(None, "fit --steps to this many seconds after timing the first steps",
                                         shown="none", metavar="SECONDS")
    skip_nonfinite: int = _setting(0, "steps with a non-finite loss to skip (no update) before the run stops",
                                   metavar="N")
    compile: bool = _setting(False, "torch.compile the model")
    activation_checkpointing: str = _setting("off", "recompute activations in the backward pass to save memory: "
                                             "off, full (keep only each layer's input) or selective (keep the "
                                             "matmul and attention outputs, recompute the rest)",
                                             choices=("off", "full", "selective"))
    precision: str = _setting("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16",
                              choices=("auto", "fp32", "bf16"))
    fast_fp32: str = _setting("auto", "oneDNN fp32 matmuls on CPU: auto (only where exact: no AMX), on or off",
                              choices=("auto", "on", "off"))
    device: str = _setting("auto", "auto (CUDA if available, else CPU), cpu, cuda or cuda:N", metavar="DEVICE")
    parallel: str = _setting("auto", "data parallelism across processes (torchrun or --nproc): auto (fsdp when "
                             "there are several data-parallel ranks), none, ddp (full replicas, gradients "
                             "all-reduced) or fsdp (FSDP2: weights, gradients and optimizer state sharded)",
                             choices=("auto", "none", "ddp", "fsdp"))
    tp: int = _setting(1, "tensor-parallel degree: each layer's heads and hidden units split over this many "
                       "neighbouring ranks, with sequence parallelism between them")
    dp: int = _setting(0, "data-parallel degree (0: the world size divided by --tp)")
    ep: int = _setting(1, "expert-parallel degree: each mixture-of-experts layer's experts split over groups of "
                       "this many data-parallel ranks, tokens sent to their experts by all-to-all (must divide "
                       "the experts and the data-parallel ranks; with --parallel ddp)")
    reshard_after_forward: bool = _setting(True, "fsdp: free each layer's gathered weights after its forward pass "
                                           "(less memory, one more all-gather per layer in backward)")
    dist_timeout: float = _setting(600.0, "seconds a rank waits for the others in a collective before the job "
                                   "stops (a dead or stuck rank ends the run instead of hanging it)",
                                   metavar="SECONDS")
    resume: bool = _setting(False, "continue the run in --out from its newest checkpoint, with its saved settings")
    overwrite: bool = _setting(False, "replace the run in --out")
    allow_changes: bool = _setting(False, "with --resume: accept settings that differ from the run's saved ones "
                                   "(run.yaml records each change)")

    def __post_init__(self) -> None:
        if isinstance(self.activation_checkpointing, bool):  # older run.yaml files hold a switch
            self.activation_checkpointing = "full" if self.activation_checkpointing else "off"
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "tp", "ep"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("warmup", "skip_nonfinite", "eval_every", "save_every", "log_every", "eval_batches",
                     "final_eval_batches", "keep_checkpoints", "dp"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.augment_shift < 0:
            raise UserError(f"--augment-shift must not be negative, got {self.augment_shift}")
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_bias_update_rate"):
            if (getattr(self, name) or 0) < 0:
                raise UserError(f"--{flag_name(name)} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"--min-lr-ratio must be between 0 and 1, got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{flag_name(f.name)} must be {', '.join(choices[:-1])} or {choices[-1]}, "
                                f"got {getattr(self, f.name)!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise UserError(f"--device {self.device!r} is not a device; use auto, cpu, cuda or cuda:N (N a GPU index)")
        if self.dist_timeout <= 0:
            raise UserError(f"--dist-timeout must be positive seconds, got {self.dist_timeout}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise UserError(f"--time-budget must be positive seconds, got {self.time_budget}")
        if self.resume and self.overwrite:
            raise UserError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
        if self.allow_changes and not self.resume:
            raise UserError("--allow-changes only applies with --resume")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path) -> dict[str, Any]:
        """Settings from a run YAML (a mapping of TrainConfig fields), checked for unknown keys."""
        return read_run_yaml(path)[0]


def flag_name(name: str) -> str:
    """The command-line spelling of a setting, without the dashes: batch_size -> batch-size."""
    return name.replace("_", "-")


def field_types() -> dict[str, tuple[type, bool]]:
    """Each setting's value type and whether it may be None (`X | None` gives (X, True))."""
    types = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        options = typing.get_args(hint) or (hint,)
        types[name] = (next(t for t in options if t is not type(None)), type(None) in options)
    return types


# ---- run.yaml: the settings of a run and the history of their changes ----

CHANGES = "changes"  # run.yaml's history of settings changed on resume: not a setting, --config skips it

# Invocation switches, not settings: never written to run.yaml, never compared on resume.
ACTIONS = frozenset({"resume", "overwrite", "allow_changes"})

# May differ on resume without --allow-changes: how far the run goes, where it lives and runs, and how often
# it reports and saves. None of them changes which data a step sees or how it updates the weights, so the
# run stays the run it was (another --device, --compile or parallel layout may round differently; --batch-size
# is over all ranks, so another world size sees the same data; raising --steps stretches the cosine tail,
# which is what extending a run means).
FREE_ON_RESUME = frozenset({"steps", "out", "device", "compile", "activation_checkpointing", "log_every",
                            "eval_every", "eval_batches", "final_eval_batches", "save_every", "keep_checkpoints",
                            "parallel", "tp", "dp", "ep", "reshard_after_forward", "dist_timeout"})

# Fixed by the checkpoint itself, even with --allow-changes.
FIXED_ON_RESUME = {
    "model": "the checkpoint's weights are the model",
    "seed": "the saved data position follows the data order drawn from it",
    "seq_len": "the saved data position counts windows of seq_len + 1 tokens",
}

_PATHS = ("model", "data", "out", "tokenizer")


def _yaml_value(name: str, value: Any, kind: type, optional: bool, source: str) -> Any:
    """A YAML value as the setting's type (YAML reads `3e-3` as a string), or a one-line error."""
    if value is None and optional:
        return None
    if name == "activation_checkpointing" and isinstance(value, bool):  # older run.yaml files hold a switch
        return "full" if value else "off"
    try:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and not isinstance(value, bool) and isinstance(value, (int, str)):
            return int(value)
        if kind is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    except ValueError:
        pass
    wanted = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[kind]
    raise UserError(f"{source}: {name} must be {wanted}{' or null' if optional else ''}, got {value!r}")


def read_run_yaml(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(settings, change history) from a run YAML, checked for unknown keys and value types."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise UserError(f"cannot read run config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of training settings")
    history = data.pop(CHANGES, None) or []
    if not isinstance(history, list):
        raise UserError(f"{path}: `{CHANGES}` must be a list of changes")
    types = field_types()
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise UserError(f"{path}: unknown training setting(s) {', '.join(map(str, unknown))}; "
                        f"known: {', '.join(sorted(types))}")
    return {name: _yaml_value(name, value, *types[name], str(path)) for name, value in data.items()}, history


def save_run_yaml(path: Path, cfg: TrainConfig, history: list[dict[str, Any]]) -> None:
    """Write run.yaml atomically: the settings (paths made absolute, so a resume works from anywhere), then
    the change history; the file stays loadable by --config."""
    import yaml

    settings = {name: value for name, value in cfg.to_dict().items() if name not in ACTIONS}
    for name in _PATHS:
        value = settings[name]
        # A preset name is not a path, nor is the embedded image set `digits` (when no such file is there).
        if value and (name not in ("model", "data") or Path(value).exists()):
            settings[name] = os.path.abspath(value)
    if history:
        settings[CHANGES] = history
    with atomic_file(path, "w") as handle:
        yaml.safe_dump(settings, handle, sort_keys=False)


def _same(name: str, old: Any, new: Any) -> bool:
    if name in _PATHS and isinstance(old, str) and isinstance(new, str):
        return os.path.abspath(old) == os.path.abspath(new)
    return old == new


def _shown(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def resume_changes(saved: dict[str, Any], cfg: TrainConfig, step: int, run_dir: Path) -> list[dict[str, Any]]:
    """The settings where `cfg` differs from the run's saved ones, as run.yaml change records (at `step`).

    A conflict is refused in one line naming the setting and both values, unless it is free on resume or
    cfg.allow_changes says so; what the checkpoint fixes is refused always.
    """
    changes, conflicts = [], []
    for f in dataclasses.fields(TrainConfig):
        if f.name in ACTIONS:
            continue
        old, new = saved.get(f.name, f.default), getattr(cfg, f.name)
        if _same(f.name, old, new):
            continue
        clash = f"--{flag_name(f.name)} {_shown(new)} conflicts with the run's saved {f.name} {_shown(old)}"
        if f.name in FIXED_ON_RESUME:
            raise UserError(f"{clash}; it cannot change on resume ({FIXED_ON_RESUME[f.name]}); start a new run "
                            f"with --model {run_dir} to train on from its weights")
        if f.name not in FREE_ON_RESUME and not cfg.allow_changes:
            conflicts.append(clash)
        elif f.name != "out":  # a moved run directory is the same run: nothing to record
            changes.append({"step": step, "setting": f.name, "old": old, "new": new})
    if conflicts:
        raise UserError(f"{', '.join(conflicts)}; pass --allow-changes to change {'it' if len(conflicts) == 1 else 'them'}")
    return changes
