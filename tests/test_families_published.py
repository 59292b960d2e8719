"""Published config.json files of each family (as on the Hub, transformers 4 spellings): read, counted, written back.

For every one: ModelConfig's parameter count equals the instantiated model's, transformers' own (on the meta
device) and, where the model card gives it, the published figure; and the config.json foundry writes back
gives transformers the same config as the original.
"""

import pytest
import torch
import transformers  # the reference: missing, collection fails loudly instead of skipping

from foundry.config import ModelConfig
from foundry.model import Transformer

transformers.logging.set_verbosity_error()

# Phi-3.5-mini's 48 LongRoPE factors, shortened to a pattern of the right length (only the count matters here).
LONGROPE_48 = {"long_factor": [1.0 + i / 16 for i in range(48)], "short_factor": [1.0 + i / 64 for i in range(48)],
               "type": "longrope"}

# name -> (config.json, published parameter count or None)
PUBLISHED = {
    "Llama-3.2-1B": (
        {'architectures': ['LlamaForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
         'bos_token_id': 128000, 'eos_token_id': 128001, 'head_dim': 64, 'hidden_act': 'silu', 'hidden_size': 2048,
         'initializer_range': 0.02, 'intermediate_size': 8192, 'max_position_embeddings': 131072, 'mlp_bias': False,
         'model_type': 'llama', 'num_attention_heads': 32, 'num_hidden_layers': 16, 'num_key_value_heads': 8,
         'pretraining_tp': 1, 'rms_norm_eps': 1e-05,
         'rope_scaling': {'factor': 32.0, 'high_freq_factor': 4.0, 'low_freq_factor': 1.0,
                          'original_max_position_embeddings': 8192, 'rope_type': 'llama3'}, 'rope_theta': 500000.0,
         'tie_word_embeddings': True, 'torch_dtype': 'bfloat16', 'transformers_version': '4.45.0.dev0',
         'use_cache': True, 'vocab_size': 128256},
        1235814400),
    "Mistral-7B-v0.1": (
        {'architectures': ['MistralForCausalLM'], 'bos_token_id': 1, 'eos_token_id': 2, 'hidden_act': 'silu',
         'hidden_size': 4096, 'initializer_range': 0.02, 'intermediate_size': 14336,
         'max_position_embeddings': 32768, 'model_type': 'mistral', 'num_attention_heads': 32,
         'num_hidden_layers': 32, 'num_key_value_heads': 8, 'rms_norm_eps': 1e-05, 'rope_theta': 10000.0,
         'sliding_window': 4096, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
         'transformers_version': '4.34.0.dev0', 'use_cache': True, 'vocab_size': 32000},
        7241732096),
    "Qwen2.5-0.5B": (
        {'architectures': ['Qwen2ForCausalLM'], 'attention_dropout': 0.0, 'bos_token_id': 151643,
         'eos_token_id': 151643, 'hidden_act': 'silu', 'hidden_size': 896, 'initializer_range': 0.02,
         'intermediate_size': 4864, 'max_position_embeddings': 32768, 'max_window_layers': 24, 'model_type': 'qwen2',
         'num_attention_heads': 14, 'num_hidden_layers': 24, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-06,
         'rope_theta': 1000000.0, 'sliding_window': 32768, 'tie_word_embeddings': True, 'torch_dtype': 'bfloat16',
         'transformers_version': '4.40.1', 'use_cache': True, 'use_sliding_window': False, 'vocab_size': 151936},
        None),
    "Qwen3-0.6B": (
        {'architectures': ['Qwen3ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
         'bos_token_id': 151643, 'eos_token_id': 151645, 'head_dim': 128, 'hidden_act': 'silu', 'hidden_size': 1024,
         'initializer_range': 0.02, 'intermediate_size': 3072, 'max_position_embeddings': 40960,
         'max_window_layers': 28, 'model_type': 'qwen3', 'num_attention_heads': 16, 'num_hidden_layers': 28,
         'num_key_value_heads': 8, 'rms_norm_eps': 1e-06, 'rope_scaling': None, 'rope_theta': 1000000,
         'sliding_window': None, 'tie_word_embeddings': True, 'torch_dtype': 'bfloat16',
         'transformers_version': '4.51.0', 'use_cache': True, 'use_sliding_window': False, 'vocab_size': 151936},
        None),
    "Phi-3-mini-4k": (
        {'architectures': ['Phi3ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0, 'bos_token_id': 1,
         'embd_pdrop': 0.0, 'eos_token_id': 32000, 'hidden_act': 'silu', 'hidden_size': 3072,
         'initializer_range': 0.02, 'intermediate_size': 8192, 'max_position_embeddings': 4096, 'model_type': 'phi3',
         'num_attention_heads': 32, 'num_hidden_layers': 32, 'num_key_value_heads': 32,
         'original_max_position_embeddings': 4096, 'pad_token_id': 32000, 'resid_pdrop': 0.0, 'rms_norm_eps': 1e-05,
         'rope_scaling': None, 'rope_theta': 10000.0, 'sliding_window': 2047, 'tie_word_embeddings': False,
         'torch_dtype': 'bfloat16', 'transformers_version': '4.40.2', 'use_cache': True, 'vocab_size': 32064},
        3821079552),
    "Phi-3.5-mini": (
        {'architectures': ['Phi3ForCausalLM'], 'attention_bias': False, 'bos_token_id': 1, 'eos_token_id': 32000,
         'hidden_act': 'silu', 'hidden_size': 3072, 'intermediate_size': 8192, 'max_position_embeddings': 131072,
         'model_type': 'phi3', 'num_attention_heads': 32, 'num_hidden_layers': 32, 'num_key_value_heads': 32,
         'original_max_position_embeddings': 4096, 'pad_token_id': 32000, 'rms_norm_eps': 1e-05,
         'rope_scaling': LONGROPE_48, 'rope_theta': 10000.0, 'sliding_window': 262144, 'tie_word_embeddings': False,
         'torch_dtype': 'bfloat16', 'vocab_size': 32064},
        3821079552),
    "gemma-2-2b": (
        {'architectures': ['Gemma2ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
         'attn_logit_softcapping': 50.0, 'bos_token_id': 2, 'cache_implementation': 'hybrid', 'eos_token_id': 1,
         'final_logit_softcapping': 30.0, 'head_dim': 256, 'hidden_act': 'gelu_pytorch_tanh',
         'hidden_activation': 'gelu_pytorch_tanh', 'hidden_size': 2304, 'initializer_range': 0.02,
         'intermediate_size': 9216, 'max_position_embeddings': 8192, 'model_type': 'gemma2',
         'num_attention_heads': 8, 'num_hidden_layers': 26, 'num_key_value_heads': 4, 'pad_token_id': 0,
         'query_pre_attn_scalar': 256, 'rms_norm_eps': 1e-06, 'rope_theta': 10000.0, 'sliding_window': 4096,
         'torch_dtype': 'float32', 'transformers_version': '4.42.4', 'use_cache': True, 'vocab_size': 256000},
        2614341888),
    "gemma-3-1b": (
        {'architectures': ['Gemma3ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
         'attn_logit_softcapping': None, 'bos_token_id': 2, 'cache_implementation': 'hybrid',
         'eos_token_id': [1, 106], 'final_logit_softcapping': None, 'head_dim': 256,
         'hidden_activation': 'gelu_pytorch_tanh', 'hidden_size': 1152, 'initializer_range': 0.02,
         'intermediate_size': 6912, 'max_position_embeddings': 32768, 'model_type': 'gemma3_text',
         'num_attention_heads': 4, 'num_hidden_layers': 26, 'num_key_value_heads': 1, 'pad_token_id': 0,
         'query_pre_attn_scalar': 256, 'rms_norm_eps': 1e-06, 'rope_local_base_freq': 10000, 'rope_scaling': None,
         'rope_theta': 1000000, 'sliding_window': 512, 'sliding_window_pattern': 6, 'torch_dtype': 'bfloat16',
         'transformers_version': '4.50.0.dev0', 'use_cache': True, 'vocab_size': 262144},
        None),
    "OLMo-2-0425-1B": (
        {'architectures': ['Olmo2ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
         'eos_token_id': 100257, 'hidden_act': 'silu', 'hidden_size': 2048, 'initializer_range': 0.02,
         'intermediate_size': 8192, 'max_position_embeddings': 4096, 'model_type': 'olmo2',
         'num_attention_heads': 16, 'num_hidden_layers': 16, 'num_key_value_heads': 16, 'pad_token_id': 100277,
         'rms_norm_eps': 1e-06, 'rope_scaling': None, 'rope_theta': 500000, 'tie_word_embeddings': False,
         'torch_dtype': 'float32', 'use_cache': True, 'vocab_size': 100352},
        None),
    "gpt2": (
        {'activation_function': 'gelu_new', 'architectures': ['GPT2LMHeadModel'], 'attn_pdrop': 0.1,
         'bos_token_id': 50256, 'embd_pdrop': 0.1, 'eos_token_id': 50256, 'initializer_range': 0.02,
         'layer_norm_epsilon': 1e-05, 'model_type': 'gpt2', 'n_ctx': 1024, 'n_embd': 768, 'n_head': 12,
         'n_layer': 12, 'n_positions': 1024, 'resid_pdrop': 0.1, 'summary_activation': None,
         'summary_first_dropout': 0.1, 'summary_proj_to_labels': True, 'summary_type': 'cls_index',
         'summary_use_proj': True,
         'task_specific_params': {'text-generation': {'do_sample': True, 'max_length': 50}}, 'vocab_size': 50257},
        124439808),
}


def _hf_config(raw: dict):
    return transformers.AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_reads_counts_and_writes_back(name):
    raw, _ = PUBLISHED[name]
    config = ModelConfig.from_hf_dict(raw)
    with torch.device("meta"):
        ours = Transformer(config)
        theirs = transformers.AutoModelForCausalLM.from_config(_hf_config(raw))
    assert config.num_params() == sum(p.numel() for p in ours.parameters()) == theirs.num_parameters()
    written = config.to_hf_dict()
    assert ModelConfig.from_hf_dict(written) == config
    ignore = {"dtype", "torch_dtype", "transformers_version"}
    before, after = _hf_config(raw).to_dict(), _hf_config(written).to_dict()
    assert {k: v for k, v in after.items() if k not in ignore} == {k: v for k, v in before.items() if k not in ignore}


@pytest.mark.parametrize("name", [name for name, (_, count) in PUBLISHED.items() if count is not None])
def test_parameter_count_is_the_model_cards(name):
    raw, published = PUBLISHED[name]
    assert ModelConfig.from_hf_dict(raw).num_params() == published
