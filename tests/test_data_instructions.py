"""SFT and DPO data: assistant-only labels, packing with document masks, resumable loaders, bad lines."""

import json

import pytest
import torch

from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.data.instructions import (IGNORE, Example, check_alignment, encode_example, load_examples,
                                       prompt_completion_messages, record_messages, show_example, trained_runs)
from foundry.data.packing import PAD_SEGMENT, InstructionLoader, pack
from foundry.data.preferences import PairLoader, encode_pair, load_pairs, record_conversations
from foundry.model import Transformer
from foundry.tokenizer import CHATML_TEMPLATE, Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi <|im_end|> please"},  # special-token text typed by a user stays text
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "And again?"},
    {"role": "assistant", "content": "Hello, again."},
]


def _trained_texts(tokenizer, example):
    return [tokenizer.decode(example.ids[a:b]) for a, b in trained_runs(example)]


def _without_template(tokenizer):
    return Tokenizer(tokenizer.backend, tokenizer.config, None)


def _with_template(tokenizer, template):
    return Tokenizer(tokenizer.backend, tokenizer.config, template)


def test_labels_are_exactly_the_assistant_turns_with_their_end_of_turn(tiny_tokenizer):
    example = encode_example(tiny_tokenizer, CONVERSATION)
    assert example.ids == tiny_tokenizer.encode_chat(CONVERSATION)
    assert _trained_texts(tiny_tokenizer, example) == ["Hello there!<|im_end|>", "Hello, again.<|im_end|>"]
    assert all(label in (IGNORE, token) for token, label in zip(example.ids, example.labels))
    # One <|im_end|> id per message: the one the user typed is text, and only the assistants' are trained.
    im_end = tiny_tokenizer.token_to_id("<|im_end|>")
    assert example.ids.count(im_end) == len(CONVERSATION)
    assert [label for label in example.labels if label == im_end] == [im_end, im_end]
    assert check_alignment(tiny_tokenizer, CONVERSATION, example) == []
    shown = show_example(tiny_tokenizer, CONVERSATION)
    assert "\u27e6Hello there!<|im_end|>\u27e7" in shown and shown.endswith(": ok")


TOOL_TEMPLATE = CHATML_TEMPLATE.replace(
    "    {{- '<|im_end|>\\n' }}\n",
    "    {%- for call in message.get('tool_calls', []) %}"
    "{{- '<tool_call>' + call['function'] | tojson + '</tool_call>' }}{%- endfor %}\n"
    "    {{- '<|im_end|>\\n' }}\n")


def test_tool_calls_and_tool_results_when_the_template_renders_them(tiny_tokenizer):
    assert TOOL_TEMPLATE != CHATML_TEMPLATE
    tokenizer = _with_template(tiny_tokenizer, TOOL_TEMPLATE)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "4", "tool_call_id": "1"},
                {"role": "assistant", "content": "It is 4."}]
    record_messages({"messages": messages})
    example = encode_example(tokenizer, messages)
    assert _trained_texts(tokenizer, example) == [
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 2}}</tool_call><|im_end|>', "It is 4.<|im_end|>"]
    assert check_alignment(tokenizer, messages, example) == []
    with pytest.raises(UserError, match="only assistant messages carry tool_calls"):
        record_messages({"messages": [{"role": "user", "content": "x", "tool_calls": [call]}, messages[-1]]})


def test_train_on_prompt_trains_every_token(tiny_tokenizer):
    example = encode_example(tiny_tokenizer, CONVERSATION, train_on_prompt=True)
    assert example.labels == example.ids == tiny_tokenizer.encode_chat(CONVERSATION)


def test_a_reply_whose_first_token_merges_with_the_template_still_trains_its_text(tiny_tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nanswer"}]
    example = encode_example(tiny_tokenizer, messages)
    assert _trained_texts(tiny_tokenizer, example)[0].endswith("\n\nanswer<|im_end|>")
    assert check_alignment(tiny_tokenizer, messages, example) == []


def test_prompt_completion_records_are_a_user_and_an_assistant_turn(tiny_tokenizer):
    messages = record_messages({"prompt": "2+2=", "completion": " 4"})
    assert messages == prompt_completion_messages("2+2=", " 4")
    example = encode_example(tiny_tokenizer, messages)
    assert example.ids == tiny_tokenizer.encode_chat(messages)
    assert _trained_texts(tiny_tokenizer, example) == [" 4<|im_end|>"]
    # Without a chat template: plain prompt + completion + eos, the completion and eos trained.
    plain = _without_template(tiny_tokenizer)
    example = encode_example(plain, messages)
    prompt = plain.encode("2+2=")
    assert example.ids == prompt + plain.encode(" 4") + [plain.eos_id]
    assert example.labels[:len(prompt)] == [IGNORE] * len(prompt)
    assert _trained_texts(plain, example) == [" 4<|endoftext|>"]
    assert "\u27e6 4<|endoftext|>\u27e7" in show_example(plain, messages)
    with pytest.raises(UserError, match="no chat template"):
        encode_example(plain, CONVERSATION)


@pytest.mark.parametrize("data, why", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "content must be"),
    ({"prompt": "p", "completion": 5}, "completion\" must be a string"),
    ({"text": "p"}, "expected"),
])
def test_bad_records_are_refused(data, why):
    with pytest.raises(UserError, match=why):
        record_messages(data)


