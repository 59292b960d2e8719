"""`foundry merge BASE ADAPTER --out DIR`: fold a LoRA adapter into its base, as a complete model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from foundry.cli.parsing import add_verb
from foundry.core.errors import UserError


def _cmd_merge(args: argparse.Namespace) -> None:
    from foundry.hub import check_new_dir, load, save_loaded
    from foundry.hub.adapter import base_fingerprint, is_adapter_dir, load_adapter
    from foundry.model.lora import merge_lora

    out = Path(args.out)
    check_new_dir(out)
    if not is_adapter_dir(args.adapter):
        raise UserError(f"{args.adapter} is not an adapter directory (it has no adapter_config.json)")
    loaded = load(args.base, with_tokenizer=False, trust_pickle=args.trust_pickle)
    fingerprint = base_fingerprint(loaded.model)
    load_adapter(loaded.model, args.adapter, fingerprint)
    merged = merge_lora(loaded.model)
    meta = dict(loaded.meta)
    meta["merged_adapter"] = {"base": str(args.base), "adapter": str(args.adapter), "base_fingerprint": fingerprint}
    save_loaded(out, loaded, meta)
    print(f"wrote {out}: {args.base} with the adapter {args.adapter} merged into {len(merged)} layers")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `merge` verb."""
    p = add_verb(sub, "merge", _cmd_merge,
                 "Fold a LoRA adapter (foundry's or one peft saved) into its base model and write the result as a "
                 "complete model directory (config.json, model.safetensors, tokenizer files) that loads anywhere "
                 "the base does, with no adapter.")
    p.add_argument("base", help="the base model: a model directory, run directory or Hugging Face Hub id")
    p.add_argument("adapter", help="the adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a base with a pytorch_model.bin checkpoint (read with torch.load(weights_only=True))")
