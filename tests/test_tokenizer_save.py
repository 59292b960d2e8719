"""Tokenizer.save killed at every step: foundry then loads all of the old tokenizer or all of the new one.

A child process saves tokenizer B over a directory holding tokenizer A (with the chat_template.jinja
that transformers writes), its os.replace / os.rename / shutil.rmtree calls wrapped so that the N-th
one SIGKILLs it first.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from foundry.tokenizer import Tokenizer

CHILD = textwrap.dedent("""
    import os, shutil, signal, sys
    kill_at, source, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    from foundry.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(source)
    calls = 0

    def killing(function):
        def wrapper(*args, **kwargs):
            global calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return wrapper

    os.replace, os.rename, shutil.rmtree = killing(os.replace), killing(os.rename), killing(shutil.rmtree)
    tokenizer.save(target)
""")


def _run(kill_at: int, source: Path, target: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", CHILD, str(kill_at), str(source), str(target)],
                          check=False, env=env, capture_output=True, text=True).returncode


def _identity(tokenizer: Tokenizer) -> tuple:
    return tokenizer.fingerprint, tokenizer.chat_template, tokenizer.special_token("eos_token")


def _on_disk(directory: Path) -> tuple:
    """What a reader of the raw files (transformers) sees."""
    config = json.loads((directory / "tokenizer_config.json").read_text())
    specials = json.loads((directory / "special_tokens_map.json").read_text())
    jinja = (directory / "chat_template.jinja").read_text()
    return (Tokenizer.load(directory / "tokenizer.json").fingerprint, config["chat_template"], jinja,
            config["eos_token"], specials["eos_token"])


@pytest.fixture
def pair(tmp_path, tiny_tokenizer, sample_texts):
    a = tiny_tokenizer
    b = Tokenizer.train(sample_texts[:4], 300)
    b = Tokenizer(b.backend, {**b.config, "eos_token": "<|im_end|>"}, chat_template="{{ messages }} (B)")
    b.save(tmp_path / "b")
    return a, Tokenizer.load(tmp_path / "b"), tmp_path / "b"


def test_saving_over_a_tokenizer_killed_at_every_step(tmp_path, pair):
    a, b, b_dir = pair
    target = tmp_path / "model"
    for kill_at in range(1, 15):
        a.save(target)
        (target / "chat_template.jinja").write_text(a.chat_template)  # as transformers >= 4.50 saves
        (target / "model.safetensors").write_bytes(b"weights")  # a model directory: other files stay
        code = _run(kill_at, b_dir, target)
        loaded = Tokenizer.load(target)
        assert _identity(loaded) in (_identity(a), _identity(b)), f"killed at step {kill_at}"
        fingerprint, template, jinja, eos, mapped_eos = _on_disk(target)
        assert (fingerprint, template, jinja, eos, mapped_eos) == (loaded.fingerprint, loaded.chat_template,
                                                                   loaded.chat_template, *[loaded.special_token("eos_token")] * 2)
        assert (target / "model.safetensors").read_bytes() == b"weights"
        if code == 0:
            assert _identity(loaded) == _identity(b)
            break
        assert code == -signal.SIGKILL
    else:
        pytest.fail("save never finished")
    assert kill_at > 2
    a.save(target)  # a save after the crashes leaves only the tokenizer's files and the model's
    assert sorted(p.name for p in target.iterdir()) == [
        "chat_template.jinja", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]


def test_a_new_tokenizer_directory_appears_whole(tmp_path, pair):
    _, b, b_dir = pair
    target = tmp_path / "fresh"
    for kill_at in range(1, 10):
        code = _run(kill_at, b_dir, target)
        if target.exists():
            assert sorted(p.name for p in target.iterdir()) == [
                "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
            assert _identity(Tokenizer.load(target)) == _identity(b)
        if code == 0:
            break
        assert code == -signal.SIGKILL
        assert not target.exists()
    else:
        pytest.fail("save never finished")
    assert target.exists()
    b.save(tmp_path / "other")  # the next save beside it removes what a killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "fresh", "other"]
