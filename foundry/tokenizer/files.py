"""A tokenizer's files written as one set: a reader never sees tokenizer.json of one and a config of another.

A new directory is built under a staging name beside it and renamed into place whole. In a directory
that already exists (a model directory holds other files too) the new files are first written, and
fsynced, into a staging folder inside it; renaming that folder to `.tokenizer-update` is the commit
point; the files are then moved into place one by one and the folder removed. A crash before the commit
leaves the old set (the staging folder of a dead process is removed by the next save); a crash after it
leaves an update that `finish_update`, run by every load and save, completes. So a tokenizer loaded by
foundry is always all old or all new.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from foundry.core import staging as stage
from foundry.core.errors import UserError
from foundry.core.files import fsync_dir

UPDATE = ".tokenizer-update"
_REMOVE = ".remove.json"  # names the update deletes (a chat_template.jinja the new set does not have)


def write_set(directory: Path, files: dict[str, str | None]) -> None:
    """Write {name: text} into `directory` as one set; a None text removes that file."""
    directory = Path(directory)
    if not directory.exists():
        target = directory.resolve()
        for path, _ in stage.abandoned(target, "tokenizer"):
            stage.remove(path)
        staging = stage.staging_path(target, "tokenizer")
        _build(staging, files)
        os.replace(staging, target)
        fsync_dir(target.parent)
        return
    finish_update(directory)
    inside = directory / "tokenizer"  # staging folders inside: `.tokenizer.staging-PID`
    for path, _ in stage.abandoned(inside, "staging"):
        stage.remove(path)
    staging = stage.staging_path(inside, "staging")
    _build(staging, files)
    os.replace(staging, directory / UPDATE)  # the commit point
    fsync_dir(directory)
    finish_update(directory)


def finish_update(directory: Path) -> None:
    """Complete a committed update of a tokenizer's files that a crash interrupted (no-op without one)."""
    update = Path(directory) / UPDATE
    if not update.is_dir():
        return
    try:
        removed = json.loads((update / _REMOVE).read_text()) if (update / _REMOVE).is_file() else []
        for name in removed:
            (Path(directory) / name).unlink(missing_ok=True)
        for path in sorted(update.iterdir()):
            if path.name != _REMOVE:
                os.replace(path, Path(directory) / path.name)
        fsync_dir(Path(directory))
        stage.remove(update)
    except (OSError, ValueError) as exc:
        raise UserError(f"{directory}: cannot finish an interrupted tokenizer save ({exc}); "
                        "save the tokenizer there again") from None


def _build(staging: Path, files: dict[str, str | None]) -> None:
    stage.remove(staging)
    staging.mkdir(parents=True)
    try:
        removed = [name for name, text in files.items() if text is None]
        if removed:
            files = {**files, _REMOVE: json.dumps(removed)}
        for name, text in files.items():
            if text is not None:
                with open(staging / name, "w", encoding="utf-8") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
        fsync_dir(staging)
    except BaseException:
        stage.remove(staging)
        raise
