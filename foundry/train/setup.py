"""Everything a run needs before its first step: checks, run directory, data, model, device."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from foundry import hub
from foundry.config import ModelConfig
from foundry.data.loader import BatchLoader
from foundry.data.shards import TokenShards, read_meta
from foundry.core.errors import UserError
from foundry.eval.perplexity import Perplexity, unigram_baseline
from foundry.hub import latest_checkpoint, resolve_model_source
from foundry.model import Transformer
from foundry.tokenizer import Tokenizer
from foundry.train.checkpoint import clean_partial_writes, is_run_dir, load_trainer_state
from foundry.train.config import ACTIONS, TrainConfig, read_run_yaml, resume_changes, save_run_yaml
from foundry.train.parallel.world import World, start_world
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
    # A fine-tuning recipe's own parts (train/finetune.py); pretraining leaves them as they are.
    stage: str = "pretrain"
    objective: torch.nn.Module | None = None  # loss of a batch's tensors (None: CausalLMLoss of (x, y))
    validate: Callable[[torch.nn.Module], Perplexity] | None = None  # scores the whole held-out set
    write_model: Callable[[Path, torch.nn.Module, dict[str, Any]], None] | None = None  # checkpoint files
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # more of foundry.json (the recipe, ...)
    recipe: Any = None  # the recipe's own parts, for its end-of-run report (train.recipes.Recipe)
    world: World | None = None  # the processes the run trains in (None: this one alone)
    data_parallel: str | None = None  # what --parallel auto means for this run (None: the loop's default)
    weights_dir: Path | None = None  # the model directory a fresh run starts from (None: fresh weights)

    @property
    def has_validation(self) -> bool:
        return self.val_shards is not None or self.validate is not None


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))  # checkpoint.checkpoint_name writes step-NNNNNN


def _resume_point(run_dir: Path) -> Path:
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is None:
        raise UserError(f"--resume: {run_dir} has no complete checkpoint to resume from")
    return checkpoint


def saved_settings(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run's settings and change history: RUN_DIR/run.yaml, else its newest checkpoint's trainer state."""
    checkpoint = _resume_point(run_dir)
    if (run_dir / "run.yaml").is_file():
        saved, history = read_run_yaml(run_dir / "run.yaml")
    else:
        saved, history = load_trainer_state(checkpoint).get("train_config", {}), []
    # Switches of the invocation that wrote them (older run.yaml files hold them too) are not settings.
    known = {f.name for f in dataclasses.fields(TrainConfig)} - ACTIONS
    return {name: value for name, value in saved.items() if name in known}, history


def resume_config(given: dict[str, Any]) -> TrainConfig:
    """The settings of `--resume`: the run's saved ones, overridden by those `given` (flags, --config)."""
    TrainConfig(**given)  # the given values pass their own checks before the run is read
    if not given.get("out"):
        raise UserError("--out RUN_DIR is required: the run to resume")
    saved, _ = saved_settings(Path(given["out"]))
    return TrainConfig(**{**saved, **given, "resume": True})


