"""Tensor parallelism (with sequence parallelism): 2 real gloo processes on CPU against one process, and the refusals.

One torchrun launch (tests/dist/tp_worker.py) measures, per family, the sharded model against an unsharded deepcopy
of the same weights; the tests below judge those numbers. Families: Llama (tied, GQA), Qwen2 (untied, q/k/v biases),
Gemma 2 (scaled embeddings, sandwich (1 + weight) norms, soft caps, sliding windows) and GPT-2 (learned positions,
LayerNorm, biases on the row-sharded projections, vocabulary and position tables that split unevenly).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from foundry.config import preset
from foundry.train.parallel.tensor_parallel import tensor_parallel_refusal

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "qwen2", "gemma2", "gpt2")
TIED = {"llama": True, "qwen2": False, "gemma2": True, "gpt2": True}
LR = 1e-3  # the worker's AdamW learning rate


@pytest.fixture(scope="module")
def results() -> dict:
    """The worker's measurements, from one 2-process torchrun launch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "tests/dist/tp_worker.py"]
    done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"tp_worker failed (exit {done.returncode}):\n{output}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("TP_RESULT ")]
    assert len(lines) == 1, f"tp_worker printed no TP_RESULT line:\n{output}"
    return json.loads(lines[0].removeprefix("TP_RESULT "))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tp_logits_equal_single_process(results, family):
    """fp32 logits of the 2-way sharded model come out whole and match the unsharded model's."""
    r = results[family]
    assert r["all_params_dtensor"], r
    assert r["logits_is_plain"], "logits should come out of lm_head as a plain, whole tensor"
    assert r["logits_max_abs"] < 1e-5, r["logits_max_abs"]
    assert r["tied"] is TIED[family], "lm_head.weight must be embed_tokens.weight exactly when the config ties them"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tp_training_steps_match_single_process(results, family):
    """Three AdamW steps: same losses and first gradients in fp32, same final weights (fp64, where Adam's
    normalised steps cannot turn rounding noise in a near-zero gradient into a whole step of difference)."""
    fp32, fp64 = results[family]["fp32"], results[family]["fp64"]
    for run in (fp32, fp64):
        assert run["same_names"], run
        assert run["tied"] is TIED[family], "sharding or training broke the embedding/head tie"
        assert len(run["losses"]) == 3
    assert fp32["loss_max_rel"] < 1e-5, fp32["losses"]
    assert fp32["grad_max_rel"] < 1e-5, fp32["grad_max_rel"]
    # fp32 weights agree to well under one Adam step (each step moves a weight by about lr whatever its gradient).
    assert fp32["weight_max_abs"] < LR / 4, (fp32["weight_max_abs"], fp32["weight_worst"])
    # fp64: Gemma's fp32 norms and soft-capped softmax leave ~1e-9; the other families agree to ~1e-13 or better.
    assert fp64["loss_max_rel"] < 1e-9, fp64["losses"]
    assert fp64["weight_max_abs"] < 1e-7, (fp64["weight_max_abs"], fp64["weight_worst"])
    assert fp64["weight_least_moved"] > 1e-5, "every weight tensor should have trained"


def test_refusal_accepts_a_shardable_model():
    """The tiny preset splits two ways (and four, and trivially one) at an even sequence length."""
    config = preset("tiny")
    assert tensor_parallel_refusal(config, 1, 17) is None
    assert tensor_parallel_refusal(config, 2, 512) is None
    gpt2_vocab = config.replace(vocab_size=50257, num_key_value_heads=4)  # uneven embedding tables are fine
    assert tensor_parallel_refusal(gpt2_vocab, 4, 512) is None


@pytest.mark.parametrize("change, tp, seq_len, words", [
    ({"num_attention_heads": 6, "num_key_value_heads": 6, "head_dim": 32}, 4, 512, ["num_attention_heads", "(6)"]),
    ({}, 4, 512, ["num_key_value_heads", "(2)"]),  # 4 query heads split 4 ways, 2 key/value heads do not
    ({"intermediate_size": 390, "num_key_value_heads": 4}, 4, 512, ["intermediate_size", "(390)"]),
    ({}, 2, 511, ["--seq-len (511)", "multiple of 2"]),
    ({"architecture": "Qwen3ForCausalLM", "model_type": "qwen3", "qk_norm": "head"}, 2, 512, ["qk_norm", "drop --tp"]),
    ({"architecture": "MixtralForCausalLM", "model_type": "mixtral", "num_experts": 8, "num_experts_per_tok": 2},
     2, 512, ["8 experts", "drop --tp"]),
    ({"architecture": "DeepseekV3ForCausalLM", "model_type": "deepseek_v3", "router_scoring": "sigmoid",
      "router_correction_bias": True, "rope_interleave": True, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
      "v_head_dim": 16}, 2, 512, ["latent attention", "drop --tp"]),
    ({}, 0, 512, ["positive integer", "0"]),
])
def test_refusal_names_the_numbers_and_the_fix(change, tp, seq_len, words):
    """Each refused case answers one sentence naming the offending number and what to do."""
    config = dataclasses.replace(preset("tiny"), **change)
    reason = tensor_parallel_refusal(config, tp, seq_len)
    assert reason is not None
    assert "\n" not in reason
    for word in words:
        assert word in reason, reason
    if tp > 0:
        assert f"--tp {tp}" in reason, reason
