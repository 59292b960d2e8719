"""Token shards: a corpus tokenized once into flat binary files, memory-mapped for training.

A data directory holds train_00000.bin, ..., val_00000.bin, ... (raw little-endian uint16 or
uint32 token ids, each document followed by the separator token), meta.json describing them, the
tokenizer/ they were made with and cache/ (digests verified once, see foundry.data.cache).

prepare builds the directory as `.NAME.prepare-PID` beside it and swaps it into place in one step
(renameat2 RENAME_EXCHANGE); where the system cannot, in two renames, and a reader that finds the
old directory moved aside and no new one in place finishes the swap (recover). Staging directories of
killed runs are removed by the next prepare into the same place.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Callable

import numpy as np

from foundry.core import staging as stage
from foundry.core.errors import UserError
from foundry.core.files import fsync_dir, write_json
from foundry.data import cache
from foundry.data.corpus import BUILTIN, check_sources, corpus_bytes, iter_documents, split_of, unit_hash
from foundry.tokenizer import ENDOFTEXT, Tokenizer

FORMAT = "foundry-token-shards"
VERSION = 1
SPLITS = ("train", "val")
VERIFIED = "verified"  # cache of {file: [sha256, size, mtime_ns, ctime_ns]} for shards whose digest matched
# Characters of text handed to one encode_batch call: large enough to keep the Rust threads busy,
# small enough that a corpus of any size streams through in bounded memory.
_BATCH_CHARS = 2 << 20
# progress(bytes read, total bytes or None, documents read): called after each encoded batch
ProgressCallback = Callable[[int, "int | None", int], None]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it, else uint32."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class _ShardWriter:
    """Appends one split's tokens into shard files of `shard_tokens` tokens, hashing as it writes."""

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.documents = 0
        self._file = self._hash = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        self.tokens += len(tokens)
        self.documents += 1
        while len(tokens):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):05d}.bin"
                self.shards.append({"file": name, "split": self.split})
                self._file, self._hash, self._count = open(self.directory / name, "wb"), hashlib.sha256(), 0
            part, tokens = tokens[:self.shard_tokens - self._count], tokens[self.shard_tokens - self._count:]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += len(part)
            if self._count == self.shard_tokens:
                self._finish_shard()

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._finish_shard()
        return self.shards

    def _finish_shard(self) -> None:
        self._file.close()
        self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
        self._file = None


