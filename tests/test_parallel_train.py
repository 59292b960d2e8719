"""Distributed training through real torchrun processes (gloo on the CPU): DDP and FSDP give one process's losses,
checkpoints move between world sizes, a sharded checkpoint consolidates, and a dead rank ends the job cleanly.

Tolerances: the runs are fp32 and see the same global batch; only the order of the gradient reduction differs,
so per-step losses agree to ~1e-7 relative (observed); 1e-5 leaves room for other CPUs' summation orders.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import make_data_dir, rolled_back, same_losses, step_losses, tiny_cfg

from foundry import hub
from foundry.hub.sharded import is_sharded
from foundry.train.loop import train

pytestmark = pytest.mark.slow

STEPS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_texts, tiny_tokenizer):
    return make_data_dir(tmp_path_factory, sample_texts, tiny_tokenizer)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One process, 6 steps of a global batch of 4 sequences, a checkpoint every 3 steps."""
    out = tmp_path_factory.mktemp("one") / "run"
    train(tiny_cfg(data_dir, out, steps=STEPS, save_every=3, keep_checkpoints=0, device="cpu"))
    return out


def _argv(data_dir: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "foundry", "pretrain", "--model", "tiny", "--data", str(data_dir), "--out", str(out),
            "--steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup", "2",
            "--eval-every", "0", "--eval-batches", "2", "--final-eval-batches", "2", "--save-every", "3",
            "--keep-checkpoints", "0", "--log-every", "1", "--seed", "7", "--device", "cpu", *extra]


def _run(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    return done


def _ok(argv: list[str]) -> subprocess.CompletedProcess:
    done = _run(argv)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    done = _ok(_argv(data_dir, out, STEPS, "--nproc", "2", "--parallel", "fsdp"))
    return out, done


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_one_process_losses(tmp_path, data_dir, reference, fsdp_run, strategy, monkeypatch):
    if strategy == "fsdp":
        run, done = fsdp_run
    else:  # with --compile too: distributed, each decoder layer is compiled on its own
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
        run = tmp_path / "run"
        done = _ok(_argv(data_dir, run, STEPS, "--nproc", "2", "--parallel", strategy, "--compile"))
    same_losses(run, reference, range(1, STEPS + 1))
    assert f"{strategy} over 2 data-parallel ranks" in done.stdout
    assert "planned memory per device (foundry plan)" in done.stdout and "measured" in done.stdout
    assert "tokens/s over 2 processes" in done.stdout and "per device)" in done.stdout  # MFU per device
    assert done.stdout.count("run finished") == 1  # rank 0 alone reports
    assert is_sharded(run / "step-000006") == (strategy == "fsdp")


def test_a_two_process_checkpoint_resumes_in_one_process_and_back(tmp_path, data_dir, reference, fsdp_run):
    two = rolled_back(fsdp_run[0], tmp_path / "two", 3)
    assert sorted(p.name for p in (two / "step-000003" / "dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own share
    # What a job killed while its ranks wrote step 6 leaves: never taken for a checkpoint, removed on resume.
    partial = two / ".step-000006.x1y2.tmp" / "dcp"
    partial.mkdir(parents=True)
    (partial / "__0_0.distcp").write_bytes(b"half")
    done = _ok(_argv(data_dir, two, STEPS, "--resume"))  # one process reads the shards
    assert not partial.parent.exists()
    assert "parameters on cpu (fp32)" in done.stderr and "steps 3->6" in done.stderr
    same_losses(two, reference, range(1, STEPS + 1))

    one = rolled_back(reference, tmp_path / "one", 3)
    done = _ok(_argv(data_dir, one, STEPS, "--resume", "--nproc", "2", "--parallel", "fsdp"))
    assert "steps 3->6" in done.stderr and "fsdp over 2" in done.stderr
    same_losses(one, reference, range(1, STEPS + 1))


def test_a_run_from_a_model_directory_fills_the_shards_tensor_by_tensor(tmp_path, data_dir, reference):
    """--model DIR under FSDP: the meta model is laid out first, then each rank copies in its shards of the
    directory's tensors one at a time; the steps equal one process's from the same directory."""
    start = ["--model", str(reference / "step-000003")]
    _ok(_argv(data_dir, tmp_path / "one", 3, *start))
    _ok(_argv(data_dir, tmp_path / "two", 3, *start, "--nproc", "2", "--parallel", "fsdp"))
    same_losses(tmp_path / "two", tmp_path / "one", range(1, 4))


def test_a_sharded_checkpoint_loads_and_exports_as_one_model(tmp_path, reference, fsdp_run):
    checkpoint = fsdp_run[0] / "step-000006"
    sharded = hub.load(checkpoint, dtype=torch.float32)  # consolidated in this process
    single = hub.load(reference / "step-000006", dtype=torch.float32)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The same 6 steps: AdamW turns rounding into weight differences of up to ~lr, the logits stay close.
        assert torch.allclose(sharded.model(ids), single.model(ids), atol=2e-3)
    _ok([sys.executable, "-m", "foundry", "export", str(checkpoint), "--out", str(tmp_path / "hf")])
    exported = hub.load(tmp_path / "hf", dtype=torch.float32)
    for name, tensor in sharded.model.state_dict().items():
        assert torch.equal(exported.model.state_dict()[name], tensor), name
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, sharded.model(ids), atol=1e-5)


def _rank_pid(rank: int, deadline: float) -> int:
    """The pid of the torchrun worker of `rank` (its environment says RANK=rank)."""
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ) \
                    and b"pretrain" in cmdline:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} found")


