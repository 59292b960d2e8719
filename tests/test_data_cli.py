"""`foundry tokenizer train` and `foundry prepare` through foundry.cli.main."""

import pytest

from foundry.cli import main
from foundry.data.shards import TokenShards
from foundry.tokenizer import Tokenizer


@pytest.fixture
def corpus(tmp_path, sample_texts):
    directory = tmp_path / "corpus"
    directory.mkdir()
    for i, text in enumerate(sample_texts):
        (directory / f"doc{i:02d}.py").write_text(text)
    return directory


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def error_line(capsys, command):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and err.startswith(f"foundry {command}: error: ")
    return err


def test_train_then_prepare(tmp_path, corpus, capsys):
    tok_dir, data_dir = tmp_path / "tok", tmp_path / "data"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "400", "--out", str(tok_dir),
                 "--glob", "*.py"]) == 0
    assert f"400-token byte-level BPE -> {tok_dir}" in capsys.readouterr().out
    tokenizer = Tokenizer.load(tok_dir)
    assert tokenizer.vocab_size == 400
    assert main(["prepare", "--corpus", str(corpus), "--tokenizer", str(tok_dir), "--out", str(data_dir),
                 "--val-fraction", "0.2"]) == 0
    out = capsys.readouterr().out
    train = TokenShards(data_dir, "train", tokenizer=tokenizer)
    val = TokenShards(data_dir, "val", tokenizer=tokenizer)
    assert f"{len(train):,} tokens" in out and f"{len(val):,} tokens" in out and "1 shard" in out


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, corpus, capsys):
    tok_dir, data_dir = tmp_path / "tok", tmp_path / "data"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "100", "--out", str(tok_dir)]) == 2
    assert "at least 260" in error_line(capsys, "tokenizer")
    assert not tok_dir.exists()
    assert main(["tokenizer", "train", "--corpus", str(tmp_path / "nope"), "--vocab-size", "300",
                 "--out", str(tok_dir)]) == 2
    assert "no such file or directory" in error_line(capsys, "tokenizer")
    assert not tok_dir.exists()

    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tok_dir)]) == 0
    capsys.readouterr()
    before = snapshot(tok_dir)
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "400", "--out", str(tok_dir)]) == 2
    assert "already has a tokenizer.json; pass --overwrite" in error_line(capsys, "tokenizer")
    assert snapshot(tok_dir) == before

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"content": "hello"}\n')
    assert main(["prepare", "--corpus", str(rows), "--tokenizer", str(tok_dir), "--out", str(data_dir)]) == 2
    assert "rows.jsonl:1: no field 'text' (found: content); pass --field" in error_line(capsys, "prepare")
    assert not data_dir.exists()
    assert main(["prepare", "--corpus", str(rows), "--field", "content", "--tokenizer", str(tok_dir),
                 "--out", str(data_dir)]) == 0
    capsys.readouterr()
    before = snapshot(data_dir)
    assert main(["prepare", "--corpus", str(corpus), "--tokenizer", str(tok_dir), "--out", str(data_dir)]) == 2
    assert "already exists and is not empty; pass --overwrite" in error_line(capsys, "prepare")
    assert main(["prepare", "--corpus", str(corpus), "--tokenizer", str(tmp_path), "--out", str(data_dir),
                 "--overwrite"]) == 2
    assert "no tokenizer at" in error_line(capsys, "prepare")
    assert snapshot(data_dir) == before
    assert main(["prepare", "--corpus", str(corpus), "--tokenizer", str(tok_dir), "--out", str(data_dir),
                 "--overwrite"]) == 0
    assert snapshot(data_dir) != before


@pytest.mark.parametrize("verb", [["prepare"], ["tokenizer", "train"]])
def test_help_names_what_stdlib_leaves_out(verb, capsys):
    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "`stdlib-all` (all of it)" in text and "pydoc_data" in text and "charmap tables" in text
