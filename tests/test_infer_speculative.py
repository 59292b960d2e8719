"""Speculative decoding: greedy output is the model's alone, token for token, whatever drafts (n-gram or model)."""

import pytest
import torch
from test_families import FAMILIES, VOCAB, _configs

from foundry import hub
from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.infer.engine import Engine
from foundry.infer.kv_pool import KVPool
from foundry.infer.sampling import SamplingParams
from foundry.infer.speculative import SpeculationStats, SpeculativeConfig, ngram_drafts
from foundry.model import Transformer
from foundry.serve.backend import Stats
from foundry.serve.metrics import Metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

NGRAM = SpeculativeConfig("ngram", num_tokens=4)
DRAFT = SpeculativeConfig("draft", num_tokens=4)


def _random(config: ModelConfig, seed: int) -> Transformer:
    # initializer_range 0.1 spreads the logits, so greedy choices are not decided by rounding noise.
    model = Transformer(config.replace(initializer_range=0.1, eos_token_id=None))
    model.init_weights(seed=seed)
    return model.eval()


def small_llama(vocab: int, seed: int = 7, layers: int = 1, context: int = 256) -> Transformer:
    """A Llama smaller than any family's, for a draft that mostly disagrees with its target."""
    return _random(ModelConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=64, max_position_embeddings=context), seed)


def ids(seed: int, length: int, vocab: int = VOCAB) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, **kw)


def tokens(engine: Engine, prompts, params) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(prompts, params)]


# ---- the drafter and the view ------------------------------------------------------------


def test_ngram_drafts_copy_what_followed_the_longest_latest_suffix_match():
    assert ngram_drafts([5, 6, 7, 1, 5, 6, 7, 2, 9, 5, 6, 7], 2) == [2, 9]  # the 3-gram's latest match
    assert ngram_drafts([1, 2, 3, 9, 3], 3, longest=3) == [9, 3, 9]  # a 1-gram; the copy runs on into itself
    assert ngram_drafts([1, 2, 1, 2], 4) == [1, 2, 1, 2]  # a period: a b a b ..
    assert ngram_drafts([1, 2, 3, 4], 3) == []
    assert ngram_drafts([4, 4, 8, 4], 2, longest=2, shortest=2) == []  # no 2-gram repeats


def test_span_view_writes_only_real_tokens_and_masks_each_row_causally():
    config = ModelConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, intermediate_size=8, max_position_embeddings=16)
    pool = KVPool(config, 10**6, 3)
    pool.lengths[:3] = [5, 2, 0]
    view = pool.span_view([0, 2], [3, 1])
    assert view.positions.tolist() == [[5, 6, 7], [0, 0, 0]]  # row 2 pads by repeating its last position
    k = torch.arange(6, dtype=torch.float32).view(2, 1, 3, 1).expand(2, 1, 3, config.head_dim) + 1
    keys, _ = view.write(0, k, k)
    assert keys.shape[0] == 2 and keys.shape[2] == 8
    assert pool.keys[0][0, 0, 5:8, 0].tolist() == [1, 2, 3] and pool.keys[0][2, 0, :2, 0].tolist() == [4, 0]
    mask = view.attention_mask(3, window=2)
    assert mask.shape == (2, 1, 3, 8)
    assert mask[0, 0, 2].nonzero().flatten().tolist() == [6, 7]
    assert mask[1, 0, 2].nonzero().flatten().tolist() == [0]  # padding sees what its row's last token sees
    view.commit()
    assert pool.lengths == [8, 2, 1]


# ---- every family: speculation changes nothing ---------------------------------------------


