"""Class names as config.json stores them: `id2label`, {"0": name, "1": name, ...}."""

from __future__ import annotations

from typing import Any

from foundry.core.errors import UserError


def id2label_names(id2label: Any, where: Any) -> list[str]:
    """The names of classes 0..n-1 from an id2label mapping; one clear line if it is not one."""
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, TypeError, ValueError):
        labels = {}
    if not labels or sorted(labels) != list(range(len(labels))):
        raise UserError(f"{where}: id2label must map 0..n-1 to label names, got {id2label!r}")
    return [labels[i] for i in range(len(labels))]
