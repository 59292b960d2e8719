"""Sequence classification: HF-compatible classifier directories, labelled data, metrics and learning a rule."""

from __future__ import annotations

import json
import random

import pytest
import torch

from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.data.labels import (
    LabelledExamples,
    batches,
    class_weights,
    eval_batches,
    read_labelled,
    truncate_keeping_end,
)
from foundry.eval.classification import classification_report, evaluate_classifier, plot_confusion
from foundry.hub.classifier import (
    classifier_architecture,
    classifier_from_causal,
    is_classifier_dir,
    load_classifier,
    save_classifier,
)
from foundry.model import Transformer
from foundry.model.classifier import SequenceClassifier

transformers = pytest.importorskip("transformers")

SHAPE = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128}
FAMILIES = {
    "llama": ModelConfig(**SHAPE),
    "qwen2": ModelConfig(**SHAPE, tie_word_embeddings=True, architecture="Qwen2ForCausalLM", model_type="qwen2",
                         attention_bias=True, attention_out_bias=False),
}
TEXTS = ["a short one", "this text is rather longer than the others, by a few words at least",
         "medium length text here", "x"]


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _classifier(config: ModelConfig, tokenizer, num_labels: int, seed: int = 0,
                pad_token_id: int | None = None) -> SequenceClassifier:
    model = Transformer(config)
    model.init_weights(seed)
    return classifier_from_causal(model, num_labels, seed=seed + 1, tokenizer=tokenizer, pad_token_id=pad_token_id)


# ---- 1. the directory is transformers' classifier ------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_saved_classifier_loads_in_transformers_with_equal_logits_and_round_trips(family, tiny_tokenizer, tmp_path):
    config = FAMILIES[family]
    labels = ["ham", "spam", "unsure"]
    classifier = _classifier(config, tiny_tokenizer, len(labels)).eval()
    assert classifier.pad_token_id == tiny_tokenizer.pad_id
    out = save_classifier(tmp_path / "clf", classifier, tiny_tokenizer, labels, meta={"recipe": "classify"})
    assert is_classifier_dir(out) and not is_classifier_dir(tmp_path)

    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == [classifier_architecture(config.architecture)]
    assert raw["architectures"][0].endswith("ForSequenceClassification")
    assert raw["id2label"] == {"0": "ham", "1": "spam", "2": "unsure"} and raw["pad_token_id"] == tiny_tokenizer.pad_id

    examples = LabelledExamples(list(TEXTS), ["ham"] * len(TEXTS), [])
    input_ids, pad_mask, _ = next(eval_batches(examples.encode(tiny_tokenizer, 64), [0] * len(TEXTS), 8,
                                               tiny_tokenizer.pad_id))
    assert len(set(pad_mask.sum(1).tolist())) == len(TEXTS)  # rows of different lengths, right-padded
    assert not pad_mask[:, 0].logical_not().any()

    theirs, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert type(theirs).__name__ == raw["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"]
    theirs.eval()
    with torch.no_grad():
        ours = classifier(input_ids, pad_mask)
        reference = theirs(input_ids=input_ids, attention_mask=pad_mask.long()).logits
    assert ours.shape == (len(TEXTS), 3)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)

    loaded, tokenizer, loaded_labels = load_classifier(out)
    assert loaded_labels == labels and tokenizer.fingerprint == tiny_tokenizer.fingerprint
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids, pad_mask), ours, atol=1e-6, rtol=0)
    assert json.loads((out / "foundry.json").read_text()) == {"recipe": "classify"}


def test_pooling_is_the_rightmost_non_pad_token_as_in_transformers():
    classifier = _classifier(FAMILIES["llama"], None, 2, pad_token_id=0)
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    with torch.no_grad():
        padded = classifier(ids, ids != 0)
        alone = classifier(ids[:1, :3])
    # The padded row scores exactly as the same row without padding.
    torch.testing.assert_close(padded[0], alone[0], atol=1e-6, rtol=0)


def test_loading_a_causal_directory_as_a_classifier_is_refused(tmp_path):
    from foundry.hub import save

    save(tmp_path / "lm", Transformer(FAMILIES["llama"]))
    assert not is_classifier_dir(tmp_path / "lm")
    with pytest.raises(UserError, match="not a classifier directory"):
        load_classifier(tmp_path / "lm")


