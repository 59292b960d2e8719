"""Training mixture-of-experts models: the balancing losses against transformers' own, the aux loss in the one
loop's gradient, DeepSeek-V3's bias update, the expert loads in metrics.jsonl and expert_load.png, and
`foundry pretrain` / `foundry demo` with the moe-tiny preset. Dense training is checked to be unchanged.

The block itself and MoE inference are in test_moe.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ROOT, make_data_dir, tiny_cfg
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.switch_transformers.modeling_switch_transformers import (
    router_z_loss_func,
)

from foundry import hub
from foundry.cli.demo import run_demo
from foundry.config import ModelConfig
from foundry.model import Transformer
from foundry.model.moe import Routing, SparseMoE, moe_blocks
from foundry.train.config import TrainConfig
from foundry.train.loop import _optimizer, train
from foundry.train.loss import CausalLMLoss
from foundry.train.metrics import read_metrics
from foundry.train.moe_balance import (
    MoETraining,
    load_balancing_loss,
    load_figures,
    router_z_loss,
)
from foundry.train.parallel.gradients import clip_grad_norm
from foundry.train.schedule import lr_at
from foundry.train.setup import prepare_run

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

# DeepSeek-V3's routing at a tiny shape: sigmoid scores, a correction bias, groups, a shared expert, latent attention.
DEEPSEEK = {"architecture": "DeepseekV3ForCausalLM", "model_type": "deepseek_v3", "num_key_value_heads": 4,
            "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64, "router_scoring": "sigmoid", "router_correction_bias": True,
            "router_groups": 4, "router_topk_groups": 2, "routed_scaling_factor": 2.5, "first_k_dense_replace": 1,
            "kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16, "head_dim": 8, "v_head_dim": 16,
            "rope_interleave": True}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_texts, tiny_tokenizer):
    return make_data_dir(tmp_path_factory, sample_texts[:12], tiny_tokenizer)


@pytest.fixture(scope="module")
def deepseek_yaml(tmp_path_factory) -> Path:
    """A model config YAML: moe-tiny's size with DeepSeek-V3's routing (its default router_aux_loss_coef is 0)."""
    import yaml

    path = tmp_path_factory.mktemp("config") / "deepseek-tiny.yaml"
    path.write_text(yaml.safe_dump({"preset": "moe-tiny", **DEEPSEEK, "router_aux_loss_coef": 0.0,
                                    "tie_word_embeddings": False}))
    return path


def _routings(layers: int, tokens: int, experts: int, k: int, seed: int = 0) -> list[Routing]:
    """Random router logits per layer, each token sent to its top-k experts (Mixtral's choice)."""
    generator = torch.Generator().manual_seed(seed)
    routings = []
    for _ in range(layers):
        logits = torch.randn(tokens, experts, generator=generator) * 2
        logits[:, 0] += 1.5  # a skew, so that the loss is not near its balanced value by chance
        routings.append(Routing(logits, logits.topk(k, dim=-1).indices))
    return routings


# ---- the losses ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers, experts, k", [(3, 8, 2), (1, 4, 1), (4, 16, 4)])
def test_the_load_balancing_loss_is_transformers_own(layers, experts, k):
    routings = _routings(layers, 96, experts, k)
    ours = load_balancing_loss(routings, experts)
    theirs = load_balancing_loss_func(tuple(r.logits for r in routings), experts, k)
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert ours.item() > k * 1.05  # skewed: above the balanced value
    # Perfect balance (every expert as often, uniform probabilities) scores k; one expert taking all k * E.
    uniform = torch.zeros(experts * 4, experts)
    balanced = Routing(uniform, (torch.arange(experts * 4 * k) % experts).view(-1, k))
    assert load_balancing_loss([balanced], experts).item() == pytest.approx(k)


def test_the_router_z_loss_is_switch_transformers_own_averaged_over_layers():
    routings = _routings(3, 64, 8, 2, seed=1)
    ours = router_z_loss(routings)
    theirs = router_z_loss_func(torch.stack([r.logits for r in routings]))  # the layers as groups
    assert abs(ours.item() - theirs.item()) < 1e-5  # ~20 in size: float32 rounding of its sum
    # The mean over layers, not the sum: three copies of one layer score as that layer does.
    assert router_z_loss(routings[:1] * 3).item() == pytest.approx(router_z_loss(routings[:1]).item(), rel=1e-6)


def _moe_model(**changes) -> Transformer:
    config = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                         router_aux_loss_coef=0.02, max_position_embeddings=64, initializer_range=0.1,
                         architecture="MixtralForCausalLM", model_type="mixtral", **changes)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(0)
    return model


