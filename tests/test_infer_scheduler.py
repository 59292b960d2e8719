"""The Scheduler: requests that join and leave mid-way get the tokens they get alone; the KV pool's budget holds."""

import threading

import pytest
import torch

from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.infer.engine import Engine
from foundry.infer.kv_pool import bytes_per_token
from foundry.infer.sampling import SamplingParams
from foundry.infer.scheduler import Scheduler
from foundry.model import Transformer
from test_infer_longrope import ORIGINAL, phi3_config

VOCAB = 200


def llama_config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                       initializer_range=0.1, eos_token_id=None)


def mistral_config() -> ModelConfig:
    # A window much shorter than the sequences, so that a wrong window changes the tokens.
    return ModelConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                       initializer_range=0.1, eos_token_id=None, sliding_window=6,
                       architecture="MistralForCausalLM", model_type="mistral")


CONFIGS = {"llama": llama_config, "mistral-sliding": mistral_config, "phi3-longrope": phi3_config}


def _model(make) -> Transformer:
    model = Transformer(make())
    model.init_weights(seed=0)
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request) -> Transformer:
    return _model(CONFIGS[request.param])


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n)


def naive_greedy(model: Transformer, ids: list[int], steps: int) -> list[int]:
    """Reference: a full forward over the whole sequence each step, no cache."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([ids + out]))[0, -1].argmax()))
    return out


def run_all(scheduler: Scheduler, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]],
            on_step=None) -> dict[str, list[int]]:
    """Step until done, adding arrivals[k] before step k; the tokens of each finished request."""
    out: dict[str, list[int]] = {}
    k = 0
    while scheduler.has_work() or any(step >= k for step in arrivals):
        for rid, ids, params in arrivals.get(k, []):
            scheduler.add_request(rid, ids, params)
        for delta in scheduler.step():
            if delta.completion is not None:
                out[delta.index] = delta.completion.token_ids
        if on_step is not None:
            on_step(scheduler, k)
        k += 1
    return out


# Prompt lengths around Phi-3's original context (32): short ones cross it while decoding, one starts past it.
REQUESTS = {"a": (prompt(1, 9), 30), "b": (prompt(2, 40), 12), "c": (prompt(3, 23), 20), "d": (prompt(4, 3), 6)}


def test_greedy_tokens_alone_equal_joining_and_leaving_mid_way(model):
    engine = Engine(model, prefill_chunk=5)  # a small chunk: prompts are prefilled over several steps
    alone = {rid: naive_greedy(model, ids, n) for rid, (ids, n) in REQUESTS.items()}
    scheduler = Scheduler(engine, prefill_chunk=5)
    # "a" runs first, "b" joins after 3 steps (a long prefill beside a running decode), "c" and "d" later;
    # "d" leaves early while the others go on.
    arrivals = {0: [("a", *REQUESTS["a"])], 3: [("b", *REQUESTS["b"])], 7: [("c", *REQUESTS["c"]),
                                                                           ("d", *REQUESTS["d"])]}
    arrivals = {k: [(rid, ids, greedy(n)) for rid, ids, n in v] for k, v in arrivals.items()}
    batched = run_all(scheduler, arrivals)
    assert batched == alone
    assert scheduler.kv_used_tokens == 0 and scheduler.running == 0


def test_the_engine_gives_the_same_tokens_through_its_scheduler(model):
    engine = Engine(model, prefill_chunk=8)
    ids = [ids for ids, _ in REQUESTS.values()]
    together = engine.generate(ids, [greedy(n) for _, n in REQUESTS.values()])
    assert [c.token_ids for c in together] == [naive_greedy(model, i, n) for i, n in REQUESTS.values()]


@pytest.fixture(scope="module")
def llama() -> Transformer:
    return _model(llama_config)


def test_abort_frees_the_slot_and_the_others_go_on_unchanged(llama):
    engine = Engine(llama)
    scheduler = Scheduler(engine)
    for rid in "abc":
        scheduler.add_request(rid, REQUESTS[rid][0], greedy(20))
    for _ in range(4):
        scheduler.step()
    used = scheduler.kv_used_tokens
    b_length = scheduler.pool.lengths[scheduler.decoding.index(scheduler.requests["b"])]
    scheduler.abort("b")
    assert scheduler.running == 2 and scheduler.kv_used_tokens == used - b_length
    assert "b" not in scheduler.requests
    out = run_all(scheduler, {})
    assert out == {rid: naive_greedy(llama, REQUESTS[rid][0], 20) for rid in "ac"}
    scheduler.abort("b")  # already gone: ignored
    scheduler.add_request("w", REQUESTS["d"][0], greedy(5))
    scheduler.abort("w")  # still waiting
    assert not scheduler.has_work()


def test_a_request_that_does_not_fit_waits_and_runs_later(llama):
    config = llama.config
    per_slot = config.max_position_embeddings * bytes_per_token(config, torch.float32)
    budget = 2 * per_slot + per_slot // 2  # two whole slots, not three
    engine = Engine(llama, kv_cache_memory=budget)
    scheduler = engine.scheduler
    assert scheduler.pool.nbytes <= budget and scheduler.kv_capacity_tokens == 2 * config.max_position_embeddings
    seen = []

    def watch(s, k):
        assert s.pool.nbytes <= budget and s.kv_used_tokens <= s.kv_capacity_tokens
        seen.append((s.running, s.waiting))

    arrivals = {0: [(rid, REQUESTS[rid][0], greedy(n)) for rid, n in zip("abc", (8, 15, 6))]}
    out = run_all(scheduler, arrivals, watch)
    assert seen[0] == (2, 1)  # "c" waits for a slot ...
    assert out["c"] == naive_greedy(llama, REQUESTS["c"][0], 6)  # ... and runs once "a" leaves
    assert out["a"] == naive_greedy(llama, REQUESTS["a"][0], 8)
    assert max(running for running, _ in seen) == 2


def test_a_request_that_can_never_fit_is_refused(llama):
    config = llama.config
    budget = 50 * bytes_per_token(config, torch.float32)  # one slot of 50 positions
    engine = Engine(llama, kv_cache_memory=budget)
    assert engine.scheduler.pool.slot_len == 50
    with pytest.raises(UserError, match="kv_cache_memory"):
        engine.generate([prompt(1, 40)], greedy(20))
    assert not engine.scheduler.has_work()
    assert engine.generate([prompt(1, 40)], greedy(11))[0].token_ids == naive_greedy(llama, prompt(1, 40), 11)
    with pytest.raises(UserError, match="kv_cache_memory"):
        _ = Engine(llama, kv_cache_memory=10).scheduler


def test_closing_a_stream_aborts_its_requests(llama):
    engine = Engine(llama)
    stream = engine.stream([prompt(1, 5), prompt(2, 7)], [greedy(3), greedy(30)])
    first = next(stream)  # no tokenizer, so no text: the first delta is the short request's completion
    assert first.index == 0 and first.completion is not None
    assert engine.scheduler.running == 1
    stream.close()
    assert not engine.scheduler.has_work() and engine.scheduler.kv_used_tokens == 0


class OnlyFrom:
    """A fake constraint: only tokens of `allowed`, finished after `length` tokens."""

    def __init__(self, allowed: set[int], length: int):
        self.allowed, self.length, self.taken = allowed, length, []

    def mask(self, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[list(self.allowed)] = True
        return mask

    def advance(self, token_id: int) -> None:
        self.taken.append(token_id)

    def is_finished(self) -> bool:
        return len(self.taken) >= self.length


def test_a_constraint_masks_tokens_is_advanced_and_ends_the_request(llama):
    engine = Engine(llama)
    allowed = {3, 17, 99}
    constraint = OnlyFrom(allowed, 3)
    params = [SamplingParams(temperature=1.0, seed=1, max_new_tokens=10, constraint=constraint), greedy(10)]
    assert params[0] == SamplingParams(temperature=1.0, seed=1, max_new_tokens=10)  # not part of equality
    constrained, free = engine.generate([prompt(1, 5), prompt(2, 5)], params)
    assert constrained.finish_reason == "stop" and len(constrained.token_ids) == 3
    assert set(constrained.token_ids) <= allowed and constraint.taken == constrained.token_ids
    assert free.token_ids == naive_greedy(llama, prompt(2, 5), 10)  # its neighbour is untouched
    greedy_constrained = engine.generate([prompt(1, 5)], SamplingParams(temperature=0.0, max_new_tokens=10,
                                                                        constraint=OnlyFrom({5, 6}, 2)))[0]
    assert set(greedy_constrained.token_ids) <= {5, 6} and len(greedy_constrained.token_ids) == 2


def test_logprobs_are_the_models_and_come_with_every_token(llama):
    engine = Engine(llama)
    ids = prompt(1, 6)
    params = SamplingParams(temperature=0.0, max_new_tokens=5, logprobs=3)
    deltas = list(engine.stream([ids], params))
    completion = deltas[-1].completion
    assert [t for d in deltas for t in d.token_ids] == completion.token_ids
    assert [e for d in deltas for e in d.logprobs] == completion.logprobs
    with torch.no_grad():
        expected = llama(torch.tensor([ids + completion.token_ids]))[0, len(ids) - 1:-1].log_softmax(-1)
    for step, entry in enumerate(completion.logprobs):
        assert entry.token_id == completion.token_ids[step]
        assert entry.logprob == pytest.approx(float(expected[step, entry.token_id]), abs=1e-4)
        assert [t for t, _ in entry.top] == expected[step].topk(3).indices.tolist()
        assert entry.top[0] == (entry.token_id, entry.logprob)  # greedy took the most likely
    assert engine.generate([ids], greedy(5))[0].logprobs is None


def test_streams_from_several_threads_share_the_scheduler_and_keep_their_tokens(llama):
    engine = Engine(llama, prefill_chunk=5)
    scheduler, busiest = engine.scheduler, []
    step = scheduler.step

    def counting_step():
        busiest.append(scheduler.running)
        return step()

    scheduler.step = counting_step
    results, start = {}, threading.Barrier(len(REQUESTS))

    def run(rid: str) -> None:
        ids, n = REQUESTS[rid]
        start.wait()
        results[rid] = engine.generate([ids], greedy(n))[0].token_ids

    threads = [threading.Thread(target=run, args=(rid,)) for rid in REQUESTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {rid: naive_greedy(llama, ids, n) for rid, (ids, n) in REQUESTS.items()}
    assert max(busiest) > 1  # they really ran in one batch


def test_prompt_logprobs_score_every_prompt_token_across_chunks_and_skip_the_prefix_cache(llama):
    engine = Engine(llama, prefill_chunk=4)  # the 10-token prompt is scored over three chunks
    ids = prompt(7, 10)
    engine.generate([ids + [1, 2]], greedy(2))  # leaves a cached entry sharing the whole prompt
    params = SamplingParams(temperature=0.0, max_new_tokens=3, prompt_logprobs=2)
    deltas = list(engine.stream([ids], params))
    completion = deltas[-1].completion
    assert deltas[0].prompt_logprobs == completion.prompt_logprobs
    assert all(d.prompt_logprobs is None for d in deltas[1:])  # sent once, on the first delta
    assert completion.cached_tokens == 0  # a cached prefix has no logits to score
    with torch.no_grad():
        expected = llama(torch.tensor([ids]))[0].log_softmax(-1)
    first, *rest = completion.prompt_logprobs
    assert (first.token_id, first.logprob) == (ids[0], None) and len(rest) == len(ids) - 1
    for position, entry in enumerate(rest):
        assert entry.token_id == ids[position + 1]
        assert entry.logprob == pytest.approx(float(expected[position, entry.token_id]), abs=1e-4)
        assert [t for t, _ in entry.top] == expected[position].topk(2).indices.tolist()
    # ... and the generated tokens are those of a request that did not ask
    assert completion.token_ids == engine.generate([ids], greedy(3))[0].token_ids
    assert engine.generate([ids], greedy(3))[0].prompt_logprobs is None


def naive_penalised(model: Transformer, ids: list[int], steps: int, presence: float, frequency: float,
                    bias: dict[int, float]) -> list[int]:
    """Reference: full forwards, OpenAI's penalties over the generated tokens, then the bias, then argmax."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out]))[0, -1]
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=VOCAB).float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
            for t, b in bias.items():
                logits[t] += b
            out.append(int(logits.argmax()))
    return out


