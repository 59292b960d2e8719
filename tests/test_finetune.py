"""`foundry finetune` end to end: each recipe learns what its data teaches, on held-out records, and saves what
the ecosystem loads (transformers for full and classifier checkpoints, peft for adapters); bad input is refused."""

import json
import random
import re
from pathlib import Path

import pytest
import torch

from foundry import hub
from foundry.cli import main
from foundry.config import ModelConfig
from foundry.model import Transformer

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, request) -> Path:
    """A random-init Llama (4 layers, hidden 128) with the 512-token BPE: a model that has never seen the tasks."""
    tokenizer = request.getfixturevalue("tiny_tokenizer")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=384, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id,
                         pad_token_id=tokenizer.pad_id)
    model = Transformer(config)
    model.init_weights(seed=0)
    return hub.save(tmp_path_factory.mktemp("base") / "base", model, tokenizer)


def _upper_records(triples: list[tuple[str, ...]]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": "upper: " + " ".join(t)},
                          {"role": "assistant", "content": " ".join(t).upper()}]} for t in triples]


def _triples(seed: int = 0) -> list[tuple[str, ...]]:
    triples = [(a, b, c) for a in LETTERS for b in LETTERS for c in LETTERS]
    random.Random(seed).shuffle(triples)
    return triples


@pytest.fixture(scope="module")
def upper_data(tmp_path_factory) -> tuple[Path, Path]:
    """Upper-case three letters: 1,500 triples to train on, 100 never seen in training to test on."""
    triples = _triples()
    root = tmp_path_factory.mktemp("upper")
    return (_write(root / "train.jsonl", _upper_records(triples[100:1600])),
            _write(root / "val.jsonl", _upper_records(triples[:100])))


def _finetune(capsys, base: Path, out: Path, *flags: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["finetune", str(base), "--out", str(out), "--seq-len", "64", "--eval-every", "0", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _exact_match(out: str) -> tuple[float, float]:
    found = re.search(r"exact match\s+([\d.]+)% on \d+ held-out prompts after fine-tuning, ([\d.]+)% before", out)
    assert found, out
    return float(found.group(1)) / 100, float(found.group(2)) / 100


@pytest.mark.slow
def test_sft_demo_learns_a_held_out_transformation(tmp_path, capsys):
    """`foundry demo --recipe sft`: a random model learns to upper-case letter triples it never saw."""
    from foundry.cli.demo_finetune import run_finetune_demo

    figures = run_finetune_demo(tmp_path / "demo")
    print(f"sft exact match on held-out triples: {figures['exact_match_before']:.0%} -> "
          f"{figures['exact_match_after']:.0%}")
    assert figures["checks"] == 100 and figures["exact_match_before"] < 0.05 and figures["exact_match_after"] > 0.9
    # The checkpoint is a model directory transformers loads with the same logits.
    import transformers

    checkpoint = Path(figures["checkpoint"])
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, hub.load(checkpoint).model(ids), atol=1e-5, rtol=1e-5)
    assert main(["demo", "--recipe", "sft", "--out", str(tmp_path / "demo")]) == 2  # never replaced unasked
    # `foundry eval --task exact-match --chat` asks the tuned model through its chat template, as the report did.
    held_out = [json.loads(line)["messages"] for line in (tmp_path / "demo" / "held_out.jsonl").read_text().splitlines()]
    qa = _write(tmp_path / "qa.jsonl", [{"prompt": m[0]["content"], "answer": m[1]["content"]} for m in held_out])
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--task", "exact-match", "--chat", "--data", str(qa), "--json",
                 "--no-save"]) == 0
    (result,) = json.loads(capsys.readouterr().out).values()
    assert result["exact-match:qa.jsonl"]["exact_match"] == figures["exact_match_after"]


