"""Parity with transformers, family by family, on random weights saved by `save_pretrained`.

Every family gets awkward shapes (head_dim not hidden/heads where the family allows it, GQA ratio 4, an odd
vocabulary, sequences longer than any sliding window). Weights are perturbed after transformers' own init so
that biases and norm scales are not zeros and ones. Checked per family: fp32 logits, the first 32 greedy
tokens, bf16 logits, KV-cache decoding, and a foundry export (sharded) loaded back in transformers.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from foundry import hub  # noqa: E402
from foundry.model import KVCache  # noqa: E402

import transformers  # noqa: E402  (the reference: missing, collection fails loudly instead of skipping)
transformers.logging.set_verbosity_error()

VOCAB = 1001
SHAPE = dict(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=200, max_position_embeddings=256)
WINDOW = 16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
PHI3_LONGROPE = {"type": "longrope", "short_factor": [1.0 + i / 10 for i in range(6)],
                 "long_factor": [2.0 + i for i in range(6)]}
SLIDING, FULL = "sliding_attention", "full_attention"


def _configs():
    t = transformers
    return {
        "llama": lambda: t.LlamaConfig(**SHAPE, head_dim=20, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
        "llama-bias": lambda: t.LlamaConfig(**SHAPE, head_dim=20, attention_bias=True, mlp_bias=True,
                                            tie_word_embeddings=True),
        "mistral": lambda: t.MistralConfig(**SHAPE, head_dim=20, sliding_window=WINDOW),
        "qwen2": lambda: t.Qwen2Config(**SHAPE, tie_word_embeddings=True),
        "qwen2-sliding": lambda: t.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=WINDOW,
                                               max_window_layers=1, rope_scaling={
                                                   "rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 64}),
        "qwen3": lambda: t.Qwen3Config(**SHAPE, head_dim=20),
        # Positions past original_max_position_embeddings (32) switch LongRoPE to its long factors.
        "phi3": lambda: t.Phi3Config(**SHAPE, original_max_position_embeddings=32, rope_scaling=PHI3_LONGROPE,
                                     sliding_window=24, pad_token_id=0, eos_token_id=1),
        "gemma2": lambda: t.Gemma2Config(**SHAPE, head_dim=20, sliding_window=WINDOW, query_pre_attn_scalar=24),
        "gemma3": lambda: t.Gemma3TextConfig(**SHAPE, head_dim=20, sliding_window=WINDOW,
                                             layer_types=[SLIDING, FULL, SLIDING],
                                             rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "olmo2": lambda: t.Olmo2Config(**SHAPE),
        "gpt2": lambda: t.GPT2Config(vocab_size=VOCAB, n_embd=96, n_layer=3, n_head=8, n_positions=256),
        # Mixtures of experts: fewer experts than the real ones, the same switches.
        "mixtral": lambda: t.MixtralConfig(**SHAPE, head_dim=20, num_local_experts=4, num_experts_per_tok=2),
        "qwen2-moe": lambda: t.Qwen2MoeConfig(**SHAPE, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
                                              shared_expert_intermediate_size=56, mlp_only_layers=[1]),
        "qwen3-moe": lambda: t.Qwen3MoeConfig(**SHAPE, head_dim=20, num_experts=6, num_experts_per_tok=3,
                                              moe_intermediate_size=40, decoder_sparse_step=2, norm_topk_prob=True),
        # Latent attention (with query compression and YaRN's softmax scale), group-limited sigmoid routing,
        # two shared experts, one dense layer first.
        "deepseek-v3": lambda: t.DeepseekV3Config(
            **{**SHAPE, "num_key_value_heads": 8}, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=40,
            first_k_dense_replace=1, n_group=4, topk_group=2, n_shared_experts=2, kv_lora_rank=24, q_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=16, routed_scaling_factor=2.5,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                          "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}),
        # Queries without the low-rank bottleneck, RoPE on the two halves instead of interleaved pairs.
        "deepseek-v3-plain-q": lambda: t.DeepseekV3Config(
            **{**SHAPE, "num_key_value_heads": 8}, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
            first_k_dense_replace=0, n_group=1, topk_group=1, kv_lora_rank=24, q_lora_rank=None, qk_rope_head_dim=8,
            qk_nope_head_dim=12, v_head_dim=16, rope_interleave=False),
        # Softmax routing limited to the groups with the best single expert; no shared expert gate.
        "deepseek-v2": lambda: t.DeepseekV2Config(
            **{**SHAPE, "num_key_value_heads": 8}, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=40,
            first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2, n_shared_experts=1,
            kv_lora_rank=24, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=16,
            routed_scaling_factor=1.5),
    }


FAMILIES = list(_configs())
MOE = {"mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3", "deepseek-v3-plain-q", "deepseek-v2"}


def _reference_options(name: str) -> dict:
    # transformers' default experts kernels are for GPUs; on CPU the reference runs its eager loop over experts.
    return {"experts_implementation": "eager"} if name in MOE else {}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, transformers model in fp32, its save_pretrained directory)."""
    name = request.param
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(_configs()[name](), **_reference_options(name)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
        for buffer_name, buffer in reference.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):  # DeepSeek's balancing bias steers the choice
                buffer.add_(torch.randn(buffer.shape, generator=gen) * 0.05)
    path = tmp_path_factory.mktemp(name) / "hf"
    reference.save_pretrained(path)
    return name, reference, path


