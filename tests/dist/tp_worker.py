"""Worker for tests/test_parallel_tp.py, launched by torchrun on CPU (gloo): 2-way tensor parallel vs one process.

Every rank builds the same model from the same seed, keeps an unparallelised deepcopy as the reference, shards
the other with apply_tensor_parallel, then compares logits and three AdamW steps on one shared batch (in fp32,
and again in fp64 where rounding cannot reach the weights through Adam's normalised steps). Rank 0
prints one line, `TP_RESULT {json}`, with the measured differences per family; the test judges them.
"""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from foundry.config import ModelConfig, preset
from foundry.model.transformer import Transformer
from foundry.train.parallel.tensor_parallel import (
    apply_tensor_parallel,
    tensor_parallel_refusal,
)

BATCH, SEQ_LEN, STEPS, LR = 2, 16, 3, 1e-3


def cases() -> dict[str, ModelConfig]:
    """The families under test, all small enough for two CPU cores."""
    # Llama: tied embeddings, 4 query heads over 2 key/value heads; 2 layers are enough to chain blocks.
    tiny = preset("tiny").replace(num_hidden_layers=2)
    return {
        "llama": tiny,
        # Untied head and biased q/k/v (Qwen2's bias layout: none on o_proj).
        "qwen2": tiny.replace(architecture="Qwen2ForCausalLM", model_type="qwen2", tie_word_embeddings=False,
                              attention_bias=True, attention_out_bias=False, rms_norm_eps=1e-6),
        # Sandwich norms with (1 + weight), scaled embeddings, soft caps, alternating sliding windows.
        "gemma2": tiny.replace(architecture="Gemma2ForCausalLM", model_type="gemma2", norm_placement="sandwich",
                               norm_unit_offset=True, scale_embeddings=True, hidden_act="gelu_pytorch_tanh",
                               sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                               query_pre_attn_scalar=24.0, attn_logit_softcapping=50.0,
                               final_logit_softcapping=30.0),
        # Learned positions, LayerNorm with biases, ungated MLP, biases on the row-wise o_proj and down_proj.
        "gpt2": tiny.replace(architecture="GPT2LMHeadModel", model_type="gpt2", norm_type="layer",
                             position_embedding="learned", mlp_gated=False, attention_bias=True, mlp_bias=True,
                             hidden_act="gelu_new", num_key_value_heads=4,
                             # Tables that split unevenly over 2 ranks, as GPT-2's 50257 tokens do.
                             vocab_size=4095, max_position_embeddings=1023),
    }


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (a plain tensor as it is)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def loss_of(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a row batch."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def twins(config: ModelConfig, mesh, seed: int, dtype: torch.dtype) -> tuple[Transformer, Transformer]:
    """A model sharded over `mesh` and its unsharded deepcopy, from the same seeded weights."""
    assert tensor_parallel_refusal(config, 2, SEQ_LEN) is None, tensor_parallel_refusal(config, 2, SEQ_LEN)
    model = Transformer(config)
    model.init_weights(seed)
    model.to(dtype)
    reference = copy.deepcopy(model)
    apply_tensor_parallel(model, mesh)
    return model, reference


def train(model: Transformer, reference: Transformer, tokens: torch.Tensor) -> dict[str, object]:
    """STEPS AdamW steps on both twins: per-step losses, first-step gradient and final weight differences."""
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    optimizers = [torch.optim.AdamW(m.parameters(), lr=LR) for m in (model, reference)]
    losses: list[tuple[float, float]] = []
    grads = {}
    for step in range(STEPS):
        pair = []
        for m, optimizer in zip((model, reference), optimizers):
            optimizer.zero_grad()
            loss = loss_of(m, tokens)
            loss.backward()
            pair.append(loss.item())
            if step == 0:
                grads[m is model] = {name: full(p.grad) for name, p in m.named_parameters()}
            optimizer.step()
        losses.append((pair[0], pair[1]))
    ref_params = dict(reference.named_parameters())
    diffs = {name: (full(p.detach()) - ref_params[name].detach()).abs().max().item()
             for name, p in model.named_parameters()}
    largest_grad = max(g.abs().max().item() for g in grads[False].values())
    return {
        "losses": losses,
        "loss_max_rel": max(abs(a - b) / abs(b) for a, b in losses),
        # Relative to the largest gradient entry: some true gradients are zero (a key bias shifts every score of
        # a query equally), so their own scale is rounding noise.
        "grad_max_rel": max((grads[True][n] - g).abs().max().item() for n, g in grads[False].items()) / largest_grad,
        "same_names": sorted(diffs) == sorted(ref_params) == sorted(grads[True]),
        "weight_max_abs": max(diffs.values()),
        "weight_worst": max(diffs, key=diffs.get),
        # Every tensor trains, bar key biases (their true gradient is zero, so Adam leaves them in place).
        "weight_least_moved": min((p.detach() - initial[name]).abs().max().item() for name, p in ref_params.items()
                                  if not name.endswith("k_proj.bias")),
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
    }


def compare(config: ModelConfig, mesh, seed: int) -> dict[str, object]:
    """fp32: logits and training against the unsharded twin; fp64: the same training, for exact final weights."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN + 1), generator=gen)
    model, reference = twins(config, mesh, seed, torch.float32)
    with torch.no_grad():
        logits, expected = model(tokens[:, :-1]), reference(tokens[:, :-1])
    out: dict[str, object] = {
        "logits_is_plain": not isinstance(logits, DTensor),
        "logits_max_abs": (logits - expected).abs().max().item(),
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "all_params_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
        "fp32": train(model, reference, tokens),
        "fp64": train(*twins(config, mesh, seed, torch.float64), tokens),
    }
    return out


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {name: compare(config, mesh, seed=i) for i, (name, config) in enumerate(cases().items())}
    if dist.get_rank() == 0:
        print("TP_RESULT " + json.dumps(results), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