def damped(model: Transformer, scale: float = 0.1) -> Transformer:
    """The model with its attention outputs scaled down: it then falls into loops, as trained models repeat
    code and text, so n-gram drafts are taken; attention still counts (some drafts are rejected)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("o_proj.weight"):
                param.mul_(scale)
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_speculation_equals_plain_decoding_in_every_family(name):
    config = ModelConfig.from_hf_dict(_configs()[name]().to_dict())
    model, start = _random(config, seed=0), ids(3, 8)
    # A prompt that repeats itself (its start, what the model says after it, its start again) and one that
    # does not. Both are longer than the sliding windows (16); with the answer they cross Phi-3's original
    # context (32), so LongRoPE switches factors mid-answer.
    prompts = [start + tokens(Engine(model), [start], greedy(8))[0] + start, ids(4, 24)]
    plain = tokens(Engine(model), prompts, greedy(32))
    for spec, draft in [(NGRAM, None), (DRAFT, model), (DRAFT, small_llama(VOCAB))]:
        engine = Engine(model, speculative=spec, draft=draft)
        assert tokens(engine, prompts, greedy(32)) == plain, f"{name}: {spec.method}"
        stats = engine.scheduler.spec_stats
        assert stats.steps > 0 and stats.drafted > 0
        if draft is model:  # a draft equal to its target is always right: every bonus token is used
            assert stats.accepted == stats.drafted
    # The model's own loops as the prompt: n-gram drafts are taken, and rejected where attention differs.
    looping = damped(_random(config, seed=0))
    prompt = start + tokens(Engine(looping), [start], greedy(64))[0]
    engine = Engine(looping, speculative=NGRAM)
    assert tokens(engine, [prompt], greedy(32)) == tokens(Engine(looping), [prompt], greedy(32))
    assert engine.scheduler.spec_stats.accepted > 0


# ---- batches, stops, streams, logprobs -------------------------------------------------------


@pytest.fixture(scope="module")
def llama() -> Transformer:
    return small_llama(300, seed=0, layers=2, context=128)


@pytest.mark.parametrize("slots", [8, 2])  # 2: rows wait, join and leave mid-way, so slots (and drafts') move
def test_a_batch_of_speculating_and_sampling_rows_keeps_each_greedy_row_exact(llama, slots):
    prompts = [ids(10, 5, 300), [3, 4, 5, 6] * 5, ids(11, 30, 300), ids(12, 9, 300), ids(13, 2, 300)]
    params = [greedy(40), greedy(25), SamplingParams(temperature=0.8, seed=1, max_new_tokens=30), greedy(33),
              SamplingParams(temperature=1.0, top_k=20, seed=2, max_new_tokens=20)]
    plain = tokens(Engine(llama), prompts, params)
    for spec, draft in [(NGRAM, None), (DRAFT, llama), (DRAFT, small_llama(300))]:
        engine = Engine(llama, speculative=spec, draft=draft, max_batch_size=slots)
        out = engine.generate(prompts, params)
        for i in (0, 1, 3):
            assert out[i].token_ids == plain[i], f"{spec.method}: row {i}"
        assert [c.completion_tokens for c in out] == [40, 25, 30, 33, 20]
        assert engine.scheduler.spec_stats.rows > 0


def test_a_draft_equal_to_the_target_has_every_draft_accepted(llama):
    engine = Engine(llama, speculative=DRAFT, draft=llama)
    assert tokens(engine, [ids(20, 7, 300)], greedy(21)) == tokens(Engine(llama), [ids(20, 7, 300)], greedy(21))
    # 1 token from the prompt's prefill, then 4 steps of 4 drafts + 1 bonus token: 1 + 4 * 5 = 21.
    stats = engine.scheduler.spec_stats
    assert (stats.steps, stats.rows, stats.drafted, stats.accepted) == (4, 4, 16, 16)
    assert stats.acceptance_rate == 1.0 and stats.tokens_per_step == 5.0


def test_speculation_stops_above_max_rows(llama):
    engine = Engine(llama, speculative=SpeculativeConfig("draft", max_rows=2), draft=llama)
    prompts = [ids(30 + i, 6, 300) for i in range(3)]
    assert tokens(engine, prompts, greedy(12)) == tokens(Engine(llama), prompts, greedy(12))
    assert engine.scheduler.spec_stats.steps == 0  # three rows decode together the whole time


def test_stop_ids_budget_and_logprobs_inside_an_accepted_run(llama):
    prompt = ids(40, 8, 300)
    plain_engine, spec_engine = Engine(llama), Engine(llama, speculative=DRAFT, draft=llama)
    full = tokens(plain_engine, [prompt], greedy(30))[0]
    stop = full[3]  # output 0 comes from the prefill, 1..5 from the first verify step: 3 is inside it
    assert full.index(stop) == 3
    for params in [greedy(30, stop_token_ids=[stop]), greedy(8), greedy(12, logprobs=3)]:
        plain = plain_engine.generate([prompt], params)[0]
        spec = spec_engine.generate([prompt], params)[0]
        assert (spec.token_ids, spec.finish_reason) == (plain.token_ids, plain.finish_reason)
        if params.logprobs:
            assert [lp.token_id for lp in spec.logprobs] == spec.token_ids
            for a, b in zip(spec.logprobs, plain.logprobs):
                assert abs(a.logprob - b.logprob) < 1e-4 and [t for t, _ in a.top] == [t for t, _ in b.top]
    steps = spec_engine.scheduler.spec_stats.steps
    assert tokens(spec_engine, [prompt], greedy(30, stop_token_ids=[stop]))[0] == full[:4]
    assert spec_engine.scheduler.spec_stats.steps == steps + 1  # one verify step; its last two tokens dropped


@pytest.fixture(scope="module")
def text_model(tiny_tokenizer) -> Transformer:
    return small_llama(tiny_tokenizer.vocab_size, seed=3, layers=2)


def test_stop_strings_and_streamed_deltas_match_plain_decoding(text_model, tiny_tokenizer):
    plain_engine = Engine(text_model, tiny_tokenizer)
    spec_engine = Engine(text_model, tiny_tokenizer, speculative=DRAFT, draft=text_model)
    prompt = "def load(path):\n    with open(path) as f:\n        return json.load(f)\n"
    full = plain_engine.generate([prompt], greedy(40))[0]
    stop = full.text[len(full.text) // 2:][:3]  # a stop string somewhere in the middle of the output
    assert stop.strip()
    for params in [greedy(40), greedy(40, stop=[stop])]:
        plain = plain_engine.generate([prompt], params)[0]
        deltas = list(spec_engine.stream([prompt], params))
        spec = deltas[-1].completion
        assert (spec.text, spec.token_ids, spec.finish_reason) == (plain.text, plain.token_ids, plain.finish_reason)
        assert "".join(d.text for d in deltas) == spec.text
        assert [t for d in deltas for t in d.token_ids] == spec.token_ids
        assert max(len(d.token_ids) for d in deltas) > 1  # several tokens arrived in one step
    assert stop not in spec.text and spec.finish_reason == "stop"


# ---- settings ------------------------------------------------------------------------------


def test_bad_settings_are_user_errors(llama, tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match="needs a draft model"):
        Engine(llama, speculative=DRAFT)
    with pytest.raises(UserError, match="vocabulary"):
        Engine(llama, speculative=DRAFT, draft=small_llama(301))
    with pytest.raises(UserError, match="method"):
        SpeculativeConfig("medusa")
    with pytest.raises(UserError, match="tokens"):
        SpeculativeConfig("ngram", num_tokens=0)
    assert Engine(llama, draft=llama).speculative.method == "draft"  # a draft alone means method draft


def test_engine_load_takes_a_draft_directory_with_the_same_tokenizer(text_model, tiny_tokenizer, tmp_path):
    target = hub.save(tmp_path / "target", text_model, tokenizer=tiny_tokenizer)
    draft = hub.save(tmp_path / "draft", small_llama(tiny_tokenizer.vocab_size), tokenizer=tiny_tokenizer)
    engine = Engine.load(target, draft=draft, speculative=DRAFT)
    assert engine.draft is not None and engine.draft.config.hidden_size == 32
    plain = Engine.load(target)
    assert tokens(engine, ["import json\n"], greedy(16)) == tokens(plain, ["import json\n"], greedy(16))
    assert engine.scheduler.spec_stats.drafted > 0
    other = tiny_tokenizer.train(["completely different text " * 50], tiny_tokenizer.vocab_size)
    odd = hub.save(tmp_path / "odd", small_llama(tiny_tokenizer.vocab_size), tokenizer=other)
    with pytest.raises(UserError, match="tokenizer"):
        Engine.load(target, draft=odd)


def test_metrics_expose_the_acceptance_rate_and_accepted_tokens_per_step():
    stats = SpeculationStats(steps=2, rows=3, drafted=12, accepted=9)
    text = Metrics(lambda: Stats(0, 0), lambda: 0, lambda: stats).render().decode()
    assert "foundry_spec_draft_tokens_total 12.0" in text and "foundry_spec_accepted_tokens_total 9.0" in text
    assert "foundry_spec_acceptance_rate 0.75" in text and "foundry_spec_mean_accepted_tokens 3.0" in text
    assert "foundry_spec" not in Metrics(lambda: Stats(0, 0), lambda: 0, lambda: None).render().decode()
