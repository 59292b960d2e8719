"""The mixture-of-experts block and latent attention on their own, and MoE models through the inference engine.

Parity of whole models with transformers, family by family, is in test_families.py; published shapes in
test_families_published.py; training in test_train_moe.py; expert parallelism in test_parallel_ep.py.
"""

import pytest
import torch

from foundry import hub
from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams
from foundry.model import KVCache, Transformer
from foundry.model.moe import Router, SparseMoE, moe_blocks

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=96, initializer_range=0.1)
MIXTRAL = dict(architecture="MixtralForCausalLM", model_type="mixtral", num_key_value_heads=2, num_experts=8,
               num_experts_per_tok=2)
DEEPSEEK = dict(architecture="DeepseekV3ForCausalLM", model_type="deepseek_v3", num_key_value_heads=4, num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                router_scoring="sigmoid", router_correction_bias=True, router_fp32=True, router_groups=4, router_topk_groups=2,
                routed_scaling_factor=2.5, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
                qk_nope_head_dim=16, head_dim=8, v_head_dim=16, rope_interleave=True)
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=20)
PROMPTS = ["def load(path):", "The model directory is the unit of exchange", "x", "héllo wörld"]


def _config(vocab: int = 512, **family) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, **SMALL, **family)


# ---- the block ------------------------------------------------------------------------------

def test_group_limited_routing_chooses_only_within_the_best_groups():
    config = _config(**DEEPSEEK)
    router = Router(config)
    torch.manual_seed(0)
    logits = torch.randn(64, 8)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.randn(8) * 0.5)
        weights, experts = router(logits)
    choice = logits.sigmoid() + router.e_score_correction_bias
    for row in range(64):
        # The reference, spelled out: groups of 2 ranked by their two best scores, the best 2 groups kept,
        # then the top 2 experts among those; weights are the uncorrected scores, renormalised, scaled.
        groups = choice[row].view(4, 2)
        kept = groups.sum(-1).topk(2).indices.tolist()
        allowed = [e for e in range(8) if e // 2 in kept]
        best = sorted(allowed, key=lambda e: -choice[row, e].item())[:2]
        assert sorted(experts[row].tolist()) == sorted(best)
        scores = logits[row].sigmoid()[experts[row]]
        assert torch.allclose(weights[row], 2.5 * scores / scores.sum())


def test_the_sorted_expert_matmuls_equal_a_loop_over_tokens():
    config = _config(**MIXTRAL)
    block = SparseMoE(config)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        out = block(x)
        flat = x.reshape(-1, 64)
        weights, experts = block.gate(block.gate.logits(flat))
        expected = torch.stack([
            sum(w * block.experts[e](token[None])[0] for w, e in zip(weights[i], experts[i].tolist()))
            for i, token in enumerate(flat)])
    assert torch.allclose(out.reshape(-1, 64), expected, atol=1e-6)


def test_routing_is_recorded_only_when_asked_and_counts_every_choice():
    model = Transformer(_config(**MIXTRAL))
    blocks = moe_blocks(model)
    assert len(blocks) == 2
    model(torch.randint(0, 512, (2, 5)))
    assert all(b.routing is None for b in blocks)
    for b in blocks:
        b.record_routing = True
    model(torch.randint(0, 512, (2, 5)))
    load = blocks[0].routing.load(8)
    assert load.sum().item() == 2 * 5 * 2 and blocks[0].routing.logits.shape == (10, 8)


def test_dense_layers_follow_each_familys_rule():
    deepseek = _config(**{**DEEPSEEK, "first_k_dense_replace": 1})
    qwen = ModelConfig(vocab_size=512, **{**SMALL, "num_hidden_layers": 4}, architecture="Qwen3MoeForCausalLM",
                       model_type="qwen3_moe", qk_norm="head", num_key_value_heads=2, num_experts=4,
                       num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3])
    assert [deepseek.is_moe_layer(i) for i in range(2)] == [False, True]
    assert [qwen.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
    model = Transformer(qwen)
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["MLP", "SparseMoE", "MLP", "MLP"]
    assert sum(p.numel() for p in model.parameters()) == qwen.num_params()


def test_inconsistent_moe_configs_are_refused_by_name():
    with pytest.raises(UserError, match="num_experts_per_tok"):
        _config(**{**MIXTRAL, "num_experts_per_tok": 9})
    with pytest.raises(UserError, match="router_groups"):
        _config(**{**DEEPSEEK, "router_groups": 3})
    with pytest.raises(UserError, match="no layer is a mixture"):
        _config(**{**DEEPSEEK, "first_k_dense_replace": 2})
    with pytest.raises(UserError, match="LlamaForCausalLM has no num_experts"):
        _config(num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)


def test_the_latent_kv_cache_stores_the_latent_not_the_heads():
    config = _config(**DEEPSEEK)
    cache = KVCache(config, batch_size=1, max_len=16)
    assert cache.keys[0].shape == (1, 1, 16, 32) and cache.values[0].shape == (1, 1, 16, 8)
    expanded = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)  # 4 x (24 + 16)
    assert config.kv_cache_values_per_token() == 2 * (32 + 8) and expanded == 160


