"""Tensor parallelism with sequence parallelism for `Transformer`, applied from outside with DTensor.

The plan is torchtitan's Llama plan under foundry's Hugging Face names. Between modules the residual stream is a
plain local tensor holding this rank's share of the sequence ([B, T / tp, hidden]); the norms run on that shard,
attention and the MLP gather the whole sequence and split their heads and hidden units across ranks, and the
output head gathers whole logits. Every rank must hold the same full weights before this is applied (norm weights
are taken as they are, not broadcast), and every rank must be fed the same batch.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.model.decoder_layer import NORM_NAMES


def tensor_parallel_refusal(config: ModelConfig, tp: int, seq_len: int) -> str | None:
    """Why this model cannot train with `--tp tp` at rows of `seq_len` tokens, in one sentence; None when it can."""
    return _shape_refusal(config, tp) or _sequence_refusal(tp, seq_len)


def _shape_refusal(config: ModelConfig, tp: int) -> str | None:
    # What the weights' shapes and the family's modules allow, whatever the batch.
    if tp < 1:
        return f"--tp must be a positive integer, got {tp}"
    if config.num_experts:
        return (f"--tp {tp}: mixture-of-experts models ({config.num_experts} experts) have no tensor-parallel plan "
                "yet; drop --tp")
    if config.kv_lora_rank:
        return (f"--tp {tp}: latent attention ({config.architecture}, kv_lora_rank={config.kv_lora_rank}) has no "
                "tensor-parallel plan yet; drop --tp")
    if config.qk_norm is not None:
        return (f"--tp {tp}: {config.architecture} normalises queries and keys (qk_norm={config.qk_norm!r}), whose "
                "norm weights would need a tensor-parallel plan of their own that foundry does not have yet; "
                "drop --tp")
    # Heads and hidden units must split evenly; embedding tables need not (GPT-2's 50257 tokens shard unevenly).
    divisible = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
                 "intermediate_size": config.intermediate_size}
    for name, value in divisible.items():
        if value % tp:
            return f"--tp {tp} must divide the model's {name} ({value}); pick a --tp that divides {value}"
    return None


def _sequence_refusal(tp: int, seq_len: int) -> str | None:
    if seq_len % tp:
        return (f"--tp {tp} shards each row's sequence across ranks, so --seq-len ({seq_len}) must divide by {tp}; "
                f"pick a --seq-len that is a multiple of {tp}")
    return None


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `model` (a foundry Transformer, full weights on every rank) over the 1-D `tp_mesh`, in place.

    Raises UserError when the model cannot be sharded that many ways (see tensor_parallel_refusal)."""
    config: ModelConfig = model.config
    tp = tp_mesh.size()
    reason = _shape_refusal(config, tp)
    if reason is not None:
        raise UserError(reason)
    # Token ids (and position ids) arrive whole; the vocab-sharded lookups sum into sequence shards.
    embedding = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    top: dict[str, ParallelStyle] = {
        "model.embed_tokens": embedding,
        "model.norm": SequenceParallel(use_local_output=True),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    if config.position_embedding == "learned":
        top["model.embed_positions"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    parallelize_module(model, tp_mesh, top)
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, _layer_plan(config))
    if config.tie_word_embeddings:
        _retie(model)


def _layer_plan(config: ModelConfig) -> dict[str, ParallelStyle]:
    """One decoder layer's plan: sequence-parallel norms, column-then-row sharded attention and MLP."""
    plan: dict[str, ParallelStyle] = {name: SequenceParallel(use_local_output=True)
                                      for name in NORM_NAMES[config.norm_placement].values()}
    # Attention's forward is (x, cos, sin, mask, cache): only x is sharded; cos, sin and the mask cover the
    # whole sequence on every rank already.
    plan["self_attn"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                           desired_input_layouts=(Replicate(), None, None, None, None))
    plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj"):
        plan[name] = ColwiseParallel()
    if config.mlp_gated:
        plan["mlp.gate_proj"] = ColwiseParallel()
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        plan[name] = RowwiseParallel(output_layouts=Shard(1))
    return plan


def _retie(model: nn.Module) -> None:
    """Share the embedding table with the output head again: sharding gave each its own parameter."""
    embed, head = model.model.embed_tokens, model.lm_head
    head.weight = embed.weight
    weight = head.weight
    if not (isinstance(weight, DTensor) and weight is embed.weight and weight.placements == (Shard(0),)):
        raise RuntimeError("tensor parallel: lm_head.weight is not the embedding's vocab-sharded table after re-tying")