def test_penalties_and_logit_bias_change_the_tokens_as_the_reference_does(llama):
    engine = Engine(llama)
    ids = prompt(3, 8)
    cases = [(0.0, 1.5, {}), (1.0, 0.0, {}), (0.0, 0.0, {7: 8.0, 9: -100.0}), (0.5, 0.5, {7: 3.0})]
    params = [SamplingParams(temperature=0.0, max_new_tokens=30, presence_penalty=p, frequency_penalty=f,
                             logit_bias=b) for p, f, b in cases]
    got = engine.generate([ids] * len(cases), params)
    expected = [naive_penalised(llama, ids, 30, p, f, b) for p, f, b in cases]
    assert [c.token_ids for c in got] == expected
    assert expected[0] != naive_greedy(llama, ids, 30)  # the penalty did change something
    with pytest.raises(UserError, match="logit_bias token id"):
        engine.generate([ids], SamplingParams(logit_bias={VOCAB: 1.0}))


def test_n_samples_of_one_prompt_share_its_cache(llama):
    engine = Engine(llama)
    ids = prompt(5, 12)
    params = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=8) for s in range(3)]
    together = engine.generate([ids] * 3, params)
    assert [c.cached_tokens for c in together] == [0, len(ids) - 1, len(ids) - 1]
    alone = [Engine(llama, prefix_caching=False).generate([ids], p)[0] for p in params]
    assert together == alone and len({tuple(c.token_ids) for c in alone}) > 1


