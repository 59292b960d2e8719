"""The transformer: exact parameter counts, parity with transformers, cache and padding paths."""

import pytest
import torch

from foundry import hub
from foundry.config import PRESETS, ModelConfig, preset
from foundry.model import KVCache, Transformer

AWKWARD = ModelConfig(vocab_size=1001, hidden_size=96, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=20, intermediate_size=200, max_position_embeddings=256,
                      rope_theta=50000.0)


def _model(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights(seed)
    return model.eval()


@pytest.mark.parametrize("name", ["tiny", "mini", "small"])
def test_num_params_matches_instantiated_small_presets(name):
    config = preset(name)
    assert sum(p.numel() for p in Transformer(config).parameters()) == config.num_params()


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("llama")])
def test_num_params_matches_meta_model_for_published_shapes(name):
    config = preset(name)
    with torch.device("meta"):
        model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()


def test_llama3_preset_counts_are_the_published_ones():
    # Meta's model cards: 8.03B, 70.6B, 405B parameters.
    assert round(preset("llama3-8b").num_params() / 1e9, 2) == 8.03
    assert round(preset("llama3-70b").num_params() / 1e9, 1) == 70.6
    assert round(preset("llama3-405b").num_params() / 1e9) == 406


@pytest.mark.parametrize("config", [
    AWKWARD,
    AWKWARD.replace(tie_word_embeddings=True, attention_bias=True),
    AWKWARD.replace(rope_theta=500000.0, max_position_embeddings=8192, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
], ids=["gqa4-headdim20", "tied-bias", "llama3-rope"])
def test_logits_equal_transformers_on_a_saved_checkpoint(tmp_path, config):
    import transformers  # a reference library: missing, the test fails (never skips)
    model = _model(config)
    hub.save(tmp_path / "m", model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    loaded = hub.load(tmp_path / "m").model
    with torch.no_grad():
        assert torch.equal(loaded(ids), ours)


def test_kv_cache_decoding_equals_full_forward():
    model = _model(AWKWARD)
    ids = torch.randint(0, AWKWARD.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(AWKWARD, batch_size=2, max_len=64)
        steps = [model(ids[:, :25], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(25, 40)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("config", [AWKWARD, AWKWARD.replace(
    architecture="Qwen3ForCausalLM", model_type="qwen3", qk_norm="head", sliding_window=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"])], ids=["full", "sliding-window-4"])
def test_left_padding_gives_each_row_its_unpadded_logits(config):
    model = _model(config)
    gen = torch.Generator().manual_seed(3)
    short, long = torch.randint(0, 1000, (1, 7), generator=gen), torch.randint(0, 1000, (1, 12), generator=gen)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    pad_mask = batch.new_ones(batch.shape, dtype=torch.bool)
    pad_mask[0, :5] = False
    positions = (pad_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(batch, positions=positions, pad_mask=pad_mask)
        cache = KVCache(config, batch_size=2, max_len=16)
        cached = model(batch, positions=positions, cache=cache, pad_mask=pad_mask)
        assert (batched[0, 5:] - model(short)[0]).abs().max() < 1e-5
        assert (batched[1] - model(long)[0]).abs().max() < 1e-5
        assert (cached - batched)[pad_mask].abs().max() < 1e-5
