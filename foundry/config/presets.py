"""Named model presets: tiny shapes for tests and the demo, and published shapes (Llama 3, Mixtral, Qwen3-MoE,
DeepSeek-V3), each as its Hub config.json spells it."""

from __future__ import annotations

import dataclasses

from foundry.config.model_config import ModelConfig
from foundry.core.errors import UserError

# DeepSeek-V3's YaRN extension of its 4K pre-training context to 128K (163,840 positions in config.json).
_DEEPSEEK_V3_YARN = {"rope_type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Named presets. The published shapes are those of the Hub's config.json files: Meta's Llama 3,
# mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B and deepseek-ai/DeepSeek-V3 (its fp8 quantization_config and the
# multi-token-prediction layer, num_nextn_predict_layers, left out: foundry builds neither).
PRESETS: dict[str, ModelConfig] = {
    # ~1.3M parameters: the test model.
    "tiny": ModelConfig(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=384, max_position_embeddings=1024,
                        tie_word_embeddings=True),
    # ~5M parameters: the demo model, trains visibly in minutes on two CPU cores.
    "mini": ModelConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=768, max_position_embeddings=1024,
                        tie_word_embeddings=True),
    # ~15.7M parameters: the benchmark model of ENVIRONMENT.md.
    "small": ModelConfig(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                         num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=2048),
    # ~3.1M parameters (1.3M active): the test and demo mixture of experts, Mixtral's layout at tiny's shape with
    # eight 192-wide experts, two per token.
    "moe-tiny": ModelConfig(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=192, num_experts=8, num_experts_per_tok=2,
                            router_aux_loss_coef=0.02, max_position_embeddings=1024, tie_word_embeddings=True,
                            architecture="MixtralForCausalLM", model_type="mixtral"),
    "llama3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=64, intermediate_size=8192, rope_theta=500000.0,
                               rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
                               tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama3.2-3b": ModelConfig(vocab_size=128256, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                               num_key_value_heads=8, head_dim=128, intermediate_size=8192, rope_theta=500000.0,
                               rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
                               tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0,
                             max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    "llama3-70b": ModelConfig(vocab_size=128256, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                              num_key_value_heads=8, intermediate_size=28672, rope_theta=500000.0,
                              max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    "llama3-405b": ModelConfig(vocab_size=128256, hidden_size=16384, num_hidden_layers=126, num_attention_heads=128,
                               num_key_value_heads=8, intermediate_size=53248, rope_theta=500000.0,
                               rope_scaling=dict(_LLAMA3_ROPE), max_position_embeddings=131072,
                               bos_token_id=128000, eos_token_id=128001),
    # 46.7B parameters, 12.9B active.
    "mixtral-8x7b": ModelConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, intermediate_size=14336, num_experts=8, num_experts_per_tok=2,
                                router_aux_loss_coef=0.02, rope_theta=1_000_000.0, max_position_embeddings=32768,
                                bos_token_id=1, eos_token_id=2, architecture="MixtralForCausalLM",
                                model_type="mixtral"),
    # 30.5B parameters, 3.3B active.
    "qwen3-30b-a3b": ModelConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                 num_key_value_heads=4, head_dim=128, intermediate_size=6144, num_experts=128,
                                 num_experts_per_tok=8, moe_intermediate_size=768, router_aux_loss_coef=0.001,
                                 qk_norm="head", rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                                 max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
                                 architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe"),
    # 671B parameters, 37.6B active: 3 dense layers, then 58 of 256 routed experts (8 per token, chosen within the
    # best 4 of 8 groups by sigmoid scores) plus one shared expert; latent attention caches 512 + 64 numbers a layer.
    "deepseek-v3": ModelConfig(vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                               num_key_value_heads=128, head_dim=64, intermediate_size=18432, num_experts=256,
                               num_experts_per_tok=8, moe_intermediate_size=2048, shared_expert_intermediate_size=2048,
                               router_scoring="sigmoid", norm_topk_prob=True, router_correction_bias=True,
                               router_fp32=True, router_groups=8, router_topk_groups=4, routed_scaling_factor=2.5,
                               first_k_dense_replace=3, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
                               v_head_dim=128, rope_interleave=True, rope_theta=10000.0,
                               rope_scaling=dict(_DEEPSEEK_V3_YARN), rms_norm_eps=1e-6,
                               max_position_embeddings=163840, bos_token_id=0, eos_token_id=1,
                               architecture="DeepseekV3ForCausalLM", model_type="deepseek_v3"),
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


__all__ = ["PRESETS", "preset"]
