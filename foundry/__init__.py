"""foundry: define, train, specialise, evaluate and serve large language models."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `foundry.load(...)` without importing torch at package import (plan.py runs where torch is absent).
    if name == "load":
        from foundry.hub import load

        return load
    raise AttributeError(f"module 'foundry' has no attribute {name!r}")
