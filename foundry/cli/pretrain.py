"""`foundry pretrain`: training settings from --config RUN.yaml and flags, then the one training loop.

Every TrainConfig field is a flag, derived from the dataclass (its metadata holds the help text), so a new
setting is on the command line the day it is added. Flags default to None internally: "given on the
command line" must stay visible, because on --resume the run's saved settings are the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import TYPE_CHECKING

import os
from pathlib import Path

from foundry.cli.launch import add_launch_flags, launch, wants_launch
from foundry.cli.parsing import add_verb
from foundry.core.units import human_bytes, human_duration
from foundry.train.config import ACTIONS, FIXED_ON_RESUME, FREE_ON_RESUME, TrainConfig, flag_name

if TYPE_CHECKING:
    from foundry.train.loop import TrainResult
    from foundry.train.setup import RunSetup


def _flags_text(names: frozenset[str] | dict[str, str]) -> str:
    order = [f.name for f in dataclasses.fields(TrainConfig)]
    return ", ".join(f"--{flag_name(n)}" for n in sorted(names, key=order.index))


EPILOG = f"""\
--resume continues the run in --out from its newest checkpoint, and the run's saved settings (RUN_DIR/run.yaml, \
else the checkpoint's) are then the defaults: `foundry pretrain --out RUN_DIR --resume` goes on exactly as the \
run was set up. A flag or --config value that differs from a saved setting is refused, unless --allow-changes \
is given; run.yaml then records each change, with the step, under `changes:`.

