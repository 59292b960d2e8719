"""ModelConfig: one dataclass for the shape of every supported decoder family, and its arithmetic.

Torch-free: the planner runs where torch is not installed. How each family spells its config.json
lives in `foundry.config.families`; the named presets in `foundry.config.presets`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from foundry.config import families
from foundry.core.errors import UserError


ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer, in Hugging Face `LlamaConfig` terms, plus each family's switches."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None means hidden_size // num_attention_heads
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5  # the epsilon of every norm, LayerNorm included
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # Mixture of experts (0 experts: every layer has a dense MLP). See is_moe_layer for which layers are sparse.
    num_experts: int = 0  # routed experts per MoE layer
    num_experts_per_tok: int = 0  # experts each token is routed to (top-k)
    moe_intermediate_size: int | None = None  # width of one routed expert; None: intermediate_size (Mixtral)
    shared_expert_intermediate_size: int = 0  # width of the always-on shared MLP (DeepSeek: n_shared x expert width)
    shared_expert_gate: bool = False  # the shared MLP's output scaled by sigmoid(a learned gate) (Qwen2-MoE)
    router_scoring: str = "softmax"  # softmax over experts | sigmoid per expert (DeepSeek-V3)
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum to one
    router_correction_bias: bool = False  # a per-expert bias added when choosing, not weighting (DeepSeek-V3)
    router_groups: int = 1  # experts split into groups; a token chooses only within its best groups (n_group)
    router_topk_groups: int = 1  # groups a token may choose from (topk_group)
    router_group_scoring: str = "top2"  # a group's rank: its two best experts' sum (DeepSeek-V3) | its best (V2)
    router_fp32: bool = False  # router logits in fp32 from fp32 weights (DeepSeek), not in the weights' dtype
    routed_scaling_factor: float = 1.0  # the routed experts' sum is multiplied by it (DeepSeek)
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training (Switch/Mixtral)
    first_k_dense_replace: int = 0  # the first k layers keep a dense MLP (DeepSeek)
    decoder_sparse_step: int = 1  # every n-th layer is sparse (Qwen-MoE)
    mlp_only_layers: list[int] | None = None  # layers that keep a dense MLP (Qwen-MoE)
    # Multi-head latent attention (DeepSeek-V2/V3): keys and values from a low-rank latent, which is what the KV
    # cache stores. kv_lora_rank 0 means grouped-query attention. head_dim is then the rotary part of a head.
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None  # None: queries projected directly; else through a normed low-rank bottleneck
    qk_nope_head_dim: int = 0  # the part of each query/key head without rotary positions
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary pairs are adjacent channels (DeepSeek) rather than the two halves
    # Family switches. The defaults are Llama's; foundry.config.families sets them from a config.json.
    hidden_act: str = "silu"  # MLP activation, one of ACTIVATIONS (gelu_new = gelu_pytorch_tanh)
    mlp_gated: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x))) (GPT-2)
    attention_out_bias: bool | None = None  # o_proj bias; None: as attention_bias (Qwen2 biases q/k/v only)
    norm_type: str = "rms"  # rms | layer (LayerNorm with bias, GPT-2)
    norm_placement: str = "pre"  # pre: norm block inputs | post: norm block outputs (OLMo 2) | sandwich: both (Gemma)
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), weights stored zero-centred (Gemma)
    upcast_norm_and_rope: bool = False  # norm weights and RoPE applied in fp32, then cast (OLMo 2; bf16 numerics)
    qk_norm: str | None = None  # RMSNorm of queries and keys before RoPE: head (Qwen3, Gemma 3) | full (OLMo 2)
    position_embedding: str = "rope"  # rope | learned (GPT-2's absolute position table)
    partial_rotary_factor: float = 1.0  # share of head_dim that RoPE rotates (Phi-4-mini)
    scale_embeddings: bool = False  # token embeddings times sqrt(hidden_size) (Gemma)
    sliding_window: int | None = None  # keys a sliding-window layer sees, its own position included
    layer_types: list[str] | None = None  # per layer, one of LAYER_TYPES; None: all sliding iff sliding_window
    sliding_rope_theta: float | None = None  # RoPE base of the sliding layers when it differs (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scores scaled by its -1/2 power (Gemma); None: head_dim
    attn_logit_softcapping: float | None = None  # cap * tanh(score / cap) on attention scores (Gemma 2)
    final_logit_softcapping: float | None = None  # the same on output logits (Gemma 2)
    # Hugging Face identity of the checkpoint this config reads and writes.
    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # Keys of a loaded config.json that foundry does not model, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    # ---- checks -------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise UserError naming the first inconsistent field."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.position_embedding == "rope" and self.rotary_dim % 2:
            raise UserError(f"model config: the rotated part of head_dim must be even for rotary embeddings, "
                            f"got {self.rotary_dim} (head_dim {self.head_dim})")
        if not 0 < self.partial_rotary_factor <= 1:
            raise UserError(f"model config: partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        choices = {"hidden_act": ACTIVATIONS, "norm_type": ("rms", "layer"),
                   "norm_placement": ("pre", "post", "sandwich"), "qk_norm": (None, "head", "full"),
                   "position_embedding": ("rope", "learned")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"model config: {name} must be one of {', '.join(map(str, allowed))}, "
                                f"got {getattr(self, name)!r}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise UserError(f"model config: rope_scaling type {rope_type!r} is not supported; "
                            f"supported: {', '.join(ROPE_TYPES)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise UserError(f"model config: layer_types must list one of {', '.join(LAYER_TYPES)} for each of "
                                f"the {self.num_hidden_layers} layers, got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise UserError("model config: layer_types has sliding_attention layers but sliding_window is not set")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise UserError(f"model config: sliding_window must be a positive integer, got {self.sliding_window!r}")
        families.check_expressible(self)  # the architecture must be able to say every switch in its config.json
        self._validate_moe()
        if self.kv_lora_rank and (self.qk_nope_head_dim <= 0 or self.v_head_dim <= 0):
            raise UserError("model config: multi-head latent attention (kv_lora_rank) needs positive "
                            "qk_nope_head_dim and v_head_dim")

    def _validate_moe(self) -> None:
        if not self.num_experts:
            return
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UserError(
                f"model config: num_experts_per_tok must be in 1..{self.num_experts}, got {self.num_experts_per_tok}")
        if self.router_scoring not in ("softmax", "sigmoid"):
            raise UserError(f"model config: router_scoring must be softmax or sigmoid, got {self.router_scoring!r}")
        if self.router_group_scoring not in ("top2", "max"):
            raise UserError(f"model config: router_group_scoring must be top2 or max, got {self.router_group_scoring!r}")
        groups, chosen = self.router_groups, self.router_topk_groups
        if self.num_experts % groups or not 0 < chosen <= groups:
            raise UserError(f"model config: {self.num_experts} experts cannot be split into router_groups={groups} "
                            f"with router_topk_groups={chosen}")
        if groups > 1 and self.num_experts_per_tok > chosen * (self.num_experts // groups):
            raise UserError(f"model config: num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts "
                            f"of the {chosen} groups a token may choose from")
        if self.decoder_sparse_step <= 0:
            raise UserError(f"model config: decoder_sparse_step must be positive, got {self.decoder_sparse_step}")
        if not any(self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            raise UserError("model config: num_experts is set but no layer is a mixture-of-experts layer "
                            "(first_k_dense_replace, decoder_sparse_step and mlp_only_layers leave none)")

    # ---- counting -----------------------------------------------------------------------

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Leading channels of each head that RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qk_head_dim(self) -> int:
        """Channels of one query/key head: head_dim, or the latent attention's plain plus rotary parts."""
        return self.qk_nope_head_dim + self.head_dim if self.kv_lora_rank else self.head_dim

    @property
    def expert_size(self) -> int:
        """Width of one routed expert's MLP."""
        return self.moe_intermediate_size or self.intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        """Whether a layer's MLP is a mixture of experts (Qwen-MoE's and DeepSeek's rules for the dense ones)."""
        return (self.num_experts > 0 and layer >= self.first_k_dense_replace
                and layer not in (self.mlp_only_layers or ()) and (layer + 1) % self.decoder_sparse_step == 0)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(heads, key channels, value channels) one token stores per layer in the KV cache.

        Latent attention stores its normed latent as the "key" and the shared rotary key as the "value"."""
        if self.kv_lora_rank:
            return 1, self.kv_lora_rank, self.head_dim
        return self.num_key_value_heads, self.head_dim, self.head_dim

    def kv_cache_values_per_token(self) -> int:
        """Numbers the KV cache holds per token, all layers together."""
        heads, key, value = self.kv_cache_shape()
        return self.num_hidden_layers * heads * (key + value)

    def layer_type(self, layer: int) -> str:
        """full_attention or sliding_attention for one layer."""
        if self.layer_types is not None:
            return self.layer_types[layer]
        return "sliding_attention" if self.sliding_window else "full_attention"

    def norm_params(self) -> int:
        """Parameters of one norm: a scale, plus a shift for LayerNorm."""
        return self.hidden_size * (2 if self.norm_type == "layer" else 1)

    def embedding_params(self) -> int:
        """Parameters of the token embedding, the output head when untied and a learned position table."""
        table = self.vocab_size * self.hidden_size
        positions = self.max_position_embeddings * self.hidden_size if self.position_embedding == "learned" else 0
        return (table if self.tie_word_embeddings else 2 * table) + positions

    def attention_params(self) -> int:
        """Parameters of one layer's attention block (projections, biases, query/key norms)."""
        h = self.hidden_size
        if self.kv_lora_rank:
            return self._latent_attention_params()
        weights = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        bias = (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        out_bias = self.attention_bias if self.attention_out_bias is None else self.attention_out_bias
        qk_norm = {None: 0, "head": 2 * self.head_dim, "full": self.q_size + self.kv_size}[self.qk_norm]
        return weights + bias + (h if out_bias else 0) + qk_norm

    def _latent_attention_params(self) -> int:
        h, heads, rank, rope = self.hidden_size, self.num_attention_heads, self.kv_lora_rank, self.head_dim
        q_out = heads * self.qk_head_dim
        q = h * q_out if self.q_lora_rank is None else h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * q_out
        kv = h * (rank + rope) + rank + rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        out = heads * self.v_head_dim * h
        bias = ((self.q_lora_rank or 0) + rank + rope + h) if self.attention_bias else 0
        return q + kv + out + bias

    def dense_mlp_params(self, width: int | None = None) -> int:
        """Parameters of one dense MLP of `width` (intermediate_size by default): gated or plain."""
        h, i = self.hidden_size, width or self.intermediate_size
        inputs = 2 if self.mlp_gated else 1  # gate and up, or up alone
        bias = (inputs * i + h) if self.mlp_bias else 0
        return (inputs + 1) * h * i + bias

    def mlp_params(self, active_only: bool = False, layer: int | None = None) -> int:
        """Parameters of one layer's MLP: dense, or the routed experts (all, or the top-k a token uses when
        active_only), the router and any shared expert. layer None: a mixture-of-experts layer if there are any."""
        moe = self.is_moe_layer(layer) if layer is not None else self.num_experts > 0
        if not moe:
            return self.dense_mlp_params()
        experts = self.num_experts_per_tok if active_only else self.num_experts
        routed = experts * self.dense_mlp_params(self.expert_size) + self.hidden_size * self.num_experts
        shared = self.shared_expert_intermediate_size
        return (routed + (self.dense_mlp_params(shared) if shared else 0)
                + (self.hidden_size if self.shared_expert_gate else 0))

    def layer_params(self, active_only: bool = False, layer: int | None = None) -> int:
        """Parameters of one decoder layer, its norms included (two, or four when sandwiched)."""
        norms = 4 if self.norm_placement == "sandwich" else 2
        return self.attention_params() + self.mlp_params(active_only, layer) + norms * self.norm_params()

    def num_params(self, active_only: bool = False) -> int:
        """Total parameter count (active_only: those one token runs through); equals the instantiated model's."""
        layers = sum(self.layer_params(active_only, i) for i in range(self.num_hidden_layers))
        return self.embedding_params() + layers + self.norm_params()  # final norm

    def non_embedding_params(self, active_only: bool = False) -> int:
        return self.num_params(active_only) - self.embedding_params()

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N (active parameters) plus attention's 6*L*H*(Q_k + Q_v)*T (PaLM, App. B:
        12*L*H*Q*T when keys and values have the same head width)."""
        n = self.num_params(active_only=True)
        v_dim = self.v_head_dim if self.kv_lora_rank else self.head_dim
        attention = 6 * self.num_hidden_layers * self.num_attention_heads * (self.qk_head_dim + v_dim) * seq_len
        return 6 * n + attention

    def weight_bytes(self, bytes_per_param: float) -> float:
        return self.num_params() * bytes_per_param

    # ---- Hugging Face config.json -------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents in the Hugging Face schema of this config's architecture."""
        return families.to_hf_dict(self)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face config.json dict (transformers 4 and 5 spellings, every supported family)."""
        return cls(**families.from_hf_dict(raw))

    # ---- files --------------------------------------------------------------------------

    def to_yaml_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}

    def replace(self, **changes: Any) -> "ModelConfig":
        checked_fields(type(self), changes, "override")
        return dataclasses.replace(self, **changes)


def checked_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data`, after checking that every key is a field of the dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where}: unknown model config field(s) {', '.join(unknown)}")
    return data


__all__ = ["ModelConfig", "ACTIVATIONS", "ROPE_TYPES", "LAYER_TYPES"]
