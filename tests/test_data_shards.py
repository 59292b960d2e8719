"""foundry.data.shards: prepare() and TokenShards."""

import json

import numpy as np
import pytest

from foundry.data.corpus import split_of
from foundry.data.shards import TokenShards, prepare, read_meta
from foundry.core.errors import UserError
from foundry.tokenizer import Tokenizer


def counting_corpus(directory, documents=40, words=50, first=1):
    """Documents of consecutive words w{first}, w{first+1}, ...; returns {name: token ids}."""
    directory.mkdir(parents=True, exist_ok=True)
    expected, next_id = {}, first
    for d in range(documents):
        ids = list(range(next_id, next_id + words))
        next_id += words
        name = f"doc{d:03d}.txt"
        (directory / name).write_text(" ".join(f"w{i}" for i in ids))
        expected[name] = ids
    return expected


def stream_of(expected, split, val_fraction):
    """The token stream prepare() should write for one split: documents in order, each + separator 0."""
    out = []
    for name in sorted(expected):
        if split_of(name, val_fraction) == split:
            out += expected[name] + [0]
    return out


def test_prepare_writes_the_expected_streams_across_shards(tmp_path, counting_tokenizer):
    expected = counting_corpus(tmp_path / "corpus")
    tok = counting_tokenizer(5000)
    meta = prepare([str(tmp_path / "corpus")], tok, tmp_path / "data", val_fraction=0.2, shard_tokens=300)
    assert meta == read_meta(tmp_path / "data")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 5002 and meta["separator_id"] == 0
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    for split in ("train", "val"):
        stream = stream_of(expected, split, 0.2)
        assert stream, f"the test corpus should put documents in {split}"
        shards = TokenShards(tmp_path / "data", split, tokenizer=tok)
        assert len(shards) == len(stream) == meta["tokens"][split]
        assert meta["documents"][split] == stream.count(0)
        assert shards.read(0, len(stream)).tolist() == stream
        # Windows that straddle shard boundaries (every 300 tokens) read the same.
        assert shards.read(290, 25).tolist() == stream[290:315]
        files = [s for s in meta["shards"] if s["split"] == split]
        assert [s["file"] for s in files] == [f"{split}_{i:05d}.bin" for i in range(len(files))]
        assert all(s["tokens"] == 300 for s in files[:-1]) and sum(s["tokens"] for s in files) == len(stream)
        assert sum(len(a) for a in shards.arrays()) == len(stream)
    # The tokenizer travels with its data.
    assert Tokenizer.load(tmp_path / "data" / "tokenizer").fingerprint == tok.fingerprint


def test_uint32_when_the_vocabulary_needs_it(tmp_path, counting_tokenizer):
    expected = counting_corpus(tmp_path / "corpus", documents=3, words=5, first=65530)
    tok = counting_tokenizer(70000)
    meta = prepare([str(tmp_path / "corpus")], tok, tmp_path / "data", val_fraction=0)
    assert meta["dtype"] == "uint32" and meta["tokens"]["val"] == 0
    assert (tmp_path / "data" / "train_00000.bin").stat().st_size == 4 * 18
    assert TokenShards(tmp_path / "data").read(0, 18).tolist() == stream_of(expected, "train", 0)
    with pytest.raises(UserError, match="no val tokens .*--val-fraction 0"):
        TokenShards(tmp_path / "data", "val")


def test_at_least_one_validation_document(tmp_path, counting_tokenizer):
    expected = counting_corpus(tmp_path / "corpus", documents=3, words=4)
    assert all(split_of(name, 0.05) == "train" for name in expected)  # hashing alone picks none
    meta = prepare([str(tmp_path / "corpus")], counting_tokenizer(100), tmp_path / "data")
    assert meta["documents"] == {"train": 2, "val": 1} and meta["val_fallback_document"] in expected
    assert TokenShards(tmp_path / "data", "val").read(0, 5).tolist() == expected[meta["val_fallback_document"]] + [0]
    # A lone document stays in train: training needs it more than validation does.
    counting_corpus(tmp_path / "one", documents=1, words=4)
    meta = prepare([str(tmp_path / "one")], counting_tokenizer(100), tmp_path / "data1")
    assert meta["documents"] == {"train": 1, "val": 0} and meta["val_fallback_document"] is None


