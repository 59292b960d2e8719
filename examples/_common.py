"""What the example scripts share: a small random base model (a model that has never seen their tasks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def arguments(description: str, steps: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=f"examples-out/{Path(__import__('sys').argv[0]).stem}")
    parser.add_argument("--steps", type=int, default=steps)
    return parser.parse_args()


def base_model(out: Path) -> Path:
    """A random-init 4-layer Llama with a 2,048-token BPE trained on the stdlib (the sft demo's), made once."""
    from foundry.cli.demo_finetune import small_base

    return out / "base" if (out / "base" / "config.json").is_file() else small_base(out)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