def test_the_aux_loss_gradient_reaches_every_router():
    model = _moe_model()
    moe = MoETraining.of(model, None, 1e-3, 0.0)
    assert moe.aux_coef == 0.02 and moe.z_coef == 1e-3  # None: the config's router_aux_loss_coef
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with moe.recording():
        loss = CausalLMLoss(model)(ids[:, :-1], ids[:, 1:])
    extra = moe.extra_loss()
    routers = [block.gate.weight for block in moe_blocks(model)]
    grads = torch.autograd.grad(extra, routers, retain_graph=True)
    assert all(g.abs().sum() > 0 and torch.isfinite(g).all() for g in grads)
    # The extra loss is exactly the weighted sum of the two, computed from what the forward recorded.
    figures = moe.end_step(updated=False)
    assert extra.item() == pytest.approx(0.02 * figures["aux_loss"] + 1e-3 * figures["z_loss"], rel=1e-6)
    assert figures["aux_loss"] >= 2.0 - 1e-6  # k = 2 is the balanced value
    # A coefficient of 0 (here both) adds nothing, and nothing is recorded outside `recording`.
    off = MoETraining.of(model, 0.0, 0.0, 0.0)
    with off.recording():
        CausalLMLoss(model)(ids[:, :-1], ids[:, 1:])
    assert off.extra_loss() is None and off.end_step(updated=True)["aux_loss"] > 0
    loss.backward()
    assert off.extra_loss() is None and off.end_step(updated=True) == {}
    moe.close()
    off.close()
    assert all(block.routing is None and not block._forward_hooks for block in moe_blocks(model))


def test_a_steps_loads_add_up_its_micro_batches():
    model = _moe_model()
    moe = MoETraining.of(model, None, 0.0, 0.0)
    batches = [torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    for ids in batches:
        with moe.recording():
            model(ids)
        moe.extra_loss()
    figures = moe.end_step(updated=True)
    # The same two micro-batches' routing, counted by hand.
    by_hand = torch.zeros(2, 4)
    for ids in batches:
        for block in moe_blocks(model):
            block.record_routing = True
        model(ids)
        by_hand += torch.stack([block.routing.load(4) for block in moe_blocks(model)])
    assert figures["expert_share"] == load_figures(by_hand)["expert_share"]
    assert by_hand.sum().item() == 2 * 2 * 2 * 12 * 2  # micro-batches x layers x tokens x k
    assert all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in figures["expert_share"])
    moe.close()


# ---- DeepSeek-V3's bias update -------------------------------------------------------------------------------

def _skewed_router() -> tuple[SparseMoE, MoETraining, torch.Tensor]:
    """A DeepSeek-style block whose router sends every one of 256 tokens to experts 0 and 1, its MoE training
    (bias rate 0.01, no aux loss) and the tokens."""
    routing = {**DEEPSEEK, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 0, "router_groups": 1,
               "router_topk_groups": 1, "first_k_dense_replace": 0}
    config = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=32, **routing)
    torch.manual_seed(0)
    block = SparseMoE(config)
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    tokens = torch.randn(256, 32) + 2 * direction
    with torch.no_grad():
        block.gate.weight.normal_(std=0.1)
        block.gate.weight[:2] += 2 * direction
    return block, MoETraining([block], aux_coef=0.0, bias_rate=0.01), tokens


def test_the_bias_update_balances_a_skewed_router():
    block, moe, tokens = _skewed_router()
    router = block.gate.weight.clone()
    imbalance = []
    for _ in range(40):
        with moe.recording():
            block(tokens)
        assert moe.extra_loss() is None  # no aux loss for a router balanced by its bias
        imbalance.append(moe.end_step(updated=True)["expert_imbalance"][0])
    assert imbalance[0] > 3.5 and max(imbalance[-5:]) < 1.5, imbalance  # measured 3.83 -> 1.17..1.20
    bias = block.gate.e_score_correction_bias
    assert bias[:2].max() < 0 < bias[2:].min()  # the overloaded experts pushed down, the others up
    assert torch.equal(block.gate.weight, router)  # only the bias moved
    # A step that did not update the weights (a skipped non-finite one) leaves the bias too.
    before = bias.clone()
    with moe.recording():
        block(tokens)
    moe.extra_loss()
    moe.end_step(updated=False)
    assert torch.equal(bias, before)