def _locate_run(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from, if any; refuses a bad --out. Writes nothing."""
    if not cfg.out:
        raise UserError("--out RUN_DIR is required")
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; give a directory")
    if cfg.resume:
        return run_dir, _resume_point(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise UserError(f"--out {run_dir} is a non-empty directory that is not a run; choose another --out")
        if not cfg.overwrite:
            raise UserError(f"--out {run_dir} already holds a run; pass --resume to continue it "
                            f"or --overwrite to replace it")
    return run_dir, None


def _make_run_dir(run_dir: Path, resuming: bool) -> None:
    if resuming:
        clean_partial_writes(run_dir)
        return
    if run_dir.is_dir() and any(run_dir.iterdir()):  # _locate_run has checked it is a run and --overwrite
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _tokenizer(cfg: TrainConfig) -> Tokenizer:
    source = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.data) / "tokenizer"
    if not (source / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer at {source}; pass --tokenizer DIR (the one given to `foundry prepare`)")
    return Tokenizer.load(source)


def _model_config(cfg: TrainConfig, tokenizer: Tokenizer, resume_from: Path | None) -> tuple[ModelConfig, Path | None]:
    # A resumed run's model is its checkpoint, wherever the original --model went since.
    config, model_dir = resolve_model_source(resume_from or cfg.model)
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


def resume_history(cfg: TrainConfig, run_dir: Path, resume_from: Path | None) -> list[dict[str, Any]]:
    """run.yaml's change history, extended by how `cfg` differs from the run's saved settings (empty when the run
    starts afresh); refuses a --steps below what the run has trained and a change resume does not allow."""
    if resume_from is None:
        return []
    saved, history = saved_settings(run_dir)
    done = _checkpoint_step(resume_from)
    if cfg.steps < done:
        raise UserError(f"--steps {cfg.steps} is fewer than the {done} steps {run_dir} has trained; "
                        f"--steps is the run's total: give at least {done}")
    return history + resume_changes(saved, cfg, done, run_dir)


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the run trains under bf16 autocast: --precision bf16, or auto on CUDA."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def join_world(cfg: TrainConfig) -> World:
    """This process's place in the run: joins torchrun's process group when it started this process."""
    return start_world(cfg.device, cfg.tp, cfg.dp, cfg.dist_timeout, cfg.ep)


def local_batch_size(cfg: TrainConfig, world: World) -> int:
    """Sequences per micro-batch on each data-parallel rank: --batch-size is over all of them."""
    if cfg.batch_size % world.dp:
        raise UserError(f"--batch-size {cfg.batch_size} is the micro-batch over all {world.dp} data-parallel ranks "
                        f"and must divide by {world.dp}; give a multiple of {world.dp}")
    return cfg.batch_size // world.dp


def check_tensor_parallel(config: ModelConfig, cfg: TrainConfig, world: World) -> None:
    """Refuse a --tp this model or --seq-len cannot run (before anything is written)."""
    if world.tp > 1:
        from foundry.train.parallel.tensor_parallel import tensor_parallel_refusal

        refusal = tensor_parallel_refusal(config, world.tp, cfg.seq_len)
        if refusal:
            raise UserError(refusal)


def check_expert_parallel(config: ModelConfig, cfg: TrainConfig, world: World) -> None:
    """Refuse an --ep this model or the data-parallel strategy cannot run (before anything is written)."""
    if world.ep > 1:
        from foundry.train.parallel.apply import data_parallel_strategy
        from foundry.train.parallel.expert_parallel import expert_parallel_refusal

        refusal = expert_parallel_refusal(config, world.ep)
        if refusal:
            raise UserError(refusal)
        data_parallel_strategy(cfg.parallel, world)  # refuses --parallel fsdp


def prepare_run(cfg: TrainConfig, world: World | None = None) -> RunSetup:
    """Check the inputs, then build or restore everything the loop needs.

    Nothing on disk changes before every check has passed. On resume, `cfg` must agree with the run's saved
    settings (config.resume_changes says where it may differ); run.yaml records each change. In a distributed
    run rank 0 alone checks and writes the run directory; every rank builds the same model and its data shard.
    """
    if not cfg.model:
        raise UserError("--model is required: a preset (tiny, mini, small, ...), a model config YAML, "
                        "a model directory or a run directory")
    if not cfg.data:
        raise UserError("--data DATA_DIR is required (make one with `foundry prepare`)")
    world = world or join_world(cfg)
    run_dir, resume_from, history = world.run_on_main(lambda: _locate_and_check(cfg))
    device = world.device
    bf16 = uses_bf16(cfg, device)
    configure_fp32_matmul(cfg.fast_fp32, device)
    tokenizer = _tokenizer(cfg)
    train_shards = TokenShards(cfg.data, "train", tokenizer=tokenizer)
    val_shards = TokenShards(cfg.data, "val", tokenizer=tokenizer) if _has_split(cfg.data, "val") else None
    config, model_dir = _model_config(cfg, tokenizer, resume_from)
    check_tensor_parallel(config, cfg, world)
    check_expert_parallel(config, cfg, world)
    loader = BatchLoader(train_shards, local_batch_size(cfg, world), cfg.seq_len, cfg.seed,
                         rank=world.dp_rank, world_size=world.dp)
    world.run_on_main(lambda: _make_run_dir(run_dir, resume_from is not None))  # the inputs have passed their checks
    torch.manual_seed(cfg.seed)
    weights_from = resume_from or model_dir
    if _shards_weights(cfg, world):
        # Sharded layouts build the model without storage; the loop materialises each rank's share once it is laid
        # out: fresh weights, a model directory's (tensor by tensor), or a sharded checkpoint's.
        with torch.device("meta"):
            model = Transformer(config)
    elif weights_from is not None:
        # Master weights train in fp32 whatever the checkpoint's dtype; bf16 comes from autocast.
        model = hub.load(weights_from, device=_build_device(world), dtype=torch.float32, with_tokenizer=False).model
    else:
        model = Transformer(config)
        model.init_weights(cfg.seed)
        model.to(_build_device(world))
    baseline = unigram_baseline(train_shards, val_shards, config.vocab_size) if val_shards is not None else None
    world.run_on_main(lambda: save_run_yaml(run_dir / "run.yaml", cfg, history))
    summary = {"dir": str(Path(cfg.data).resolve()), "train_tokens": len(train_shards),
               "val_tokens": len(val_shards) if val_shards is not None else 0,
               "tokenizer_fingerprint": tokenizer.fingerprint}
    return RunSetup(run_dir, device, bf16, tokenizer, model, sum(p.numel() for p in model.parameters()),
                    loader, val_shards, baseline, resume_from, summary, world=world,
                    weights_dir=model_dir if resume_from is None else None)


def _build_device(world: World) -> torch.device:
    # Expert parallel: every rank builds the whole model on the CPU (the same weights as one process), and
    # apply_expert_parallel moves only its share of the experts to the device.
    return torch.device("cpu") if world.ep > 1 else world.device


def _shards_weights(cfg: TrainConfig, world: World) -> bool:
    from foundry.train.parallel.apply import data_parallel_strategy

    return world.tp > 1 or data_parallel_strategy(cfg.parallel, world) == "fsdp"


def _locate_and_check(cfg: TrainConfig) -> tuple[Path, Path | None, list[dict[str, Any]]]:
    run_dir, resume_from = _locate_run(cfg)
    return run_dir, resume_from, resume_history(cfg, run_dir, resume_from)


def _has_split(data_dir: str, split: str) -> bool:
    return any(s["split"] == split for s in read_meta(data_dir).get("shards", []))