@pytest.mark.slow
def test_lora_teaches_a_model_what_it_could_not_do(capsys, base, tmp_path):
    """A model taught to upper-case the letters a-m learns, through a LoRA adapter alone, the letters n-z."""
    first, rest = LETTERS[:13], LETTERS[13:]
    known = [(a, b, c) for a in first for b in first for c in first]
    new = [t for t in _triples(1) if any(c in rest for c in t)]
    random.Random(0).shuffle(known)
    code, _, err = _finetune(capsys, base, tmp_path / "base", "--recipe", "sft", "--val-fraction", "0", "--data",
                             str(_write(tmp_path / "a_m.jsonl", _upper_records(known[:1500]))),
                             "--steps", "300", "--batch-size", "8", "--lr", "3e-3")
    assert code == 0, err
    code, out, err = _finetune(capsys, hub.latest_checkpoint(tmp_path / "base"), tmp_path / "lora", "--recipe", "sft",
                               "--lora", "--lora-rank", "16", "--data",
                               str(_write(tmp_path / "n_z.jsonl", _upper_records(new[100:1100]))),
                               "--val", str(_write(tmp_path / "n_z_val.jsonl", _upper_records(new[:100]))),
                               "--steps", "600", "--batch-size", "8", "--lr", "1e-2")
    assert code == 0, err
    after, before = _exact_match(out)
    print(f"lora exact match on held-out n-z triples: {before:.0%} -> {after:.0%}")
    assert before < 0.05 and after > 0.9