def _ids(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, prompt: torch.Tensor, steps: int, logits_of) -> list[int]:
    # Full forwards each step: the plainest greedy loop, the same on both sides.
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, logits_of(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def test_fp32_logits_and_greedy_tokens_equal_transformers(family):
    name, reference, path = family
    ours = hub.load(path).model
    assert ours.config.architecture == reference.config.architectures[0]
    assert sum(p.numel() for p in ours.parameters()) == ours.config.num_params() == reference.num_parameters()
    ids = _ids(2, 40)  # longer than the sliding windows and Phi-3's original context
    with torch.no_grad():
        diff = (ours(ids) - reference(ids).logits).abs().max().item()
    assert diff < 1e-4, f"{name}: max abs logit diff {diff:.2e}"
    prompt = _ids(1, 8, seed=3)
    theirs = _greedy(reference, prompt, 32, lambda m, x: m(x).logits)
    assert _greedy(ours, prompt, 32, lambda m, x: m(x)) == theirs


def test_bf16_logits_as_accurate_as_transformers(family):
    # bf16 keeps 8 significant bits: at logits of magnitude ~2.5 one rounding step is 2^-6 = 0.016. Both
    # implementations are judged against the fp32 reference: ours may be at most 25% less accurate than
    # transformers' own bf16 run, and the two may differ by a few rounding steps (GEMM accumulation order).
    name, reference, path = family
    ids = _ids(2, 40)
    with torch.no_grad():
        exact = reference(ids).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, **_reference_options(name)).eval()(ids).logits
        ours = hub.load(path, dtype=torch.bfloat16).model(ids)
    assert ours.dtype == torch.bfloat16
    our_error = (ours.float() - exact).abs().max().item()
    their_error = (theirs.float() - exact).abs().max().item()
    assert our_error <= 1.25 * their_error + 1e-3, f"{name}: bf16 error {our_error:.3e} vs {their_error:.3e}"
    if name not in MOE:  # in a mixture, bf16 rounding can flip a near-tie routing choice on either side
        assert (ours.float() - theirs.float()).abs().max().item() < 0.05


def test_kv_cache_decoding_equals_full_forward(family):
    name, _, path = family
    ours = hub.load(path).model
    ids = _ids(2, 60)
    prefill = 36  # already past Phi-3's original context, so LongRoPE uses one set of factors throughout
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(ours.config, batch_size=2, max_len=64)
        steps = [ours(ids[:, :prefill], cache=cache)]
        steps += [ours(ids[:, i:i + 1], cache=cache) for i in range(prefill, ids.shape[1])]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4


def test_export_loads_in_transformers_with_equal_logits(family, tmp_path):
    name, reference, path = family
    out = hub.export(path, tmp_path / "export", shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()  # small shards force the sharded layout
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **_reference_options(name)).eval()
    ids = _ids(2, 40)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, reference(ids).logits)
    # The config transformers reads back is the one it wrote, up to bookkeeping keys.
    ignore = {"_name_or_path", "dtype", "torch_dtype", "transformers_version"}
    before, after = reference.config.to_dict(), again.config.to_dict()
    assert _comparable(after, ignore) == _comparable(before, ignore)


def _comparable(config: dict, ignore: set[str]) -> dict:
    # DeepSeek's files also spell the RoPE type with the legacy `type` key (its own modelling code reads it).
    out = {k: v for k, v in config.items() if k not in ignore}
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("type") == rope.get("rope_type"):
        out["rope_parameters"] = {k: v for k, v in rope.items() if k != "type"}
    return out