def _biases(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(checkpoint / "model.safetensors").items() if "e_score_correction_bias" in k}


def test_deepseek_biases_train_save_and_resume(tmp_path, data_dir, deepseek_yaml):
    settings = {"model": str(deepseek_yaml), "steps": 4, "batch_size": 2, "seq_len": 16, "moe_bias_update_rate": 0.01}
    whole = train(tiny_cfg(data_dir, tmp_path / "whole", **settings))
    biases = _biases(whole.checkpoint)
    assert len(biases) == 3  # layer 0 is dense (first_k_dense_replace)
    steps = torch.cat(list(biases.values())) / 0.01
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 4 and steps.abs().sum() > 0
    records = [r for r in read_metrics(whole.run_dir / "metrics.jsonl") if "loss" in r]
    assert all(len(r["expert_imbalance"]) == 3 and len(r["expert_share"][0]) == 8 for r in records)
    # Stopped after 2 steps and resumed: the saved biases carry on, to the same values.
    train(tiny_cfg(data_dir, tmp_path / "split", **{**settings, "steps": 2}))
    resumed = train(tiny_cfg(data_dir, tmp_path / "split", **settings, resume=True))
    assert resumed.losses == whole.losses[2:]
    assert all(torch.equal(_biases(resumed.checkpoint)[k], biases[k]) for k in biases)
    # Rate 0 turns it off.
    off = train(tiny_cfg(data_dir, tmp_path / "off", **{**settings, "steps": 1, "moe_bias_update_rate": 0.0}))
    assert all(not b.any() for b in _biases(off.checkpoint).values())


# ---- the one loop ----------------------------------------------------------------------------------------------

