"""Cost of constrained decoding per token: Constraint.mask and .advance along a real JSON-schema output.

Trains byte-level BPE tokenizers of a few sizes on foundry's own source, then walks the tokens of one
schema-valid JSON value through a fresh Constraint many times, timing each call. Also reports the one-off
costs: building the llguidance tokenizer (cached per tokenizer) and compiling the schema (per request).

    .venv/bin/python benchmarks/constrained_mask.py [--sizes 400 8192] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import foundry
from foundry.infer.constrained import constraint_for_response_format, ll_tokenizer
from foundry.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "user", None]},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "maxLength": 5}},
                    "required": ["zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "member", "role", "scores", "address"],
    "additionalProperties": False,
}
VALUE = ('{"name": "abc", "age": 42, "member": true, "role": "admin", "scores": [1.5, -2, 3e4], '
         '"address": {"zip": "12345"}}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 8192])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = "".join(p.read_text() for p in sorted(Path(foundry.__file__).parent.rglob("*.py")))
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for size in args.sizes:
        tok = Tokenizer.train([corpus], vocab_size=size)
        start = time.perf_counter()
        ll_tokenizer(tok)
        build = time.perf_counter() - start
        ids = tok.encode(VALUE)
        compile_s = mask_s = advance_s = 0.0
        for _ in range(args.repeats):
            start = time.perf_counter()
            constraint = constraint_for_response_format(fmt, tok)
            compile_s += time.perf_counter() - start
            for token in ids:
                start = time.perf_counter()
                allowed = constraint.mask(tok.vocab_size)
                mask_s += time.perf_counter() - start
                assert allowed[token]
                start = time.perf_counter()
                constraint.advance(token)
                advance_s += time.perf_counter() - start
            assert constraint.is_finished()
        steps = args.repeats * len(ids)
        print(f"vocab {tok.vocab_size:6d}: llguidance tokenizer {build * 1e3:6.1f} ms once, "
              f"schema compile {compile_s / args.repeats * 1e3:5.2f} ms/request, "
              f"mask {mask_s / steps * 1e6:6.1f} us/token, advance {advance_s / steps * 1e6:5.1f} us/token "
              f"({len(ids)} tokens)")


if __name__ == "__main__":
    main()
