"""Published config.json files of each family (as on the Hub, transformers 4 spellings): read, counted, written back.

For every one: ModelConfig's parameter count equals the instantiated model's, transformers' own (on the meta
device) and, where the model card gives it, the published figure; and the config.json foundry writes back
gives transformers the same config as the original. Mixtures of experts also count their active parameters as
their makers publish them, and the MoE presets are these files.
"""

import math

import pytest
import torch
import transformers  # the reference: missing, collection fails loudly instead of skipping

from foundry.config import ModelConfig, preset
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
    # The mixtures of experts (their cards give rounded figures only: see PUBLISHED_MOE below).
    "Mixtral-8x7B-v0.1": (
        {'architectures': ['MixtralForCausalLM'], 'attention_dropout': 0.0, 'bos_token_id': 1, 'eos_token_id': 2,
         'hidden_act': 'silu', 'hidden_size': 4096, 'initializer_range': 0.02, 'intermediate_size': 14336,
         'max_position_embeddings': 32768, 'model_type': 'mixtral', 'num_attention_heads': 32,
         'num_experts_per_tok': 2, 'num_hidden_layers': 32, 'num_key_value_heads': 8, 'num_local_experts': 8,
         'output_router_logits': False, 'rms_norm_eps': 1e-05, 'rope_theta': 1000000.0, 'router_aux_loss_coef': 0.02,
         'sliding_window': None, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
         'transformers_version': '4.36.0.dev0', 'use_cache': True, 'vocab_size': 32000},
        None),
    "Qwen1.5-MoE-A2.7B": (
        {'architectures': ['Qwen2MoeForCausalLM'], 'attention_dropout': 0.0, 'bos_token_id': 151643,
         'eos_token_id': 151643, 'hidden_act': 'silu', 'hidden_size': 2048, 'initializer_range': 0.02,
         'intermediate_size': 5632, 'max_position_embeddings': 8192, 'max_window_layers': 21,
         'model_type': 'qwen2_moe', 'num_attention_heads': 16, 'num_hidden_layers': 24, 'num_key_value_heads': 16,
         'rms_norm_eps': 1e-06, 'rope_theta': 1000000.0, 'sliding_window': 32768, 'tie_word_embeddings': False,
         'torch_dtype': 'bfloat16', 'transformers_version': '4.39.0.dev0', 'use_cache': True,
         'use_sliding_window': False, 'vocab_size': 151936, 'decoder_sparse_step': 1, 'moe_intermediate_size': 1408,
         'shared_expert_intermediate_size': 5632, 'num_experts_per_tok': 4, 'num_experts': 60,
         'norm_topk_prob': False, 'output_router_logits': False, 'router_aux_loss_coef': 0.001},
        None),
    "Qwen3-30B-A3B": (
        {'architectures': ['Qwen3MoeForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
         'bos_token_id': 151643, 'decoder_sparse_step': 1, 'eos_token_id': 151645, 'head_dim': 128,
         'hidden_act': 'silu', 'hidden_size': 2048, 'initializer_range': 0.02, 'intermediate_size': 6144,
         'max_position_embeddings': 40960, 'max_window_layers': 48, 'mlp_only_layers': [], 'model_type': 'qwen3_moe',
         'moe_intermediate_size': 768, 'norm_topk_prob': True, 'num_attention_heads': 32, 'num_experts': 128,
         'num_experts_per_tok': 8, 'num_hidden_layers': 48, 'num_key_value_heads': 4, 'output_router_logits': False,
         'rms_norm_eps': 1e-06, 'rope_scaling': None, 'rope_theta': 1000000.0, 'router_aux_loss_coef': 0.001,
         'sliding_window': None, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
         'transformers_version': '4.51.0', 'use_cache': True, 'use_sliding_window': False, 'vocab_size': 151936},
        None),
    "DeepSeek-V3": (
        {'architectures': ['DeepseekV3ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
         'auto_map': {'AutoConfig': 'configuration_deepseek.DeepseekV3Config',
                      'AutoModel': 'modeling_deepseek.DeepseekV3Model',
                      'AutoModelForCausalLM': 'modeling_deepseek.DeepseekV3ForCausalLM'},
         'aux_loss_alpha': 0.001, 'bos_token_id': 0, 'eos_token_id': 1, 'ep_size': 1, 'first_k_dense_replace': 3,
         'hidden_act': 'silu', 'hidden_size': 7168, 'initializer_range': 0.02, 'intermediate_size': 18432,
         'kv_lora_rank': 512, 'max_position_embeddings': 163840, 'model_type': 'deepseek_v3',
         'moe_intermediate_size': 2048, 'moe_layer_freq': 1, 'n_group': 8, 'n_routed_experts': 256,
         'n_shared_experts': 1, 'norm_topk_prob': True, 'num_attention_heads': 128, 'num_experts_per_tok': 8,
         'num_hidden_layers': 61, 'num_key_value_heads': 128, 'num_nextn_predict_layers': 1, 'pretraining_tp': 1,
         'q_lora_rank': 1536, 'qk_nope_head_dim': 128, 'qk_rope_head_dim': 64,
         'quantization_config': {'activation_scheme': 'dynamic', 'fmt': 'e4m3', 'quant_method': 'fp8',
                                 'weight_block_size': [128, 128]},
         'rms_norm_eps': 1e-06,
         'rope_scaling': {'beta_fast': 32, 'beta_slow': 1, 'factor': 40, 'mscale': 1.0, 'mscale_all_dim': 1.0,
                          'original_max_position_embeddings': 4096, 'type': 'yarn'},
         'rope_theta': 10000, 'routed_scaling_factor': 2.5, 'scoring_func': 'sigmoid', 'seq_aux': True,
         'tie_word_embeddings': False, 'topk_group': 4, 'topk_method': 'noaux_tc', 'torch_dtype': 'bfloat16',
         'transformers_version': '4.33.1', 'use_cache': True, 'v_head_dim': 128, 'vocab_size': 129280},
        None),
    "DeepSeek-V2-Lite": (
        {'architectures': ['DeepseekV2ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
         'aux_loss_alpha': 0.001, 'bos_token_id': 100000, 'eos_token_id': 100001, 'first_k_dense_replace': 1,
         'hidden_act': 'silu', 'hidden_size': 2048, 'initializer_range': 0.02, 'intermediate_size': 10944,
         'kv_lora_rank': 512, 'max_position_embeddings': 163840, 'model_type': 'deepseek_v2',
         'moe_intermediate_size': 1408, 'moe_layer_freq': 1, 'n_group': 1, 'n_routed_experts': 64,
         'n_shared_experts': 2, 'norm_topk_prob': False, 'num_attention_heads': 16, 'num_experts_per_tok': 6,
         'num_hidden_layers': 27, 'num_key_value_heads': 16, 'pretraining_tp': 1, 'q_lora_rank': None,
         'qk_nope_head_dim': 128, 'qk_rope_head_dim': 64, 'rms_norm_eps': 1e-06,
         'rope_scaling': {'beta_fast': 32, 'beta_slow': 1, 'factor': 40, 'mscale': 0.707, 'mscale_all_dim': 0.707,
                          'original_max_position_embeddings': 4096, 'type': 'yarn'},
         'rope_theta': 10000, 'routed_scaling_factor': 1.0, 'scoring_func': 'softmax', 'seq_aux': True,
         'tie_word_embeddings': False, 'topk_group': 1, 'topk_method': 'greedy', 'torch_dtype': 'bfloat16',
         'transformers_version': '4.33.1', 'use_cache': True, 'v_head_dim': 128, 'vocab_size': 102400},
        None),
}

# name -> (total, active) as the makers publish them, in billions, and how they rounded their exact counts.
# Mixtral: "46.7B total parameters but only uses 12.9B parameters per token" (Mistral AI, "Mixtral of experts",
# 2023). Qwen1.5-MoE: "14.3B", "2.7B activated" (Qwen, "Qwen1.5-MoE: Matching 7B Model Performance with 1/3
# Activated Parameters", 2024). Qwen3-30B-A3B's card: "30.5B in total and 3.3B activated" (its 3.353B active is
# cut, not rounded, to 3.3B). DeepSeek-V3 (arXiv:2412.19437): "671B total parameters with 37B activated for each
# token", whole billions cut (37.55B; or 36.63B rounded, without the input embedding, which is a lookup). The Hub
# shows 685B for DeepSeek-V3: it includes the 14B multi-token-prediction module (num_nextn_predict_layers: 1, one
# more decoder layer with its own projection and norms), which neither foundry nor transformers builds.
PUBLISHED_MOE = {
    "Mixtral-8x7B-v0.1": (46.7, 12.9, 1, round),
    "Qwen1.5-MoE-A2.7B": (14.3, 2.7, 1, round),
    "Qwen3-30B-A3B": (30.5, 3.3, 1, math.floor),
    "DeepSeek-V3": (671, 37, 0, math.floor),
}
# The presets that are published files.
PRESET_FILES = {"mixtral-8x7b": "Mixtral-8x7B-v0.1", "qwen3-30b-a3b": "Qwen3-30B-A3B", "deepseek-v3": "DeepSeek-V3"}


def _hf_config(raw: dict):
    return transformers.AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})


