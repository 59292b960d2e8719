"""Everything a run needs before its first step: checks, run directory, data, model, device."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from foundry import hub
from foundry.config import ModelConfig
from foundry.data.loader import BatchLoader
from foundry.data.shards import TokenShards, read_meta
from foundry.core.errors import UserError
from foundry.eval.perplexity import Perplexity, unigram_baseline
from foundry.core.files import atomic_file
from foundry.hub import latest_checkpoint, resolve_model_source
from foundry.model import Transformer
from foundry.tokenizer import Tokenizer
from foundry.train.checkpoint import clean_partial_writes, is_run_dir
from foundry.train.config import TrainConfig
from foundry.train.speed import configure_fp32_matmul


@dataclass
class RunSetup:
    """The resolved pieces of a run."""

    run_dir: Path
    device: torch.device
    bf16: bool
    tokenizer: Tokenizer
    model: Transformer
    param_count: int
    loader: BatchLoader
    val_shards: TokenShards | None
    baseline: Perplexity | None
    resume_from: Path | None
    data_summary: dict[str, Any]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return device


def _run_dir(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """The run directory, made ready; and the checkpoint to resume from, if any."""
    if not cfg.out:
        raise UserError("--out RUN_DIR is required")
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; give a directory")
    if cfg.resume:
        ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
        if ckpt is None:
            raise UserError(f"--resume: {run_dir} has no complete checkpoint to resume from")
        clean_partial_writes(run_dir)
        return run_dir, ckpt
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise UserError(f"--out {run_dir} is a non-empty directory that is not a run; choose another --out")
        if not cfg.overwrite:
            raise UserError(f"--out {run_dir} already holds a run; pass --resume to continue it "
                            f"or --overwrite to replace it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None


def _tokenizer(cfg: TrainConfig) -> Tokenizer:
    source = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.data) / "tokenizer"
    if not (source / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer at {source}; pass --tokenizer DIR (the one given to `foundry prepare`)")
    return Tokenizer.load(source)


def _model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[ModelConfig, Path | None]:
    config, model_dir = resolve_model_source(cfg.model)
    if model_dir is None:  # a fresh model: size its vocabulary and special ids to the tokenizer
        config = config.replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    elif config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model {model_dir} has {config.vocab_size} embeddings but the tokenizer has "
                        f"{tokenizer.vocab_size} tokens; use the model's own tokenizer")
    if cfg.seq_len > config.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                        f"({config.max_position_embeddings}); lower --seq-len")
    return config, model_dir


def prepare_run(cfg: TrainConfig) -> RunSetup:
    """Check the inputs, then build or restore everything the loop needs."""
    device = _device(cfg.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    configure_fp32_matmul(cfg.fast_fp32, device)
    if not cfg.data:
        raise UserError("--data DATA_DIR is required (make one with `foundry prepare`)")
    tokenizer = _tokenizer(cfg)
    train_shards = TokenShards(cfg.data, "train", tokenizer=tokenizer)
    val_shards = TokenShards(cfg.data, "val", tokenizer=tokenizer) if _has_split(cfg.data, "val") else None
    config, model_dir = _model_config(cfg, tokenizer)
    loader = BatchLoader(train_shards, cfg.batch_size, cfg.seq_len, cfg.seed)
    run_dir, resume_from = _run_dir(cfg)  # last: nothing on disk changes before the inputs pass their checks
    torch.manual_seed(cfg.seed)
    weights_from = resume_from or model_dir
    if weights_from is not None:
        # Master weights train in fp32 whatever the checkpoint's dtype; bf16 comes from autocast.
        model = hub.load(weights_from, device=device, dtype=torch.float32, with_tokenizer=False).model
    else:
        model = Transformer(config)
        model.init_weights(cfg.seed)
        model.to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    baseline = unigram_baseline(train_shards, val_shards, config.vocab_size) if val_shards is not None else None
    with atomic_file(run_dir / "run.yaml", "w") as handle:
        yaml.safe_dump(cfg.to_dict(), handle, sort_keys=False)
    summary = {"dir": str(Path(cfg.data).resolve()), "train_tokens": len(train_shards),
               "val_tokens": len(val_shards) if val_shards is not None else 0,
               "tokenizer_fingerprint": tokenizer.fingerprint}
    return RunSetup(run_dir, device, bf16, tokenizer, model, sum(p.numel() for p in model.parameters()),
                    loader, val_shards, baseline, resume_from, summary)


def _has_split(data_dir: str, split: str) -> bool:
    return any(s["split"] == split for s in read_meta(data_dir).get("shards", []))