def _start(argv: list[str], stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_checkpoint(run: Path, process: subprocess.Popen) -> float:
    """Wait until the job has published a checkpoint; returns the deadline for what follows."""
    deadline = time.monotonic() + 120
    while not (run / "latest").is_file():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    return deadline


def _kill_rank_after_checkpoint(run: Path, process: subprocess.Popen, rank: int = 1) -> None:
    os.kill(_rank_pid(rank, _wait_for_checkpoint(run, process)), signal.SIGKILL)


def test_a_killed_rank_ends_the_job_with_a_clear_message_and_a_rerun_resumes(tmp_path, data_dir, reference):
    run = tmp_path / "run"
    argv = _argv(data_dir, run, 400, "--nproc", "2", "--parallel", "ddp", "--dist-timeout", "30")
    process = _start(argv)
    _kill_rank_after_checkpoint(run, process)
    killed = time.monotonic()
    out, err = process.communicate(timeout=90)
    assert time.monotonic() - killed < 60  # the survivor saw the lost peer at once, not after a hang
    assert process.returncode == 1
    assert "rank 1 was killed by SIGKILL" in err and "continue with --resume" in err
    assert "rank 0 lost the other ranks at step" in err and "Traceback" not in err
    newest = (run / "latest").read_text().strip()
    assert not list(run.glob(".step-*.tmp"))  # nothing half-written is left looking like a checkpoint

    done = _ok(_argv(data_dir, run, int(newest.removeprefix("step-")) + 3, "--resume", "--nproc", "2",
                     "--parallel", "ddp"))
    assert f"steps {int(newest.removeprefix('step-'))}->" in done.stderr


def test_a_silent_rank_ends_the_job_after_the_timeout(tmp_path, data_dir):
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    argv = _argv(data_dir, run, 400, "--nproc", "2", "--parallel", "ddp", "--dist-timeout", "3")
    with open(log, "w") as stderr:
        process = _start(argv, stderr=stderr)
        silent = _rank_pid(1, _wait_for_checkpoint(run, process))
        os.kill(silent, signal.SIGSTOP)  # alive, holding its sockets open, answering nothing
        stopped = time.monotonic()
        try:
            while "lost the other ranks" not in log.read_text():
                assert time.monotonic() - stopped < 60, log.read_text()
                time.sleep(0.2)
            waited = time.monotonic() - stopped
        finally:
            os.kill(silent, signal.SIGCONT)  # let torchrun's SIGTERM reach it
        process.wait(timeout=60)
    err = log.read_text()
    assert 2 < waited < 30 and "longer than --dist-timeout (3 s)" in err and "Timed out" in err
    assert process.returncode != 0 and "Traceback" not in err


def test_torchrun_restarts_a_failed_job_from_its_newest_checkpoint(tmp_path, data_dir, reference):
    run = tmp_path / "run"
    argv = _argv(data_dir, run, 40, "--nproc", "2", "--parallel", "fsdp", "--max-restarts", "1")
    process = _start(argv)
    _kill_rank_after_checkpoint(run, process)
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, err[-3000:]
    assert "lost the other ranks" in err
    restarted = [line for line in err.splitlines() if line.startswith("training ")]
    assert len(restarted) == 2 and "steps 0->40" in restarted[0] and "steps 0->" not in restarted[1]
    assert (run / "latest").read_text().strip() == "step-000040"
    assert sorted(step_losses(run)) == list(range(1, 41))  # every step once: the restart redid only the lost ones


def test_two_by_two_mesh_fsdp_with_tensor_parallel_gives_one_process_losses(tmp_path, data_dir, reference):
    done = _ok(_argv(data_dir, tmp_path / "run", STEPS, "--nproc", "4", "--tp", "2"))
    assert "fsdp over 2 data-parallel ranks, tensor parallel 2-way" in done.stdout
    same_losses(tmp_path / "run", reference, range(1, STEPS + 1))
