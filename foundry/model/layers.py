"""The building blocks of a decoder layer, with each family's switches (see ModelConfig) as plain branches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from foundry.config import ModelConfig
from foundry.model.kv_cache import KVCache
from foundry.model.rope import apply_rotary


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32; where the weight is applied is the family's choice.

    Llama casts back to the activation dtype, then scales; scale_fp32 scales first (OLMo 2);
    unit_offset scales by (1 + weight) in fp32 (Gemma's zero-centred weights). Equal in fp32, not in bf16."""

    def __init__(self, size: int, eps: float, unit_offset: bool = False, scale_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if unit_offset else torch.ones(size))
        self.eps = eps
        self.unit_offset = unit_offset
        self.scale_fp32 = scale_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        if self.scale_fp32:
            return (self.weight * x).to(dtype)
        return self.weight * x.to(dtype)


def make_norm(config: ModelConfig, size: int | None = None) -> nn.Module:
    """The family's norm over `size` channels (hidden_size by default): RMSNorm or LayerNorm."""
    size = size or config.hidden_size
    if config.norm_type == "layer":
        return nn.LayerNorm(size, eps=config.rms_norm_eps)
    return RMSNorm(size, config.rms_norm_eps, config.norm_unit_offset, config.upcast_norm_and_rope)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # GPT-2's tanh GELU spelled out op by op: the same function, rounded as the reference rounds it in bf16.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": _gelu_tanh,
               "gelu_new": _gelu_new, "relu": F.relu}


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions, optional query/key norms and a KV cache."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        out_bias = bias if config.attention_out_bias is None else config.attention_out_bias
        self.q_proj = nn.Linear(h, config.q_size, bias=bias)
        self.k_proj = nn.Linear(h, config.kv_size, bias=bias)
        self.v_proj = nn.Linear(h, config.kv_size, bias=bias)
        self.o_proj = nn.Linear(config.q_size, h, bias=out_bias)
        # "head" normalises each head's channels (Qwen3, Gemma 3); "full" the whole projection (OLMo 2).
        self.qk_norm = config.qk_norm
        if config.qk_norm is not None:
            norm_q, norm_k = (config.head_dim,) * 2 if config.qk_norm == "head" else (config.q_size, config.kv_size)
            norm = (config.rms_norm_eps, config.norm_unit_offset, config.upcast_norm_and_rope)
            self.q_norm, self.k_norm = RMSNorm(norm_q, *norm), RMSNorm(norm_k, *norm)
        self.scale = None if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar ** -0.5
        self.softcap = config.attn_logit_softcapping

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        # -1 heads: under tensor parallelism each rank holds only its share of the heads.
        q = q.view(b, t, -1, self.head_dim)
        k = k.view(b, t, -1, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if cos is not None:  # cos/sin are fp32 when the family rotates in fp32 (OLMo 2): cast back
            q, k = apply_rotary(q, cos, sin).to(q.dtype), apply_rotary(k, cos, sin).to(k.dtype)
        if cache is not None:
            k, v = cache.write(self.layer, k, v)
        out = attend(q, k, v, mask, self.scale, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Softmax attention [B, H, T, hd]; causal when mask is None, else the boolean mask decides.

    scale: multiplies the scores (default 1/sqrt(hd)). softcap: cap * tanh(score / cap) before masking (Gemma 2)."""
    groups = q.shape[1] // k.shape[1]
    b, heads, t, hd = q.shape
    if groups > 1 and t == 1 and softcap is None:
        # Decoding (one query per head): fold each group of query heads onto the query axis of the
        # key/value head they share, instead of copying the whole cache `groups` times every step.
        out = F.scaled_dot_product_attention(q.reshape(b, k.shape[1], groups, hd), k, v, attn_mask=mask, scale=scale)
        return out.view(b, heads, 1, hd)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # SDPA has no soft-capping: spell the attention out, softmax in fp32 as the reference does.
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        t, s = q.shape[2], k.shape[2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


class MLP(nn.Module):
    """Feed-forward: gated down(act(gate(x)) * up(x)) (SwiGLU, GeGLU) or plain down(act(up(x))) (GPT-2)."""

    def __init__(self, config: ModelConfig, width: int | None = None):
        """width: the hidden width (intermediate_size by default; an expert's or shared expert's in MoE)."""
        super().__init__()
        h, i, bias = config.hidden_size, width or config.intermediate_size, config.mlp_bias
        if config.mlp_gated:
            self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]
        self.gated = config.mlp_gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))
