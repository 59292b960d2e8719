"""Atomic writes: nothing foundry writes is ever seen half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the result the permissions a plain write would."""
    os.chmod(path, mode & ~_umask())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        _publish_mode(Path(tmp), 0o666)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync it and rename it over `path`."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically, indented, with a trailing newline."""
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")


def new_temp_dir(path: str | Path) -> Path:
    """A fresh temp directory beside `path` (`.NAME.<random>.tmp`), to be filled, then published by publish_dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))


def publish_dir(tmp: Path, path: str | Path) -> None:
    """fsync every file under `tmp`, then rename it into place as `path` (which must not exist)."""
    path = Path(path)
    for child in tmp.rglob("*"):
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    _publish_mode(tmp, 0o777)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name; on success rename it into place as `path`.

    `path` must not exist yet (a complete directory is never replaced in place)."""
    tmp = new_temp_dir(path)
    try:
        yield tmp
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
