"""Named model presets: tiny shapes for tests and the demo, and the published Llama 3 shapes."""

from __future__ import annotations

import dataclasses

from foundry.config.model_config import ModelConfig
from foundry.core.errors import UserError

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Named presets. The Llama 3 shapes are the published ones (Meta's config.json files).
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
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


__all__ = ["PRESETS", "preset"]