def _settings(hf_config) -> dict:
    """A transformers config's to_dict(), with a legacy rope `type` equal to its `rope_type` dropped: transformers
    keeps both spellings of the one setting when a file (DeepSeek-V3's) still says `type`."""
    out = hf_config.to_dict()
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "type" in rope and rope["type"] == rope.get("rope_type"):
        out["rope_parameters"] = {k: v for k, v in rope.items() if k != "type"}
    return out


# DeepSeek-V3's 61 x 256 experts take ~20 s to build on the meta device, foundry's and transformers' together.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "DeepSeek-V3" else n
                                  for n in PUBLISHED])
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
    before, after = _settings(_hf_config(raw)), _settings(_hf_config(written))
    assert {k: v for k, v in after.items() if k not in ignore} == {k: v for k, v in before.items() if k not in ignore}


@pytest.mark.parametrize("name", [name for name, (_, count) in PUBLISHED.items() if count is not None])
def test_parameter_count_is_the_model_cards(name):
    raw, published = PUBLISHED[name]
    assert ModelConfig.from_hf_dict(raw).num_params() == published


def _billions(count: int, digits: int, rule) -> float:
    return rule(count / 1e9 * 10**digits) / 10**digits


@pytest.mark.parametrize("name", list(PUBLISHED_MOE))
def test_moe_total_and_active_counts_are_the_published_ones(name):
    total, active, digits, rule = PUBLISHED_MOE[name]
    config = ModelConfig.from_hf_dict(PUBLISHED[name][0])
    assert _billions(config.num_params(), digits, rule) == total
    assert _billions(config.num_params(active_only=True), digits, rule) == active
    assert config.num_params(active_only=True) < config.num_params() / 3  # a real sparsity, not a rounding


