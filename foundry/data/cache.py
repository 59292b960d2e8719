"""Facts computed once about a data directory (verified shard digests, the unigram baseline), kept beside it.

Each fact is stored with the key it was computed for: every shard file's size, modification and change
times (ns). Rewriting, truncating or copying a shard changes its key, so a stale fact is never used; a
read-only data directory simply goes without its cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from foundry.core.files import write_json

DIR = "cache"


def file_key(path: Path) -> list[int]:
    """[size, mtime_ns, ctime_ns] of a file: what changes when its bytes may have."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def read(data_dir: Path, name: str) -> dict[str, Any]:
    """The cached facts called `name` in a data directory ({} when there are none or they are unreadable)."""
    try:
        value = json.loads((Path(data_dir) / DIR / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write(data_dir: Path, name: str, value: dict[str, Any]) -> None:
    """Store facts atomically; a directory we may not write to goes without (the cache is only a shortcut)."""
    try:
        write_json(Path(data_dir) / DIR / f"{name}.json", value)
    except OSError:
        pass
