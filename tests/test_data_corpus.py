"""foundry.data.corpus: sources, streaming, bad input and the train/validation split."""

import pytest

from foundry.data.corpus import check_sources, corpus_bytes, iter_documents, split_of, stdlib_files
from foundry.core.errors import UserError


def test_text_file_directory_and_jsonl(tmp_path):
    (tmp_path / "one.txt").write_text("a single document")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.md").write_text("bee")
    (docs / "sub" / "a.md").write_text("ay")
    (docs / "empty.md").write_text("")
    (docs / "skip.txt").write_text("not matched by the glob")
    (docs / "binary.md").write_bytes(b"\x00\x01\xff")
    (docs / ".hidden").mkdir()
    (docs / ".hidden" / "h.md").write_text("hidden")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    got = list(iter_documents([str(tmp_path / "one.txt"), str(docs), str(rows)], glob="**/*.md"))
    assert got == [("one.txt", "a single document"), ("b.md", "bee"), ("sub/a.md", "ay"),
                   ("rows.jsonl:1", "first"), ("rows.jsonl:3", "second")]


def test_jsonl_custom_field(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "x"}\n')
    assert list(iter_documents([str(rows)], field="body")) == [("rows.jsonl:1", "x")]


@pytest.mark.parametrize("line, message", [
    ('{"body": "x"}', r"rows.jsonl:2: no field 'text' \(found: body\); pass --field"),
    ("{not json", r"rows.jsonl:2: not valid JSON"),
    ('{"text": 3}', r"rows.jsonl:2: field 'text' is int, expected a string; pass --field"),
    ('["text"]', r"rows.jsonl:2: no field 'text' \(found: list\)"),
])
def test_bad_jsonl_names_file_line_and_field(tmp_path, line, message):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        list(iter_documents([str(rows)]))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(UserError, match="nope: no such file or directory"):
        next(iter_documents([str(tmp_path / "nope")]))
    with pytest.raises(UserError, match="no corpus given"):
        next(iter_documents([]))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(UserError, match=r"empty: no files matching --glob '\*\*/\*' with any text"):
        list(iter_documents([str(tmp_path / "empty")]))
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(UserError, match="empty.jsonl: no documents with any text"):
        list(iter_documents([str(tmp_path / "empty.jsonl")]))
    with pytest.raises(UserError, match="--glob '/abs': .*relative"):
        list(iter_documents([str(tmp_path / "empty")], glob="/abs"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        list(iter_documents([str(tmp_path / "latin1.txt")]))


def test_split_is_a_stable_function_of_the_name():
    names = [f"doc{i}.txt" for i in range(2000)]
    splits = [split_of(n, 0.1) for n in names]
    assert splits == [split_of(n, 0.1) for n in names]
    assert 150 < splits.count("val") < 250
    assert all(split_of(n, 0.0) == "train" for n in names)
    # Growing the fraction only moves documents from train to val, never back.
    assert all(split_of(n, 0.2) == "val" for n, s in zip(names, splits) if s == "val")


def test_stdlib_corpus():
    """The one test that reads the whole embedded corpus."""
    files = stdlib_files()
    names = [name for name, _ in files]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert 500 < len(files) < 1500
    assert 8e6 < sum(path.stat().st_size for _, path in files) < 2e7
    assert "json/decoder.py" in names and "os.py" in names
    assert not any(n.startswith(("test/", "site-packages/")) or "/tests/" in n or "idle_test/" in n for n in names)
    docs = list(iter_documents(["stdlib"]))
    assert len(docs) > 0.95 * len(files)  # only empty __init__.py files are skipped
    val = {name for name, _ in docs if split_of(name, 0.05) == "val"}
    assert 0.02 * len(docs) < len(val) < 0.1 * len(docs)
    assert val == {name for name, _ in iter_documents(["stdlib"]) if split_of(name, 0.05) == "val"}


def test_stdlib_leaves_out_generated_data_modules_and_stdlib_all_keeps_them():
    everything = dict(stdlib_files(everything=True))
    curated = dict(stdlib_files())
    left_out = set(everything) - set(curated)
    assert set(curated) <= set(everything)
    assert {"pydoc_data/topics.py", "encodings/cp437.py", "encodings/mac_roman.py", "encodings/iso8859_1.py",
            "stringprep.py", "re/_casefix.py", "html/entities.py"} <= left_out
    assert any(name.startswith("_sysconfigdata_") for name in left_out)
    # Only generated data goes: codec code (utf_8, idna, the CJK codecs), idlelib and the rest stay.
    assert {"encodings/utf_8.py", "encodings/idna.py", "encodings/aliases.py", "encodings/big5.py",
            "idlelib/editor.py", "keyword.py", "token.py"} <= set(curated)
    charmaps = {n for n in left_out if n.startswith("encodings/")}
    assert len(charmaps) > 50
    assert all(b"Python Character Mapping Codec" in everything[n].read_bytes()[:200] for n in charmaps)
    assert not any(b"with gencodec.py" in path.read_bytes()[:300] for path in curated.values())
    assert check_sources(["stdlib-all", "stdlib"]) == ["stdlib-all", "stdlib"]
    assert corpus_bytes(["stdlib-all"]) - corpus_bytes(["stdlib"]) == sum(everything[n].stat().st_size for n in left_out)
