"""Staging directories named for the process that builds them, and the atomic swap of two directories.

A directory built beside its target as `.NAME.TAG-PID` tells a later run whose it is: when that
process is gone (killed mid-write), the next run into the same place removes it. `exchange` swaps two
directories in one step where the kernel can (Linux renameat2 RENAME_EXCHANGE), so replacing a
complete directory never passes through a moment with no directory at all.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def staging_path(target: Path, tag: str, pid: int | None = None) -> Path:
    """`.NAME.TAG-PID` beside `target`, for this process unless `pid` is given."""
    return target.with_name(f".{target.name}.{tag}-{os.getpid() if pid is None else pid}")


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (our own process counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def abandoned(target: Path, tag: str) -> list[tuple[Path, int]]:
    """(path, pid) of `.NAME.TAG-PID` entries beside `target` whose process is no longer running."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{re.escape(tag)}-(\d+)")
    found = []
    if target.parent.is_dir():
        for entry in target.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and not process_alive(int(match.group(1))):
                found.append((entry, int(match.group(1))))
    return sorted(found)


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where this system or file system cannot do it."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # e.g. a file system without RENAME_EXCHANGE support
    raise OSError(code, os.strerror(code), str(a), None, str(b))
