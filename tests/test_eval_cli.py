"""`foundry eval`: perplexity and bits per byte agree with transformers' logits, exact match scores the engine's
greedy answers, results land in foundry.json, two models print side by side, bad input is one line and exit 2."""

import json
import math
from pathlib import Path

import pytest
import torch

from foundry import hub
from foundry.cli import main
from foundry.config import ModelConfig
from foundry.eval.scoring import exact_match, rolling_windows
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams
from foundry.model import Transformer

TEXT = "def load(path):\n    return json.loads(Path(path).read_text())\n# Grüße, café ✓\n" * 3
PROMPTS = ["def load(", "import json\n", "class Message", "return self."]


def build_eval_model_dir(path: Path, tokenizer, seed: int = 0, context: int = 128) -> Path:
    """A tiny random Llama saved as a model directory with the given tokenizer."""
    # initializer_range 0.1 spreads the logits, so greedy choices are not decided by rounding noise.
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=context,
                         initializer_range=0.1, eos_token_id=tokenizer.eos_id)
    model = Transformer(config)
    model.init_weights(seed=seed)
    return hub.save(path, model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    return (build_eval_model_dir(root / "a", tiny_tokenizer, seed=0),
            build_eval_model_dir(root / "b", tiny_tokenizer, seed=1))


def _reference_nats(model_dir: Path, tokenizer, text: str, max_length: int) -> tuple[float, int]:
    """Total nats of text from transformers' logits, window by window as the rolling scheme defines them."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.encode(text)
    nats, scored = 0.0, 0
    with torch.no_grad():
        for tokens, n in rolling_windows(ids, tokenizer.eos_id, max_length):
            logits = hf(torch.tensor([tokens[:-1]])).logits[0, -n:].float()
            nats += torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[-n:]), reduction="sum").item()
            scored += n
    assert scored == len(ids)  # every token once, the first one after the prefix (eos)
    return nats, scored


def _eval_json(capsys, *args) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("seq_len", [None, 16])  # one window; many windows of 16
def test_perplexity_and_bits_per_byte_match_transformers(model_dirs, tiny_tokenizer, tmp_path, capsys, seq_len):
    model_dir = model_dirs[0]
    text_file = tmp_path / "doc.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    flags = ["--seq-len", str(seq_len)] if seq_len else []
    result = _eval_json(capsys, str(model_dir), "--task", "perplexity", "--data", str(text_file), "--no-save", *flags)
    metrics = result[str(model_dir)]["perplexity:doc.txt"]
    nats, tokens = _reference_nats(model_dir, tiny_tokenizer, TEXT, seq_len or 128)
    assert tokens > 16 * 3 and metrics["tokens"] == tokens and metrics["bytes"] == len(TEXT.encode("utf-8"))
    assert metrics["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-5)


def test_perplexity_of_a_model_quantised_on_the_fly_matches_transformers_on_the_quantised_directory(
        model_dirs, tiny_tokenizer, tmp_path, capsys):
    # --quantize int8 at evaluation time scores the same model that `foundry quantize` writes, which
    # transformers loads (through compressed-tensors) as the reference.
    text_file = tmp_path / "doc.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    quantized = tmp_path / "int8"
    assert main(["quantize", str(model_dirs[0]), "--scheme", "int8", "--out", str(quantized)]) == 0
    capsys.readouterr()
    result = _eval_json(capsys, str(model_dirs[0]), "--task", "perplexity", "--data", str(text_file), "--no-save",
                        "--quantize", "int8")
    on_the_fly = result[str(model_dirs[0])]["perplexity:doc.txt"]["loss"]
    stored = _eval_json(capsys, str(quantized), "--task", "perplexity", "--data", str(text_file), "--no-save")
    assert on_the_fly == pytest.approx(stored[str(quantized)]["perplexity:doc.txt"]["loss"], rel=1e-6)
    # transformers computes with fp32 activations, foundry's int8 kernel with bf16 ones (measured 1.5e-4 apart)
    nats, tokens = _reference_nats(quantized, tiny_tokenizer, TEXT, 128)
    assert on_the_fly == pytest.approx(nats / tokens, rel=1e-3)


def test_rolling_windows_score_each_token_once_with_full_context():
    windows = rolling_windows(list(range(10, 20)), 0, 4)
    assert windows == [([0, 10, 11, 12, 13], 4), ([13, 14, 15, 16, 17], 4), ([15, 16, 17, 18, 19], 2)]
    assert rolling_windows([5, 6, 7], None, 8) == [([5, 6, 7], 2)]  # no prefix: the first token is not scored


def test_perplexity_over_jsonl_and_a_directory_counts_every_document(model_dirs, tmp_path, capsys):
    docs = ["first document, short.", "second one: a bit longer than the first", "third ✓"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d)
    a = _eval_json(capsys, str(model_dirs[0]), "--task", "perplexity", "--data", str(jsonl), "--no-save")
    b = _eval_json(capsys, str(model_dirs[0]), "--task", "perplexity", "--data", str(folder), "--no-save")
    first, second = a[str(model_dirs[0])]["perplexity:docs.jsonl"], b[str(model_dirs[0])]["perplexity:docs"]
    assert first["documents"] == second["documents"] == 3
    assert first["bytes"] == sum(len(d.encode()) for d in docs)
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-6) and first["tokens"] == second["tokens"]


def _greedy(model_dir: Path, prompts: list[str], max_new_tokens: int = 6) -> list[str]:
    engine = Engine.load(model_dir)
    return [c.text for c in engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new_tokens))]


def test_exact_match_scores_the_engines_greedy_answers(model_dirs, tmp_path, capsys):
    model_dir = model_dirs[0]
    answers = _greedy(model_dir, PROMPTS)
    assert all(a.strip() for a in answers)  # a real comparison, not of empty strings
    right, wrong = tmp_path / "right.jsonl", tmp_path / "wrong.jsonl"
    right.write_text("".join(json.dumps({"prompt": p, "answer": f"  {a}\n"}) + "\n" for p, a in zip(PROMPTS, answers)))
    wrong.write_text("".join(json.dumps({"prompt": p, "answer": a + "x"}) + "\n" for p, a in zip(PROMPTS, answers)))
    flags = ["--task", "exact-match", "--max-new-tokens", "6", "--stop-at", "eos", "--no-save"]
    got = _eval_json(capsys, str(model_dir), "--data", str(right), *flags)[str(model_dir)]["exact-match:right.jsonl"]
    assert (got["exact_match"], got["correct"], got["examples"]) == (1.0, len(PROMPTS), len(PROMPTS))
    got = _eval_json(capsys, str(model_dir), "--data", str(wrong), *flags)[str(model_dir)]["exact-match:wrong.jsonl"]
    assert (got["exact_match"], got["correct"]) == (0.0, 0)


def test_exact_match_normalises_only_surrounding_whitespace():
    assert exact_match([" Paris\n", "paris", "4"], ["Paris", "Paris", ["four", "4"]]) == pytest.approx(2 / 3)


def test_results_land_in_foundry_json_beside_what_is_there(model_dirs, tmp_path, capsys):
    model_dir = model_dirs[1]
    (model_dir / "foundry.json").write_text(json.dumps({"recipe": {"steps": 3}, "eval": {"old:x": {"loss": 1.0}}}))
    text_file = tmp_path / "doc.txt"
    text_file.write_text(TEXT)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "def load(", "answer": "nothing like this"}) + "\n")
    assert main(["eval", str(model_dir), "--task", "perplexity", "--task", "exact-match", "--data", str(text_file),
                 "--data", str(qa)]) == 0
    out = capsys.readouterr().out
    assert "perplexity:doc.txt" in out and "bits_per_byte" in out and "exact-match:qa.jsonl" in out
    meta = json.loads((model_dir / "foundry.json").read_text())
    assert meta["recipe"] == {"steps": 3} and meta["eval"]["old:x"] == {"loss": 1.0}
    ppl = meta["eval"]["perplexity:doc.txt"]
    assert ppl["data"] == str(text_file.resolve()) and ppl["perplexity"] > 1 and "evaluated_at" in ppl
    assert meta["eval"]["exact-match:qa.jsonl"]["exact_match"] == 0.0
    assert hub.load(model_dir).meta["eval"]["perplexity:doc.txt"] == ppl  # foundry reads it back as metadata


def test_two_models_print_side_by_side_with_the_difference(model_dirs, tmp_path, capsys):
    text_file = tmp_path / "doc.txt"
    text_file.write_text(TEXT)
    a, b = (str(d) for d in model_dirs)
    both = _eval_json(capsys, a, b, "--task", "perplexity", "--data", str(text_file), "--no-save")
    loss_a, loss_b = (both[m]["perplexity:doc.txt"]["loss"] for m in (a, b))
    assert loss_a != loss_b
    assert main(["eval", a, b, "--task", "perplexity", "--data", str(text_file), "--no-save"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"A: {a}" in lines[0] and f"B: {b}" in lines[0] and "difference (B - A)" in lines[0]
    loss_row = next(line for line in lines if " loss " in line).split()
    assert loss_row[-3:] == [f"{loss_a:.4f}", f"{loss_b:.4f}", f"{loss_b - loss_a:.4f}"]


@pytest.mark.parametrize("case", ["missing data", "no data flag", "no weights", "bad line", "unknown task",
                                  "bad seq len"])
def test_bad_input_is_one_line_and_exit_2(model_dirs, tmp_path, capsys, case):
    model = str(model_dirs[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n{not json\n")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text((model_dirs[0] / "config.json").read_text())
    text_file = tmp_path / "doc.txt"
    text_file.write_text(TEXT)
    args = {
        "missing data": [model, "--task", "perplexity", "--data", str(tmp_path / "nope.txt")],
        "no data flag": [model, "--task", "exact-match"],
        "no weights": [str(empty), "--task", "perplexity", "--data", str(text_file)],
        "bad line": [model, "--task", "exact-match", "--data", str(bad)],
        "unknown task": [model, "--task", "bleu", "--data", str(text_file)],
        "bad seq len": [model, "--task", "perplexity", "--data", str(text_file), "--seq-len", "100000"],
    }[case]
    assert main(["eval", *args, "--no-save"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("foundry eval: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_skip_bad_lines_scores_the_good_ones(model_dirs, tmp_path, capsys):
    model_dir = model_dirs[0]
    [answer] = _greedy(model_dir, [PROMPTS[0]])
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": PROMPTS[0], "answer": answer}) + "\n{not json\n" + json.dumps({"x": 1}) + "\n")
    assert main(["eval", str(model_dir), "--task", "exact-match", "--data", str(qa), "--skip-bad-lines",
                 "--max-new-tokens", "6", "--stop-at", "eos", "--no-save", "--json"]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out)[str(model_dir)]["exact-match:qa.jsonl"]
    assert (got["exact_match"], got["examples"], got["skipped_lines"]) == (1.0, 1, 2)
    assert f"skipped 2 bad line(s); the first: {qa}:2: not valid JSON" in err


def test_lm_eval_tasks_without_lm_eval_installed_say_how_to_install_it(model_dirs, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "foundry.eval.harness", raising=False)
    assert main(["eval", str(model_dirs[0]), "--task", "lm-eval:hellaswag", "--no-save"]) == 2
    assert "pip install 'foundry[eval]'" in capsys.readouterr().err


def test_perplexity_over_a_token_data_directory_is_the_validation_loss(model_dirs, tiny_tokenizer, sample_texts,
                                                                       tmp_path, capsys):
    from foundry.data.shards import TokenShards, prepare
    from foundry.eval.perplexity import evaluate

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(sample_texts[:12]):
        (corpus / f"{i:02d}.txt").write_text(text)
    prepare([str(corpus)], tiny_tokenizer, tmp_path / "data", val_fraction=0.3)
    got = _eval_json(capsys, str(model_dirs[0]), "--task", "perplexity", "--data", str(tmp_path / "data"),
                     "--seq-len", "32", "--max-batches", "3", "--batch-size", "4", "--no-save")
    metrics = got[str(model_dirs[0])]["perplexity:data"]
    expected = evaluate(hub.load(model_dirs[0]).model, TokenShards(tmp_path / "data", "val"), 4, 32, 3)
    assert metrics["tokens"] == expected.tokens == 3 * 4 * 32
    assert metrics["loss"] == pytest.approx(expected.loss, rel=1e-6) and "bits_per_byte" not in metrics
