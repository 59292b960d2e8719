"""The training loop: learning, exact resume, crash safety, signals and bad input."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from foundry import hub
from foundry.cli import main
from foundry.train.checkpoint import load_trainer_state
from foundry.train.loop import train
from foundry.train.metrics import read_metrics
from train_helpers import FakeClock, charge, make_data_dir, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_texts, tiny_tokenizer):
    """Token shards of a few hundred KB of stdlib text, with a 512-token tokenizer."""
    return make_data_dir(tmp_path_factory, sample_texts, tiny_tokenizer)


_cfg = tiny_cfg


def _step_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_loss_falls_and_the_run_is_a_model_directory(tmp_path, data_dir):
    result = train(_cfg(data_dir, tmp_path / "run", steps=40, batch_size=8, lr=1e-2, warmup=4, eval_every=20))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.4, result.losses
    assert result.val.loss < torch.log(torch.tensor(512.0)).item()  # better than uniform guessing
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-000040"
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    loaded = hub.load(tmp_path / "run")  # a run directory means its newest checkpoint
    assert loaded.path.name == "step-000040" and loaded.tokenizer is not None
    assert loaded.meta["step"] == 40 and loaded.meta["eval"]["val_loss"] == pytest.approx(result.val.loss)


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, data_dir):
    train(_cfg(data_dir, tmp_path / "straight", steps=8, save_every=4))
    # The same run stopped after its step-4 checkpoint: later state gone, then resumed.
    shutil.copytree(tmp_path / "straight", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "step-000008")
    (tmp_path / "split" / "latest").write_text("step-000004\n")
    assert len(_step_losses(tmp_path / "split")) == 8
    train(_cfg(data_dir, tmp_path / "split", steps=8, save_every=4, resume=True))
    straight, split = _step_losses(tmp_path / "straight"), _step_losses(tmp_path / "split")
    assert len(straight) == 8 and split == straight
    a = hub.load(tmp_path / "straight").model.state_dict()
    b = hub.load(tmp_path / "split").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _pretrain_cmd(data_dir, out, steps, *extra):
    return [sys.executable, "-m", "foundry.cli", "pretrain", "--model", "tiny", "--data", str(data_dir),
            "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--seq-len", "32",
            "--eval-every", "0", "--final-eval-batches", "2", "--log-every", "1", *extra]


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_resumable(tmp_path, data_dir):
    # A real SIGKILL, delivered from inside the second checkpoint write (after its config.json).
    killer = tmp_path / "killer.py"
    killer.write_text(
        "import os, signal, sys\n"
        "import foundry.hub as hub\n"
        "from foundry.cli import main\n"
        "real, calls = hub.write_model_files, []\n"
        "def dying(model_dir, *a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        (model_dir / 'config.json').write_text('{}')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(model_dir, *a, **k)\n"
        "hub.write_model_files = dying\n"
        "sys.exit(main(sys.argv[1:]))\n")
    run = tmp_path / "run"
    cmd = _pretrain_cmd(data_dir, run, 6, "--save-every", "3")
    proc = subprocess.run([sys.executable, str(killer), *cmd[3:]], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    assert (run / "latest").read_text().strip() == "step-000003"
    assert list(run.glob(".step-000006*"))  # the half-written one exists only under its temp name
    assert hub.load(run).meta["step"] == 3
    assert main(_pretrain_cmd(data_dir, run, 6, "--resume")[3:]) == 0
    assert (run / "latest").read_text().strip() == "step-000006" and not list(run.glob(".step-*"))


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_then_exits(tmp_path, data_dir):
    run = tmp_path / "run"
    proc = subprocess.Popen(_pretrain_cmd(data_dir, run, 100000), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = hub.load(run).meta["step"]
    assert 3 <= step < 100000 and "stopping on signal" in err


def _fails(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_input_is_one_line_and_touches_nothing(tmp_path, data_dir, capsys):
    base = ["pretrain", "--model", "tiny", "--data", str(data_dir), "--steps", "2", "--batch-size", "2",
            "--final-eval-batches", "2"]
    assert "max_position_embeddings (1024)" in _fails(capsys, base + ["--out", str(tmp_path / "a"), "--seq-len", "4096"])
    assert not (tmp_path / "a").exists()
    run = tmp_path / "run"
    assert main(base + ["--out", str(run), "--seq-len", "16", "--eval-every", "0"]) == 0
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert "already holds a run" in _fails(capsys, base + ["--out", str(run), "--seq-len", "16"])
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert "no complete checkpoint" in _fails(capsys, base + ["--out", str(tmp_path / "b"), "--resume"])
    assert "--steps must be positive" in _fails(capsys, ["pretrain", "--steps", "0"])
    assert "not a preset" in _fails(capsys, base + ["--model", "nope", "--out", str(tmp_path / "c")])
    cfg = tmp_path / "run.yaml"
    cfg.write_text("stepz: 3\n")
    assert "unknown training setting(s) stepz" in _fails(capsys, base + ["--config", str(cfg)])


def test_run_yaml_and_flags_combine(tmp_path, data_dir):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: tiny\ndata: {data_dir}\nsteps: 3\nbatch_size: 2\nseq_len: 16\neval_every: 0\n"
                   "final_eval_batches: 2\n")
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "r"), "--steps", "2"]) == 0
    assert json.loads((tmp_path / "r" / "step-000002" / "foundry.json").read_text())["train_config"]["steps"] == 2


def test_fast_fp32_matmuls_keep_fp32_accurate_gradients():
    from foundry.config import preset
    from foundry.model import Transformer
    from foundry.train.speed import configure_fp32_matmul

    config = preset("tiny").replace(vocab_size=512)
    model = Transformer(config)
    model.init_weights(0)
    x = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))

    def grads(m, dtype):
        m = m.to(dtype)
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
        return torch.cat([p.grad.flatten().double() for p in m.parameters()])

    import copy

    reference = grads(copy.deepcopy(model), torch.float64)
    try:
        configure_fp32_matmul("auto", torch.device("cpu"))
        fast = grads(copy.deepcopy(model), torch.float32)
    finally:
        torch.set_float32_matmul_precision("highest")
    assert ((fast - reference).norm() / reference.norm()).item() < 1e-5


def test_pretraining_continues_from_a_model_directory(tmp_path, data_dir):
    first = train(_cfg(data_dir, tmp_path / "first", steps=3))
    export = tmp_path / "bf16"
    hub.save(export, hub.load(first.checkpoint).model, dtype=torch.bfloat16)
    second = train(_cfg(data_dir, tmp_path / "second", model=str(export), steps=2))
    model = hub.load(second.checkpoint).model
    assert next(model.parameters()).dtype == torch.float32  # master weights train in fp32
    assert model.config.num_params() == hub.load(first.checkpoint).config.num_params()


def test_a_time_budget_fits_the_step_count_and_the_schedule(tmp_path, data_dir, monkeypatch):
    # A fake clock in the loop: each micro-batch costs 0.1 s of a 4 s budget, whatever the machine does.
    clock = FakeClock()
    charge(monkeypatch, clock, lambda n: 0.1)
    result = train(_cfg(data_dir, tmp_path / "run", steps=100_000, time_budget=4.0, eval_every=0))
    assert 20 <= result.total_steps == result.step <= 40 and not result.interrupted
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert len(lrs) == result.step and lrs[-1] == 3e-3 * 0.1  # the cosine reached its floor at the fitted end
    assert result.val is not None  # evaluated at the end


def test_chunked_loss_equals_plain_cross_entropy():
    from foundry.config import preset
    from foundry.model import Transformer
    from foundry.train.loss import CausalLMLoss

    model = Transformer(preset("tiny").replace(vocab_size=300))
    model.init_weights(0)
    x = torch.randint(0, 300, (3, 50), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, 1)
    y[0, :7] = -100  # masked prompt tokens, as instruction tuning will use
    expected = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    assert torch.allclose(CausalLMLoss(model, chunk_rows=16)(x, y), expected, rtol=1e-6)


def test_cuda_rng_states_are_saved_and_restored_on_resume(tmp_path, data_dir, monkeypatch):
    # No GPU here: stand in for two CUDA devices in use, whose RNG states a resumed run must get back.
    from foundry.train import checkpoint

    states = [torch.arange(16, dtype=torch.uint8) + device for device in (1, 2)]
    restored = []
    monkeypatch.setattr(checkpoint, "_cuda_in_use", lambda: True)
    monkeypatch.setattr(checkpoint, "_cuda_device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    first = train(_cfg(data_dir, tmp_path / "run", steps=2))
    saved = load_trainer_state(first.checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(saved["rng_cuda"], states)) and len(saved["rng_cuda"]) == 2
    train(_cfg(data_dir, tmp_path / "run", steps=3, resume=True))
    assert [device for device, _ in restored] == [0, 1]
    assert all(torch.equal(state, states[device]) for device, state in restored)
