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
    # Mixture of experts: 0 experts means a dense MLP. Counted by num_params/planner.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
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
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise UserError(
                f"model config: num_experts_per_tok must be in 1..{self.num_experts}, got {self.num_experts_per_tok}")

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
        weights = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        bias = (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        out_bias = self.attention_bias if self.attention_out_bias is None else self.attention_out_bias
        qk_norm = {None: 0, "head": 2 * self.head_dim, "full": self.q_size + self.kv_size}[self.qk_norm]
        return weights + bias + (h if out_bias else 0) + qk_norm

    def mlp_params(self, active_only: bool = False) -> int:
        """Parameters of one layer's MLP: gated (SwiGLU/GeGLU) or plain, or the experts plus router when MoE."""
        h, i = self.hidden_size, self.intermediate_size
        if not self.num_experts:
            inputs = 2 if self.mlp_gated else 1  # gate and up, or up alone
            bias = (inputs * i + h) if self.mlp_bias else 0
            return (inputs + 1) * h * i + bias
        inter = self.moe_intermediate_size or self.intermediate_size
        experts = self.num_experts_per_tok if active_only else self.num_experts
        return experts * 3 * h * inter + h * self.num_experts

    def layer_params(self, active_only: bool = False) -> int:
        """Parameters of one decoder layer, its norms included (two, or four when sandwiched)."""
        norms = 4 if self.norm_placement == "sandwich" else 2
        return self.attention_params() + self.mlp_params(active_only) + norms * self.norm_params()

    def num_params(self, active_only: bool = False) -> int:
        """Total parameter count; equals the instantiated model's count exactly."""
        return (self.embedding_params() + self.num_hidden_layers * self.layer_params(active_only)
                + self.norm_params())  # final norm

    def non_embedding_params(self, active_only: bool = False) -> int:
        return self.num_params(active_only) - self.embedding_params()

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N (active parameters) plus attention's 12*L*H*Q*T (PaLM, App. B)."""
        n = self.num_params(active_only=True)
        attention = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
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
