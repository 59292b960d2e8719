"""foundry: define, train, specialise, evaluate and serve large language models."""

from typing import Any

from foundry.core.version import __version__  # noqa: F401 (re-exported)


def __getattr__(name: str) -> Any:
    # `foundry.load(...)` without importing torch at package import (foundry plan runs where torch is absent).
    if name == "load":
        from foundry.hub import load

        return load
    raise AttributeError(f"module 'foundry' has no attribute {name!r}")