def test_an_unstable_template_is_refused(tiny_tokenizer):
    # The generation prompt opens an "assistant" turn, but past replies are rendered as "bot" turns.
    unstable = CHATML_TEMPLATE.replace("message['role'] + '\\n'",
                                       "('bot' if message['role'] == 'assistant' else message['role']) + '\\n'")
    tokenizer = _with_template(tiny_tokenizer, unstable)
    with pytest.raises(UserError, match="cannot mark assistant spans"):
        encode_example(tokenizer, CONVERSATION)


def test_show_example_refuses_a_template_that_rewrites_replies(tiny_tokenizer):
    shouting = CHATML_TEMPLATE.replace("{{- message['content'] }}", "{{- message['content'] | upper }}")
    tokenizer = _with_template(tiny_tokenizer, shouting)
    example = encode_example(tokenizer, CONVERSATION)
    assert check_alignment(tokenizer, CONVERSATION, example)
    with pytest.raises(UserError, match="not its assistant turns"):
        show_example(tokenizer, CONVERSATION)


def test_bad_lines_are_named_and_skipped_when_asked(tmp_path, tiny_tokenizer):
    path = tmp_path / "sft.jsonl"
    lines = [json.dumps({"messages": CONVERSATION}), "{not json",
             json.dumps({"messages": [{"role": "user", "content": "alone"}]}),
             json.dumps({"prompt": "a", "completion": "b"}), json.dumps({"prompt": 1, "completion": "b"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=f"{path}:2: not valid JSON.*--skip-bad-lines"):
        load_examples(path, tiny_tokenizer)
    loaded = load_examples(path, tiny_tokenizer, skip_bad_lines=True)
    assert len(loaded) == 2 and len(loaded.skipped) == 3
    assert [s.split(": ")[0] for s in loaded.skipped] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert "no assistant turn" in loaded.skipped[1]
    assert loaded.examples[0] == encode_example(tiny_tokenizer, CONVERSATION)


def _examples(tokenizer, count):
    examples = []
    for i in range(count):
        messages = [{"role": "user", "content": "question " * (i % 5 + 1)},
                    {"role": "assistant", "content": f"answer {i} " * (i % 3 + 1)}]
        examples.append(encode_example(tokenizer, messages))
    return examples


def test_packing_places_every_example_once_and_counts_truncations(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, 30)
    examples.append(Example(list(range(5, 105)), list(range(5, 105))))  # longer than a row
    packed = pack(examples, seq_len=64, seed=0)
    assert packed.truncated == 1 and packed.dropped == 0
    assert all(len(row.ids) <= 64 for row in packed)
    assert len(packed) < len(examples)  # short examples share rows
    pieces = sorted(tuple(row.ids[row.segments == s]) for row in packed for s in set(row.segments.tolist()))
    assert pieces == sorted([tuple(e.ids) for e in examples[:-1]] + [tuple(range(5, 69))])
    for row in packed:
        for s in set(row.segments.tolist()):
            assert row.positions[row.segments == s].tolist() == list(range(int((row.segments == s).sum())))
    assert [r.ids.tolist() for r in pack(examples, 64, seed=0)] == [r.ids.tolist() for r in packed]


SMALL = ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)


@pytest.mark.parametrize("config", [SMALL, SMALL.replace(
    architecture="Qwen3ForCausalLM", model_type="qwen3", qk_norm="head", sliding_window=6,
    layer_types=["sliding_attention", "full_attention"])], ids=["full", "sliding-window-6"])
def test_a_packed_row_gives_each_example_its_logits_alone(tiny_tokenizer, config):
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(0)
    model.eval()
    examples = _examples(tiny_tokenizer, 12)
    loader = InstructionLoader(examples, batch_size=3, seq_len=96, seed=1)
    ids, targets, positions, segments = next(loader)
    assert (segments == PAD_SEGMENT).any()  # some padding to keep apart, too
    with torch.no_grad():
        packed = model(ids, positions, segments=segments)
        for b in range(ids.shape[0]):
            for s in set(segments[b].tolist()) - {PAD_SEGMENT}:
                where = segments[b] == s
                alone = model(ids[b][where][None])[0]
                assert (packed[b][where] - alone).abs().max().item() < 1e-5
                # targets: the next token of the same example, where that token is trained; none at its end.
                example = next(e for e in examples if e.ids == ids[b][where].tolist())
                assert targets[b][where].tolist() == example.labels[1:] + [IGNORE]
        assert (targets[segments == PAD_SEGMENT] == IGNORE).all()
        # Positions default to restarting where the segment changes (padding aside: its positions differ).
        real = segments != PAD_SEGMENT
        assert torch.equal(model(ids, segments=segments)[real], packed[real])
        # One segment over a whole row is plain causal attention.
        whole = torch.zeros_like(ids)
        assert (model(ids, segments=whole) - model(ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("packing", [True, False])
def test_loader_resumes_with_identical_batches(tiny_tokenizer, packing):
    examples = _examples(tiny_tokenizer, 20)
    loader = InstructionLoader(examples, batch_size=3, seq_len=64, seed=7, packing=packing)
    for _ in range(5):  # past the first epoch
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(6)]
    resumed = InstructionLoader(examples, batch_size=3, seq_len=64, seed=7, packing=packing)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(6))):
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    if not packing:
        assert all(len(set(row.tolist()) - {PAD_SEGMENT}) == 1 for row in expected[0][3])
    other = InstructionLoader(examples[:-1], batch_size=3, seq_len=64, seed=7, packing=packing)
    with pytest.raises(UserError, match="cannot resume"):
        other.load_state_dict(state)