# ---- through the engine ---------------------------------------------------------------------

@pytest.fixture(scope="module", params=["mixtral", "deepseek"])
def moe_dir(request, tmp_path_factory, tiny_tokenizer):
    family = MIXTRAL if request.param == "mixtral" else DEEPSEEK
    config = _config(vocab=tiny_tokenizer.vocab_size, eos_token_id=tiny_tokenizer.eos_id, **family)
    model = Transformer(config)
    model.init_weights(seed=0)
    return hub.save(tmp_path_factory.mktemp(request.param) / "model", model, tokenizer=tiny_tokenizer)


def test_engine_greedy_is_batch_invariant_and_equals_transformers_generate(moe_dir):
    import transformers  # the reference

    engine = Engine.load(moe_dir)
    alone = [engine.generate([p], GREEDY)[0] for p in PROMPTS]
    assert engine.generate(PROMPTS, GREEDY) == alone
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        moe_dir, dtype=torch.float32, experts_implementation="eager").eval()
    stop = sorted(engine.stop_ids)
    for prompt, ours in zip(PROMPTS[:2], alone):
        ids = engine.encode(prompt)
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     do_sample=False, max_new_tokens=20, eos_token_id=stop, pad_token_id=stop[0])
        assert ours.token_ids == out[0, len(ids):].tolist()


def test_the_compiled_step_refuses_moe_models_in_one_line(moe_dir):
    with pytest.raises(UserError, match="mixture-of-experts"):
        Engine.load(moe_dir, compile=True)


def test_serve_defaults_to_the_eager_step_for_moe_and_batches_requests_like_the_engine(moe_dir, tmp_path):
    import asyncio

    import openai
    from test_serve import KEY, Server

    from foundry.cli.engine_flags import build_engine

    assert build_engine(str(moe_dir), compile=None).compiled_step is None  # serve's CPU default
    engine = Engine.load(moe_dir)
    expected = [engine.generate([p], GREEDY)[0].text for p in PROMPTS]
    server = Server(moe_dir, tmp_path / "server.log", "--max-batch-size", "4", env={"FOUNDRY_API_KEY": KEY})
    try:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

        async def all_at_once():
            return await asyncio.gather(*(client.completions.create(
                model="tiny", prompt=p, max_tokens=GREEDY.max_new_tokens, temperature=0) for p in PROMPTS))

        answers = asyncio.run(all_at_once())
    finally:
        server.stop()
    assert [a.choices[0].text for a in answers] == expected


def test_deepseeks_multi_token_prediction_layer_is_passed_over_on_loading(tmp_path):
    # DeepSeek-V3's checkpoints store the MTP module as one more layer (model.layers.61 of 61); neither foundry
    # nor transformers builds it.
    from safetensors.torch import load_file, save_file

    config = _config(**DEEPSEEK).replace(extra={"num_nextn_predict_layers": 1})
    model = Transformer(config)
    model.init_weights(seed=0)
    path = hub.save(tmp_path / "v3", model)
    tensors = load_file(path / "model.safetensors")
    tensors.update({name.replace("layers.1.", "layers.2."): t.clone() for name, t in tensors.items() if "layers.1." in name})
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    loaded = hub.load(path).model
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("family, change, words", [
    ("DeepseekV3ForCausalLM", {"scoring_func": "softmax"}, ["DeepSeek-V3", "scoring_func='softmax'", "'sigmoid'"]),
    ("DeepseekV3ForCausalLM", {"topk_method": "greedy"}, ["DeepSeek-V3", "topk_method='greedy'", "'noaux_tc'"]),
    ("DeepseekV2ForCausalLM", {"topk_method": "noaux_tc"}, ["DeepSeek-V2", "topk_method='noaux_tc'", "greedy"]),
    ("DeepseekV2ForCausalLM", {"norm_topk_prob": True}, ["DeepSeek-V2", "norm_topk_prob=true"]),
    ("DeepseekV2ForCausalLM", {"moe_layer_freq": 2}, ["DeepSeek-V2", "moe_layer_freq=2"]),
])
def test_a_config_json_with_routing_foundry_does_not_build_is_refused_by_name(family, change, words):
    raw = {"architectures": [family], "model_type": "deepseek_v3" if "V3" in family else "deepseek_v2", **change}
    before = dict(raw)
    with pytest.raises(UserError) as refused:
        ModelConfig.from_hf_dict(raw)
    message = str(refused.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert raw == before  # the caller's dict is read, never changed


def test_deepseek_shared_experts_must_be_whole_experts_wide_to_be_saved():
    config = _config(**{**DEEPSEEK, "shared_expert_intermediate_size": 100})  # 64-wide experts
    with pytest.raises(UserError, match="whole number of routed experts wide"):
        config.to_hf_dict()
