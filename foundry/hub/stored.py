"""What a model directory says about itself without loading it (torch-free, for `foundry info`)."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from foundry.core.errors import UserError

# safetensors' dtype names -> torch's, as config.json's torch_dtype spells them.
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def checkpoint_dtype(model_dir: Path) -> str | None:
    """The dtype a model directory's weights are stored in ("bfloat16", ...): config.json's, else the weights'."""
    raw = read_json_if_any(model_dir / "config.json") or {}
    name = raw.get("dtype") or raw.get("torch_dtype")  # transformers 5 writes "dtype", 4 "torch_dtype"
    if isinstance(name, str):
        return name.removeprefix("torch.")
    files = [model_dir / "model.safetensors"]
    index = read_json_if_any(model_dir / "model.safetensors.index.json")
    if index and isinstance(index.get("weight_map"), dict):
        files = [model_dir / f for f in sorted(set(index["weight_map"].values()))[:1]]
    counts: Counter[str] = Counter()
    for file in files:
        for entry in _safetensors_header(file).values():
            if isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_DTYPES:
                counts[_SAFETENSORS_DTYPES[entry["dtype"]]] += 1
    return counts.most_common(1)[0][0] if counts else None


def _safetensors_header(path: Path) -> dict[str, Any]:
    # A safetensors file starts with the byte length of its JSON header (u64, little-endian), then the header.
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            return json.loads(handle.read(size)) if size < 100_000_000 else {}
    except (OSError, struct.error, ValueError):
        return {}


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (config.json, foundry.json, ...); one clear line when it cannot be read, is not
    JSON, or holds something else."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a JSON object")
    return raw


def read_json_if_any(path: Path) -> Any:
    """A JSON file's contents, or None when it is missing or damaged (describe what can be read)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
