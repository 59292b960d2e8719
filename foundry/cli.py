"""foundry's command line: one sub-command per user verb; each parses, then calls one function."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Callable

from foundry.errors import UserError

if TYPE_CHECKING:  # the verbs import their modules lazily, so `foundry plan` needs no torch
    from foundry.infer.sampling import SamplingParams
    from foundry.train.config import TrainConfig

Handler = Callable[[argparse.Namespace], int | None]


def _add(sub: argparse._SubParsersAction, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(handler=handler)
    return parser


# ---- info -------------------------------------------------------------------------------

def _cmd_info(args: argparse.Namespace) -> None:
    from foundry.info import show_info

    show_info(args.model)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "info", _cmd_info, "Parameters, training FLOPs per token and weight memory of a model.")
    p.add_argument("model", help="preset name, config YAML/JSON, model directory or run directory")


# ---- pretrain ---------------------------------------------------------------------------

_TRAIN_FLAGS = {  # flag -> (type, help); every one defaults to the TrainConfig field (or --config)
    "steps": (int, "optimizer steps in the whole run; a resumed run continues up to it"),
    "batch-size": (int, "sequences per micro-batch"),
    "seq-len": (int, "tokens per sequence"),
    "grad-accum": (int, "micro-batches per optimizer step"),
    "lr": (float, "peak learning rate"),
    "warmup": (int, "linear warm-up steps"),
    "weight-decay": (float, "AdamW weight decay"),
    "grad-clip": (float, "gradient-norm clipping threshold"),
    "seed": (int, "seed for initialisation and data order"),
    "eval-every": (int, "steps between validation evaluations (0: only at the end)"),
    "eval-batches": (int, "validation batches per periodic evaluation (0: the whole split)"),
    "final-eval-batches": (int, "validation batches at the end of the run (0: the whole split)"),
    "save-every": (int, "steps between checkpoints (0: only at the end)"),
    "keep-checkpoints": (int, "complete checkpoints to keep (0: all)"),
    "log-every": (int, "steps between metric lines"),
    "time-budget": (float, "seconds: fit --steps to this budget after timing the first steps"),
    "precision": (str, "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16"),
    "fast-fp32": (str, "oneDNN fp32 matmuls on CPU: auto (only where exact), on, off"),
    "device": (str, "auto, cpu, cuda, cuda:N"),
    "tokenizer": (str, "tokenizer directory (default: the one stored in DATA_DIR)"),
}


def train_config_from_args(args: argparse.Namespace) -> "TrainConfig":
    """TrainConfig from --config YAML (if any) overridden by the flags given on the command line."""
    from foundry.train.config import TrainConfig

    settings = TrainConfig.from_yaml(args.config) if args.config else {}
    for name in ("model", "data", "out", *(f.replace("-", "_") for f in _TRAIN_FLAGS),
                 "compile", "activation_checkpointing", "resume", "overwrite"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    return TrainConfig(**settings)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from foundry.train.loop import train

    result = train(train_config_from_args(args))
    print(f"checkpoint: {result.checkpoint}")
    if result.val is not None:
        print(f"validation loss {result.val.loss:.4f}  perplexity {result.val.perplexity:.2f}  "
              f"(unigram baseline {result.baseline.loss:.4f} / {result.baseline.perplexity:.1f})")
    return 130 if result.interrupted else 0


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="preset, model config YAML, model directory or run directory")
    p.add_argument("--data", help="DATA_DIR written by `foundry prepare`")
    p.add_argument("--out", help="RUN_DIR for checkpoints, metrics and the loss plot")
    p.add_argument("--config", help="RUN.yaml of training settings; flags override it")
    for flag, (kind, text) in _TRAIN_FLAGS.items():
        p.add_argument(f"--{flag}", type=kind, default=None, help=text)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass to save memory")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace the run in --out")


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "pretrain", _cmd_pretrain, "Pretrain a model on token shards.")
    _add_train_flags(p)


# ---- demo -------------------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> None:
    from foundry.demo import run_demo

    run_demo(args.out, time_budget=args.time_budget, preset_name=args.model, overwrite=args.overwrite)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "demo", _cmd_demo, "Tokenizer, data, pretraining, evaluation and a sample, on the stdlib corpus.")
    p.add_argument("--out", default="demo-out", help="directory for everything the demo writes")
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds of pretraining (default 300)")
    p.add_argument("--model", default="mini", help="preset to pretrain (default mini)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")


# ---- tokenizer --------------------------------------------------------------------------

def _cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from foundry.data.corpus import train_tokenizer

    tokenizer = train_tokenizer(args.corpus, args.vocab_size, args.out, glob=args.glob, field=args.field,
                                overwrite=args.overwrite)
    print(f"trained a {tokenizer.vocab_size:,}-token byte-level BPE -> {args.out}")


def _add_corpus_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", nargs="+", required=True, metavar="stdlib|PATH",
                   help="`stdlib` (the embedded Python standard library), text files, directories or .jsonl files")
    p.add_argument("--glob", default="**/*", help="files to read inside directories (default **/*)")
    p.add_argument("--field", default="text", help="text field of .jsonl records (default text)")


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="Train tokenizers.", description="Train tokenizers.")
    verbs = p.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    t = _add(verbs, "train", _cmd_tokenizer_train,
             "Train a byte-level BPE tokenizer (with ChatML special tokens and chat template) on every document "
             "of the corpus, train and validation alike.")
    _add_corpus_flags(t)
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, special ones included")
    t.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    t.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")


# ---- prepare ----------------------------------------------------------------------------

def _cmd_prepare(args: argparse.Namespace) -> None:
    from foundry.data.shards import prepare, summary

    meta = prepare(args.corpus, args.tokenizer, args.out, val_fraction=args.val_fraction, glob=args.glob,
                   field=args.field, overwrite=args.overwrite)
    print(summary(meta, args.out))


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "prepare", _cmd_prepare, "Tokenize a corpus into train/validation token shards.")
    _add_corpus_flags(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (from `foundry tokenizer train`)")
    p.add_argument("--out", required=True, help="DATA_DIR to create")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of documents held out for validation, chosen by a hash of their names "
                        "(default 0.05; at least one document)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DATA_DIR (only once the new one is complete)")


# ---- generate / chat --------------------------------------------------------------------

def _sampling_params(args: argparse.Namespace) -> "SamplingParams":
    from foundry.infer.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=args.stop or [])


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    # Unset flags stay None so that the model's generation_config.json supplies the default.
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster tokens after a one-off compile of tens of seconds")
    p.add_argument("--max-new-tokens", type=int, default=None, help="most tokens to generate per reply")
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the model's, else 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest tokens (0: off)")
    p.add_argument("--top-p", type=float, default=None, help="sample within probability mass P (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (1: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop before this text (repeatable)")


def _cmd_generate(args: argparse.Namespace) -> None:
    from foundry.infer.commands import run_generate

    prompts = args.prompt
    if not prompts and not sys.stdin.isatty():
        prompts = [sys.stdin.read()]
    run_generate(args.model, prompts or [], _sampling_params(args), device=args.device, compile=args.compile)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "generate", _cmd_generate, "Complete prompts with a model (one prompt streams as it goes).")
    p.add_argument("model", help="model directory or run directory")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text to complete (repeatable; default: read stdin)")
    _add_sampling_flags(p)


def _cmd_chat(args: argparse.Namespace) -> None:
    from foundry.infer.commands import run_chat

    run_chat(args.model, _sampling_params(args), system=args.system, device=args.device, compile=args.compile)


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "chat", _cmd_chat, "Talk with a model: one message per line on stdin, replies stream back.")
    p.add_argument("model", help="model directory or run directory")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    _add_sampling_flags(p)


# ---- plan -------------------------------------------------------------------------------

def _cmd_plan(args: argparse.Namespace) -> None:
    import dataclasses

    from foundry.plan import PlanRequest, make_plan, print_plan

    fields = {f.name for f in dataclasses.fields(PlanRequest)}
    print_plan(make_plan(PlanRequest(**{k: v for k, v in vars(args).items() if k in fields})), as_json=args.json)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from foundry.hardware import NAMES

    p = _add(sub, "plan", _cmd_plan, "Training FLOPs, time, cost and memory per device, compute-optimal sizing "
                                     "and inference limits, before you spend (no torch needed).")
    p.add_argument("model", nargs="?", help="preset, config YAML/JSON, model directory or run directory")
    p.add_argument("--params", help="parameter count instead of a model, e.g. 70B (no shape: 6ND only)")
    p.add_argument("--tokens", help="training tokens, e.g. 15.6T (default: compute-optimal for the size)")
    p.add_argument("--hardware", default="h100-sxm", help=f"one of {', '.join(NAMES)} (default h100-sxm)")
    p.add_argument("--gpus", type=int, help="devices in all (default dp x tp x pp)")
    p.add_argument("--dp", type=int, help="data-parallel degree (default --gpus / (tp x pp))")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (default 1)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage over the data-parallel ranks")
    p.add_argument("--fsdp", choices=("full", "grad-op"), help="FSDP sharding: full = ZeRO-3, grad-op = ZeRO-2")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="Megatron sequence parallelism (default: on when --tp > 1)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="selective",
                   help="activation recompute (default selective: no attention scores kept, as FlashAttention)")
    p.add_argument("--kernels", choices=("fused", "eager"), default="fused",
                   help="fused (Megatron-style) or PyTorch eager activation accounting (default fused)")
    p.add_argument("--precision", choices=("bf16-mixed", "fp32"), default="bf16-mixed",
                   help="bf16-mixed: 2+2+12 bytes/parameter with Adam; fp32: 4+4+8 (default bf16-mixed)")
    p.add_argument("--mfu", type=float, help="model-FLOPs utilisation, 0-1 (default: the hardware's, from published runs)")
    p.add_argument("--price", type=float, help="$ per device-hour (default: the catalog's indicative rate)")
    p.add_argument("--seq-len", type=int, help="training sequence length (default min(4096, model maximum))")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per device per micro-batch (default 1)")
    p.add_argument("--budget-flops", help="size a compute-optimal model for this many FLOPs, e.g. 1e24")
    p.add_argument("--budget-dollars", help="size a compute-optimal model for this many dollars, e.g. 1M")
    p.add_argument("--loss-law", choices=("besiroglu2024", "hoffmann2022"), default="besiroglu2024",
                   help="fitted loss law for predicted loss (default besiroglu2024)")
    p.add_argument("--context", type=int, help="inference context length (default --seq-len)")
    p.add_argument("--weight-dtype", choices=("bf16", "fp16", "fp8", "int8", "int4"), default="bf16",
                   help="inference weight format (default bf16)")
    p.add_argument("--kv-dtype", choices=("bf16", "fp16", "fp8", "int8"), default="bf16",
                   help="inference KV-cache format (default bf16)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


# ---- export -----------------------------------------------------------------------------

_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


def _cmd_export(args: argparse.Namespace) -> None:
    import torch

    from foundry.hub import export

    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    out = export(args.model, args.out, dtype=dtype, shard_size=args.shard_size, trust_pickle=args.trust_pickle)
    print(f"wrote {out} (loads with transformers' AutoModelForCausalLM.from_pretrained)")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "export", _cmd_export,
             "Write a model as a Hugging Face directory: safetensors shards, config.json, generation_config.json "
             "and tokenizer files, loadable by transformers as it is.")
    p.add_argument("model", help="model directory, run directory or Hugging Face Hub id (org/name[@revision])")
    p.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="weight dtype to write (default: the model's own)")
    p.add_argument("--shard-size", default="5GB", help="largest weight file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pytorch_model.bin checkpoint (read with torch.load(weights_only=True))")


# ---- parser -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one sub-parser per verb."""
    parser = argparse.ArgumentParser(
        prog="foundry", description="Define, prepare data for, pretrain, generate with, export and plan large "
        "language models. Every verb takes --help.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_info, _add_pretrain, _add_demo, _add_tokenizer, _add_prepare, _add_generate, _add_chat,
                _add_plan, _add_export):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one verb; bad input prints one line and exits 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except UserError as exc:
        print(f"foundry {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"foundry {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