# ---- 2. metrics ----------------------------------------------------------------------------------

def test_report_matches_the_definitions_on_a_hand_made_confusion(tmp_path):
    labels = ["a", "b", "c"]
    confusion = [[5, 1, 0],   # true a
                 [2, 3, 1],   # true b
                 [0, 0, 4]]   # true c
    true_ids = [t for t in range(3) for p in range(3) for _ in range(confusion[t][p])]
    pred_ids = [p for t in range(3) for p in range(3) for _ in range(confusion[t][p])]
    report = classification_report(true_ids, pred_ids, labels)
    assert report.confusion == confusion and report.count == 16
    assert report.accuracy == pytest.approx(12 / 16)
    precision = [5 / 7, 3 / 4, 4 / 5]
    recall = [5 / 6, 3 / 6, 4 / 4]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    for k, metrics in enumerate(report.per_class):
        assert metrics.label == labels[k]
        assert metrics.precision == pytest.approx(precision[k])
        assert metrics.recall == pytest.approx(recall[k])
        assert metrics.f1 == pytest.approx(f1[k])
    assert [m.support for m in report.per_class] == [6, 6, 4]
    assert report.macro_f1 == pytest.approx(sum(f1) / 3)
    assert report.majority_label == "a" and report.majority_baseline == pytest.approx(6 / 16)
    assert json.loads(json.dumps(report.to_dict()))["per_class"][1]["recall"] == pytest.approx(0.5)
    lines = report.table_lines()
    assert any("0.7500" in line and "macro F1" in line for line in lines)
    assert any(line.split()[:4] == ["b", "2", "3", "1"] for line in lines)

    png = plot_confusion(report, tmp_path / "plots" / "confusion.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in png.parent.iterdir() if p.name != "confusion.png"]  # no temp file left


def test_perfect_predictions_and_a_class_never_predicted():
    perfect = classification_report([0, 1, 2, 1], [0, 1, 2, 1], ["x", "y", "z"])
    assert perfect.accuracy == perfect.macro_f1 == 1.0
    assert perfect.confusion == [[1, 0, 0], [0, 2, 0], [0, 0, 1]]
    lazy = classification_report([0, 0, 0, 1], [0, 0, 0, 0], ["no", "yes"])
    assert lazy.per_class[1].precision == lazy.per_class[1].recall == lazy.per_class[1].f1 == 0.0
    assert lazy.accuracy == lazy.majority_baseline == 0.75


def test_class_weights_are_inverse_frequency_with_mean_one_per_example():
    ids = [0] * 6 + [1] * 2 + [2] * 4
    weights = class_weights(ids, 4)
    assert weights.tolist() == pytest.approx([12 / 3 / 6, 12 / 3 / 2, 12 / 3 / 4, 0.0])
    assert sum(weights[i] for i in ids).item() == pytest.approx(len(ids))


# ---- 3. learning a rule --------------------------------------------------------------------------

def _rule_data(n: int, seed: int, vocab: int) -> list[dict]:
    # Token presence: a text holding w1 is "fraud", else "legitimate" (about 30% fraud).
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [f"w{rng.randint(2, vocab)}" for _ in range(rng.randint(4, 12))]
        fraud = rng.random() < 0.3
        if fraud:
            words.insert(rng.randint(0, len(words)), "w1")
        rows.append({"text": " ".join(words), "label": "fraud" if fraud else "legitimate"})
    return rows


def test_a_tiny_classifier_learns_a_token_presence_rule(counting_tokenizer, tmp_path):
    tokenizer = counting_tokenizer(40)  # no pad token: batches pad with eos (id 0), which no text holds
    train = read_labelled(_write_jsonl(tmp_path / "train.jsonl", _rule_data(800, 0, 40)))
    test = read_labelled(_write_jsonl(tmp_path / "test.jsonl", _rule_data(200, 1, 40)))
    labels = train.label_set
    assert labels == ["fraud", "legitimate"]
    train_ids, test_ids = train.label_ids(), test.label_ids(labels)
    torch.manual_seed(0)
    classifier = _classifier(FAMILIES["llama"], tokenizer, len(labels))
    assert classifier.pad_token_id == tokenizer.eos_id == 0
    loader = batches(train.encode(tokenizer, 32), train_ids, 16, classifier.pad_token_id, seed=0)
    weights = class_weights(train_ids, len(labels))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=0.0)
    classifier.train()
    for _ in range(150):
        input_ids, pad_mask, y = next(loader)
        loss = classifier.loss(input_ids, pad_mask, y, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    report = evaluate_classifier(classifier, eval_batches(test.encode(tokenizer, 32), test_ids, 64,
                                                          classifier.pad_token_id), labels)
    print("\n".join(report.table_lines()))
    assert report.majority_label == "legitimate" and report.majority_baseline < 0.8
    assert report.accuracy > 0.95 > report.majority_baseline
    assert classifier.training  # evaluation restored the mode


def test_batches_resume_exactly_and_are_right_padded():
    rows = [[1] * n for n in range(1, 12)]
    loader = batches(rows, list(range(11)), 4, pad_id=0, seed=3)
    for _ in range(2):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(4)]  # crosses an epoch
    resumed = batches(rows, list(range(11)), 4, pad_id=0, seed=3)
    resumed.load_state_dict(state)
    for got, want in zip((next(resumed) for _ in range(4)), expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    input_ids, pad_mask, labels = expected[0]
    assert torch.equal(pad_mask.sum(1), torch.tensor([len(rows[i]) for i in labels.tolist()]))
    assert torch.equal(input_ids != 0, pad_mask)
    seen = [int(i) for b in [*(next(batches(rows, list(range(11)), 11, 0, 5)),)] for i in b[2]]
    assert sorted(seen) == list(range(11))  # one epoch visits every example once
    with pytest.raises(UserError, match="seed"):
        batches(rows, list(range(11)), 4, pad_id=0, seed=4).load_state_dict(state)


def test_long_texts_keep_their_end_and_a_leading_bos():
    assert truncate_keeping_end([1, 2, 3, 4, 5], 3) == [3, 4, 5]
    assert truncate_keeping_end([9, 2, 3, 4, 5], 3, bos_id=9) == [9, 4, 5]
    assert truncate_keeping_end([1, 2], 3) == [1, 2]


def test_conversations_are_encoded_with_the_chat_template(tiny_tokenizer, tmp_path):
    messages = [{"role": "user", "content": "where is my refund"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages, "label": "fraud"},
                                                 {"text": "hello", "label": "legitimate"}])
    examples = read_labelled(path)
    ids = examples.encode(tiny_tokenizer, 256)
    assert ids[0] == tiny_tokenizer.encode_chat(messages) and ids[1] == tiny_tokenizer.encode("hello")


