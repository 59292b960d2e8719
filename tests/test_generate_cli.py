"""`foundry generate` and `foundry chat`: output, piped conversations, and one-line errors for bad input."""

import io
import os
import subprocess
import sys
from pathlib import Path

import json

import pytest
import torch

from foundry.cli import engine_flags, main
from foundry.infer import device
from foundry.infer.chat import ChatSession
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams
from scripted_model import BigramModel, ascii_tokenizer, chain
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


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_a_prompts_file_is_batched_and_printed_as_json_lines(model_dir, tmp_path, capsys):
    prompts = ["def load(", "The model directory", "x"]
    path = tmp_path / "prompts.txt"
    path.write_text(prompts[0] + "\n\n" + prompts[1] + "\n" + prompts[2] + "\n")  # a blank line is skipped
    assert main(["generate", str(model_dir), "--prompts-file", str(path), "--json", *SAMPLING]) == 0
    out, err = capsys.readouterr()
    records = _records(out)
    expected = Engine.load(model_dir).generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    assert [r["index"] for r in records] == [0, 1, 2] and [r["prompt"] for r in records] == prompts
    for r, c in zip(records, expected):
        assert (r["text"], r["finish_reason"], r["prompt_tokens"], r["completion_tokens"]) == (
            c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens)
        assert 0 < r["time_to_first_token_s"] <= r["seconds"]
        assert r["tokens_per_s"] == pytest.approx(r["completion_tokens"] / r["seconds"], rel=1e-3)
    assert "3 prompt(s)" in err


def test_prompts_file_dash_reads_one_prompt_a_line_from_stdin(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond one\n"))
    assert main(["generate", str(model_dir), "--prompts-file", "-", "--prompt", "zero", "--json", *SAMPLING]) == 0
    assert [r["prompt"] for r in _records(capsys.readouterr().out)] == ["zero", "first", "second one"]


def _scripted(monkeypatch, text: str) -> None:
    """Make every Engine.load return an engine whose greedy output is `text`'s tokens after the prompt "x"."""
    tok = ascii_tokenizer()
    model = BigramModel(tok.vocab_size, chain(tok, "x", text), default=tok.eos_id)
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: Engine(model, tok)))


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_character_cut_by_max_new_tokens_is_dropped(model_dir, capsys, monkeypatch, as_json):
    _scripted(monkeypatch, "a🎉b")  # after "a", the emoji's four byte tokens
    args = ["generate", str(model_dir), "--prompt", "x", "--temperature", "0", "--max-new-tokens", "3"]
    assert main(args + (["--json"] if as_json else [])) == 0
    out = capsys.readouterr().out
    assert "\ufffd" not in out
    if as_json:
        [record] = _records(out)
        assert (record["text"], record["finish_reason"], record["completion_tokens"]) == ("a", "length", 3)
    else:
        assert out == "a\n"