Free to differ on resume: {_flags_text(FREE_ON_RESUME)}. They say how far the run goes (--steps is the run's \
total: raise it to extend a run), where it runs and how often it reports and saves, not which data a step sees \
or how it updates the weights (another device or --compile may round differently). Never changed on resume, \
as the checkpoint fixes them: {_flags_text(FIXED_ON_RESUME)}.
"""


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from --config YAML (if any) overridden by the flags given on the command line; with
    --resume, both override the run's saved settings."""
    given = TrainConfig.from_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        if getattr(args, f.name) is not None:
            given[f.name] = getattr(args, f.name)
    restarted_job_resumes(given)
    if given.get("resume"):
        from foundry.train.setup import resume_config

        return resume_config(given)
    return TrainConfig(**given)


def restarted_job_resumes(given: dict[str, object]) -> None:
    """A job torchrun restarted (--max-restarts) continues from the run's newest complete checkpoint."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) < 1 or given.get("resume") or not given.get("out"):
        return
    from foundry.hub import latest_checkpoint

    if latest_checkpoint(Path(str(given["out"]))) is not None:
        given["resume"], given["overwrite"] = True, False


def planned_memory(setup: RunSetup, cfg: TrainConfig) -> dict[str, float]:
    """`foundry plan`'s per-device memory for this run's model and layout: weights, gradients, optimizer, activations."""
    from foundry.plan.planner import activation_bytes, model_state_bytes

    world, config = setup.world, setup.model.config
    zero = {"fsdp": 3, "ddp": 0, "none": 0}[_strategy(setup, cfg)]
    precision = "bf16-mixed" if setup.bf16 else "fp32"
    states = model_state_bytes(config.num_params(), dp=world.dp, zero=zero, precision=precision,
                               model_parallel=world.tp)
    recompute = {"off": "none", "full": "full", "selective": "selective"}[cfg.activation_checkpointing]
    states["activations"] = activation_bytes(config, seq=cfg.seq_len, micro_batch=cfg.batch_size // world.dp,
                                             tp=world.tp, sequence_parallel=world.tp > 1, recompute=recompute,
                                             elem=2 if setup.bf16 else 4, kernels="eager")
    return states


def _strategy(setup: RunSetup, cfg: TrainConfig) -> str:
    from foundry.train.parallel.apply import data_parallel_strategy

    return data_parallel_strategy(cfg.parallel, setup.world)


def planned_memory_line(plan: dict[str, float]) -> str:
    parts = ", ".join(f"{name} {human_bytes(value)}" for name, value in plan.items())
    return f"planned memory per device (foundry plan): {human_bytes(sum(plan.values()))} ({parts})"


def _flops(rate: float) -> str:
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if rate >= scale:
            return f"{rate / scale:.3g} {unit}"
    return f"{rate / 1e6:.3g} MFLOP/s"


def summary_lines(result: TrainResult, planned: dict[str, float] | None = None) -> list[str]:
    """The end-of-run summary: plain lines, one figure each, fit for a log file.

    planned: `foundry plan`'s per-device memory for the run (planned_memory), shown beside the measured peak."""
    state = f"stopped by a signal at step {result.step}" if result.interrupted else "finished"
    over = f" over {result.world_size} processes" if result.world_size > 1 else ""
    lines = [f"run {state}: {result.step:,}/{result.total_steps:,} steps, {result.tokens:,} tokens in the whole run",
             (f"  wall time     {human_duration(result.wall_seconds)} this invocation; training steps ran at "
              f"{result.tokens_per_second:,.0f} tokens/s{over}")]
    if result.world_size > 1:
        lines.append(f"  layout        {result.layout}")
    if result.peak_memory is not None:
        plan = f"; planned {human_bytes(sum(planned.values()))} per device" if planned else ""
        lines.append(f"  memory        {human_bytes(result.peak_memory)} measured ({result.peak_memory_source}"
                     f"{', rank 0' if result.world_size > 1 else ''}){plan}")
    if result.mfu is not None and result.peak_flops:
        lines.append(f"  MFU           {result.mfu * 100:.3g}% of a {_flops(result.peak_flops)} peak ({result.peak_source})")
    else:
        lines.append(f"  MFU           unknown: {result.peak_source or 'no peak FLOP/s known for this device'}")
    if result.baseline is None and result.val is None:
        lines.append("  validation    none: no validation split (pretraining: the data directory has none; "
                     "fine-tuning: --val-fraction 0)")
    elif result.baseline is None:  # a fine-tuning recipe: its held-out loss and figures
        extra = "".join(f", {name.replace('_', ' ')} {value:.4g}"
                        for name, value in getattr(result.val, "metrics", {}).items())
        lines.append(f"  validation    final loss {result.val.loss:.4f}{extra} on the held-out set")
    else:
        if result.val is not None:
            lines.append(f"  validation    final loss {result.val.loss:.4f} (perplexity {result.val.perplexity:,.2f})")
        if result.best_val is not None:
            lines.append(f"                best loss  {result.best_val.loss:.4f} (perplexity "
                         f"{result.best_val.perplexity:,.2f}) of the evaluations on the fixed sample")
        lines.append(f"  baseline      unigram loss {result.baseline.loss:.4f} "
                     f"(perplexity {result.baseline.perplexity:,.1f})")
    lines.append(f"  checkpoint    {result.checkpoint or 'none saved'}")
    if result.interrupted:
        lines.append(f"  continue with `foundry pretrain --out {result.run_dir} --resume`")
    return lines


def _cmd_pretrain(args: argparse.Namespace) -> int:
    if wants_launch(args):
        return launch("pretrain", args.verb_argv, args.nproc, args.max_restarts, args.out)
    from foundry.cli.progress import ConsoleTrainReporter
    from foundry.train.loop import train
    from foundry.train.parallel.world import is_main_process
    from foundry.train.progress import TrainReporter
    from foundry.train.setup import prepare_run

    cfg = train_config_from_args(args)
    from foundry.train.vision import vision_kind

    if vision_kind(cfg.model) is not None:  # a ViT or DiT: images, not token shards
        from foundry.cli.vision import train_vision

        return train_vision(cfg, cfg.val_fraction, "pretrain")
    main_rank = is_main_process()  # the other ranks of a distributed run train silently
    setup = prepare_run(cfg)
    plan = planned_memory(setup, cfg)
    if main_rank:
        print(planned_memory_line(plan), flush=True)
    result = train(cfg, ConsoleTrainReporter() if main_rank else TrainReporter(), setup)
    if main_rank:
        print("\n".join(summary_lines(result, plan)), flush=True)
    return 130 if result.interrupted else 0


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def add_settings_flags(p: argparse.ArgumentParser, cls: type = TrainConfig, skip: tuple[str, ...] = (),
                       defaults: dict[str, object] | None = None, helps: dict[str, str] | None = None) -> None:
    """One flag per field of a settings dataclass (TrainConfig, FinetuneConfig), its help from the field.

    defaults: what --help shows as the default where a verb sets its own (finetune's shorter runs); the flags
    themselves default to None so that "given on the command line" stays visible."""
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        options = typing.get_args(types[f.name]) or (types[f.name],)
        kind = next(t for t in options if t is not type(None))
        default = (defaults or {}).get(f.name, f.default)
        shown = f.metadata["shown"] or ({True: "on", False: "off"}[default] if kind is bool else str(default))
        text = f"{(helps or {}).get(f.name, f.metadata['help'])} " \
               f"({'' if shown.startswith('required') else 'default: '}{shown})"
        flag = f"--{flag_name(f.name)}"
        if kind is bool:
            # --no-X turns a setting off again on resume; the actions are switches of one invocation.
            action = "store_true" if f.name in ACTIONS else argparse.BooleanOptionalAction
            p.add_argument(flag, action=action, default=None, help=text)
        else:
            choices = f.metadata["choices"]  # shown in --help; TrainConfig checks them (one-line errors)
            metavar = "{" + ",".join(choices) + "}" if choices else f.metadata["metavar"] or _METAVARS[kind]
            p.add_argument(flag, type=kind, default=None, metavar=metavar, help=text)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `pretrain` verb."""
    p = add_verb(sub, "pretrain", _cmd_pretrain, "Pretrain a model on token shards.")
    p.epilog = EPILOG
    p.add_argument("--config", metavar="RUN.yaml",
                   help="training settings from a YAML file (a run's run.yaml works); flags override it")
    add_settings_flags(p)
    add_launch_flags(p)