def prepare(sources: list[str], tokenizer: Tokenizer | str | Path, out_dir: str | Path, *,
            val_fraction: float = 0.05, shard_tokens: int = 2**24, glob: str = "**/*", field: str = "text",
            overwrite: bool = False, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Tokenize the sources into train/val shards in out_dir; returns the meta.json contents."""
    sources = check_sources(sources)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.load(tokenizer)
    out_dir = Path(out_dir)
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"shard size must be positive, got {shard_tokens}")
    recover(out_dir)  # a data dir whose replacement was killed half-way counts as there
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} already exists and is not empty; pass --overwrite to replace it "
                        "(the old data stays until the new data is complete)")
    separator = tokenizer.token_to_id(ENDOFTEXT)
    if separator is None:
        separator = tokenizer.eos_id
    if separator is None:
        raise UserError(f"the tokenizer has neither {ENDOFTEXT} nor an eos token to separate documents")

    dtype = token_dtype(tokenizer.vocab_size)
    target = out_dir.resolve()  # a name to build beside, even for `--out .`
    for path, _ in stage.abandoned(target, "prepare") + stage.abandoned(target, "old"):
        stage.remove(path)  # left by a prepare that was killed
    staging = stage.staging_path(target, "prepare")
    stage.remove(staging)
    staging.mkdir(parents=True)
    try:
        writers = {split: _ShardWriter(staging, split, shard_tokens) for split in SPLITS}
        router = _SplitRouter(writers, val_fraction)
        _stream(sources, tokenizer, router, separator, dtype, glob, field, progress)
        fallback = router.finish()
        shards = writers["train"].close() + writers["val"].close()
        if not writers["train"].documents:
            raise UserError(f"all {writers['val'].documents} documents landed in the validation split; "
                            "lower --val-fraction or add documents")
        meta = {
            "format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "tokenizer_fingerprint": tokenizer.fingerprint, "separator_id": separator,
            "sources": [str(s) for s in sources], "glob": glob, "field": field, "val_fraction": val_fraction,
            # The stdlib differs between Python versions; record which one was read.
            "python": platform.python_version() if set(BUILTIN) & set(sources) else None,
            "val_fallback_document": fallback,
            "tokens": {s: w.tokens for s, w in writers.items()},
            "documents": {s: w.documents for s, w in writers.items()},
            "shards": shards,
        }
        # A copy of the tokenizer travels with its data, so training finds the matching one by default.
        tokenizer.save(staging / "tokenizer")
        for shard in shards:
            _fsync(staging / shard["file"])
        # The digests were taken as the bytes were written: the first training run need not re-hash.
        cache.write(staging, VERIFIED, {shard["file"]: [shard["sha256"], *cache.file_key(staging / shard["file"])]
                                    for shard in shards})
        write_json(staging / "meta.json", meta)
        fsync_dir(staging)
    except BaseException:
        stage.remove(staging)
        raise
    _install(staging, target)
    return meta


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class _SplitRouter:
    """Sends each document's tokens to the writer of its split.

    With a positive val_fraction a small corpus may hash no document into val; then the train document
    with the smallest hash goes there instead. Only that one candidate is held back, so memory stays
    bounded, and a corpus of one document keeps it for training."""

    def __init__(self, writers: dict[str, _ShardWriter], val_fraction: float):
        self.writers, self.val_fraction = writers, val_fraction
        self.held: tuple[float, str, np.ndarray] | None = None

    def add(self, name: str, tokens: np.ndarray) -> None:
        train, val = self.writers["train"], self.writers["val"]
        if split_of(name, self.val_fraction) == "val":
            val.write(tokens)
            self._release()
        elif self.val_fraction > 0 and not val.documents:
            key = unit_hash(name)
            if self.held is None or key < self.held[0]:
                self._release()
                self.held = (key, name, tokens)
            else:
                train.write(tokens)
        else:
            train.write(tokens)

    def finish(self) -> str | None:
        """Place the held-back document; returns its name when it had to become the val document."""
        if self.held is None or self.writers["val"].documents or not self.writers["train"].documents:
            self._release()
            return None
        name = self.held[1]
        self.writers["val"].write(self.held[2])
        self.held = None
        return name

    def _release(self) -> None:
        if self.held is not None:
            self.writers["train"].write(self.held[2])
            self.held = None


def _stream(sources: list[str], tokenizer: Tokenizer, router: _SplitRouter, separator: int, dtype: np.dtype,
            glob: str, field: str, progress: ProgressCallback | None) -> None:
    """Read documents, encode them in batches of a few MB and route each, reporting bytes read."""
    sep = np.array([separator], dtype=dtype)
    total = (corpus_bytes(sources, glob) or None) if progress else None
    batch: list[tuple[str, str]] = []
    done_docs = done_bytes = 0
    documents = iter_documents(sources, glob, field)
    while True:
        text_chars = 0
        for name, text in documents:
            batch.append((name, text))
            text_chars += len(text)
            if text_chars >= _BATCH_CHARS:
                break
        if not batch:
            break
        encoded = tokenizer.encode_batch([text for _, text in batch], split_special_tokens=True)
        for (name, text), ids in zip(batch, encoded):
            router.add(name, np.concatenate([np.asarray(ids, dtype=dtype), sep]))
            done_bytes += len(text.encode("utf-8"))
        done_docs += len(batch)
        if progress:
            progress(done_bytes, total, done_docs)
        batch.clear()


def _install(staging: Path, out_dir: Path) -> None:
    """Move a complete data dir into place; at every instant a complete data dir (old or new) is there."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        fsync_dir(out_dir.parent)
        return
    if stage.exchange(staging, out_dir):  # one step: the old data now sits under the staging name
        fsync_dir(out_dir.parent)
        stage.remove(staging)
        return
    # Without an atomic exchange, two renames; a crash between them leaves `.NAME.old-PID` and no NAME,
    # which recover() mends before anything reads the directory.
    old = stage.staging_path(out_dir, "old")
    os.replace(out_dir, old)
    os.replace(staging, out_dir)
    fsync_dir(out_dir.parent)
    stage.remove(old)


def recover(data_dir: str | Path) -> None:
    """Finish the swap of a prepare --overwrite killed between its two renames (no-op otherwise)."""
    target = Path(data_dir).resolve()
    if target.exists():
        return
    for old, pid in stage.abandoned(target, "old"):
        new = stage.staging_path(target, "prepare", pid)
        # The old data was moved aside only once the new data was complete: put the new one in place.
        os.replace(new if new.is_dir() else old, target)
        fsync_dir(target.parent)
        stage.remove(old)
        return


def summary(meta: dict[str, Any], out_dir: str | Path) -> str:
    """Human summary of a prepared data dir: tokens, documents and shards per split."""
    lines = [f"wrote {out_dir} ({meta['dtype']} tokens, vocabulary {meta['vocab_size']:,})"]
    for split in SPLITS:
        shards = sum(s["split"] == split for s in meta["shards"])
        lines.append(f"  {split:5s} {meta['tokens'][split]:>13,} tokens {meta['documents'][split]:>9,} documents "
                     f"{shards:>4} shard{'s' if shards != 1 else ''}")
    if meta.get("val_fallback_document"):
        lines.append(f"  (no document hashed into val; used {meta['val_fallback_document']})")
    return "\n".join(lines)


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared data dir, checked for format and version."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        recover(data_dir)
    if not path.is_file():
        raise UserError(f"{data_dir} is not a prepared data directory (no meta.json); "
                        "create one with `foundry prepare`")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); re-run `foundry prepare`") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}; "
                        f"this foundry reads {FORMAT} version {VERSION}: re-run `foundry prepare`")
    return meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class TokenShards:
    """One split of a prepared data dir as a single token stream, memory-mapped."""

    def __init__(self, data_dir: str | Path, split: str = "train", tokenizer: Tokenizer | None = None,
                 verify: bool = True):
        self.dir = Path(data_dir)
        self.split = split
        self.meta = read_meta(self.dir)
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if tokenizer is not None and tokenizer.fingerprint != self.meta["tokenizer_fingerprint"]:
            raise UserError(
                f"{self.dir} was made with another tokenizer (fingerprint {self.meta['tokenizer_fingerprint'][:12]}, "
                f"this one is {tokenizer.fingerprint[:12]}); re-run `foundry prepare` with this tokenizer "
                "or use the tokenizer the data was made with")
        shards = [s for s in self.meta["shards"] if s["split"] == split]
        if not shards:
            hint = " (prepared with --val-fraction 0)" if split == "val" else ""
            raise UserError(f"{self.dir} has no {split} tokens{hint}; re-run `foundry prepare`")
        self.dtype = np.dtype(self.meta["dtype"])
        self._arrays: list[np.ndarray] = []
        self.file_keys: dict[str, list[int]] = {}
        verified = cache.read(self.dir, VERIFIED) if verify else {}
        newly_verified = {}
        for shard in shards:
            path = self.dir / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise UserError(f"shard {path} is missing or has the wrong size; re-run `foundry prepare`")
            key = cache.file_key(path)
            # A digest checked before holds while the file's size and times are those it was checked at.
            if verify and verified.get(shard["file"]) != [shard["sha256"], *key]:
                if _sha256(path) != shard["sha256"]:
                    raise UserError(f"shard {path} is corrupt (sha256 mismatch); re-run `foundry prepare`")
                if cache.file_key(path) == key:  # unchanged while it was being read
                    newly_verified[shard["file"]] = [shard["sha256"], *key]
            self.file_keys[shard["file"]] = key
            self._arrays.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["tokens"],)))
        if newly_verified:
            cache.write(self.dir, VERIFIED, {**cache.read(self.dir, VERIFIED), **newly_verified})
        self._starts = np.cumsum([0] + [len(a) for a in self._arrays]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def arrays(self) -> list[np.ndarray]:
        """The split's shards as read-only memory-mapped arrays, in stream order."""
        return list(self._arrays)

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the tokenizer the data was made with."""
        return self.meta["tokenizer_fingerprint"]

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start+n) as int64, read across shard boundaries."""
        if start < 0 or n < 0 or start + n > len(self):
            raise IndexError(f"token window [{start}, {start + n}) outside 0..{len(self)}")
        out = np.empty(n, dtype=np.int64)
        filled = 0
        shard = bisect.bisect_right(self._starts, start) - 1
        while filled < n:
            offset = start + filled - self._starts[shard]
            part = self._arrays[shard][offset:offset + n - filled]
            out[filled:filled + len(part)] = part
            filled += len(part)
            shard += 1
        return out


__all__ = ["prepare", "TokenShards", "read_meta", "summary", "token_dtype", "FORMAT", "VERSION"]
