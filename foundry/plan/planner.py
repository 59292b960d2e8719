"""`foundry plan`: what a training or serving run will take, whether it fits, what it costs, what it reaches.

Pure arithmetic over `ModelConfig`; runs where torch is not installed. Sources:
- FLOPs: 6N per token (Kaplan et al. 2020), plus attention's 12*L*H*Q*T (PaLM, Chowdhery et al. 2022,
  App. B); MoE counts active parameters. MFU is PaLM's model-FLOPs utilisation.
- Model states: 2 + 2 + 12 bytes per parameter for mixed-precision Adam, sharded by ZeRO stage
  (Rajbhandari et al. 2020, Sec. 3-5); FSDP full shard = stage 3, shard-grad-op = stage 2. MoE counts all
  parameters; expert parallelism splits the routed experts' states (`foundry.plan.experts`).
- Activations: Korthikanti et al. 2022 (arXiv:2205.05198, Sec. 4), per layout and recompute mode.
- Sizing and loss: see `foundry.plan.scaling`. Hardware: see `foundry.plan.hardware`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundry.config import PRESETS, ModelConfig, preset, read_config_file
from foundry.core.errors import UserError
from foundry.plan import experts, scaling
from foundry.plan.hardware import Hardware, lookup, with_overrides

# (weights, gradients, optimizer) bytes per parameter with Adam; ZeRO's K = 12 for mixed precision.
STATE_BYTES = {"bf16-mixed": (2, 2, 12), "fp32": (4, 4, 8)}
ACTIVATION_BYTES = {"bf16-mixed": 2, "fp32": 4}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
RECOMPUTE = ("none", "selective", "full")
KERNELS = ("fused", "eager")
FSDP = {"full": 3, "grad-op": 2}
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(value: str | float | None, flag: str) -> float | None:
    """'7B', '15.6T', '3e23', 1e9 -> a positive float; UserError naming `flag` otherwise."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = re.fullmatch(r"\$?\s*([0-9.eE+-]+)\s*([kKmMbBgGtT]?)", value.strip().replace("_", ""))
        try:
            number = float(match.group(1)) * _SUFFIX[match.group(2).lower()] if match else math.nan
        except ValueError:
            number = math.nan
        if math.isnan(number):
            raise UserError(f"{flag} must be a number such as 7e9 or 7B, got {value!r}")
    _positive(flag, number)
    return number


