"""`foundry quantize MODEL --scheme int8|int4 --out DIR`: a weight-only quantised model directory in
compressed-tensors' layout, which foundry and transformers load."""

from __future__ import annotations

import argparse
from pathlib import Path

from foundry.cli.parsing import add_verb


def _cmd_quantize(args: argparse.Namespace) -> None:
    from foundry.hub import check_new_dir, load, save_loaded
    from foundry.hub.compressed import check_storable
    from foundry.model.quantized import memory_bytes
    from foundry.model.weight_only import check_group_size, quantization_of, quantize_model

    out = Path(args.out)
    check_new_dir(out)
    check_group_size({}, args.scheme, args.group_size)  # refuse a bad scheme or size before loading
    loaded = load(args.model, with_tokenizer=False, trust_pickle=args.trust_pickle)
    check_storable(loaded.config)
    before = memory_bytes(loaded.model)
    swapped = quantize_model(loaded.model, args.scheme, args.group_size)
    scheme, group_size = quantization_of(loaded.model)
    meta = dict(loaded.meta)
    meta["quantization"] = {"scheme": scheme, "group_size": group_size, "source": str(args.model),
                            "linears": swapped}
    save_loaded(out, loaded, meta)
    grouping = f"groups of {group_size}" if group_size else "one scale per output channel"
    print(f"wrote {out}: {swapped} linears as {scheme} ({grouping}); weights {before / 1e6:.1f} MB -> "
          f"{memory_bytes(loaded.model) / 1e6:.1f} MB in memory (loads in foundry and transformers)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `quantize` verb."""
    p = add_verb(sub, "quantize", _cmd_quantize,
                 "Quantise a model's weights to int8 (one scale per output channel) or int4 (one scale per group "
                 "of inputs), symmetric, round-to-nearest, no calibration data. Every linear layer of the decoder "
                 "(and the output head unless it shares the embeddings) is quantised; embeddings and norms keep "
                 "their dtype. The directory is in compressed-tensors' pack-quantized layout (llm-compressor's "
                 "W8A16 / W4A16): foundry generate/serve/eval run it with int8/int4 CPU kernels, and "
                 "transformers (with compressed-tensors) loads it as it is.")
    p.add_argument("model", help="model directory, run directory or Hugging Face Hub id (org/name[@revision])")
    p.add_argument("--scheme", required=True, metavar="int8|int4",
                   help="int8: 8-bit weights, one scale per output channel; int4: 4-bit weights, one scale per "
                        "--group-size inputs")
    p.add_argument("--group-size", type=int,
                   help="int4 only: inputs sharing one scale; it must divide every layer's input size "
                        "(default 32; 128 is GPTQ's choice, smaller is more accurate and larger)")
    p.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pytorch_model.bin checkpoint (read with torch.load(weights_only=True))")
