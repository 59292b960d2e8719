"""Shard digests and the unigram baseline are computed once per data directory, and again only when a shard changes."""

import os
import shutil

import numpy as np
import pytest

import foundry.data.shards as shards_module
from foundry.core.errors import UserError
from foundry.data.shards import TokenShards, prepare
from foundry.eval.perplexity import unigram_baseline


@pytest.fixture
def data(tmp_path, counting_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(30):
        (corpus / f"doc{d:02d}.txt").write_text(" ".join(f"w{(7 * d + i) % 400 + 1}" for i in range(40)))
    prepare([str(corpus)], counting_tokenizer(400), tmp_path / "data", val_fraction=0.2, shard_tokens=200)
    return tmp_path / "data"


@pytest.fixture
def hashes(monkeypatch):
    """The shard files whose sha256 was computed, in order."""
    seen = []
    real = shards_module._sha256

    def counting(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(shards_module, "_sha256", counting)
    return seen


def test_shards_are_hashed_once(data, hashes):
    files = sorted(p.name for p in data.glob("train_*.bin"))
    assert len(files) > 1
    TokenShards(data, "train")
    assert hashes == []  # prepare took the digests as it wrote the shards
    shutil.rmtree(data / "cache")
    TokenShards(data, "train")
    assert sorted(hashes) == files
    TokenShards(data, "val")
    hashes.clear()
    TokenShards(data, "train")
    TokenShards(data, "val")
    assert hashes == []


def test_a_changed_shard_is_verified_again_and_refused_when_corrupt(data, hashes):
    shard = data / "train_00001.bin"
    TokenShards(data, "train")
    stat = shard.stat()
    # Same size, same modification time, one bit flipped: the change time still tells.
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 1
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(UserError, match="train_00001.bin is corrupt"):
        TokenShards(data, "train")
    assert hashes == ["train_00001.bin"]
    # Mended (new times): verified again once, then trusted.
    raw[3] ^= 1
    shard.write_bytes(bytes(raw))
    hashes.clear()
    TokenShards(data, "train")
    TokenShards(data, "train")
    assert hashes == ["train_00001.bin"]


def test_unigram_baseline_is_counted_once(data, monkeypatch):
    counted = []
    real = np.bincount
    monkeypatch.setattr(np, "bincount", lambda *a, **k: counted.append(1) or real(*a, **k))
    train, val = TokenShards(data, "train"), TokenShards(data, "val")
    first = unigram_baseline(train, val, 402)
    assert counted
    counted.clear()
    again = unigram_baseline(TokenShards(data, "train"), TokenShards(data, "val"), 402)
    assert again == first and counted == []
    # Another vocabulary size is another baseline.
    wider = unigram_baseline(train, val, 500)
    assert counted and wider.loss > first.loss
    # A shard with new times is counted again.
    counted.clear()
    shard = data / "val_00000.bin"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert unigram_baseline(train, TokenShards(data, "val"), 402) == first
    assert counted
