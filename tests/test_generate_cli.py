"""`foundry generate` and `foundry chat`: output, piped conversations, and one-line errors for bad input."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from foundry.cli import main
from foundry.infer.chat import ChatSession
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams
from test_infer import build_model_dir

SAMPLING = ["--temperature", "0", "--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("cli") / "tiny")


def _replies(model_dir: Path, messages: list[str], system: str | None = None) -> list[str]:
    session = ChatSession(Engine.load(model_dir), system, SamplingParams(temperature=0, max_new_tokens=12))
    return ["".join(session.send(m)) for m in messages]


def test_generate_streams_one_prompt(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "def load(", *SAMPLING]) == 0
    out, err = capsys.readouterr()
    expected = Engine.load(model_dir).generate(["def load("], SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert out == expected.text + "\n"
    assert "tokens/s" in err


def test_generate_prints_every_prompt(model_dir, capsys):
    args = ["generate", str(model_dir), "--prompt", "first", "--prompt", "second one", "--seed", "1",
            "--top-k", "20", "--top-p", "0.9", "--temperature", "0.8", "--max-new-tokens", "6", "--stop", "zz"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--- 1/2: first\n" in out and "--- 2/2: second one\n" in out
    assert main(args) == 0
    assert capsys.readouterr().out == out  # seeded: the same text again


def test_generate_reads_the_prompt_from_stdin(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("def load("))
    assert main(["generate", str(model_dir), *SAMPLING]) == 0
    expected = Engine.load(model_dir).generate(["def load("], SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert capsys.readouterr().out == expected.text + "\n"


def test_chat_over_piped_stdin(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\n/reset\nhello\n/exit\nnever read\n"))
    assert main(["chat", str(model_dir), "--system", "be brief", *SAMPLING]) == 0
    out, err = capsys.readouterr()
    reply = _replies(model_dir, ["hello"], system="be brief")[0]
    assert out == reply + "\n" + reply + "\n"  # after /reset the same question gets the same answer
    assert "cleared" in err


def test_chat_ends_at_eof_and_notes_a_missing_template(tmp_path, capsys, monkeypatch):
    plain = build_model_dir(tmp_path / "plain", chat_template=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhow are you?"))
    assert main(["chat", str(plain), *SAMPLING]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(r + "\n" for r in _replies(plain, ["hi", "how are you?"]))
    assert "no chat template" in err


def test_chat_in_a_real_pipe(model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "foundry.cli", "chat", str(model_dir), *SAMPLING],
                          input="hello\n/exit\n", capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _replies(model_dir, ["hello"])[0] + "\n"


@pytest.mark.parametrize("args, needle", [
    (["generate", "{missing}", "--prompt", "x"], "not found"),
    (["generate", "{model}", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "{model}", "--prompt", "x", "--top-p", "2"], "top_p"),
    (["generate", "{model}", "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "{model}", "--prompt", ""], "empty"),
    (["generate", "{model}", "--prompt", "x " * 200], "context"),
    (["chat", "{missing}"], "not found"),
    (["chat", "{model}", "--top-k", "-2"], "top_k"),
])
def test_bad_input_exits_2_with_one_line(model_dir, tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    args = [a.format(model=model_dir, missing=tmp_path / "nope") for a in args]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and needle in err
