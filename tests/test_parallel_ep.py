"""Expert parallelism (--ep): real gloo processes on CPU against one process, and the refusals.

tests/dist/ep_worker.py measures, in one torchrun launch, the all-to-all dispatch of one MoE block, three AdamW
steps of a two-layer Mixtral-style model through parallelize() (fp32 and fp64) and the checkpoint pieces, each
against an unsplit deepcopy that sees the whole global batch; with 2 ranks (dp = ep = 2) and, slow, with 4 (two
replicas of each expert). The pretrain tests run `foundry pretrain --nproc 2 --ep 2` end to end against one process.

Tolerances: the all-to-all moves rows without arithmetic, so the block's outputs are exact; gradients summed in
another order differ by ~1e-7 relative in fp32 (observed <= 3e-7) and ~1e-15 in fp64 (the loss itself is fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import make_data_dir, rolled_back, same_losses, tiny_cfg

from foundry import hub
from foundry.config import preset
from foundry.core.errors import UserError
from foundry.train.config import TrainConfig
from foundry.train.loop import train
from foundry.train.parallel.apply import data_parallel_strategy
from foundry.train.parallel.expert_parallel import expert_parallel_refusal
from foundry.train.parallel.world import World, check_expert_layout, start_world
from foundry.train.setup import check_expert_parallel

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3  # the worker's AdamW learning rate


def _worker(nproc: int, out: Path, *flags: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "tests/dist/ep_worker.py", str(out), *flags]
    done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"ep_worker failed (exit {done.returncode}):\n{output[-6000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("EP_RESULT ")]
    assert len(lines) == 1, f"ep_worker printed no EP_RESULT line:\n{output[-6000:]}"
    return json.loads(lines[0].removeprefix("EP_RESULT "))


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> dict:
    """2 ranks, --ep 2: each holds 4 of the 8 experts of every MoE layer."""
    return _worker(2, tmp_path_factory.mktemp("ep2"), "--fp64")


@pytest.mark.slow
def test_dispatch_round_trip_equals_the_local_block(two):
    """Rows out to their experts' ranks and back: the block's output and input gradient are one process's exactly;
    the router's and the experts' gradients are its gradient (the experts' finished: summed, then / dp)."""
    for case in ("dispatch", "empty"):
        assert two[case]["out"] == 0.0, two[case]
        assert two[case]["input_grad"] == 0.0, two[case]
    assert two["dispatch"]["gate_grad"] < 1e-6, two["dispatch"]
    assert two["dispatch"]["expert_grad"] < 1e-6, two["dispatch"]


@pytest.mark.slow
def test_a_rank_that_receives_no_rows_still_takes_part(two):
    """Every row routed to rank 0's experts: rank 1 sends and receives empty all-to-alls (forward and backward),
    and every expert gets a gradient, zeros for those no row reached, as in one process."""
    assert two["empty"]["every_expert_has_a_gradient"], two["empty"]


def _judge_training(fp32: dict, fp64: dict | None) -> None:
    assert fp32["expert_params_here"] == 2 * 4 * 3, "each rank should hold 4 experts x 3 matrices of 2 layers"
    assert fp32["clipped_steps"] == 3, "the clipping threshold should bind on every step (it is what is tested)"
    assert fp32["loss_max_rel"] < 1e-5, fp32
    assert fp32["norm_max_rel"] < 1e-5, fp32
    assert fp32["weight_max_abs"] < LR / 100, fp32  # observed ~3e-6 after 3 steps of lr 1e-3
    assert fp32["weight_least_moved"] > LR, "every weight tensor should have trained"
    if fp64 is not None:
        assert fp64["loss_max_rel"] < 1e-6, fp64  # the loss is computed in fp32 (as CausalLMLoss does)
        assert fp64["norm_max_rel"] < 1e-12, fp64
        assert fp64["weight_max_abs"] < 1e-12, fp64


@pytest.mark.slow
def test_training_steps_match_one_process(two):
    """Three AdamW steps of two micro-batches each (DDP's no_sync on the first), gradient clipping binding: the
    losses, the clipped-from norms and the final weights of every rank's parameters are one process's."""
    _judge_training(two["fp32"], two["fp64"])


@pytest.mark.slow
def test_checkpoint_pieces_make_the_whole_model(two):
    """gathered_experts gives rank 0 a model directory holding every rank's experts exactly, which transformers
    loads as Mixtral (logits equal foundry's); full_optimizer_state numbers the state as one process does, and
    load_optimizer_state hands each rank its share back, from it or from a one-process optimizer's state."""
    c = two["checkpoint"]
    assert c["weights_exact"], c
    assert c["hf_logits_max_abs"] < 1e-5, c
    assert c["hf_vs_reference_max_abs"] < 1e-4, c
    assert c["optimizer_layout_same"], c
    assert c["optimizer_exp_avg_max_rel"] < 1e-3, c  # Adam's first moments after 3 steps of ~1e-7-close gradients
    assert c["optimizer_round_trip_exact"], c
    assert c["optimizer_from_one_process_exact"], c


@pytest.mark.slow
def test_four_ranks_two_replicas_of_each_expert(tmp_path):
    """dp 4, ep 2: the expert gradients are also summed over the replica that holds the same experts."""
    four = _worker(4, tmp_path)
    assert four["world"] == 4
    assert four["dispatch"]["out"] == 0.0 and four["dispatch"]["expert_grad"] < 1e-6, four["dispatch"]
    assert four["empty"]["every_expert_has_a_gradient"], four["empty"]
    _judge_training(four["fp32"], None)
    assert four["checkpoint"]["weights_exact"] and four["checkpoint"]["optimizer_round_trip_exact"], four


# ---- refusals ----------------------------------------------------------------------------------------------


def _world(dp: int, ep: int, tp: int = 1) -> World:
    return World(torch.device("cpu"), rank=0, size=dp * tp, dp=dp, tp=tp, ep=ep)


@pytest.mark.parametrize("change, ep, words", [
    ({"num_experts": 0, "num_experts_per_tok": 0}, 2, ["dense model", "drop --ep"]),
    ({}, 3, ["--ep 3", "8 experts", "divides 8"]),
    ({}, 0, ["positive integer", "0"]),
])
def test_refusal_names_the_numbers_and_the_fix(change, ep, words):
    config = preset("moe-tiny").replace(**change)
    reason = expert_parallel_refusal(config, ep)
    assert reason is not None and "\n" not in reason
    for word in words:
        assert word in reason, reason


def test_a_splittable_model_is_accepted():
    config = preset("moe-tiny")
    assert all(expert_parallel_refusal(config, ep) is None for ep in (1, 2, 4, 8))
    check_expert_parallel(config, tiny_cfg("data", "out", ep=2), _world(dp=2, ep=2))


@pytest.mark.parametrize("ep, dp, tp, words", [
    (2, 3, 1, ["--ep 2 must divide the 3 data-parallel ranks"]),
    (2, 2, 2, ["--ep 2 does not compose with --tp 2"]),
])
def test_layout_refusals(ep, dp, tp, words):
    with pytest.raises(UserError) as caught:
        check_expert_layout(ep, dp, tp)
    for word in words:
        assert word in str(caught.value)


def test_fsdp_is_refused_and_auto_means_ddp():
    world = _world(dp=2, ep=2)
    assert data_parallel_strategy("auto", world) == "ddp"
    assert data_parallel_strategy("ddp", world) == "ddp"
    with pytest.raises(UserError, match="--parallel fsdp does not compose with --ep 2.*use --parallel ddp"):
        data_parallel_strategy("fsdp", world)
    with pytest.raises(UserError, match="--parallel fsdp"):  # refused before the run directory is written
        check_expert_parallel(preset("moe-tiny"), tiny_cfg("data", "out", ep=2, parallel="fsdp"), world)
    with pytest.raises(UserError, match="dense model"):
        check_expert_parallel(preset("tiny"), tiny_cfg("data", "out", ep=2), world)


def test_ep_needs_processes_and_a_positive_degree(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="--ep 2 splits the experts over 2 processes.*--ep 1"):
        start_world("cpu", ep=2)
    with pytest.raises(UserError, match="--ep must be positive"):
        TrainConfig(ep=0)


# ---- foundry pretrain --ep, end to end -----------------------------------------------------------------------

STEPS = 6
MOE = {"model": "moe-tiny", "moe_aux_loss_coef": 0.0, "save_every": 3, "keep_checkpoints": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_texts, tiny_tokenizer):
    return make_data_dir(tmp_path_factory, sample_texts, tiny_tokenizer)


def _pretrain(data_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "foundry", "pretrain", "--model", "moe-tiny", "--moe-aux-loss-coef", "0",
            "--data", str(data_dir), "--out", str(out), "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32",
            "--lr", "3e-3", "--warmup", "2", "--eval-every", "0", "--eval-batches", "2", "--final-eval-batches", "2",
            "--save-every", "3", "--keep-checkpoints", "0", "--log-every", "1", "--seed", "7", "--device", "cpu",
            *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """The same 6 steps in one process and as `foundry pretrain --nproc 2 --ep 2` (checkpoints at 3 and 6)."""
    root = tmp_path_factory.mktemp("pretrain")
    train(tiny_cfg(data_dir, root / "one", steps=STEPS, **MOE))
    _pretrain(data_dir, root / "two", "--nproc", "2", "--ep", "2")
    return root / "one", root / "two"


@pytest.mark.slow
def test_pretrain_with_ep_equals_one_process(runs):
    """One process's losses and, within rounding, its weights; the checkpoint is a whole model directory, which
    transformers loads as Mixtral with foundry's logits."""
    one, two = runs
    same_losses(two, one, range(1, STEPS + 1))
    mine = hub.load(two / "step-000006", dtype=torch.float32).model
    single = hub.load(one / "step-000006", dtype=torch.float32).model.state_dict()
    drift = max((tensor - single[name]).abs().max().item() for name, tensor in mine.state_dict().items())
    assert drift < 3e-4, drift  # observed ~2e-6 after 6 AdamW steps at lr 3e-3

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(two / "step-000006", dtype=torch.float32)
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, mine(ids), atol=1e-4)


@pytest.mark.slow
def test_an_ep_checkpoint_resumes_at_ep_and_in_one_process(runs, tmp_path, data_dir):
    """Step 3 of the --ep 2 run, resumed at --ep 2 and in one process (--ep 1): the same steps 4-6."""
    one, two = runs
    again = rolled_back(two, tmp_path / "again", 3)
    done = _pretrain(data_dir, again, "--resume", "--nproc", "2", "--ep", "2")
    assert "steps 3->6" in done.stderr
    same_losses(again, one, range(1, STEPS + 1))
    alone = rolled_back(two, tmp_path / "alone", 3)
    train(TrainConfig(**{**tiny_cfg(data_dir, alone, steps=STEPS, **MOE).to_dict(), "ep": 1, "resume": True}))
    same_losses(alone, one, range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_moe_trains_data_parallel_as_one_process(runs, tmp_path, data_dir, parallel):
    """Plain data parallelism, no --ep: every expert gets a gradient on every rank (zeros for one its tokens never
    chose), so DDP's buckets and FSDP's reduce-scatters match across ranks and the run is one process's."""
    one, _ = runs
    _pretrain(data_dir, tmp_path / parallel, "--nproc", "2", "--parallel", parallel)
    same_losses(tmp_path / parallel, one, range(1, STEPS + 1))
