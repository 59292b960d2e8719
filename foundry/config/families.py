"""The open model families: how each spells its config.json, and the ModelConfig switches it sets.

Torch-free: ModelConfig (and through it the planner) reads config.json files with it. How each family names
its weights is in foundry.hub.weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from foundry.core.errors import UserError

if TYPE_CHECKING:
    from foundry.config import ModelConfig

# config.json keys that Llama-like families spell the same way as ModelConfig's fields.
_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
           "attention_bias", "mlp_bias", "initializer_range", "hidden_act", "bos_token_id", "eos_token_id",
           "pad_token_id")

# Fields that change the computation, with the value that means "off". A family either fixes a field,
# spells it in its config.json (`keys`, `features`), or cannot express anything but the "off" value.
_SWITCHES: dict[str, Any] = {
    "attention_bias": False, "mlp_bias": False, "attention_out_bias": None, "mlp_gated": True, "norm_type": "rms",
    "norm_placement": "pre", "norm_unit_offset": False, "upcast_norm_and_rope": False, "qk_norm": None,
    "position_embedding": "rope", "scale_embeddings": False, "partial_rotary_factor": 1.0, "sliding_window": None,
    "layer_types": None, "sliding_rope_theta": None, "query_pre_attn_scalar": None, "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    # Mixture of experts and latent attention: only the families below can say them.
    "num_experts": 0, "shared_expert_intermediate_size": 0, "shared_expert_gate": False, "router_scoring": "softmax",
    "norm_topk_prob": True, "router_correction_bias": False, "router_groups": 1, "router_topk_groups": 1,
    "routed_scaling_factor": 1.0, "router_group_scoring": "top2", "first_k_dense_replace": 0, "decoder_sparse_step": 1, "mlp_only_layers": None,
    "kv_lora_rank": 0, "q_lora_rank": None, "rope_interleave": False,
}

Hook = Callable[[dict[str, Any], dict[str, Any]], None]


def _nothing(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class Family:
    """One model family: its Hugging Face identity and how its config.json maps onto ModelConfig."""

    name: str
    architectures: tuple[str, ...]
    model_type: str
    keys: dict[str, str]  # config.json key -> ModelConfig field, for keys read and written as they are
    fixed: dict[str, Any] = field(default_factory=dict)  # fields every member of the family has
    features: frozenset[str] = frozenset()  # switch fields its read/write hooks express
    defaults: dict[str, Any] = field(default_factory=dict)  # transformers' values for keys a file may omit
    rope_aliases: dict[str, str] = field(default_factory=dict)  # legacy rope_scaling type names
    read: Hook = _nothing  # (raw config.json, ModelConfig kwargs): move family keys from raw into kwargs
    write: Callable[["ModelConfig", dict[str, Any]], None] = _nothing  # add family keys to config.json


def _keys(*drop: str, **renamed: str) -> dict[str, str]:
    keys = {k: k for k in _COMMON if k not in drop}
    for json_key, field_name in renamed.items():
        keys = {k: v for k, v in keys.items() if v != field_name}
        keys[json_key] = field_name
    return keys


# ---- family-specific keys ------------------------------------------------------------------

def _all_layers(config: "ModelConfig") -> list[str]:
    return [config.layer_type(i) for i in range(config.num_hidden_layers)]


def _read_mistral(raw: dict[str, Any], kw: dict[str, Any]) -> None:
    kw["sliding_window"] = raw.pop("sliding_window")
    raw.pop("layer_types", None)  # transformers ignores it for Mistral: every layer shares the window


def _write_mistral(config: "ModelConfig", out: dict[str, Any]) -> None:
    if len(set(_all_layers(config))) > 1:
        raise UserError("model config: MistralForCausalLM applies sliding_window to every layer; "
                        "mixed layer_types need another architecture")
    out["sliding_window"] = config.sliding_window


def _read_qwen(raw: dict[str, Any], kw: dict[str, Any]) -> None:
    # The window only applies with use_sliding_window, and then (without layer_types) from max_window_layers on.
    window = raw.pop("sliding_window") if raw.pop("use_sliding_window") else None
    raw.pop("sliding_window", None)
    n = raw.get("num_hidden_layers", 0)
    types = raw.pop("layer_types", None) or [
        "sliding_attention" if window is not None and i >= raw.get("max_window_layers", 28) else "full_attention"
        for i in range(n)]
    if window is None or "sliding_attention" not in types:
        return  # no sliding layer: the window is irrelevant
    kw["sliding_window"] = window
    kw["layer_types"] = None if set(types) == {"sliding_attention"} else list(types)


def _write_qwen(config: "ModelConfig", out: dict[str, Any]) -> None:
    out["use_sliding_window"] = config.sliding_window is not None
    out["sliding_window"] = config.sliding_window
    out["layer_types"] = _all_layers(config)


def _read_phi3(raw: dict[str, Any], kw: dict[str, Any]) -> None:
    kw["sliding_window"] = raw.pop("sliding_window")


def _write_phi3(config: "ModelConfig", out: dict[str, Any]) -> None:
    _write_mistral(config, out)
    if config.rope_scaling:  # transformers 4 reads the legacy `type` key of Phi-3's rope_scaling
        out["rope_scaling"] = {**config.rope_scaling, "type": config.rope_scaling["rope_type"]}
        original = config.rope_scaling.get("original_max_position_embeddings")
        if original is not None:  # transformers reads it at the top level (default 4096), not in rope_scaling
            out["original_max_position_embeddings"] = original


def _read_gemma(raw: dict[str, Any], kw: dict[str, Any], pattern: int) -> None:
    if raw.pop("use_bidirectional_attention", None):
        raise UserError("config.json: use_bidirectional_attention (non-causal Gemma) is not supported")
    for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        kw[name] = raw.pop(name)
    # Older files give the layer pattern as a period; kept as they are, since layer_types is what we write.
    pattern = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", pattern))
    n = raw.get("num_hidden_layers", 0)
    kw["layer_types"] = raw.pop("layer_types", None) or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def _read_gemma3(raw: dict[str, Any], kw: dict[str, Any]) -> None:
    _read_gemma(raw, kw, pattern=6)
    params = raw.pop("rope_parameters", None) or {}
    if "full_attention" in params:  # transformers 5: one RoPE setting per layer type
        full, local = dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
        raw["rope_theta"] = full.pop("rope_theta", raw.get("rope_theta"))
        raw["rope_scaling"] = full
        raw["rope_local_base_freq"] = local.get("rope_theta", raw.get("rope_local_base_freq"))
        if local.get("rope_type", "default") != "default":
            raise UserError("config.json: RoPE scaling on Gemma 3's sliding layers is not supported")
    elif params:
        raw["rope_parameters"] = params
    kw["sliding_rope_theta"] = float(raw.pop("rope_local_base_freq"))


def _write_gemma(config: "ModelConfig", out: dict[str, Any]) -> None:
    for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        out[name] = getattr(config, name)
    out["layer_types"] = _all_layers(config)


def _write_gemma3(config: "ModelConfig", out: dict[str, Any]) -> None:
    _write_gemma(config, out)
    out["rope_local_base_freq"] = config.sliding_rope_theta or config.rope_theta


def _read_gpt2(raw: dict[str, Any], kw: dict[str, Any]) -> None:
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if bool(raw.get(key, ok)) != ok:
            raise UserError(f"config.json: GPT-2 with {key}={raw[key]!r} is not supported")
    if raw.get("n_inner") is None:
        raw["n_inner"] = 4 * raw["n_embd"]
    raw["num_key_value_heads"] = raw["n_head"]


def _write_gpt2(config: "ModelConfig", out: dict[str, Any]) -> None:
    if config.num_key_value_heads != config.num_attention_heads or config.head_dim * config.num_attention_heads \
            != config.hidden_size:
        raise UserError("model config: GPT2LMHeadModel needs num_key_value_heads == num_attention_heads and "
                        "head_dim == hidden_size / num_attention_heads")
    out.pop("num_key_value_heads", None)
    if config.intermediate_size == 4 * config.hidden_size:
        out["n_inner"] = None  # GPT-2's own spelling of the default


def _read_qwen_moe(raw: dict[str, Any], kw: dict[str, Any]) -> None:
    _read_qwen(raw, kw)
    if "num_local_experts" in raw:  # transformers 5's spelling; the Hub's files say num_experts
        raw["num_experts"] = raw.pop("num_local_experts")
    kw["mlp_only_layers"] = list(raw.pop("mlp_only_layers") or []) or None


def _write_qwen_moe(config: "ModelConfig", out: dict[str, Any]) -> None:
    _write_qwen(config, out)
    out["mlp_only_layers"] = list(config.mlp_only_layers or [])
    if config.model_type == "qwen3_moe":
        out.pop("layer_types")  # its config class has none: the window applies to every layer


def _read_qwen2_moe(raw: dict[str, Any], kw: dict[str, Any]) -> None:
    _read_qwen_moe(raw, kw)
    kw["attention_bias"] = raw.pop("qkv_bias", True)  # transformers 5 names the q/k/v bias switch


def _write_qwen2_moe(config: "ModelConfig", out: dict[str, Any]) -> None:
    _write_qwen_moe(config, out)
    if not config.attention_bias:
        out["qkv_bias"] = False  # written only when off: transformers 4 has no such key and always biases


def _read_deepseek(raw: dict[str, Any], kw: dict[str, Any]) -> None:
    for key, allowed in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if raw.get(key, allowed) != allowed:  # checked, and left in `extra` to be written back as it came
            raise UserError(f"config.json: DeepSeek-V3 with {key}={raw.get(key)!r} is not supported "
                            f"(only {allowed!r})")
    kw["shared_expert_intermediate_size"] = raw.pop("n_shared_experts") * raw["moe_intermediate_size"]
    raw.pop("qk_head_dim", None)  # derived: qk_nope_head_dim + qk_rope_head_dim
    raw.pop("head_dim", None)  # transformers 5 writes it as qk_rope_head_dim, which is what we read


def _read_deepseek_v2(raw: dict[str, Any], kw: dict[str, Any]) -> None:
    for key, allowed in (("scoring_func", "softmax"), ("moe_layer_freq", 1)):
        if raw.get(key, allowed) != allowed:  # checked, and left in `extra` to be written back as it came
            raise UserError(f"config.json: DeepSeek-V2 with {key}={raw.get(key)!r} is not supported (only {allowed!r})")
    method = raw.pop("topk_method")
    if method not in ("greedy", "group_limited_greedy"):
        raise UserError(f"config.json: DeepSeek-V2 with topk_method={method!r} is not supported "
                        f"(greedy or group_limited_greedy)")
    if raw.pop("norm_topk_prob", False):
        raise UserError("config.json: DeepSeek-V2 with norm_topk_prob=true is not supported (transformers ignores "
                        "it; the published models have false)")
    groups = (raw.pop("n_group"), raw.pop("topk_group")) if method == "group_limited_greedy" else (None, None)
    raw.pop("n_group", None), raw.pop("topk_group", None)
    kw["router_groups"], kw["router_topk_groups"] = groups[0] or 1, groups[1] or 1
    kw["shared_expert_intermediate_size"] = (raw.pop("n_shared_experts") or 0) * raw["moe_intermediate_size"]
    raw.pop("qk_head_dim", None)
    raw.pop("head_dim", None)


def _write_deepseek_v2(config: "ModelConfig", out: dict[str, Any]) -> None:
    _write_deepseek(config, out)
    grouped = config.router_groups > 1
    out["topk_method"] = "group_limited_greedy" if grouped else "greedy"
    out["n_group"], out["topk_group"] = config.router_groups, config.router_topk_groups  # 1 and 1: not grouped


def _write_deepseek(config: "ModelConfig", out: dict[str, Any]) -> None:
    if config.shared_expert_intermediate_size % config.expert_size:
        raise UserError("model config: DeepseekV3ForCausalLM's shared experts are a whole number of routed "
                        "experts wide (n_shared_experts)")
    out["n_shared_experts"] = config.shared_expert_intermediate_size // config.expert_size
    out["head_dim"] = config.head_dim  # transformers 5 sets it to qk_rope_head_dim
    if config.rope_scaling:  # DeepSeek's own modelling code (trust_remote_code) reads the legacy `type` key
        out["rope_scaling"] = {**config.rope_scaling, "type": config.rope_scaling["rope_type"]}


_QWEN_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False,
                  "sliding_window": 4096}
_MOE_KEYS = {"num_experts_per_tok": "num_experts_per_tok", "moe_intermediate_size": "moe_intermediate_size",
             "norm_topk_prob": "norm_topk_prob", "router_aux_loss_coef": "router_aux_loss_coef"}
_QWEN_MOE_KEYS = {**_MOE_KEYS, "num_experts": "num_experts", "decoder_sparse_step": "decoder_sparse_step"}
_QWEN_MOE_DEFAULTS = {**_QWEN_DEFAULTS, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False,
                      "router_aux_loss_coef": 0.001, "num_experts_per_tok": 4, "num_experts": 60}

_GEMMA_SWITCHES = {"norm_placement": "sandwich", "norm_unit_offset": True, "scale_embeddings": True,
                   "mlp_bias": False}
_GEMMA_FEATURES = frozenset({"sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
                             "final_logit_softcapping"})
_GEMMA_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "head_dim": 256, "query_pre_attn_scalar": 256,
                   "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096, "attention_bias": False}

FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("LlamaForCausalLM",), "llama", _keys(),
           defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": False}),
    Family("Mistral", ("MistralForCausalLM",), "mistral", _keys("attention_bias", "mlp_bias"),
           features=frozenset({"sliding_window"}), read=_read_mistral, write=_write_mistral,
           defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "sliding_window": 4096}),
    Family("Qwen2 / Qwen2.5", ("Qwen2ForCausalLM",), "qwen2", _keys("attention_bias", "mlp_bias", "head_dim"),
           fixed={"attention_bias": True, "attention_out_bias": False},
           features=frozenset({"sliding_window", "layer_types"}), read=_read_qwen, write=_write_qwen,
           defaults=_QWEN_DEFAULTS),
    Family("Qwen3", ("Qwen3ForCausalLM",), "qwen3", _keys("mlp_bias"), fixed={"qk_norm": "head"},
           features=frozenset({"sliding_window", "layer_types"}), read=_read_qwen, write=_write_qwen,
           defaults={**_QWEN_DEFAULTS, "attention_bias": False}),
    Family("Mixtral", ("MixtralForCausalLM",), "mixtral",
           {**_keys("attention_bias", "mlp_bias", "head_dim"), "num_local_experts": "num_experts",
            "num_experts_per_tok": "num_experts_per_tok", "router_aux_loss_coef": "router_aux_loss_coef"},
           features=frozenset({"sliding_window"}), read=_read_phi3, write=_write_mistral,
           defaults={"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": None,
                     "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001}),
    Family("Qwen2-MoE / Qwen1.5-MoE", ("Qwen2MoeForCausalLM",), "qwen2_moe",
           {**_keys("attention_bias", "mlp_bias", "head_dim"), **_QWEN_MOE_KEYS,
            "shared_expert_intermediate_size": "shared_expert_intermediate_size"},
           fixed={"attention_out_bias": False, "shared_expert_gate": True},
           features=frozenset({"sliding_window", "layer_types", "attention_bias", "mlp_only_layers"}),
           read=_read_qwen2_moe, write=_write_qwen2_moe,
           defaults={**_QWEN_MOE_DEFAULTS, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632}),
    Family("Qwen3-MoE", ("Qwen3MoeForCausalLM",), "qwen3_moe", {**_keys("mlp_bias"), **_QWEN_MOE_KEYS},
           fixed={"qk_norm": "head"}, features=frozenset({"sliding_window", "mlp_only_layers"}),
           read=_read_qwen_moe, write=_write_qwen_moe,
           defaults={**_QWEN_MOE_DEFAULTS, "attention_bias": False, "num_experts_per_tok": 8, "num_experts": 128,
                     "moe_intermediate_size": 768}),
    Family("DeepSeek-V3", ("DeepseekV3ForCausalLM",), "deepseek_v3",
           {**_keys("mlp_bias", "head_dim"),
            **{k: v for k, v in _MOE_KEYS.items() if k != "router_aux_loss_coef"},  # auxiliary-loss-free
            "n_routed_experts": "num_experts", "routed_scaling_factor": "routed_scaling_factor",
            "n_group": "router_groups", "topk_group": "router_topk_groups",
            "first_k_dense_replace": "first_k_dense_replace", "kv_lora_rank": "kv_lora_rank",
            "q_lora_rank": "q_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "head_dim",
            "v_head_dim": "v_head_dim", "rope_interleave": "rope_interleave"},
           fixed={"router_scoring": "sigmoid", "router_correction_bias": True, "router_fp32": True},
           features=frozenset({"shared_expert_intermediate_size"}), read=_read_deepseek, write=_write_deepseek,
           defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
                     "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8,
                     "moe_intermediate_size": 2048, "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4,
                     "first_k_dense_replace": 3, "norm_topk_prob": True, "kv_lora_rank": 512, "q_lora_rank": 1536,
                     "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_interleave": True}),
    Family("DeepSeek-V2", ("DeepseekV2ForCausalLM",), "deepseek_v2",
           {**_keys("mlp_bias", "head_dim"), "n_routed_experts": "num_experts",
            "num_experts_per_tok": "num_experts_per_tok", "moe_intermediate_size": "moe_intermediate_size",
            "routed_scaling_factor": "routed_scaling_factor", "first_k_dense_replace": "first_k_dense_replace",
            "kv_lora_rank": "kv_lora_rank", "q_lora_rank": "q_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
            "qk_rope_head_dim": "head_dim", "v_head_dim": "v_head_dim"},
           # Its complex-number RoPE rotates adjacent pairs: the same scores as V3's interleaved rotation.
           fixed={"norm_topk_prob": False, "router_group_scoring": "max", "router_fp32": True,
                  "rope_interleave": True},
           features=frozenset({"shared_expert_intermediate_size", "router_groups", "router_topk_groups"}),
           read=_read_deepseek_v2, write=_write_deepseek_v2,
           defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
                     "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6,
                     "moe_intermediate_size": 1407, "routed_scaling_factor": 1.0, "first_k_dense_replace": 0,
                     "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                     "v_head_dim": 128, "topk_method": "greedy", "n_group": None, "topk_group": None}),
    Family("Phi-3", ("Phi3ForCausalLM",), "phi3", _keys("attention_bias", "mlp_bias", "head_dim"),
           features=frozenset({"sliding_window", "partial_rotary_factor"}), read=_read_phi3, write=_write_phi3,
           rope_aliases={"su": "longrope", "yarn": "longrope"},
           defaults={"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": None}),
    Family("Gemma 2", ("Gemma2ForCausalLM",), "gemma2", _keys("mlp_bias", hidden_activation="hidden_act"),
           fixed=_GEMMA_SWITCHES, features=_GEMMA_FEATURES, read=lambda r, k: _read_gemma(r, k, pattern=2),
           write=_write_gemma, defaults={**_GEMMA_DEFAULTS, "attn_logit_softcapping": 50.0,
                                         "final_logit_softcapping": 30.0}),
    Family("Gemma 3 (text)", ("Gemma3ForCausalLM",), "gemma3_text", _keys("mlp_bias", hidden_activation="hidden_act"),
           fixed={**_GEMMA_SWITCHES, "qk_norm": "head"}, features=_GEMMA_FEATURES | {"sliding_rope_theta"},
           read=_read_gemma3, write=_write_gemma3,
           defaults={**_GEMMA_DEFAULTS, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                     "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}),
    Family("OLMo 2", ("Olmo2ForCausalLM",), "olmo2", _keys("mlp_bias", "head_dim"),
           fixed={"norm_placement": "post", "qk_norm": "full", "upcast_norm_and_rope": True},
           defaults={"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False}),
    Family("GPT-2", ("GPT2LMHeadModel",), "gpt2",
           _keys("head_dim", "attention_bias", "mlp_bias", "hidden_act", "rms_norm_eps",
                 n_embd="hidden_size", n_layer="num_hidden_layers", n_head="num_attention_heads",
                 n_inner="intermediate_size", n_positions="max_position_embeddings",
                 layer_norm_epsilon="rms_norm_eps", activation_function="hidden_act"),
           fixed={"norm_type": "layer", "position_embedding": "learned", "mlp_gated": False, "attention_bias": True,
                  "mlp_bias": True}, read=_read_gpt2, write=_write_gpt2,
           defaults={"tie_word_embeddings": True, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
                     "n_positions": 1024, "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12}),
)

SUPPORTED_ARCHITECTURES = tuple(a for f in FAMILIES for a in f.architectures)


def family_of(architecture: str | None, model_type: str | None = None) -> Family:
    """The family of an architecture name (or, when a config.json names none, of its model_type)."""
    for family in FAMILIES:
        if architecture in family.architectures:
            return family
    if architecture is None:
        return next((f for f in FAMILIES if f.model_type == model_type), FAMILIES[0])
    raise UserError(f"unsupported architecture {architecture!r}; foundry runs {', '.join(SUPPORTED_ARCHITECTURES)}")


# ---- config.json <-> ModelConfig ---------------------------------------------------------------

def from_hf_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments from a config.json dict; keys foundry does not model go to `extra`."""
    raw = dict(raw)
    archs = raw.pop("architectures", None) or [None]
    family = family_of(archs[0], raw.get("model_type"))
    raw.pop("model_type", None)
    for key, value in family.defaults.items():
        raw.setdefault(key, value)
    kwargs: dict[str, Any] = {"architecture": archs[0] or family.architectures[0], "model_type": family.model_type,
                              **family.fixed}
    family.read(raw, kwargs)
    if family.fixed.get("position_embedding", "rope") == "rope":
        _read_rope(raw, kwargs, family)
    for json_key, name in family.keys.items():
        if json_key in raw:
            kwargs[name] = raw.pop(json_key)
    if "head_dim" in raw and family.fixed.get("position_embedding", "rope") == "rope":
        kwargs["head_dim"] = raw.pop("head_dim")  # families whose config class reads it without declaring it
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)
    for key in ("dtype", "torch_dtype"):  # describes the weight files; written again on save
        raw.pop(key, None)
    kwargs["extra"] = raw
    return kwargs