def test_dtype_bf16_runs_the_model_in_bf16(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert main(["generate", str(model_dir), "--prompt", "def load(", "--dtype", "bf16", "--device", "cpu",
                 "--json", *SAMPLING]) == 0
    out, err = capsys.readouterr()
    expected = Engine.load(model_dir, dtype=torch.bfloat16).generate(["def load("], SamplingParams(
        temperature=0, max_new_tokens=12))[0]
    assert _records(out)[0]["text"] == expected.text
    assert "(bfloat16)" in err and "warning" not in err


def test_dtype_bf16_on_a_cpu_without_bf16_is_refused_not_emulated(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert main(["generate", str(model_dir), "--prompt", "x", "--dtype", "bf16", "--device", "cpu", *SAMPLING]) == 2
    err = capsys.readouterr().err
    assert "--dtype bf16: this CPU has no bf16 instructions" in err and "would be emulated" in err
    assert "Traceback" not in err


def test_device_auto_is_the_default_and_picks_the_cpu_without_a_gpu(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", str(model_dir), "--prompt", "x", *SAMPLING]) == 0
    assert "on cpu (float32)" in capsys.readouterr().err  # auto: fp32 on a CPU


def test_flag_choices_match_the_engine_side():
    from foundry.infer import speculative
    from foundry.model import weight_only

    assert engine_flags.DTYPE_CHOICES == device.DTYPE_CHOICES
    assert engine_flags.QUANTIZE_CHOICES == tuple(weight_only.SCHEMES)
    assert engine_flags.SPECULATIVE_CHOICES == speculative.METHODS


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
    (["generate", "{model}", "--prompts-file", "{missing}"], "cannot read"),
    (["generate", "{model}", "--prompts-file", "{empty}"], "holds no prompts"),
    (["generate", "{model}", "--prompt", "x", "--device", "cuda"], "no CUDA GPU"),
    (["generate", "{model}", "--prompt", "x", "--device", "tpu"], "not a device"),
    (["generate", "{model}", "--prompt", "x", "--device", "cpu", "--dtype", "fp16"], "fp16"),
    (["generate", "{model}"], "give at least one --prompt"),
    (["chat", "{missing}"], "not found"),
    (["chat", "{model}", "--top-k", "-2"], "top_k"),
])
def test_bad_input_exits_2_with_one_line(model_dir, tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "no CUDA" holds on a GPU machine too
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [a.format(model=model_dir, missing=tmp_path / "nope", empty=tmp_path / "empty.txt") for a in args]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and needle in err


def test_serving_compiles_the_decode_step_unless_eager_and_generating_only_when_asked():
    from foundry.cli.main import build_parser

    parse = build_parser().parse_args
    assert parse(["serve", "m"]).compile is None  # auto: compiled on a CPU (build_engine), eager on a GPU
    assert parse(["serve", "m", "--eager"]).compile is False and parse(["serve", "m", "--compile"]).compile is True
    assert parse(["generate", "m"]).compile is False and parse(["generate", "m", "--compile"]).compile is True
    args = parse(["chat", "m", "--quantize", "int4", "--group-size", "32", "--speculative", "ngram"])
    assert engine_flags.engine_options(args) == {
        "device": "auto", "dtype": "auto", "compile": False, "quantize": "int4", "group_size": 32,
        "speculative": "ngram", "draft": None, "speculative_tokens": 4}


@pytest.mark.parametrize("flags, message", [
    (["--speculative", "draft"], "--speculative draft needs --draft MODEL"),
    (["--speculative", "ngram", "--draft", "."], "which --speculative ngram does not use"),
    (["--quantize", "int8", "--group-size", "32"], "--group-size is for --quantize int4"),
])
def test_bad_engine_flag_combinations_are_refused_in_one_line(model_dir, capsys, flags, message):
    assert main(["generate", str(model_dir), "--prompt", "x", *flags, *SAMPLING]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_quantised_on_the_fly_with_ngram_speculation_gives_the_quantised_greedy_text(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "def load(", "--quantize", "int4", "--group-size", "32",
                 "--speculative", "ngram", "--json", *SAMPLING]) == 0
    expected = Engine.load(model_dir, quantize="int4", group_size=32).generate(
        ["def load("], SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert _records(capsys.readouterr().out)[0]["text"] == expected.text


def test_generate_with_a_draft_model_gives_the_plain_greedy_text(model_dir, capsys):
    # The model drafts for itself: every draft is accepted, and the text is still the plain greedy one.
    assert main(["generate", str(model_dir), "--prompt", "def load(", "--draft", str(model_dir), "--json",
                 *SAMPLING]) == 0
    expected = Engine.load(model_dir).generate(["def load("], SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert _records(capsys.readouterr().out)[0]["text"] == expected.text


def test_serve_s_automatic_compile_is_on_for_a_cpu(model_dir, monkeypatch):
    from foundry.cli.engine_flags import build_engine
    from foundry.infer.engine import Engine as EngineClass

    monkeypatch.setattr(EngineClass, "warm_up", lambda self: None)  # the compile itself is test_infer_compiled's
    assert build_engine(str(model_dir), device="cpu", compile=None).compiled_step is not None
    assert build_engine(str(model_dir), device="cpu", compile=False).compiled_step is None
