"""Corpora: where documents come from, streamed one at a time, and which split each one belongs to.

A source is `stdlib` (the running interpreter's standard library, embedded so that everything runs
offline), a text file (one document), a directory (one document per matching file) or a `.jsonl`
file (one document per line).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from foundry.core.errors import UserError

STDLIB = "stdlib"
# Test suites are large, repetitive and full of deliberately odd code; site-packages is not the stdlib.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test"}


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative posix path, path) of the embedded corpus's files, in sorted relative-path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        # Pruning here, rather than filtering rglob's output, skips site-packages' ~10k files unread.
        top = folder == str(root)
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS and not (top and d == "site-packages")]
        for name in names:
            if name.endswith(".py"):
                path = Path(folder, name)
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def check_sources(sources: Iterable[str]) -> list[str]:
    """Fail early, before any work, on a missing path or an empty source list."""
    sources = list(sources)
    if not sources:
        raise UserError("no corpus given: pass --corpus stdlib or one or more files/directories")
    for source in sources:
        if source != STDLIB and not Path(source).exists():
            raise UserError(f"corpus {source}: no such file or directory (or use the embedded corpus `stdlib`)")
    return sources


def corpus_bytes(sources: Iterable[str], glob: str = "**/*") -> int:
    """Approximate size of the sources on disk, for progress bars."""
    total = 0
    for source in sources:
        if source == STDLIB:
            total += sum(path.stat().st_size for _, path in stdlib_files())
        elif Path(source).is_dir():
            total += sum(p.stat().st_size for _, p in _dir_files(Path(source), glob))
        elif Path(source).is_file():
            total += Path(source).stat().st_size
    return total


def iter_documents(sources: list[str], glob: str = "**/*", field: str = "text") -> Iterator[tuple[str, str]]:
    """Yield (name, text) for each non-empty document of the sources, one at a time."""
    for source in check_sources(sources):
        count = 0
        for name, text in _iter_source(source, glob, field):
            if text:
                count += 1
                yield name, text
        if not count:
            what = f"no files matching --glob {glob!r}" if Path(source).is_dir() else "no documents"
            raise UserError(f"corpus {source}: {what} with any text; nothing to tokenize")


def _iter_source(source: str, glob: str, field: str) -> Iterator[tuple[str, str]]:
    if source == STDLIB:
        for rel, path in stdlib_files():
            # The stdlib is UTF-8 (PEP 3120); `replace` only guards against a vendor's odd file.
            yield rel, path.read_bytes().decode("utf-8", errors="replace")
        return
    path = Path(source)
    if path.is_dir():
        for rel, file in _dir_files(path, glob):
            text = _read_text(file, strict=False)
            if text is not None:
                yield rel, text
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path, field)
    else:
        yield path.name, _read_text(path, strict=True)


def _dir_files(root: Path, glob: str) -> list[tuple[str, Path]]:
    """Files under `root` matching `glob`, hidden ones (.git, .venv) left out, in sorted order."""
    try:
        matches = list(root.glob(glob))
    except (ValueError, NotImplementedError) as exc:
        raise UserError(f"--glob {glob!r}: {exc}; give a pattern relative to the directory, e.g. '**/*.md'") from None
    files = []
    for path in matches:
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append((rel.as_posix(), path))
    return sorted(files)


def _read_text(path: Path, strict: bool) -> str | None:
    """UTF-8 text of a file; a binary file in a directory is skipped, a named one is an error."""
    data = path.read_bytes()
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "contains NUL bytes")
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if strict:
            raise UserError(f"corpus {path}: not UTF-8 text") from None
        return None


def _iter_jsonl(path: Path, field: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or field not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"{where}: no field {field!r} (found: {keys}); "
                                "pass --field NAME to choose the text field")
            text = record[field]
            if not isinstance(text, str):
                raise UserError(f"{where}: field {field!r} is {type(text).__name__}, expected a string; "
                                "pass --field NAME to choose the text field")
            yield f"{path.name}:{lineno}", text


def unit_hash(name: str) -> float:
    """A document name hashed to [0, 1), the same on every run and machine."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(name: str, val_fraction: float) -> str:
    """"train" or "val" for a document, from a hash of its name: the same file always lands on the same side."""
    return "val" if unit_hash(name) < val_fraction else "train"


def train_tokenizer(sources: list[str], vocab_size: int, out_dir: str | Path, *, glob: str = "**/*",
                    field: str = "text", overwrite: bool = False):
    """Train a byte-level BPE on every document of the sources (both splits) and save it to out_dir."""
    from foundry.tokenizer import Tokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory")
    if (out_dir / "tokenizer.json").exists() and not overwrite:
        raise UserError(f"{out_dir} already has a tokenizer.json; pass --overwrite to replace it "
                        "or choose another --out")
    texts = (text for _, text in iter_documents(sources, glob, field))
    tokenizer = Tokenizer.train(texts, vocab_size)  # a UserError raised in `texts` passes through the trainer
    tokenizer.save(out_dir)
    return tokenizer


__all__ = ["STDLIB", "iter_documents", "split_of", "unit_hash", "stdlib_files", "check_sources", "corpus_bytes",
           "train_tokenizer"]