def to_hf_dict(config: "ModelConfig") -> dict[str, Any]:
    """config.json contents for `config` in its family's spelling."""
    family = family_of(config.architecture)
    check_expressible(config)
    out: dict[str, Any] = {"architectures": [config.architecture], "model_type": family.model_type}
    out.update(config.extra)
    for json_key, name in family.keys.items():
        out[json_key] = getattr(config, name)
    if "head_dim" not in family.keys and config.head_dim != config.hidden_size // config.num_attention_heads:
        out["head_dim"] = config.head_dim  # written only where their config class does not declare it
    if config.position_embedding == "rope":
        out["rope_theta"] = config.rope_theta
        out["rope_scaling"] = config.rope_scaling
        out.pop("rope_parameters", None)  # the two spellings must not disagree
        if config.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = config.partial_rotary_factor
    family.write(config, out)
    return out


def _read_rope(raw: dict[str, Any], kwargs: dict[str, Any], family: Family) -> None:
    # transformers 5 writes rope_parameters = {rope_type, rope_theta, ...}; 4 wrote rope_theta + rope_scaling.
    params = dict(raw.pop("rope_parameters", None) or {})
    scaling = raw.pop("rope_scaling", None)
    theta = params.pop("rope_theta", raw.pop("rope_theta", 10000.0))
    partial = params.pop("partial_rotary_factor", raw.pop("partial_rotary_factor", 1.0))
    if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    kwargs["rope_theta"] = float(theta)
    kwargs["partial_rotary_factor"] = float(partial)
    kwargs["rope_scaling"] = None
    if scaling:
        scaling = dict(scaling)
        for key in ("rope_theta", "partial_rotary_factor"):  # transformers 5 nests them; they have own fields
            scaling.pop(key, None)
        kind = scaling.pop("type", None)
        kind = scaling.pop("rope_type", None) or kind or "default"
        kind = family.rope_aliases.get(kind, kind)
        if kind != "default":
            if "original_max_position_embeddings" in raw:  # Phi-3 keeps it beside rope_scaling
                scaling.setdefault("original_max_position_embeddings", raw["original_max_position_embeddings"])
            kwargs["rope_scaling"] = {"rope_type": kind, **scaling}


def check_expressible(config: "ModelConfig") -> None:
    """Refuse a switch the architecture's config.json cannot spell (saving would silently drop it)."""
    family = family_of(config.architecture)
    spelled = set(family.keys.values()) | family.features
    for name, off in _SWITCHES.items():
        value = getattr(config, name)
        if name in family.fixed:
            ok = value == family.fixed[name]
        else:
            ok = name in spelled or value == off
        if not ok:
            supported = [f.architectures[0] for f in FAMILIES if _could_express(f, name, value)]
            raise UserError(f"model config: {config.architecture} has no {name}={value!r}"
                            + (f"; architectures that have it: {', '.join(supported)}" if supported else ""))


def _could_express(family: Family, name: str, value: Any) -> bool:
    if name in family.fixed:
        return family.fixed[name] == value
    return name in family.features or name in family.keys.values()


__all__ = ["Family", "FAMILIES", "SUPPORTED_ARCHITECTURES", "check_expressible", "family_of", "from_hf_dict",
           "to_hf_dict"]
