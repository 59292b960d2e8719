"""`foundry finetune --nproc 2`: the recipes train as DDP replicas through real torchrun processes, with one
process's losses (each step's mean over all its scored tokens, however the masks share them out over ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import step_losses

from foundry import hub
from foundry.config import ModelConfig
from foundry.model import Transformer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer) -> Path:
    config = ModelConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         max_position_embeddings=128, tie_word_embeddings=True, eos_token_id=tiny_tokenizer.eos_id,
                         bos_token_id=tiny_tokenizer.bos_id, pad_token_id=tiny_tokenizer.pad_id)
    model = Transformer(config)
    model.init_weights(seed=0)
    return hub.save(tmp_path_factory.mktemp("base") / "base", model, tiny_tokenizer)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    """Replies of very different lengths, so that ranks and micro-batches score unequal numbers of tokens."""
    records = [{"messages": [{"role": "user", "content": f"count to {n}"},
                             {"role": "assistant", "content": " ".join(str(i) for i in range(n % 17 + 1))}]}
               for n in range(64)]
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _finetune(base: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "foundry", "finetune", str(base), "--recipe", "sft", "--data", str(data),
            "--out", str(out), "--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--seq-len", "64",
            "--no-packing", "--val-fraction", "0", "--lr", "1e-3", "--warmup", "1", "--log-every", "1",
            "--device", "cpu", *extra]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_on_two_processes_gives_one_process_losses(tmp_path, base, sft_data, lora):
    extra = ("--lora", "--lora-dropout", "0") if lora else ()  # dropout draws differ between layouts by design
    _finetune(base, sft_data, tmp_path / "one", *extra)
    done = _finetune(base, sft_data, tmp_path / "two", "--nproc", "2", *extra)
    assert "ddp over 2 data-parallel ranks" in done.stdout
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert [two[s] for s in range(1, 5)] == pytest.approx([one[s] for s in range(1, 5)], rel=1e-5)
    checkpoint = tmp_path / "two" / "step-000004"
    assert (checkpoint / ("adapter_config.json" if lora else "config.json")).is_file()  # rank 0 wrote the model


def test_finetune_refuses_the_sharded_layouts_it_does_not_have(tmp_path, base, sft_data):
    argv = [sys.executable, "-m", "foundry", "finetune", str(base), "--recipe", "sft", "--data", str(sft_data),
            "--out", str(tmp_path / "run"), "--steps", "2", "--nproc", "2", "--parallel", "fsdp", "--device", "cpu"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert "--parallel fsdp, --tp and --ep are not built for the recipes yet" in done.stderr
    assert done.stderr.count("not built for the recipes") == 1  # rank 0 speaks for both