def test_the_pool_is_persistent_across_calls(llama):
    engine = Engine(llama)
    engine.generate([prompt(1, 5)], greedy(3))
    pool = engine.scheduler.pool
    engine.generate([prompt(2, 9)], greedy(3))
    assert engine.scheduler.pool is pool


def test_the_phi3_requests_cross_the_original_context():
    # Guard on the data: the LongRoPE case above exercises both a mid-decode crossing and a long prompt.
    lengths = [len(ids) + n for ids, n in REQUESTS.values()]
    assert any(len(ids) <= ORIGINAL < len(ids) + n for ids, n in REQUESTS.values())
    assert any(len(ids) > ORIGINAL for ids, _ in REQUESTS.values()) and max(lengths) < 128


# ---- prefix cache ----------------------------------------------------------------------------

SYSTEM = prompt(10, 20)  # a shared "system prompt"


def test_prefix_caching_leaves_the_tokens_unchanged(model):
    cached, plain = Engine(model, prefill_chunk=8), Engine(model, prefill_chunk=8, prefix_caching=False)
    first = [SYSTEM + prompt(11, 4), SYSTEM + prompt(12, 9)]
    later = [SYSTEM + prompt(13, 6), first[0], SYSTEM[:12]]
    params = [greedy(14), greedy(20), greedy(9)]
    for batch in (first, later):
        with_cache = cached.generate(batch, params[:len(batch)])
        assert with_cache == plain.generate(batch, params[:len(batch)])
    assert cached.scheduler.kv_cached_tokens > 0 and plain.scheduler.kv_cached_tokens == 0