def test_special_token_text_does_not_forge_a_document_boundary(tmp_path, tiny_tokenizer):
    (tmp_path / "doc.txt").write_text("quoting <|endoftext|> in a document")
    meta = prepare([str(tmp_path / "doc.txt")], tiny_tokenizer, tmp_path / "data", val_fraction=0)
    tokens = TokenShards(tmp_path / "data").read(0, meta["tokens"]["train"]).tolist()
    assert tokens.count(0) == 1 and tokens[-1] == 0
    assert tiny_tokenizer.decode(tokens[:-1]) == "quoting <|endoftext|> in a document"


def test_corrupt_shard_is_named(tmp_path, counting_tokenizer):
    counting_corpus(tmp_path / "corpus")
    prepare([str(tmp_path / "corpus")], counting_tokenizer(5000), tmp_path / "data", val_fraction=0.2)
    shard = tmp_path / "data" / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard .*train_00000.bin is corrupt \(sha256 mismatch\); re-run `foundry prepare`"):
        TokenShards(tmp_path / "data", "train")
    assert len(TokenShards(tmp_path / "data", "train", verify=False)) > 0
    TokenShards(tmp_path / "data", "val")  # the other split is still fine
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(UserError, match="missing or has the wrong size"):
        TokenShards(tmp_path / "data", "train", verify=False)


def test_data_made_with_another_tokenizer(tmp_path, counting_tokenizer, tiny_tokenizer):
    counting_corpus(tmp_path / "corpus", documents=5)
    prepare([str(tmp_path / "corpus")], counting_tokenizer(5000), tmp_path / "data")
    with pytest.raises(UserError, match="made with another tokenizer.*re-run `foundry prepare` with this tokenizer"):
        TokenShards(tmp_path / "data", "train", tokenizer=tiny_tokenizer)


def test_not_a_data_dir(tmp_path):
    with pytest.raises(UserError, match="not a prepared data directory .*foundry prepare"):
        TokenShards(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(UserError, match="unsupported format"):
        TokenShards(tmp_path)


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_prepare_is_atomic(tmp_path, counting_tokenizer):
    """A failing prepare leaves an existing data dir intact and nothing half-written beside it."""
    tok = counting_tokenizer(5000)
    counting_corpus(tmp_path / "corpus")
    prepare([str(tmp_path / "corpus")], tok, tmp_path / "data")
    before = _snapshot(tmp_path / "data")
    # Refused without --overwrite.
    with pytest.raises(UserError, match="already exists and is not empty; pass --overwrite"):
        prepare([str(tmp_path / "corpus")], tok, tmp_path / "data")
    # With --overwrite, but the corpus turns out bad half-way: the old data survives.
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "w1 w2"}\n' * 50 + '{"txt": "w3"}\n')
    with pytest.raises(UserError, match="rows.jsonl:51: no field 'text'"):
        prepare([str(tmp_path / "corpus"), str(rows)], tok, tmp_path / "data", overwrite=True)
    assert _snapshot(tmp_path / "data") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data", "rows.jsonl"]
    # A successful overwrite replaces it completely.
    rows.write_text('{"text": "w1 w2"}\n' * 50)
    meta = prepare([str(rows)], tok, tmp_path / "data", overwrite=True)
    assert meta["documents"]["train"] + meta["documents"]["val"] == 50
    assert _snapshot(tmp_path / "data") != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data", "rows.jsonl"]


def test_prepare_checks_its_arguments(tmp_path, counting_tokenizer):
    tok = counting_tokenizer(100)
    counting_corpus(tmp_path / "corpus", documents=2, words=3)
    corpus = [str(tmp_path / "corpus")]
    with pytest.raises(UserError, match="--val-fraction must be in"):
        prepare(corpus, tok, tmp_path / "data", val_fraction=1.0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        prepare(corpus, tok, tmp_path / "file")
    with pytest.raises(UserError, match="all 2 documents landed in the validation split"):
        prepare(corpus, tok, tmp_path / "data", val_fraction=0.999999)
    assert not (tmp_path / "data").exists()
    (tmp_path / "empty").mkdir()
    meta = prepare(corpus, tok, tmp_path / "empty")  # an empty directory is fine to fill
    assert meta["tokens"]["train"] > 0 and np.array(1, dtype=meta["dtype"]).itemsize == 2
