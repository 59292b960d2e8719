"""A run killed at any moment (SIGKILL) or stopped (SIGTERM) leaves a loadable checkpoint and no litter."""

import random
import signal
import subprocess
import sys
import time

import pytest

from foundry import hub
from foundry.cli import main
from foundry.train.loop import train
from foundry.train.metrics import read_metrics
from train_helpers import ROOT, make_data_dir, pretrain_argv, step_losses, temp_files, tiny_cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_texts, tiny_tokenizer):
    return make_data_dir(tmp_path_factory, sample_texts, tiny_tokenizer)


def _run_patched(tmp_path, patch: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`foundry pretrain` in a fresh process after running `patch` (Python that sets a trap in foundry)."""
    script = tmp_path / "patched.py"
    script.write_text(f"import os, signal, sys\n{patch}\nfrom foundry.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, str(script), *argv[3:]], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_a_kill_between_the_checkpoint_and_its_latest_pointer_is_repaired_on_resume(tmp_path, data_dir):
    # SIGKILL right after step-000006/ is renamed into place, before `latest` is pointed at it.
    patch = ("import foundry.train.checkpoint as ckpt\n"
             "real, calls = ckpt.atomic_file, []\n"
             "def dying(path, *a, **k):\n"
             "    if os.path.basename(path) == 'latest':\n"
             "        calls.append(1)\n"
             "        if len(calls) == 2:\n"
             "            os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return real(path, *a, **k)\n"
             "ckpt.atomic_file = dying\n")
    run = tmp_path / "run"
    argv = pretrain_argv(data_dir, run, 6, "--save-every", "3")
    proc = _run_patched(tmp_path, patch, argv)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (run / "latest").read_text().strip() == "step-000003"
    assert (run / "step-000006" / "config.json").is_file()  # complete, but nothing points at it
    assert hub.load(run).meta["step"] == 3
    # The resume redoes steps 4-6 and must point `latest` at step 6, although step-000006/ was there.
    assert main([*argv[3:], "--resume"]) == 0
    assert (run / "latest").read_text().strip() == "step-000006"
    assert hub.load(run).meta["step"] == 6 and not temp_files(run)


def test_a_resume_removes_every_temp_file_a_killed_run_left(tmp_path, data_dir):
    run = tmp_path / "run"
    train(tiny_cfg(data_dir, run, steps=2))
    # What a process killed inside each of its atomic writes leaves behind (names as core.files makes them).
    litter = [".loss.png.k2j3_x.tmp", ".metrics.jsonl.a8f0.tmp", ".latest.q1w2.tmp", ".run.yaml.zz9.tmp",
              ".step-000003.8ad1.tmp/config.json", ".step-000003.8ad1.tmp/trainer/.state.pt.p0.tmp",
              ".step-000002.replaced.tmp/model.safetensors"]
    for name in litter:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("partial")
    (run / "notes.txt").write_text("mine")
    assert len(temp_files(run)) == 7
    train(tiny_cfg(data_dir, run, steps=3, resume=True))
    assert temp_files(run) == [] and (run / "notes.txt").read_text() == "mine"
    assert hub.load(run).meta["step"] == 3


@pytest.mark.slow
def test_random_sigkills_of_a_run_saving_every_step_never_break_it(tmp_path, data_dir):
    # The experiment of the issue: kill a run that checkpoints (and plots) every step at random moments.
    steps = 30
    reference = tmp_path / "straight"
    assert main(pretrain_argv(data_dir, reference, steps, "--save-every", "1")[3:]) == 0
    run, rng, kills = tmp_path / "run", random.Random(0), 0
    argv = pretrain_argv(data_dir, run, steps, "--save-every", "1")
    while kills < 6:
        resume = ["--resume"] if (run / "latest").exists() else []
        before = (run / "latest").read_text() if resume else None
        proc = subprocess.Popen(argv + resume, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        # Wait for a new checkpoint, so that every round makes progress, then kill at a random moment.
        while proc.poll() is None and time.time() < deadline:
            if (run / "latest").exists() and (run / "latest").read_text() != before:
                break
            time.sleep(0.05)
        if proc.poll() is not None:  # it finished before the kill
            break
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        loaded = hub.load(run)  # `latest` always loads, and is what it says it is
        assert f"step-{loaded.meta['step']:06d}" == (run / "latest").read_text().strip()
    assert kills >= 3
    assert main([*argv[3:], "--resume"]) == 0  # finishes the run (a finished one resumes to no new step)
    assert (run / "latest").read_text().strip() == f"step-{steps:06d}"
    assert temp_files(run) == []
    logged = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert logged == list(range(1, steps + 1))  # each step once: a resume drops what followed its checkpoint
    assert step_losses(run) == step_losses(reference)


@pytest.mark.slow
def test_sigterm_mid_run_saves_a_checkpoint_exits_130_and_resumes_exactly(tmp_path, data_dir):
    # A real SIGTERM from outside the loop, delivered during step 3 (the reporter is told of each step).
    patch = ("import foundry.cli.progress as progress\n"
             "real = progress.ConsoleTrainReporter.update\n"
             "def update(self, step, *a):\n"
             "    if step == 3:\n"
             "        os.kill(os.getpid(), signal.SIGTERM)\n"
             "    return real(self, step, *a)\n"
             "progress.ConsoleTrainReporter.update = update\n")
    run = tmp_path / "run"
    argv = pretrain_argv(data_dir, run, 8)
    proc = _run_patched(tmp_path, patch, argv)
    assert proc.returncode == 130, proc.stderr  # the documented code of an interrupted run
    assert f"stopping on signal {signal.SIGTERM}" in proc.stderr
    assert (run / "latest").read_text().strip() == "step-000003" and hub.load(run).meta["step"] == 3
    assert main([*argv[3:], "--resume"]) == 0
    reference = tmp_path / "straight"
    assert main(pretrain_argv(data_dir, reference, 8)[3:]) == 0
    assert step_losses(run) == step_losses(reference) and len(step_losses(run)) == 8


def test_a_directory_holding_only_a_killed_runs_temp_files_counts_as_a_run(tmp_path):
    from foundry.train.checkpoint import is_run_dir

    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / ".run.yaml.x81k.tmp").write_text("partial")  # killed in its very first write
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".cache.tmp").write_text("not ours")
    assert is_run_dir(tmp_path / "killed") and not is_run_dir(tmp_path / "other")