def test_cached_tokens_are_counted(llama):
    engine = Engine(llama)
    assert engine.generate([SYSTEM + prompt(11, 4)], greedy(5))[0].cached_tokens == 0
    again = engine.generate([SYSTEM + prompt(12, 7), SYSTEM + prompt(11, 4)], greedy(5))
    assert [c.cached_tokens for c in again] == [len(SYSTEM), len(SYSTEM) + 3]  # the last prompt token is fed
    # A request that joins while another with its prefix is still running copies from the running row.
    scheduler = Scheduler(engine)
    out = {}
    scheduler.add_request("a", SYSTEM + prompt(14, 3), greedy(10))
    scheduler.step()
    scheduler.add_request("b", SYSTEM + prompt(15, 2), greedy(4))
    while scheduler.has_work():
        out.update({d.index: d.completion for d in scheduler.step() if d.completion})
    assert (out["a"].cached_tokens, out["b"].cached_tokens) == (0, len(SYSTEM))
    assert out["b"].token_ids == naive_greedy(llama, SYSTEM + prompt(15, 2), 4)


def test_cache_entries_give_way_to_running_requests(llama):
    config = llama.config
    budget = 2 * config.max_position_embeddings * bytes_per_token(config, torch.float32)
    engine = Engine(llama, kv_cache_memory=budget)
    scheduler = engine.scheduler
    assert scheduler.pool.num_slots == 2
    engine.generate([SYSTEM + prompt(11, 4)], greedy(3))
    assert list(scheduler.prefix_cache.entries) == [1]  # kept in the idle slot
    # Both slots are wanted now: the entry's slot is taken, by the request that reuses it.
    prompts = [prompt(17, 6), SYSTEM + prompt(18, 3)]
    together = engine.generate(prompts, greedy(6))
    assert [c.token_ids for c in together] == [naive_greedy(llama, p, 6) for p in prompts]
    assert [c.cached_tokens for c in together] == [0, len(SYSTEM)]
    assert scheduler.pool.nbytes <= budget
    # Both finished in one step with every slot busy: the cache only ever uses idle slots, so neither is kept.
    assert len(scheduler.prefix_cache.entries) == 0
