"""Peak memory while loading a ~1B-parameter model: foundry.hub.load beside transformers' from_pretrained.

Writes a random bf16 model of a preset's shape (default llama3.2-1b, 1.24B parameters) as sharded safetensors,
tensor by tensor (never a whole fp32 copy), then loads it in a fresh subprocess per loader and reports the peak
resident set size (ru_maxrss) against the weight bytes. After loading, every parameter is summed so that
memory-mapped pages are really resident when the peak is read.

Every step runs in its own interpreter started from this small parent, which never imports torch: Linux carries
a parent's resident size at fork into the child's ru_maxrss, which would otherwise inflate the figures.

    .venv/bin/python benchmarks/load_memory.py [--preset llama3.2-1b] [--shard-size 1GB] [--no-reference]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURE = r"""
import json, resource, sys, time
import torch
loader, path = sys.argv[1], sys.argv[2]
if loader == "foundry":
    from foundry import hub
    def load():
        return hub.load(path, dtype=torch.bfloat16, with_tokenizer=False).model
else:
    import transformers
    transformers.logging.set_verbosity_error()
    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # imports only
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
with torch.no_grad():
    checksum = sum(float(p.sum(dtype=torch.float32)) for p in model.parameters())  # pages every weight in
params = sum(p.numel() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024  # the same, per address space
print(json.dumps({"baseline": before, "peak": peak, "hwm": hwm, "seconds": seconds, "params": params,
                  "checksum": checksum}))
"""


def write_random_model(path: Path, preset_name: str, shard_size: str) -> int:
    """A random bf16 model directory of a preset's shape; returns its weight bytes."""
    import torch

    from foundry.config import preset
    from foundry.core.files import write_json
    from foundry.model import Transformer
    from foundry.hub.weights import parse_size, write_tensors

    config = preset(preset_name)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Transformer(config).named_parameters()}  # tied head listed once
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in shapes.items():
            yield name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    path.mkdir(parents=True, exist_ok=True)
    write_tensors(path, tensors(), parse_size(shard_size))
    write_json(path / "config.json", {**config.to_hf_dict(), "torch_dtype": "bfloat16"})
    return 2 * sum(s.numel() for s in shapes.values())


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{args[-2]} failed:\n{result.stderr}")
    return result.stdout.strip().splitlines()[-1]


def measure(loader: str, path: Path) -> dict:
    """Load in a fresh interpreter and return its memory figures."""
    return json.loads(_run("-c", MEASURE, loader, str(path)))


def main() -> None:
    """Write the model, measure each loader, print a table of ratios to the weight bytes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--shard-size", default="1GB")
    parser.add_argument("--dir", help="where to write the model (default: a temporary directory, removed after)")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers' from_pretrained")
    parser.add_argument("--write-only", metavar="PATH", help=argparse.SUPPRESS)  # the writer subprocess
    args = parser.parse_args()
    if args.write_only:
        print(write_random_model(Path(args.write_only), args.preset, args.shard_size))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "model"
        start = time.perf_counter()
        weight_bytes = int(_run(__file__, "--preset", args.preset, "--shard-size", args.shard_size,
                                "--write-only", str(path)))
        shards = len(list(path.glob("*.safetensors")))
        print(f"{args.preset}: {weight_bytes / 2**30:.2f} GiB of bf16 weights in {shards} shard(s), "
              f"written in {time.perf_counter() - start:.0f} s")
        loaders = ["foundry"] + ([] if args.no_reference else ["transformers"])
        print(f"{'loader':<13} {'load s':>7} {'imports GiB':>12} {'peak GiB':>9} {'VmHWM GiB':>10} "
              f"{'peak/weights':>13} {'(peak-imports)/weights':>23}")
        for loader in loaders:
            m = measure(loader, path)
            print(f"{loader:<13} {m['seconds']:>7.1f} {m['baseline'] / 2**30:>12.2f} {m['peak'] / 2**30:>9.2f} "
                  f"{m['hwm'] / 2**30:>10.2f} {m['peak'] / weight_bytes:>13.2f} "
                  f"{(m['peak'] - m['baseline']) / weight_bytes:>23.2f}")


if __name__ == "__main__":
    main()
