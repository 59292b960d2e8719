"""Sampling settings, the next-token sampler and incremental detokenization, without a model."""

import pytest
import torch

from foundry.core.errors import UserError
from foundry.infer.detokenize import TextStream
from foundry.infer.sampling import SamplingParams, apply_penalties, make_generator, sample_next, truncate
from foundry.tokenizer import Tokenizer

TEXT = "Grüße, naïve café — 日本語のテキスト ✓ émoji 🎉 and plain words STOP here. " * 30


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], vocab_size=300)


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
    dict(max_new_tokens=0), dict(max_new_tokens=2.5), dict(repetition_penalty=0.0), dict(seed=-1),
    dict(stop=[""]), dict(stop_token_ids=[-3]), dict(temperature=True),
    dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(logit_bias={5: 101}), dict(logit_bias={-1: 1}),
    dict(logit_bias={"x": 1}), dict(logit_bias=[1]), dict(logprobs=21), dict(logprobs=-1),
])
def test_bad_settings_are_user_errors(bad):
    with pytest.raises(UserError):
        SamplingParams(**bad)


def test_prompt_logprobs_out_of_range_is_named():
    with pytest.raises(UserError, match=r"prompt_logprobs must be an integer in \[0, 20\]"):
        SamplingParams(prompt_logprobs=21)


def test_a_single_stop_string_is_accepted_as_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]


def test_resolve_prefers_user_then_generation_config_then_builtin():
    p = SamplingParams(temperature=0.3).resolve({"temperature": 0.6, "top_k": 20, "do_sample": True})
    assert (p.temperature, p.top_k, p.top_p, p.max_new_tokens) == (0.3, 20, 1.0, 256)
    assert SamplingParams().resolve({"do_sample": False, "temperature": 0.6}).temperature == 0.0
    assert SamplingParams().resolve({}).temperature == 1.0


def test_truncate_keeps_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = truncate(logits, top_k=[2, 0], top_p=[1.0, 0.7]).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    # top_p below the best token's mass still keeps that token.
    assert truncate(logits, top_k=[0, 0], top_p=[0.01, 0.01]).isfinite().sum(-1).tolist() == [1, 1]


def test_rows_sample_only_from_their_own_generator():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, seed=s).resolve() for s in (11, 12, 13)]

    def draw(rows):
        gens = [make_generator(params[i], "cpu") for i in rows]
        return [sample_next(logits[rows], [params[i] for i in rows], gens).tolist() for _ in range(5)]

    together = draw([0, 1, 2])
    alone = draw([1])
    assert [step[1] for step in together] == [step[0] for step in alone]


def test_greedy_rows_take_the_argmax_and_need_no_generator():
    logits = torch.randn(2, 30)
    params = [SamplingParams(temperature=0.0).resolve(), SamplingParams(temperature=0.0, seed=1).resolve()]
    assert make_generator(params[0], "cpu") is None
    assert sample_next(logits, params, [None, None]).tolist() == logits.argmax(-1).tolist()


def test_repetition_penalty_steers_away_from_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    p = [SamplingParams(temperature=0.0, repetition_penalty=1.5).resolve()]
    assert sample_next(logits, p, [None], seen).tolist() == [1]
    assert sample_next(logits, [SamplingParams(temperature=0.0).resolve()], [None], seen).tolist() == [0]


def _stream(tok, text, stop=()):
    ids = tok.encode(text)
    stream = TextStream(tok, [], stop)
    deltas = [stream.add(i) for i in ids] + [stream.finish()]
    return stream, deltas


def test_deltas_never_split_a_character_and_add_up_to_the_text(tok):
    text = "Grüße 日本語 🎉 ✓"
    stream, deltas = _stream(tok, text)
    assert len(tok.encode("🎉")) > 1  # the emoji really is split across byte tokens
    assert "".join(deltas) == text == stream.text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_is_cut_and_never_shown_in_part(tok):
    stream, deltas = _stream(tok, "plain words STOP here", stop=["STOP"])
    assert "".join(deltas) == "plain words " and stream.stopped
    assert not any("S" in d for d in deltas)
    stream, deltas = _stream(tok, "a STOMP b", stop=["STOP"])
    assert "".join(deltas) == "a STOMP b" and not stream.stopped


def test_the_earliest_of_several_stop_strings_wins(tok):
    stream, deltas = _stream(tok, "naïve café — here", stop=["here", "café"])
    assert "".join(deltas) == "naïve " == stream.text


def test_prompt_context_does_not_leak_into_the_output(tok):
    prompt = tok.encode("Grüße, naïve")
    stream = TextStream(tok, prompt)
    deltas = [stream.add(i) for i in tok.encode(" café")] + [stream.finish()]
    assert "".join(deltas) == " café"


def test_presence_and_frequency_penalties_follow_openais_formula():
    logits = torch.zeros(1, 3)
    counts = torch.tensor([[0.0, 2.0, 1.0]])
    assert apply_penalties(logits, counts, [0.5], [0.25]).tolist() == [[0.0, -1.0, -0.75]]


def test_logit_bias_moves_the_greedy_choice_and_keys_may_be_strings():
    params = SamplingParams(temperature=0.0, logit_bias={"2": 5.0}).resolve()
    assert params.logit_bias == {2: 5.0}
    logits = torch.tensor([[1.0, 3.0, 0.0]])
    assert sample_next(logits, [params], [None]).tolist() == [2]
    assert logits.tolist() == [[1.0, 3.0, 0.0]]  # the caller's logits are left alone
