"""The parts of distributed training that need no second process: layouts and their refusals, gradient clipping,
activation checkpointing, the launcher's flags, and the settings' old forms."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from foundry.cli.launch import _failure_line, _without_launch_flags
from foundry.cli.main import main
from foundry.config import PRESETS
from foundry.core.errors import UserError
from foundry.model import Transformer
from foundry.train.config import TrainConfig, read_run_yaml
from foundry.train.parallel.activation import apply_activation_checkpointing
from foundry.train.parallel.apply import data_parallel_strategy
from foundry.train.parallel.gradients import clip_grad_norm
from foundry.train.parallel.world import World, layout, start_world
from foundry.train.setup import local_batch_size


def test_layouts_fit_the_world_or_are_refused():
    assert layout(8, tp=1, dp=0) == (8, 1)
    assert layout(8, tp=2, dp=0) == (4, 2)
    assert layout(8, tp=2, dp=4) == (4, 2)
    with pytest.raises(UserError, match="--tp 3 does not divide the 8 processes"):
        layout(8, tp=3, dp=0)
    with pytest.raises(UserError, match="--dp 3 x --tp 2 = 6 ranks, but 8 processes run"):
        layout(8, tp=2, dp=3)


def test_one_process_is_a_world_of_one_and_refuses_a_layout_it_cannot_run(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = start_world("cpu")
    assert (world.size, world.dp, world.tp, world.is_main, world.distributed) == (1, 1, 1, True, False)
    assert world.mean([1.5, 2.0]) == [1.5, 2.0] and world.any(True) and world.from_main(7) == 7
    with pytest.raises(UserError, match="--tp 2 / --dp 0 need as many processes: start the run with --nproc"):
        start_world("cpu", tp=2)


def _world(dp: int, tp: int = 1) -> World:
    return World(torch.device("cpu"), rank=0, size=dp * tp, dp=dp, tp=tp)


def test_the_data_parallel_strategy_follows_the_layout():
    assert data_parallel_strategy("auto", _world(1)) == "none"
    assert data_parallel_strategy("fsdp", _world(1)) == "none"  # one replica: nothing to shard
    assert data_parallel_strategy("auto", _world(2)) == "fsdp"
    assert data_parallel_strategy("ddp", _world(2)) == "ddp"
    assert data_parallel_strategy("auto", _world(1, tp=2)) == "none"  # tensor parallel alone
    with pytest.raises(UserError, match="--parallel none with 2 data-parallel ranks would train 2 unsynchronised"):
        data_parallel_strategy("none", _world(2))
    with pytest.raises(UserError, match="--parallel ddp does not compose with --tp 2; use --parallel fsdp"):
        data_parallel_strategy("ddp", _world(2, tp=2))


def test_the_batch_is_over_all_data_parallel_ranks():
    cfg = TrainConfig(batch_size=8)
    assert local_batch_size(cfg, _world(1)) == 8 and local_batch_size(cfg, _world(4, tp=2)) == 2
    with pytest.raises(UserError, match="--batch-size 8 is the micro-batch over all 3 data-parallel ranks"):
        local_batch_size(cfg, _world(3))


def test_clipping_plain_gradients_is_torchs_own():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(4, 4) * 3
        b.grad = a.grad.clone()
    norm = clip_grad_norm(ours, 1.0)
    assert norm == pytest.approx(torch.nn.utils.clip_grad_norm_(theirs, 1.0).item())
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert clip_grad_norm([torch.nn.Parameter(torch.zeros(2))], 1.0) == 0.0  # no gradients yet


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _checkpointed_run(mode: str) -> tuple[int, Counter, torch.Tensor]:
    """(bytes autograd keeps outside the checkpoints, the ops the backward pass runs, a gradient) of one step."""
    config = PRESETS["tiny"].replace(vocab_size=512)
    model = Transformer(config)
    model.init_weights(0)
    apply_activation_checkpointing(model, mode)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids).float().logsumexp(-1).mean()
    with _OpCounter() as backward:
        loss.backward()
    return sum(saved), backward.counts, model.model.embed_tokens.weight.grad


def test_activation_checkpointing_recomputes_what_its_mode_says_and_the_gradients_stay():
    off, selective, full = (_checkpointed_run(mode) for mode in ("off", "selective", "full"))
    assert full[0] < off[0] / 2  # full keeps little more than each layer's input
    # Full recomputes each layer's matmuls in the backward pass; selective keeps them and recomputes the cheap
    # element-wise ops (the norms' rsqrt among them), which the plain backward never runs.
    assert full[1]["mm"] > selective[1]["mm"] == off[1]["mm"]
    assert selective[1]["rsqrt"] > off[1]["rsqrt"] and full[1]["rsqrt"] > off[1]["rsqrt"]
    assert torch.allclose(selective[2], off[2], atol=1e-6) and torch.allclose(full[2], off[2], atol=1e-6)
    with pytest.raises(ValueError, match="not one of"):
        apply_activation_checkpointing(Transformer(PRESETS["tiny"]), "some")


def test_older_run_files_spell_activation_checkpointing_as_a_switch(tmp_path):
    (tmp_path / "run.yaml").write_text("activation_checkpointing: true\nsteps: 5\n")
    settings, _ = read_run_yaml(tmp_path / "run.yaml")
    assert TrainConfig(**settings).activation_checkpointing == "full"
    assert TrainConfig(activation_checkpointing=False).activation_checkpointing == "off"
    with pytest.raises(UserError, match="--activation-checkpointing must be off, full or selective"):
        TrainConfig(activation_checkpointing="some")


def test_settings_of_the_layout_are_checked():
    with pytest.raises(UserError, match="--tp must be positive"):
        TrainConfig(tp=0)
    with pytest.raises(UserError, match="--dist-timeout must be positive"):
        TrainConfig(dist_timeout=0)
    with pytest.raises(UserError, match="--parallel must be auto, none, ddp or fsdp"):
        TrainConfig(parallel="zero3")


def test_the_launcher_passes_on_everything_but_its_own_flags():
    argv = ["--model", "tiny", "--nproc", "2", "--max-restarts=1", "--out", "r", "--nproc=4", "--steps", "3"]
    assert _without_launch_flags(argv) == ["--model", "tiny", "--out", "r", "--steps", "3"]
    assert _failure_line(1, -9) == "rank 1 was killed by SIGKILL" and _failure_line(0, 2) == "rank 0 exited with code 2"


def test_nproc_is_refused_inside_a_torchrun_worker_and_when_not_positive(monkeypatch, capsys):
    assert main(["pretrain", "--model", "tiny", "--data", "d", "--out", "o", "--nproc", "0"]) == 2
    assert "--nproc must be at least 1, got 0" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pretrain", "--model", "tiny", "--data", "d", "--out", "o", "--nproc", "2"]) == 2
    assert "leave --nproc out under torchrun" in capsys.readouterr().err


def test_only_rank_zero_prints_a_refusal(monkeypatch, capsys):
    waited = []
    monkeypatch.setattr(time, "sleep", waited.append)
    monkeypatch.setenv("RANK", "1")
    assert main(["pretrain", "--model", "tiny", "--out", "o"]) == 2  # no --data: refused on every rank
    assert capsys.readouterr().err == "" and waited == [10]  # waits for rank 0 to say why


@pytest.fixture
def one_rank_group():
    """A real process group of one rank (gloo): FSDP2 runs in this process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_fsdp_under_bf16_computes_with_bf16_weights_and_keeps_fp32_masters(one_rank_group):
    from torch.distributed.tensor import DTensor

    from foundry.train.parallel.data_parallel import apply_fsdp

    model = Transformer(PRESETS["tiny"].replace(vocab_size=512))
    model.init_weights(0)
    apply_fsdp(model, one_rank_group, bf16=True)
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids).float().mean().backward()
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert seen == [torch.bfloat16]  # gathered for compute in bf16
    assert isinstance(weight, DTensor) and weight.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_a_sharded_model_built_on_meta_gets_one_process_fresh_weights(one_rank_group):
    from foundry.train.parallel.data_parallel import apply_fsdp
    from foundry.train.parallel.materialize import is_on_meta, materialize

    config = PRESETS["tiny"].replace(vocab_size=512)
    fresh = Transformer(config)
    fresh.init_weights(3)
    with torch.device("meta"):
        model = Transformer(config)
    apply_fsdp(model, one_rank_group, bf16=False)
    assert is_on_meta(model)
    materialize(model, torch.device("cpu"), model.initial_values(3))
    assert not is_on_meta(model) and model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    for name, param in model.named_parameters():
        assert torch.equal(param.full_tensor(), dict(fresh.named_parameters())[name]), name
    assert torch.equal(model.inv_freq, fresh.inv_freq)