def test_lora_checkpoint_is_a_peft_adapter_with_equal_logits(capsys, base, upper_data, tmp_path):
    train, val = upper_data
    code, out, err = _finetune(capsys, base, tmp_path / "run", "--recipe", "sft", "--lora", "--lora-rank", "4",
                               "--data", str(train), "--val", str(val), "--steps", "6", "--lr", "1e-2")
    assert code == 0, err
    checkpoint = hub.latest_checkpoint(tmp_path / "run")
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # the adapter alone, not a second copy of the base
    import peft
    import transformers

    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), checkpoint).eval()
    from foundry.hub.adapter import load_adapter

    adapted = hub.load(base).model
    load_adapter(adapted, checkpoint)  # wrapped as peft wraps it, so both round alike
    ours = hub.load(checkpoint).model  # the base with the adapter folded into its weights
    ids = torch.tensor([[3, 17, 40, 2, 9, 11]])
    with torch.no_grad():
        base_logits = hub.load(base).model(ids)
        assert not torch.allclose(ours(ids), base_logits, atol=1e-4)  # six steps moved the adapter
        torch.testing.assert_close(theirs(ids).logits, adapted(ids), atol=1e-5, rtol=1e-5)
        # Folding the adapter in rounds differently from adding its branch: equal to float32 rounding.
        torch.testing.assert_close(ours(ids), adapted(ids), atol=5e-5, rtol=1e-5)
    # `foundry merge` folds it into a model directory transformers loads with the same logits.
    assert main(["merge", str(base), str(checkpoint), "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


def test_lora_and_qlora_report_their_memory(capsys, base, upper_data, tmp_path):
    train, _ = upper_data
    code, out, err = _finetune(capsys, base, tmp_path / "lora", "--recipe", "sft", "--lora", "--lora-targets",
                               "q_proj,v_proj", "--data", str(train), "--steps", "1")
    assert code == 0, err
    share = re.search(r"training [\d,]+ of [\d,]+ parameters \(([\d.]+)%\); AdamW state [\d.]+ MiB, ([\d.]+)% of full",
                      err)
    assert share, err
    assert float(share.group(1)) < 5 and float(share.group(2)) < 5
    code, out, err = _finetune(capsys, base, tmp_path / "qlora", "--recipe", "sft", "--qlora", "--qlora-dtype", "nf4",
                               "--data", str(train), "--steps", "2")
    assert code == 0, err
    frozen = re.search(r"QLoRA: the frozen base takes [\d.]+ MiB in nf4, (\d+)% of its", err)
    assert frozen and int(frozen.group(1)) < 30, err
    assert (hub.latest_checkpoint(tmp_path / "qlora") / "adapter_config.json").is_file()


def _fraud_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = "the card was used at a shop online for fuel food travel hotel cash store app payment".split()
    records = []
    for _ in range(n):
        text = [rng.choice(words) for _ in range(rng.randint(4, 9))]
        fraud = rng.random() < 0.3
        if fraud:
            text.insert(rng.randrange(len(text) + 1), "refund")
        records.append({"text": " ".join(text), "label": "fraud" if fraud else "legitimate"})
    return records


def test_classify_learns_the_rule_and_saves_what_transformers_loads(capsys, base, tmp_path):
    train = _write(tmp_path / "train.jsonl", _fraud_records(800, 0))
    val = _write(tmp_path / "val.jsonl", _fraud_records(200, 1))
    code, out, err = _finetune(capsys, base, tmp_path / "run", "--recipe", "classify", "--data", str(train), "--val",
                               str(val), "--steps", "60", "--batch-size", "16", "--lr", "1e-3",
                               "--class-weights", "balanced")
    assert code == 0, err
    found = re.search(r"accuracy ([\d.]+)\s+macro F1 ([\d.]+)\s+majority baseline ([\d.]+) \(always 'legitimate'\)", out)
    assert found, out
    accuracy, baseline = float(found.group(1)), float(found.group(3))
    print(f"classify held-out accuracy {accuracy:.3f}, majority baseline {baseline:.3f}")
    assert accuracy > 0.95 and baseline < 0.8
    assert (tmp_path / "run" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import transformers

    from foundry.data.labels import pad_batch
    from foundry.hub.classifier import load_classifier

    checkpoint = hub.latest_checkpoint(tmp_path / "run")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert theirs.config.id2label == {0: "fraud", 1: "legitimate"}
    ours, tokenizer, labels = load_classifier(checkpoint)
    ids, mask = pad_batch([tokenizer.encode("card used for a refund online"), tokenizer.encode("fuel")],
                          ours.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids, attention_mask=mask.long()).logits, ours(ids, mask), atol=1e-5, rtol=1e-5)
    # `foundry eval --task classify` scores it on the same records.
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--task", "classify", "--data", str(val), "--no-save"]) == 0
    assert re.search(r"accuracy\s+" + re.escape(f"{accuracy:.4f}"), capsys.readouterr().out)


@pytest.mark.slow
def test_dpo_prefers_the_rule_on_held_out_prompts(capsys, base, tmp_path):
    """A model taught to answer `say: a b c` in either case learns from pairs to prefer upper case."""
    from foundry.cli.recipe_report import greedy_answers

    triples = _triples(1)
    rng = random.Random(2)
    mixed = [{"messages": [{"role": "user", "content": "say: " + " ".join(t)},
                           {"role": "assistant", "content": " ".join(t).upper() if rng.random() < 0.5 else " ".join(t)}]}
             for t in triples[100:1600]]
    code, _, err = _finetune(capsys, base, tmp_path / "sft", "--recipe", "sft", "--data",
                             str(_write(tmp_path / "mixed.jsonl", mixed)), "--val-fraction", "0",
                             "--steps", "300", "--batch-size", "8", "--lr", "3e-3")
    assert code == 0, err
    start = hub.latest_checkpoint(tmp_path / "sft")

    def pairs(part):
        return [{"prompt": "say: " + " ".join(t), "chosen": " ".join(t).upper(), "rejected": " ".join(t)} for t in part]

    train = _write(tmp_path / "pairs.jsonl", pairs(triples[100:600]))
    val = _write(tmp_path / "pairs_val.jsonl", pairs(triples[:100]))
    code, out, err = _finetune(capsys, start, tmp_path / "dpo", "--recipe", "dpo", "--lora", "--data", str(train),
                               "--val", str(val), "--steps", "40", "--batch-size", "8", "--lr", "5e-3")
    assert code == 0, err
    accuracy = float(re.search(r"reward accuracy ([\d.]+)%", out).group(1)) / 100
    prompts = [[{"role": "user", "content": "say: " + " ".join(t)}] for t in triples[:100]]

    def upper_share(model_dir):
        loaded = hub.load(model_dir)
        answers = greedy_answers(loaded.model, loaded.tokenizer, prompts, 12)
        # The rule the pairs teach: reply in upper case (whether the letters are right is sft's business).
        return sum(any(c.isalpha() for c in a) and a == a.upper() for a in answers) / len(prompts)

    before, after = upper_share(start), upper_share(hub.latest_checkpoint(tmp_path / "dpo"))
    print(f"dpo held-out reward accuracy {accuracy:.0%}; greedy answers in upper case {before:.0%} -> {after:.0%}")
    assert accuracy > 0.9 and after > before and after > 0.9


def _refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_refused_in_one_line_and_nothing_is_written(capsys, base, tmp_path):
    good = _upper_records(_triples()[:20])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good[0]) + "\n{not json\n" + json.dumps(good[1]) + "\n")
    argv = ["finetune", str(base), "--recipe", "sft", "--steps", "1", "--seq-len", "64"]
    err = _refused(capsys, argv + ["--data", str(bad), "--out", str(tmp_path / "r1")])
    assert f"{bad}:2" in err and "--skip-bad-lines" in err
    assert not (tmp_path / "r1").exists()
    # --skip-bad-lines skips and counts it (never silently).
    capsys.readouterr()
    assert main(argv + ["--data", str(bad), "--out", str(tmp_path / "r2"), "--skip-bad-lines", "--val-fraction", "0",
                        "--eval-every", "0"]) == 0
    assert f"skipped 1 bad line(s) (--skip-bad-lines); the first: {bad}:2" in capsys.readouterr().err
    no_reply = _write(tmp_path / "no_reply.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert "assistant" in _refused(capsys, argv + ["--data", str(no_reply), "--out", str(tmp_path / "r3")])
    data = _write(tmp_path / "ok.jsonl", good)
    err = _refused(capsys, argv + ["--data", str(data), "--out", str(tmp_path / "r4"), "--lora", "--lora-targets",
                                   "attention_dense"])
    assert "attention_dense" in err
    same = _write(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    assert "same" in _refused(capsys, ["finetune", str(base), "--recipe", "dpo", "--data", str(same), "--out",
                                       str(tmp_path / "r5")]).lower()
    one_label = _write(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    assert "two labels" in _refused(capsys, ["finetune", str(base), "--recipe", "classify", "--data", str(one_label),
                                             "--val-fraction", "0", "--out", str(tmp_path / "r6")])
    too_long = ["finetune", str(base), "--recipe", "sft", "--data", str(data), "--seq-len", "4096"]
    assert "max_position_embeddings (256)" in _refused(capsys, too_long + ["--out", str(tmp_path / "r7")])
    assert "--ref" in _refused(capsys, argv + ["--data", str(data), "--out", str(tmp_path / "r8"), "--ref", str(base)])
    err = _refused(capsys, argv + ["--data", str(data), "--out", str(tmp_path / "r9"), "--val-fraction", "0.99"])
    assert "leaves no training records" in err
    # A resumed run keeps its recipe: r2's checkpoint and settings stay as they were.
    before = sorted(p.name for p in (tmp_path / "r2").rglob("*"))
    err = _refused(capsys, argv + ["--data", str(bad), "--out", str(tmp_path / "r2"), "--skip-bad-lines",
                                   "--val-fraction", "0", "--steps", "2", "--resume", "--train-on-prompt"])
    assert "train_on_prompt" in err and "recipe.yaml" in err
    assert sorted(p.name for p in (tmp_path / "r2").rglob("*")) == before
    # A run directory already there is never overwritten without --overwrite.
    assert "--overwrite" in _refused(capsys, argv + ["--data", str(data), "--out", str(tmp_path / "r2")])
    assert not any((tmp_path / name).exists() for name in ("r1", "r3", "r4", "r5", "r6", "r7", "r8", "r9"))


def test_a_resumed_run_continues_exactly(capsys, base, upper_data, tmp_path):
    train, val = upper_data
    flags = ["--recipe", "sft", "--data", str(train), "--val", str(val), "--lr", "3e-3", "--log-every", "1"]
    assert _finetune(capsys, base, tmp_path / "whole", *flags, "--steps", "6")[0] == 0
    assert _finetune(capsys, base, tmp_path / "parts", *flags, "--steps", "3")[0] == 0
    assert _finetune(capsys, base, tmp_path / "parts", *flags, "--steps", "6", "--resume")[0] == 0

    def losses(run):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in lines if "loss" in r]

    assert losses(tmp_path / "parts") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["finetune_sft.py", "finetune_classify.py", "finetune_dpo.py"])
def test_example_scripts_run(script, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "examples" / script), "--out", str(tmp_path), "--steps", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert hub.latest_checkpoint(tmp_path / "run") is not None


def test_help_shows_an_example_per_recipe_and_the_format_samples_read(capsys, tiny_tokenizer):
    from foundry.data.instructions import load_examples
    from foundry.data.labels import read_labelled
    from foundry.data.preferences import load_pairs

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for recipe in ("sft", "classify", "dpo"):
        assert f"--recipe {recipe}" in text
    examples = Path(__file__).resolve().parents[1] / "examples"
    assert len(load_examples(examples / "sft_messages.jsonl", tiny_tokenizer).examples) == 4
    assert len(load_examples(examples / "sft_prompt_completion.jsonl", tiny_tokenizer).examples) == 3
    assert read_labelled(examples / "classify.jsonl").label_set == ["fraud", "legitimate"]
    assert len(load_pairs(examples / "dpo.jsonl", tiny_tokenizer).pairs) == 3
