"""Phi-3 LongRoPE in the engine: each sequence picks its frequency set by its own length, never by its batch."""

import pytest
import torch

from foundry import hub
from foundry.config import ModelConfig
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams
from foundry.model import Transformer

ORIGINAL = 32  # original_max_position_embeddings: sequences longer than this use the long factors
SHORT_PROMPT = [7, 3, 90, 41, 5, 66, 12]
LONG_PROMPT = [(11 * i + 5) % 200 for i in range(ORIGINAL + 9)]


def phi3_config() -> ModelConfig:
    """A tiny Phi-3 whose long factors differ a lot from the short ones, so a wrong choice changes the tokens."""
    half = 16 // 2  # head_dim 16: 8 rotation pairs
    scaling = {"rope_type": "longrope", "original_max_position_embeddings": ORIGINAL,
               "short_factor": [1.0 + i / 10 for i in range(half)], "long_factor": [3.0 + 2 * i for i in range(half)]}
    return ModelConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                       rope_scaling=scaling, initializer_range=0.1, architecture="Phi3ForCausalLM",
                       model_type="phi3", eos_token_id=None,
                       # Phi-3's config.json also spells it at the top level, where transformers reads it.
                       extra={"original_max_position_embeddings": ORIGINAL})


@pytest.fixture(scope="module")
def model() -> Transformer:
    model = Transformer(phi3_config())
    model.init_weights(seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    return Engine(model)


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)


def naive_greedy(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    """Reference: a full forward over the whole sequence each step (what transformers computes for one sequence)."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([prompt + out]))[0, -1].argmax()))
    return out


def test_a_short_row_keeps_its_logits_beside_a_long_one(model):
    alone_ids = torch.tensor([SHORT_PROMPT])
    width = len(LONG_PROMPT)
    ids = torch.zeros(2, width, dtype=torch.long)
    pad_mask = torch.zeros(2, width, dtype=torch.bool)
    ids[0], pad_mask[0] = torch.tensor(LONG_PROMPT), True
    ids[1, width - len(SHORT_PROMPT):], pad_mask[1, width - len(SHORT_PROMPT):] = alone_ids[0], True
    positions = (pad_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(alone_ids)[0]
        batched = model(ids, positions, pad_mask=pad_mask)
        long_alone = model(torch.tensor([LONG_PROMPT]))[0]
    assert (batched[1, pad_mask[1]] - alone).abs().max() < 1e-5
    assert (batched[0] - long_alone).abs().max() < 1e-5


def test_greedy_tokens_do_not_depend_on_the_batch(engine):
    alone = engine.generate([SHORT_PROMPT], greedy(12))[0]
    together = engine.generate([SHORT_PROMPT, LONG_PROMPT], greedy(12))
    assert together[0] == alone
    assert together[1] == engine.generate([LONG_PROMPT], greedy(12))[0]


def test_a_sequence_that_grows_past_the_original_context_matches_full_forwards(model, engine):
    # 20 tokens of prompt, 30 new ones: the switch to the long factors happens mid-decode, where transformers
    # recomputes the whole sequence with them. The engine must give the tokens of full forwards.
    prompt = LONG_PROMPT[:20]
    expected = naive_greedy(model, prompt, 30)
    assert engine.generate([prompt], greedy(30))[0].token_ids == expected
    # ... also when it crosses while another row (already long) shares its batch
    assert engine.generate([prompt, LONG_PROMPT], greedy(30))[0].token_ids == expected
    assert engine.generate([LONG_PROMPT, prompt], greedy(30))[1].token_ids == expected


def test_transformers_generate_gives_the_same_tokens(model, tmp_path):
    import transformers  # a test reference: its absence must fail, not skip

    path = hub.save(tmp_path / "phi3", model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = LONG_PROMPT[:20]
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=30, pad_token_id=0, eos_token_id=None)
    assert Engine(model).generate([prompt], greedy(30))[0].token_ids == out[0, len(prompt):].tolist()