# ---- 4. bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("row, why", [
    ({"text": "no label here"}, 'missing "label"'),
    ({"label": "fraud"}, 'missing "text"'),
    ({"text": ["not", "a", "string"], "label": "fraud"}, '"text" must be a string'),
    ({"text": "ok", "label": {"a": 1}}, '"label" must be a string'),
    ('{"text": "broken', "not valid JSON"),
])
def test_bad_lines_name_the_file_and_line_and_can_be_skipped(tmp_path, row, why):
    path = _write_jsonl(tmp_path / "data.jsonl", [{"text": "fine", "label": "a"}, row, {"text": "also", "label": "b"}])
    with pytest.raises(UserError, match=rf"data\.jsonl:2: {why}"):
        read_labelled(path)
    examples = read_labelled(path, skip_bad_lines=True)
    assert examples.labels == ["a", "b"] and len(examples.skipped) == 1 and ":2:" in examples.skipped[0]


def test_labels_unseen_in_training_are_named(tmp_path):
    path = _write_jsonl(tmp_path / "eval.jsonl", [{"text": "x", "label": "fraud"}, {"text": "y", "label": "spam"},
                                                 {"text": "z", "label": "phishing"}])
    with pytest.raises(UserError, match=r"eval\.jsonl: label\(s\) 'phishing', 'spam' were not seen in training"):
        read_labelled(path).label_ids(["fraud", "legitimate"])


def test_label_names_must_match_the_outputs(tiny_tokenizer, tmp_path):
    classifier = _classifier(FAMILIES["llama"], tiny_tokenizer, 2)
    with pytest.raises(UserError, match="distinct"):
        save_classifier(tmp_path / "a", classifier, None, ["same", "same"])
    with pytest.raises(ValueError, match="3 label names"):
        save_classifier(tmp_path / "b", classifier, None, ["a", "b", "c"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