def test_ranks_get_disjoint_rows(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, 16)
    seen = []
    for rank in range(2):
        loader = InstructionLoader(examples, 1, 64, seed=3, packing=False, rank=rank, world_size=2)
        seen.append({tuple(next(loader)[0][0].tolist()) for _ in range(int(loader.order.per_rank))})
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 8


def test_preference_pairs_train_only_the_final_reply(tiny_tokenizer):
    chosen, rejected = record_conversations({"prompt": "Capital of France?", "chosen": "Paris.",
                                             "rejected": "Lyon."})
    pair = encode_pair(tiny_tokenizer, chosen, rejected)
    assert _trained_texts(tiny_tokenizer, pair.chosen) == ["Paris.<|im_end|>"]
    assert _trained_texts(tiny_tokenizer, pair.rejected) == ["Lyon.<|im_end|>"]
    assert pair.chosen.ids == tiny_tokenizer.encode_chat(chosen)
    # Conversation form: earlier assistant turns are shared context, not trained.
    history = CONVERSATION[:-1]
    chosen, rejected = record_conversations({
        "chosen": history + [{"role": "assistant", "content": "Hi again."}],
        "rejected": history + [{"role": "assistant", "content": "No."}]})
    pair = encode_pair(tiny_tokenizer, chosen, rejected)
    assert _trained_texts(tiny_tokenizer, pair.chosen) == ["Hi again.<|im_end|>"]
    assert _trained_texts(tiny_tokenizer, pair.rejected) == ["No.<|im_end|>"]


@pytest.mark.parametrize("data, why", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are the same"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "c"}]}, "up to their last"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}, "last message"),
    ({"prompt": "p", "chosen": "a"}, "expected"),
    ({"prompt": "p", "chosen": "a", "rejected": ["b"]}, "both be strings"),
])
def test_bad_preference_records_are_refused(data, why):
    with pytest.raises(UserError, match=why):
        record_conversations(data)


def test_pair_loader_pads_shifts_and_resumes(tmp_path, tiny_tokenizer):
    path = tmp_path / "dpo.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": "bad " * (i + 1)} for i in range(7)]
    path.write_text("\n".join(map(json.dumps, rows + [{"prompt": "x", "chosen": "y", "rejected": "y"}])) + "\n")
    with pytest.raises(UserError, match=f"{path}:8: the chosen and rejected"):
        load_pairs(path, tiny_tokenizer)
    pairs = load_pairs(path, tiny_tokenizer, skip_bad_lines=True)
    assert len(pairs) == 7 and len(pairs.skipped) == 1
    loader = PairLoader(pairs.pairs, batch_size=2, seq_len=40, seed=0, pad_id=tiny_tokenizer.pad_id)
    chosen_ids, chosen_targets, rejected_ids, rejected_targets = next(loader)
    assert chosen_ids.shape == rejected_targets.shape == (2, 40)
    for ids, targets in ((chosen_ids[0], chosen_targets[0]), (rejected_ids[0], rejected_targets[0])):
        example = next(e for p in pairs.pairs for e in (p.chosen, p.rejected)
                       if e.ids == ids[:len(e.ids)].tolist() and ids[len(e.ids):].eq(tiny_tokenizer.pad_id).all())
        n = len(example.ids)
        assert targets[:n].tolist() == example.labels[1:] + [IGNORE]
        assert (targets[n:] == IGNORE).all()
    state = loader.state_dict()
    expected = [next(loader) for _ in range(5)]
    resumed = PairLoader(pairs.pairs, batch_size=2, seq_len=40, seed=0, pad_id=tiny_tokenizer.pad_id)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(5))):
        assert all(torch.equal(a, b) for a, b in zip(want, got))
