"""Worker for tests/test_parallel_ep.py, launched by torchrun on CPU (gloo): expert parallelism (--ep 2) against one
process, with 2 ranks (dp = ep: one copy of the experts) or 4 (dp = 4: two replicas of each expert).

Every rank builds the same seeded model and keeps a deepcopy as the one-process reference, which sees the whole
global batch; the parallel twin sees this rank's slice of it. Measured: one MoE block's all-to-all round trip
(outputs and gradients, also when a rank receives no rows), three AdamW steps of the whole model through
parallelize() (DDP for the shared weights, two micro-batches a step, gradient clipping on) in fp32 and fp64, and
the checkpoint pieces (the gathered model directory, loaded by transformers; the optimizer state both ways).
Arguments: a directory to write in, and --fp64 to train the fp64 twins too. Rank 0 prints one line,
`EP_RESULT {json}`; the test judges the numbers.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from foundry import hub
from foundry.config import ModelConfig, preset
from foundry.model.moe import SparseMoE
from foundry.model.transformer import Transformer
from foundry.train.loss import CausalLMLoss
from foundry.train.parallel.apply import parallelize
from foundry.train.parallel.expert_checkpoint import (
    full_optimizer_state,
    gathered_experts,
    load_optimizer_state,
)
from foundry.train.parallel.expert_parallel import (
    apply_expert_parallel,
    is_expert_param,
)
from foundry.train.parallel.gradients import clip_grad_norm
from foundry.train.parallel.world import start_world

EP, ROWS, SEQ_LEN, STEPS, ACCUM, LR, CLIP = 2, 2, 16, 3, 2, 1e-3, 0.5


def config() -> ModelConfig:
    """moe-tiny at two layers and a small vocabulary: 8 experts, 2 per token (Mixtral's layout)."""
    return preset("moe-tiny").replace(num_hidden_layers=2, vocab_size=256, router_aux_loss_coef=0.0)


def max_all(value: float) -> float:
    """The largest of every rank's value."""
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def dispatch(world, rows: torch.Tensor) -> dict[str, float]:
    """One block, ep-split, against the whole block on all ranks' rows: outputs, and the gradients of
    sum(out * g) after the experts' gradients are finished (summed over replicas, divided by dp)."""
    torch.manual_seed(0)
    block = SparseMoE(config())
    reference = copy.deepcopy(block)
    gradients = apply_expert_parallel(block, world)
    mine = slice(world.rank * ROWS * SEQ_LEN, (world.rank + 1) * ROWS * SEQ_LEN)
    x = rows.clone().requires_grad_()
    g = torch.randn(rows.shape, generator=torch.Generator().manual_seed(1))
    local = x[mine].detach().clone().requires_grad_()
    out = block(local)
    (out * g[mine]).sum().backward()
    want = reference(x)
    (want * g).sum().backward()
    gate = block.gate.weight.grad.clone()
    dist.all_reduce(gate)  # each rank's router gradient holds its own rows' share
    expert = max(rel(p.grad * world.dp, dict(reference.named_parameters())[n].grad)
                 for n, p in block.named_parameters() if is_expert_param(p))
    assert len(gradients.params) == 3 * 8 // EP
    return {"out": max_all(rel(out, want[mine])), "input_grad": max_all(rel(local.grad, x.grad[mine])),
            "gate_grad": max_all(rel(gate, reference.gate.weight.grad)), "expert_grad": max_all(expert)}


def skewed_rows(rows: torch.Tensor) -> tuple[torch.Tensor, callable]:
    """Rows every token of which chooses experts 0 and 1 (rank 0's): the other ranks receive no row at all."""
    def steer(block: SparseMoE) -> None:
        with torch.no_grad():
            block.gate.weight.fill_(-1.0)
            block.gate.weight[0].fill_(1.0)
            block.gate.weight[1].fill_(0.5)
    return rows.abs(), steer


def empty_dispatch(world, rows: torch.Tensor) -> dict[str, float]:
    """As dispatch(), with all rows routed to rank 0's experts."""
    rows, steer = skewed_rows(rows)
    torch.manual_seed(0)
    block = SparseMoE(config())
    steer(block)
    reference = copy.deepcopy(block)
    apply_expert_parallel(block, world)
    mine = slice(world.rank * ROWS * SEQ_LEN, (world.rank + 1) * ROWS * SEQ_LEN)
    local = rows[mine].clone().requires_grad_()
    x = rows.clone().requires_grad_()
    out, want = block(local), reference(x)
    out.sum().backward()
    want.sum().backward()
    # Every expert has a gradient, zeros where no row reached it, as in one process (data-parallel reducers wait
    # for one from every parameter); the idle ones' are zero.
    held = {n: p.grad for n, p in block.named_parameters() if is_expert_param(p)}
    chosen = {"0", "1"}
    right = all(g is not None and (n.split(".")[1] in chosen or not g.any()) for n, g in held.items())
    right = right and all(p.grad is not None for p in reference.parameters())
    return {"out": max_all(rel(out, want[mine])), "input_grad": max_all(rel(local.grad, x.grad[mine])),
            "every_expert_has_a_gradient": max_all(float(not right)) == 0.0}


def optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """The loop's AdamW: decay on matrices, none on vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)


def train(world, dtype: torch.dtype, tokens: torch.Tensor):
    """STEPS AdamW steps of the parallel twin and the reference on the same global batches."""
    model = Transformer(config())
    model.init_weights(3)
    model.to(dtype)
    reference = copy.deepcopy(model)
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    step_of = parallelize(model, CausalLMLoss(model), world, "ddp", activation_checkpointing="off", compile=False,
                          bf16=False)
    step_ref = CausalLMLoss(reference)
    opt, opt_ref = optimizer(model), optimizer(reference)
    rows = tokens.shape[1] // world.dp
    losses, norms = [], []
    for step in range(STEPS):
        total, total_ref = 0.0, 0.0
        for micro in range(ACCUM):
            batch = tokens[step * ACCUM + micro]
            mine = batch[world.rank * rows:(world.rank + 1) * rows]
            with step_of.no_sync() if micro < ACCUM - 1 else nullcontext():
                loss = step_of(mine[:, :-1], mine[:, 1:])
                (loss / ACCUM).backward()
            loss_ref = step_ref(batch[:, :-1], batch[:, 1:])
            (loss_ref / ACCUM).backward()
            total, total_ref = total + loss.item() / ACCUM, total_ref + loss_ref.item() / ACCUM
        total = world.mean([total])[0]
        norms.append((clip_grad_norm(model.parameters(), CLIP),
                      float(torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP))))
        opt.step(), opt_ref.step()
        opt.zero_grad(set_to_none=True), opt_ref.zero_grad(set_to_none=True)
        losses.append((total, total_ref))
    want = dict(reference.named_parameters())
    weights = max((p - want[n]).abs().max().item() for n, p in model.named_parameters())
    least = min((want[n] - initial[n]).abs().max().item() for n in want)
    return model, reference, opt, opt_ref, {
        "loss_max_rel": max(abs(a - b) / abs(b) for a, b in losses),
        "norm_max_rel": max(abs(a - b) / abs(b) for a, b in norms),
        "clipped_steps": sum(b > CLIP for _, b in norms),
        "weight_max_abs": max_all(weights), "weight_least_moved": least,
        "expert_params_here": sum(is_expert_param(p) for p in model.parameters())}


def checkpoint(world, model, reference, opt, opt_ref, out: Path) -> dict[str, object]:
    """The gathered model directory (every rank's experts, exactly; transformers loads it) and the optimizer
    state: gathered as one process numbers it, and handed back to each rank."""
    directory = out / "model"
    directory.mkdir(parents=True, exist_ok=True)
    with gathered_experts(model):
        if world.is_main:
            hub.write_model_files(directory, model)
    full = full_optimizer_state(model, opt)
    if world.is_main:
        torch.save(full, out / "optimizer.pt")
    dist.barrier()
    loaded = dict(hub.load(directory, dtype=torch.float32).model.named_parameters())
    exact = all(torch.equal(p, loaded[n]) for n, p in model.named_parameters())
    result: dict[str, object] = {"weights_exact": max_all(float(not exact)) == 0.0}
    if world.is_main:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            result["hf_logits_max_abs"] = float((hf(ids).logits - hub.load(directory).model(ids)).abs().max())
            result["hf_vs_reference_max_abs"] = float((hf(ids).logits - reference(ids)).abs().max())
        single = opt_ref.state_dict()
        result["optimizer_layout_same"] = (
            [len(g["params"]) for g in full["param_groups"]] == [len(g["params"]) for g in single["param_groups"]]
            and sorted(full["state"]) == sorted(single["state"]))
        result["optimizer_exp_avg_max_rel"] = max(rel(full["state"][i]["exp_avg"], single["state"][i]["exp_avg"])
                                                  for i in single["state"])
    # Back from the gathered file: each rank's share exactly as it was; from the reference's: the reference's.
    saved = torch.load(out / "optimizer.pt", weights_only=True)
    names = {id(p): n for n, p in model.named_parameters()}
    back, from_single = optimizer(model), optimizer(model)
    load_optimizer_state(model, back, saved)
    load_optimizer_state(model, from_single, opt_ref.state_dict())
    ref_state = {n: opt_ref.state[p] for n, p in reference.named_parameters()}
    same = all(torch.equal(back.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"]) for p in model.parameters())
    single_same = all(torch.equal(from_single.state[p]["exp_avg"], ref_state[names[id(p)]]["exp_avg"])
                      for p in model.parameters())
    result["optimizer_round_trip_exact"] = max_all(float(not same)) == 0.0
    result["optimizer_from_one_process_exact"] = max_all(float(not single_same)) == 0.0
    return result


def main() -> None:
    out = Path(sys.argv[1])
    world = start_world("cpu", ep=EP)
    torch.manual_seed(0)
    rows = torch.randn(world.dp * ROWS * SEQ_LEN, 128, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(0, 256, (STEPS * ACCUM, world.dp * ROWS, SEQ_LEN + 1),
                           generator=torch.Generator().manual_seed(4))
    result: dict[str, object] = {"world": world.size, "dispatch": dispatch(world, rows),
                                 "empty": empty_dispatch(world, rows)}
    model, reference, opt, opt_ref, result["fp32"] = train(world, torch.float32, tokens)
    result["checkpoint"] = checkpoint(world, model, reference, opt, opt_ref, out)
    if "--fp64" in sys.argv:
        result["fp64"] = train(world, torch.float64, tokens)[-1]
    if world.is_main:
        print("EP_RESULT " + json.dumps(result), flush=True)
    world.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