def _reference(cfg: TrainConfig, aux_coef: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The loop's step spelled out (one micro-batch, one process), with transformers' load-balancing loss."""
    setup = prepare_run(cfg)
    model = setup.model
    model.train()
    optimizer, objective, blocks = _optimizer(model, cfg), CausalLMLoss(model), moe_blocks(model)
    for block in blocks:
        block.record_routing = True
    losses = []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        x, y = next(setup.loader)
        loss = objective(x, y)
        total = loss
        if blocks:
            total = loss + aux_coef * load_balancing_loss_func(tuple(b.routing.logits for b in blocks),
                                                               blocks[0].num_experts, model.config.num_experts_per_tok)
        total.backward()
        clip_grad_norm(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_dense_training_is_the_plain_loop_bit_for_bit(tmp_path, data_dir):
    cfg = tiny_cfg(data_dir, tmp_path / "run", steps=3)
    result = train(cfg)
    losses, weights = _reference(tiny_cfg(data_dir, tmp_path / "reference", steps=3), 0.0)
    assert result.losses == losses
    assert _difference(hub.load(result.checkpoint).model.state_dict(), weights) == 0.0
    records = read_metrics(result.run_dir / "metrics.jsonl")
    assert not any(key.startswith(("aux", "z_", "expert")) for r in records for key in r)
    assert not (result.run_dir / "expert_load.png").exists()


def test_moe_training_adds_the_weighted_aux_loss_to_the_gradient(tmp_path, data_dir):
    # A large weight, so that leaving it out shows; the logged loss stays the cross-entropy.
    cfg = tiny_cfg(data_dir, tmp_path / "run", model="moe-tiny", steps=3, moe_aux_loss_coef=0.5)
    result = train(cfg)
    losses, weights = _reference(tiny_cfg(data_dir, tmp_path / "reference", model="moe-tiny", steps=3), 0.5)
    assert result.losses == pytest.approx(losses, rel=1e-6)
    assert _difference(hub.load(result.checkpoint).model.state_dict(), weights) < 2e-4  # as test_train_equivalence
    _, without = _reference(tiny_cfg(data_dir, tmp_path / "without", model="moe-tiny", steps=3), 0.0)
    assert _difference(without, weights) > 1e-3  # the comparison can tell
    records = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["aux_loss"] >= 2.0 - 1e-6 for r in records)


# ---- the command line --------------------------------------------------------------------------------------------

def test_pretrain_moe_tiny_end_to_end(tmp_path, data_dir):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "foundry.cli", "pretrain", "--model", "moe-tiny", "--data", str(data_dir),
            "--out", str(run), "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--grad-accum", "2",
            "--eval-every", "0", "--final-eval-batches", "1", "--moe-z-loss-coef", "1e-3"]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # a tiny model: one thread is all it uses
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run finished: 2/2 steps" in proc.stdout
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [2]  # the last step is always logged
    for record in records:
        assert len(record["expert_imbalance"]) == 4 and all(1.0 <= x <= 4.0 for x in record["expert_imbalance"])
        assert all(len(row) == 8 and sum(row) == pytest.approx(1.0, abs=1e-3) for row in record["expert_share"])
        assert record["aux_loss"] >= 2.0 - 1e-6 and record["z_loss"] > 0
    for png in ("loss.png", "expert_load.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = hub.load(run)  # its newest checkpoint
    assert saved.model.config.num_experts == 8 and len(moe_blocks(saved.model)) == 4


def test_bad_moe_settings_are_one_line(capsys, data_dir, tmp_path):
    from foundry.cli import main

    argv = ["pretrain", "--model", "moe-tiny", "--data", str(data_dir), "--out", str(tmp_path / "o")]
    assert main([*argv, "--moe-aux-loss-coef", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--moe-aux-loss-coef must not be negative, got -1.0") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_demo_trains_moe_tiny(tmp_path, capsys):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    figures = run_demo(tmp_path / "demo", preset_name="moe-tiny", vocab_size=512, steps=3,
                       corpus=[str(stdlib / "json")], batch_size=4, seq_len=32, sample_tokens=8)
    assert figures["steps"] == 3 and figures["val_loss"] > 0
    assert len(moe_blocks(hub.load(figures["checkpoint"]).model)) == 4
    out = capsys.readouterr().out
    assert "expert load:" in out and (tmp_path / "demo" / "run" / "expert_load.png").is_file()


# Each rank routes half of the tokens; the bias moves by the loads of all of them (one all-reduce), so every
# replica's bias stays equal to what one process seeing every token computes.
_RANK = """
import torch
import torch.distributed as dist
from foundry.config import ModelConfig
from foundry.model.moe import SparseMoE
from foundry.train.moe_balance import MoETraining
DEEPSEEK = {deepseek!r}
{router}
dist.init_process_group("gloo")
rank = dist.get_rank()
block, moe, tokens = _skewed_router()
for _ in range(30):
    with moe.recording():
        block(tokens[rank::2])
    moe.extra_loss()
    figures = moe.end_step(updated=True)
torch.save({{"bias": block.gate.e_score_correction_bias, "figures": figures}}, {out!r}.format(rank))
dist.destroy_process_group()
"""


def test_data_parallel_ranks_update_their_biases_from_every_ranks_loads(tmp_path):
    import inspect
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = _RANK.format(deepseek=DEEPSEEK, router=inspect.getsource(_skewed_router), out=str(tmp_path / "rank{}.pt"))
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}) for rank in range(2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    block, moe, tokens = _skewed_router()
    alone = []
    for _ in range(30):
        with moe.recording():
            block(tokens)
        moe.extra_loss()
        alone.append(moe.end_step(updated=True))
    assert torch.equal(ranks[0]["bias"], ranks[1]["bias"])
    assert torch.equal(ranks[0]["bias"], block.gate.e_score_correction_bias)
    assert ranks[0]["figures"] == ranks[1]["figures"]
    assert ranks[0]["figures"]["expert_share"] == alone[-1]["expert_share"]
    # The comparison can tell: half of the tokens alone steer the bias elsewhere.
    block, moe, tokens = _skewed_router()
    for _ in range(30):
        with moe.recording():
            block(tokens[::2])
        moe.extra_loss()
        moe.end_step(updated=True)
    assert not torch.equal(block.gate.e_score_correction_bias, ranks[0]["bias"])
