"""TrainConfig: every setting of a training run, loadable from YAML and overridden by flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundry.core.errors import UserError


@dataclass
class TrainConfig:
    """One training run (pretraining or a fine-tuning recipe)."""

    model: str = "tiny"            # preset, model config YAML/JSON, model directory or run directory
    data: str = ""                 # DATA_DIR written by `foundry prepare`
    out: str = ""                  # RUN_DIR: checkpoints, metrics.jsonl, loss.png
    tokenizer: str | None = None   # default: the tokenizer stored in DATA_DIR
    steps: int = 1000              # optimizer steps in the whole run (a resumed run continues up to it)
    batch_size: int = 8            # sequences per micro-batch
    seq_len: int = 256
    grad_accum: int = 1            # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    eval_every: int = 100          # 0: evaluate only at the end
    eval_batches: int = 20         # validation batches per periodic evaluation (0: the whole split)
    final_eval_batches: int = 0    # validation batches at the end (0: the whole split, like the baseline)
    save_every: int = 500          # 0: save only at the end
    keep_checkpoints: int = 2      # older complete checkpoints are deleted
    log_every: int = 10
    time_budget: float | None = None  # seconds: fit `steps` to this budget after timing the first steps
    skip_nonfinite: int = 0        # steps with a non-finite loss to skip (no update) before the run stops
    compile: bool = False
    activation_checkpointing: bool = False
    precision: str = "auto"        # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    fast_fp32: str = "auto"        # oneDNN fp32 matmuls on CPU: auto (only where exact: no AMX) | on | off
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("warmup", "skip_nonfinite", "eval_every", "save_every", "log_every", "eval_batches", "final_eval_batches"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.fast_fp32 not in ("auto", "on", "off"):
            raise UserError(f"--fast-fp32 must be auto, on or off, got {self.fast_fp32!r}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise UserError(f"--time-budget must be positive seconds, got {self.time_budget}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path) -> dict[str, Any]:
        """Settings from a run YAML (a mapping of TrainConfig fields), checked for unknown keys."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise UserError(f"cannot read run config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of training settings")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{path}: unknown training setting(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        return data
