"""Unmasked (bidirectional) attention for the image transformers (ViT, DiT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, H, T, d] heads, no mask.

    On a CPU this holds scaled_dot_product_attention to its math backend: torch 2.13's fused CPU kernel runs these
    short sequences several times slower whenever fp32 matmuls may use reduced precision (what `foundry pretrain`
    picks on CPUs without AMX): forward + backward of [128, 4, 17, 24] heads 7 ms at "highest", 80 ms at
    "medium"; the math backend is as fast as transformers' eager attention (benchmarks/vision.py)."""
    if q.device.type == "cpu":
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