def _positive(flag: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise UserError(f"{flag} must be positive, got {value:g}")


# ---- arithmetic ---------------------------------------------------------------------------

def model_state_bytes(params: float, *, dp: int = 1, zero: int = 0, precision: str = "bf16-mixed",
                      model_parallel: int = 1) -> dict[str, float]:
    """Per-device weights, gradients and Adam states, split over TP x PP then sharded by ZeRO over DP."""
    weights, grads, optimizer = (b * params / model_parallel for b in STATE_BYTES[precision])
    return {"weights": weights / (dp if zero >= 3 else 1),
            "gradients": grads / (dp if zero >= 2 else 1),
            "optimizer": optimizer / (dp if zero >= 1 else 1)}


def layer_activation_bytes(seq: int, batch: int, hidden: int, heads: int, *, q_width: float | None = None,
                           kv_width: float | None = None, ffn_width: float | None = None, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none", elem: int = 2,
                           gated: bool = True, dropout: bool = False, kernels: str = "fused",
                           routed_copies: float = 0) -> float:
    """Bytes one transformer layer keeps for backward (Korthikanti et al. 2022, Sec. 4, generalised).

    With q = kv = h, a 4h GELU MLP, dropout and elem = 2 it is the paper's sbh(34 + 5as/h), with TP
    sbh(10 + 24/t + 5as/(ht)), with sequence parallelism sbh/t(34 + 5as/h); selective recompute drops
    the as^2 terms (as FlashAttention does), full recompute keeps only the layer input, 2sbh. A mixture of
    experts keeps, for each of a token's `routed_copies`, the dispatched input and the expert's output."""
    q_width, kv_width = q_width or hidden, kv_width or hidden
    ffn_width = ffn_width or 4 * hidden
    sbh, sb = seq * batch * hidden, seq * batch
    norm_split = tp if sequence_parallel else 1  # without SP, norms and dropouts are replicated per TP rank
    if recompute == "full":
        return elem * sbh / norm_split
    # Two norm inputs, two block inputs (QKV, MLP) and, with dropout, two 1-byte masks; the routed copies'
    # inputs (for the experts' backward) and outputs (for the weighted sum's), at full width like the MLP input.
    outside = 4 * elem * sbh + (2 * sbh if dropout else 0) + 2 * routed_copies * elem * sbh
    # Q, K, V, the attention output; the MLP's hidden activations (SwiGLU keeps four, GELU two).
    inside = elem * sb * (2 * q_width + 2 * kv_width) + (4 if gated else 2) * elem * sb * ffn_width
    if kernels == "eager":
        # PyTorch eager (foundry's model unfused): each RMSNorm also keeps its fp32 normalised
        # input, and GQA's K/V are expanded to every query head before SDPA saves them.
        outside += 2 * 4 * sbh
        inside += elem * sb * 2 * (q_width - kv_width)
    scores = 0 if recompute == "selective" else heads * seq * seq * batch * (elem + (1 + elem if dropout else 0))
    return outside / norm_split + (inside + scores) / tp


def activation_bytes(config: ModelConfig, *, seq: int, micro_batch: int, tp: int = 1, pp: int = 1,
                     sequence_parallel: bool = False, recompute: str = "selective", elem: int = 2,
                     kernels: str = "fused") -> float:
    """Peak activation bytes on the busiest device: all layers' worth under 1F1B, plus the output layer.
    Layers are averaged: a mixture of experts' token runs through k experts (and a shared one) in its sparse
    layers, the dense width in the others; latent attention keeps its expanded per-head K and V."""
    q_width, kv_width = experts.attention_widths(config)
    common = {"q_width": q_width, "kv_width": kv_width, "ffn_width": experts.mean_mlp_width(config), "tp": tp,
              "sequence_parallel": sequence_parallel, "elem": elem, "kernels": kernels,
              "routed_copies": experts.mean_routed_copies(config)}
    shape = (seq, micro_batch, config.hidden_size, config.num_attention_heads)
    per_layer = layer_activation_bytes(*shape, recompute=recompute, **common)
    layers = config.num_hidden_layers
    # 1F1B: the first stage holds L/p layers for p micro-batches in flight (Korthikanti Sec. 4.2.3).
    first_stage = layers * per_layer
    if recompute == "full":  # the layer being recomputed holds its full set during its backward
        first_stage += layer_activation_bytes(*shape, recompute="none", **common)
    sb = seq * micro_batch
    norm_split = tp if sequence_parallel else 1
    final_norm = (2 * elem + (4 if kernels == "eager" else 0)) * sb * config.hidden_size / norm_split
    # At the loss's backward: logits, fp32 log-probs saved by cross-entropy, and both their gradients.
    logits = (elem + 12) * sb * config.vocab_size / tp
    last_stage = (layers / pp) * per_layer + final_norm + logits
    return first_stage + final_norm + logits if pp == 1 else max(first_stage, last_stage)


# ---- the request ------------------------------------------------------------------------

@dataclass
class PlanRequest:
    """Everything `foundry plan` takes; field names are the CLI's flag names."""

    model: str | ModelConfig | None = None
    model_name: str | None = None  # how the plan names a ModelConfig given as `model` (its spec)
    params: str | float | None = None
    tokens: str | float | None = None
    hardware: str = "h100-sxm"
    gpus: int | None = None
    dp: int | None = None
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero: int | None = None
    fsdp: str | None = None
    sequence_parallel: bool | None = None
    recompute: str = "selective"
    kernels: str = "fused"
    precision: str = "bf16-mixed"
    mfu: float | None = None
    price: float | None = None
    seq_len: int | None = None
    micro_batch: int = 1
    budget_flops: str | float | None = None
    budget_dollars: str | float | None = None
    loss_law: str = scaling.DEFAULT_LAW
    context: int | None = None
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"


def make_plan(req: PlanRequest) -> dict[str, Any]:
    """The whole plan as a JSON-ready dict: model, hardware, layout, training, memory, sizing, inference."""
    config, source = _model(req)
    params = parse_count(req.params, "--params")
    if config is not None:
        params = float(config.num_params())
    budget_flops = parse_count(req.budget_flops, "--budget-flops")
    budget_dollars = parse_count(req.budget_dollars, "--budget-dollars")
    if budget_flops and budget_dollars:
        raise UserError("give --budget-flops or --budget-dollars, not both")
    if params is None and not (budget_flops or budget_dollars):
        raise UserError("give a model (preset, config file or model directory), --params, "
                        "or a budget (--budget-flops / --budget-dollars)")
    if req.mfu is not None and not 0 < req.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {req.mfu:g}")
    if req.price is not None and req.price < 0:
        raise UserError(f"--price must not be negative, got {req.price:g}")
    for flag, value in (("--seq-len", req.seq_len), ("--micro-batch", req.micro_batch), ("--context", req.context)):
        _positive(flag, value)
    hw = with_overrides(lookup(req.hardware), price=req.price, mfu=req.mfu)
    layout = _layout(req, config)
    law = scaling.loss_law(req.loss_law)
    plan: dict[str, Any] = {"model": _describe_model(config, source, params),
                            "hardware": dataclasses.asdict(hw), "layout": layout, "notes": []}
    if config is not None and config.num_experts:
        plan["notes"].append(experts.moe_note(config))
        if layout["ep"] > 1:
            plan["notes"].append(experts.expert_parallel_note(layout))
    if config is not None and config.kv_lora_rank:
        plan["notes"].append(f"latent attention: the KV cache holds kv_lora_rank {config.kv_lora_rank} + rope "
                             f"{config.head_dim} numbers per layer and token, not K and V per head")
    if params is not None:
        plan["training"] = _training(req, config, params, hw, layout, law, plan["notes"])
        plan["memory"] = _memory(config, params, hw, layout, plan["notes"])
        plan["inference"] = _inference(req, config, params, hw, layout)
    if budget_flops or budget_dollars:
        plan["compute_optimal"] = _sizing(budget_flops, budget_dollars, hw, layout, law)
        plan["notes"].append(f"sizing: {scaling.TABLE3_SOURCE}")
    if "compute_optimal" in plan or (plan.get("training") or {}).get("predicted_loss") is not None:
        plan["notes"].append(f"loss law {law.name}: {law.describe()}; {scaling.WHY[law.name]}")
    return plan


def _model(req: PlanRequest) -> tuple[ModelConfig | None, str | None]:
    if req.model is not None and req.params is not None:
        raise UserError("give a model or --params, not both")
    if isinstance(req.model, ModelConfig):
        return req.model, req.model_name or "config object"
    if req.model is None:
        return None, None
    return load_model(req.model), req.model_name or str(req.model)


def load_model(spec: str) -> ModelConfig:
    """The config of a preset or a YAML/JSON config file (model and run directories and Hub ids are
    resolved by `foundry.hub.resolve_model_source`, which hands the planner a ModelConfig)."""
    if spec in PRESETS:
        return preset(spec)
    if Path(spec).is_file():
        return read_config_file(spec)
    raise UserError(f"model {spec!r} is not a preset ({', '.join(PRESETS)}) or a config file; "
                    "resolve directories and Hub ids with foundry.hub.resolve_model_source first")


def _layout(req: PlanRequest, config: ModelConfig | None) -> dict[str, Any]:
    for flag, value in (("--gpus", req.gpus), ("--dp", req.dp), ("--tp", req.tp), ("--pp", req.pp),
                        ("--ep", req.ep)):
        _positive(flag, value)
    tp, pp, ep = req.tp, req.pp, req.ep
    if req.gpus is None:
        dp = req.dp or ep  # the least data parallelism that expert parallelism can be carved from
        gpus = dp * tp * pp
    elif req.dp is None:
        if req.gpus % (tp * pp):
            raise UserError(f"--gpus {req.gpus} is not a multiple of tp x pp = {tp} x {pp} = {tp * pp}")
        dp, gpus = req.gpus // (tp * pp), req.gpus
    elif req.dp * tp * pp != req.gpus:
        raise UserError(f"layout dp x tp x pp = {req.dp} x {tp} x {pp} = {req.dp * tp * pp} "
                        f"does not equal --gpus {req.gpus}")
    else:
        dp, gpus = req.dp, req.gpus
    if config is not None:
        heads = config.num_attention_heads
        if tp > heads:
            raise UserError(f"--tp {tp} is larger than the model's {heads} attention heads")
        if heads % tp:
            raise UserError(f"--tp {tp} does not divide the model's {heads} attention heads")
        if pp > config.num_hidden_layers:
            raise UserError(f"--pp {pp} is more than the model's {config.num_hidden_layers} layers")
    experts.check_expert_parallel(config, ep, gpus, dp)
    zero = req.zero
    if req.fsdp is not None:
        if req.fsdp not in FSDP:
            raise UserError(f"--fsdp must be one of {', '.join(FSDP)}, got {req.fsdp!r}")
        if zero is not None and zero != FSDP[req.fsdp]:
            raise UserError(f"--fsdp {req.fsdp} is ZeRO stage {FSDP[req.fsdp]}, which contradicts --zero {zero}")
        zero = FSDP[req.fsdp]
    zero = zero or 0
    if zero not in (0, 1, 2, 3):
        raise UserError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    for flag, value, known in (("--recompute", req.recompute, RECOMPUTE), ("--kernels", req.kernels, KERNELS),
                               ("--precision", req.precision, tuple(STATE_BYTES))):
        if value not in known:
            raise UserError(f"{flag} must be one of {', '.join(known)}, got {value!r}")
    seq_len = req.seq_len or (min(4096, config.max_position_embeddings) if config else 2048)
    sp = tp > 1 if req.sequence_parallel is None else bool(req.sequence_parallel)
    return {"gpus": gpus, "dp": dp, "tp": tp, "pp": pp, "ep": ep, "zero": zero, "sequence_parallel": sp,
            "recompute": req.recompute, "kernels": req.kernels, "precision": req.precision,
            "seq_len": seq_len, "micro_batch": req.micro_batch}


def _describe_model(config: ModelConfig | None, source: str | None, params: float | None) -> dict[str, Any]:
    if config is None:
        return {"source": "--params" if params else None, "params": params, "active_params": params}
    return {"source": source, "params": config.num_params(), "active_params": config.num_params(active_only=True),
            "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "attention_heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim, "vocab_size": config.vocab_size, "experts": config.num_experts,
            "experts_per_token": config.num_experts_per_tok,
            "routed_expert_params": experts.routed_expert_params(config),
            "kv_lora_rank": config.kv_lora_rank}


def _training(req, config, params, hw: Hardware, layout, law, notes) -> dict[str, Any]:
    active = float(config.num_params(active_only=True)) if config else params
    tokens = parse_count(req.tokens, "--tokens")
    tokens_source = "--tokens"
    if tokens is None:
        tokens, tokens_source = scaling.optimal_tokens_for(params), "Chinchilla-optimal for this size (Table 3)"
        notes.append("no --tokens given: training on the compute-optimal token count for this size")
    seq = layout["seq_len"]
    flops_6nd = 6 * active * tokens
    flops = config.train_flops_per_token(seq) * tokens if config else flops_6nd
    if config is None:
        notes.append("--params gives no shape: FLOPs are 6ND without the attention term")
    seconds = flops / (layout["gpus"] * hw.peak_flops * hw.mfu)
    device_hours = layout["gpus"] * seconds / 3600
    dense = not (config and config.num_experts)
    if dense and not scaling.FITTED_PARAMS[0] <= params <= scaling.FITTED_PARAMS[1]:
        notes.append(f"{scaling.human(params)} parameters is outside the loss law's fitted range "
                     f"({scaling.human(scaling.FITTED_PARAMS[0])}-{scaling.human(scaling.FITTED_PARAMS[1])}): "
                     "the predicted loss is an extrapolation")
    return {"tokens": tokens, "tokens_source": tokens_source, "tokens_per_param": tokens / params,
            "flops": flops, "flops_6nd": flops_6nd, "flops_attention": flops - flops_6nd,
            "seconds": seconds, "days": seconds / 86400, "device_hours": device_hours,
            "cost": device_hours * hw.price_per_hour,
            "predicted_loss": law.loss(params, tokens) if dense else None,
            "loss_law": law.describe()}


def _memory(config, params, hw: Hardware, layout, notes) -> dict[str, Any]:
    # The routed experts are split over ep on top of tp x pp, and ZeRO shards them over the dp / ep ranks that hold
    # the same experts (Megatron's expert data parallelism); everything else is laid out as in a dense model.
    routed = experts.routed_expert_params(config)
    common = {"zero": layout["zero"], "precision": layout["precision"]}
    model_parallel, ep = layout["tp"] * layout["pp"], layout["ep"]
    dense = model_state_bytes(params - routed, dp=layout["dp"], model_parallel=model_parallel, **common)
    expert = model_state_bytes(routed, dp=layout["dp"] // ep, model_parallel=model_parallel * ep, **common)
    states = {k: dense[k] + expert[k] for k in dense}
    fixed = sum(states.values())
    out: dict[str, Any] = {**states, "routed_expert_params": routed, "expert_states": sum(expert.values()),
                           "dense_states": sum(dense.values()), "capacity": hw.memory_bytes}
    if config is None:
        notes.append("--params gives no shape: activation memory is not counted")
        out.update(activations=None, total=fixed, fits=fixed <= hw.memory_bytes, max_micro_batch=None)
        return out
    act = activation_bytes(config, seq=layout["seq_len"], micro_batch=layout["micro_batch"], tp=layout["tp"],
                           pp=layout["pp"], sequence_parallel=layout["sequence_parallel"],
                           recompute=layout["recompute"], elem=ACTIVATION_BYTES[layout["precision"]],
                           kernels=layout["kernels"])
    per_sample = act / layout["micro_batch"]
    room = hw.memory_bytes - fixed
    out.update(activations=act, total=fixed + act, fits=fixed + act <= hw.memory_bytes,
               max_micro_batch=max(0, math.floor(room / per_sample)) if room > 0 else 0)
    return out


def _inference(req, config, params, hw: Hardware, layout) -> dict[str, Any]:
    for flag, value in (("--weight-dtype", req.weight_dtype), ("--kv-dtype", req.kv_dtype)):
        if value not in DTYPE_BYTES:
            raise UserError(f"{flag} must be one of {', '.join(DTYPE_BYTES)}, got {value!r}")
    wb, kvb = DTYPE_BYTES[req.weight_dtype], DTYPE_BYTES[req.kv_dtype]
    active = float(config.num_params(active_only=True)) if config else params
    context = req.context or layout["seq_len"]
    devices = layout["tp"] * layout["pp"]  # one serving replica
    weights = params * wb
    out: dict[str, Any] = {"context": context, "replica_devices": devices, "weights": weights,
                           "weights_per_device": weights / devices}
    kv_token = experts.kv_cache_bytes_per_token(config, kvb) if config else 0.0
    kv_request = kv_token * context
    # Per generated token: 2 FLOPs per active weight, 2*L*H*(Q_k + Q_v) per context position for QK^T and AV.
    flops_token = 2 * active + (2 * config.num_hidden_layers * config.num_attention_heads
                                * (config.qk_head_dim + (config.v_head_dim if config.kv_lora_rank else config.head_dim))
                                * context if config else 0)
    # Batch 1: pipeline stages take turns, so only TP's bandwidth adds up.
    bw1 = layout["tp"] * hw.bandwidth
    bandwidth_one = bw1 / (active * wb + kv_request)
    compute_one = layout["tp"] * hw.peak_flops / flops_token
    out.update(kv_per_token=kv_token or None, kv_per_request=kv_request or None,
               decode_tokens_per_s_batch1=min(bandwidth_one, compute_one),
               bound_batch1="bandwidth" if bandwidth_one <= compute_one else "compute")
    room = devices * hw.memory_bytes - weights
    if not config:
        return out
    batch = max(0, math.floor(room / kv_request)) if room > 0 else 0
    out["max_batch"] = batch
    if batch:
        read = (params if config.num_experts else active) * wb  # a large batch touches every expert
        bandwidth_bound = batch * devices * hw.bandwidth / (read + batch * kv_request)
        compute_bound = devices * hw.peak_flops / flops_token
        rate = min(bandwidth_bound, compute_bound)
        out.update(decode_tokens_per_s=rate, bound="bandwidth" if bandwidth_bound <= compute_bound else "compute",
                   dollars_per_million_tokens=hw.price_per_hour * devices / (rate * 3600) * 1e6)
    return out


def _sizing(budget_flops, budget_dollars, hw: Hardware, layout, law) -> dict[str, Any]:
    flops_per_device_hour = 3600 * hw.peak_flops * hw.mfu
    if budget_dollars:
        if hw.price_per_hour <= 0:
            raise UserError("--budget-dollars needs a positive --price for this hardware")
        budget_flops = budget_dollars / hw.price_per_hour * flops_per_device_hour
    params, tokens = scaling.compute_optimal(budget_flops)
    law_params, law_tokens = law.optimum(budget_flops)
    device_hours = budget_flops / flops_per_device_hour
    return {"budget_flops": budget_flops, "params": params, "tokens": tokens, "tokens_per_param": tokens / params,
            "sizing": scaling.TABLE3_SOURCE, "predicted_loss": law.loss(params, tokens), "loss_law": law.describe(),
            "law_optimum": {"params": law_params, "tokens": law_tokens, "loss": law.loss(law_params, law_tokens)},
            "device_hours": device_hours, "days": device_hours / layout["gpus"] / 24,
            "cost": device_hours * hw.price_per_hour}


__all__ = [
    "PlanRequest",
    "activation_bytes",
    "layer_activation_bytes",
    "make_plan",
    "model_state_bytes",
    "parse_count",
]