def test_deepseek_v2_lite_is_15_7b_with_2_4b_active():
    # The card: "15.7B parameters in total, 2.4B activated". Active here counts both embedding tables, as 6N does
    # (2.66B); without the input table, a lookup, it is the card's 2.45B.
    config = ModelConfig.from_hf_dict(PUBLISHED["DeepSeek-V2-Lite"][0])
    assert round(config.num_params() / 1e9, 1) == 15.7
    lookup = config.vocab_size * config.hidden_size
    assert math.floor((config.num_params(active_only=True) - lookup) / 1e8) / 10 == 2.4


def test_deepseek_v3_is_671b_without_its_multi_token_prediction_module():
    config = ModelConfig.from_hf_dict(PUBLISHED["DeepSeek-V3"][0])
    assert (config.num_params(), config.num_params(active_only=True)) == (671_026_404_352, 37_552_282_624)
    assert config.extra["num_nextn_predict_layers"] == 1  # written back as it came; not built
    # The module (arXiv:2412.19437, Sec. 2.2): one more MoE decoder layer, a 2h -> h projection, three norms, and in
    # the checkpoint its own copies of the embedding and output head: 13.5B, which brings the 671.0B to the 684.5B
    # of the Hub's files (shown as 685B with the FP8 weights' block scales; "685B - 671B = 14B" in the report).
    h = config.hidden_size
    mtp = config.layer_params(layer=config.num_hidden_layers - 1) + 2 * h * h + 3 * h + config.embedding_params()
    assert round((config.num_params() + mtp) / 1e9, 1) == 684.5


@pytest.mark.parametrize("name", list(PRESET_FILES))
def test_moe_presets_are_the_published_files(name):
    assert preset(name) == ModelConfig.from_hf_dict(PUBLISHED[PRESET_FILES[name]][0])
