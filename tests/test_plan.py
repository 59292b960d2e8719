"""The planner against published figures (each with its source), against foundry itself, and on bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from foundry.cli import main
from foundry.config import ModelConfig, preset
from foundry.core.errors import UserError
from foundry.plan import (
    PlanRequest,
    hardware,
    layer_activation_bytes,
    make_plan,
    model_state_bytes,
    scaling,
)


def plan(**kwargs):
    return make_plan(PlanRequest(**kwargs))


def close(value: float, target: float, rel: float) -> bool:
    return abs(value / target - 1) <= rel


# GPT-3 175B's shape (Brown et al. 2020, Table 2.1): 96 layers, d_model 12288, 96 heads, tied
# embeddings. Its 4h GELU MLP has 8h^2 weights; a SwiGLU of width 8h/3 has the same count.
GPT3 = ModelConfig(vocab_size=50257, hidden_size=12288, num_hidden_layers=96, num_attention_heads=96,
                   num_key_value_heads=96, intermediate_size=32768, max_position_embeddings=2048,
                   tie_word_embeddings=True)


# ---- training FLOPs -------------------------------------------------------------------------

def test_gpt3_175b_on_300b_tokens_is_3_14e23_flops():
    # Brown et al. 2020, Table D.1: 3.14E+23 training FLOPs, 6ND with N = 174.6B and attention left out.
    result = plan(model=GPT3, tokens="300B", seq_len=2048)
    assert close(result["model"]["params"], 174.6e9, 0.001)
    assert close(result["training"]["flops_6nd"], 3.14e23, 0.002)
    # With PaLM's attention term the total is a few percent more (the paper: "less than 10%").
    assert 1.02 < result["training"]["flops"] / result["training"]["flops_6nd"] < 1.10
    # The bare parameter count gives the same figure to within the rounding of "175B".
    assert close(plan(params="175B", tokens="300B")["training"]["flops"], 3.14e23, 0.005)


def test_llama31_405b_on_15_6t_tokens_is_3_8e25_flops():
    # Llama Team 2024 (arXiv:2407.21783), Sec. 3.2.1: "3.8 x 10^25 FLOPs", counted as 6ND.
    result = plan(model="llama3-405b", tokens="15.6T", seq_len=8192)
    assert result["model"]["params"] == preset("llama3-405b").num_params()
    assert close(result["training"]["flops_6nd"], 3.8e25, 0.013)  # the figure has two digits
    # Non-causal attention FLOPs at 8K context add ~8% on top, which is why time uses the total.
    assert 1.05 < result["training"]["flops"] / result["training"]["flops_6nd"] < 1.10


def test_llama31_405b_training_hours_match_the_model_card():
    # Llama 3.1 model card: 30.84M H100-hours for 405B. At the catalog's 40% MFU (Llama 3 paper, Table 4)
    # the plan gives 28.9M: the card's hours also cover restarts, evaluation and long-context training.
    result = plan(model="llama3-405b", tokens="15.6T", seq_len=8192, hardware="h100-sxm")["training"]
    assert close(result["device_hours"], 30.84e6, 0.10)


def test_time_and_cost_follow_from_flops_mfu_and_price():
    result = plan(params="1B", tokens="20B", hardware="h100-sxm", gpus=8, mfu=0.5, price=2.0)
    t = result["training"]
    assert close(t["seconds"], 6 * 1e9 * 20e9 / (8 * 989.4e12 * 0.5), 1e-9)
    assert close(t["cost"], t["seconds"] / 3600 * 8 * 2.0, 1e-9)


def test_moe_counts_active_parameters_for_flops_and_all_for_memory():
    moe = preset("mini").replace(architecture="MixtralForCausalLM", model_type="mixtral", tie_word_embeddings=False,
                                 num_experts=8, num_experts_per_tok=2)
    result = plan(model=moe, tokens="1B", precision="fp32")
    active, total = moe.num_params(active_only=True), moe.num_params()
    assert active < total
    assert result["training"]["flops_6nd"] == pytest.approx(6 * active * 1e9)
    assert result["memory"]["weights"] == pytest.approx(4 * total)


def test_parameter_count_is_the_configs():
    for name in ("tiny", "small", "llama3-8b", "llama3-70b"):
        result = plan(model=name, tokens="1B")
        assert result["model"]["params"] == preset(name).num_params()


# ---- Chinchilla -----------------------------------------------------------------------------

# Hoffmann et al. 2022, Table 3 (Approach 1): parameters, FLOPs, tokens.
TABLE3 = [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9), (67e9, 5.76e23, 1.5e12),
          (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12), (520e9, 3.43e25, 11.0e12),
          (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12)]


@pytest.mark.parametrize("params,flops,tokens", TABLE3)
def test_compute_optimal_sizing_reproduces_chinchilla_table3(params, flops, tokens):
    n, d = scaling.compute_optimal(flops)
    assert close(n, params, 0.015)
    # The 67B row prints 1.5T tokens where its own 6ND = 5.76e23 gives 1.43T.
    assert close(d, tokens, 0.07 if params == 67e9 else 0.01)
    assert close(scaling.optimal_flops_for(params), flops, 0.03)


def test_budget_flops_on_the_command_line():
    for params, flops, tokens in TABLE3[1:3]:  # 1B -> 1.21e20 and 20.2B; 10B -> 1.23e22 and 205.1B
        result = plan(budget_flops=flops)["compute_optimal"]
        assert close(result["params"], params, 0.01) and close(result["tokens"], tokens, 0.01)
    by_size = plan(params="175B")["training"]  # tokens default to the compute-optimal count
    assert close(by_size["tokens"], 3.7e12, 0.01) and close(by_size["flops"], 3.85e24, 0.015)


def test_budget_dollars_buys_flops_at_price_and_mfu():
    result = plan(budget_dollars="1M", hardware="a100-80gb", price=2.0, mfu=0.5)["compute_optimal"]
    assert close(result["budget_flops"], 1e6 / 2.0 * 3600 * 312e12 * 0.5, 1e-9)
    assert close(result["cost"], 1e6, 1e-9)


def test_rounded_hoffmann_constants_miss_table3_and_the_refit_does_not():
    # Besiroglu et al. 2024 (arXiv:2404.10102): the printed Approach 3 fit contradicts Approach 1.
    hoffmann, refit = scaling.LAWS["hoffmann2022"], scaling.LAWS["besiroglu2024"]
    for params, flops, _ in TABLE3[:5]:
        assert hoffmann.optimum(flops)[0] < 0.8 * params
        assert close(refit.optimum(flops)[0], params, 0.10)


def test_loss_law_is_named_with_its_constants_in_the_output(capsys):
    assert main(["plan", "--budget-flops", "1e22"]) == 0
    out = capsys.readouterr().out
    assert "besiroglu2024" in out and "1.8172" in out and "2085.43" in out and "Table 3" in out
    result = plan(budget_flops=5.76e23, loss_law="hoffmann2022")["compute_optimal"]
    assert result["predicted_loss"] == pytest.approx(1.69 + 406.4 / result["params"]**0.34
                                                     + 410.7 / result["tokens"]**0.28)


# ---- memory ---------------------------------------------------------------------------------

@pytest.mark.parametrize("zero,gigabytes", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.88)])
def test_zero_paper_model_state_memory(zero, gigabytes):
    # Rajbhandari et al. 2020, Figure 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12).
    total = sum(model_state_bytes(7.5e9, dp=64, zero=zero).values())
    assert close(total / 1e9, gigabytes, 0.005)
    result = plan(params="7.5B", gpus=64, zero=zero)["memory"]
    assert close(result["total"] / 1e9, gigabytes, 0.005)


def test_fsdp_maps_to_zero_stages():
    full = plan(params="7.5B", gpus=64, fsdp="full")["memory"]["total"]
    grad_op = plan(params="7.5B", gpus=64, fsdp="grad-op")["memory"]["total"]
    assert close(full / 1e9, 1.875, 1e-9) and close(grad_op / 1e9, 16.640625, 1e-9)


@pytest.mark.parametrize("s,b,h,a,t", [(2048, 1, 12288, 96, 8), (4096, 4, 4096, 32, 4), (512, 8, 1024, 16, 2)])
def test_korthikanti_activation_formulas(s, b, h, a, t):
    # Korthikanti et al. 2022, Sec. 4 (GPT: 4h GELU MLP, dropout, 16-bit activations).
    gpt = {"gated": False, "dropout": True, "elem": 2}
    layer = lambda **kw: layer_activation_bytes(s, b, h, a, **gpt, **kw)
    sbh = s * b * h
    assert layer() == pytest.approx(sbh * (34 + 5 * a * s / h))  # eq. 1
    assert layer(tp=t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))  # eq. 2
    assert layer(tp=t, sequence_parallel=True) == pytest.approx(sbh / t * (34 + 5 * a * s / h))  # eq. 4
    assert layer(tp=t, sequence_parallel=True, recompute="selective") == pytest.approx(sbh / t * 34)  # eq. 6
    assert layer(tp=t, recompute="selective") == pytest.approx(sbh * (10 + 24 / t))
    assert layer(recompute="full") == pytest.approx(2 * sbh)


def test_fit_and_largest_micro_batch():
    result = plan(model="llama3-8b", tokens="1T", gpus=8, zero=3, seq_len=4096, micro_batch=1)["memory"]
    assert result["fits"] and result["max_micro_batch"] >= 1
    bigger = plan(model="llama3-8b", tokens="1T", gpus=8, zero=3, seq_len=4096,
                  micro_batch=result["max_micro_batch"] + 1)["memory"]
    assert not bigger["fits"]
    no_zero = plan(model="llama3-70b", tokens="1T", gpus=8)["memory"]
    assert not no_zero["fits"] and no_zero["max_micro_batch"] == 0


def test_pipeline_and_tensor_parallel_split_memory():
    base = plan(model="llama3-70b", tokens="1T", gpus=64)["memory"]
    split = plan(model="llama3-70b", tokens="1T", gpus=64, tp=8, pp=4)["memory"]
    assert split["weights"] == pytest.approx(base["weights"] / 32)
    assert split["activations"] < base["activations"] / 4


# ---- inference ------------------------------------------------------------------------------

def test_inference_kv_cache_batch_and_decode_ceiling():
    result = plan(model="llama3-8b", hardware="h100-sxm", context=8192)["inference"]
    assert result["kv_per_token"] == 2 * 32 * 8 * 128 * 2  # 128 KiB/token in bf16
    assert result["kv_per_request"] == result["kv_per_token"] * 8192
    weights = preset("llama3-8b").num_params() * 2
    assert result["max_batch"] == int((80e9 - weights) // result["kv_per_request"])
    assert result["decode_tokens_per_s_batch1"] == pytest.approx(3.35e12 / (weights + result["kv_per_request"]))
    assert result["decode_tokens_per_s"] > 10 * result["decode_tokens_per_s_batch1"]
    assert result["dollars_per_million_tokens"] == pytest.approx(2.99 / (result["decode_tokens_per_s"] * 3600) * 1e6)


# ---- inputs and output ----------------------------------------------------------------------

def test_model_directory_run_directory_and_yaml(tmp_path, capsys):
    config = preset("small")
    ckpt = tmp_path / "run" / "step-000100"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps(config.to_hf_dict()))
    (tmp_path / "run" / "latest").write_text("step-000100\n")
    (tmp_path / "m.yaml").write_text("preset: small\n")
    for source in (ckpt, tmp_path / "run", tmp_path / "m.yaml"):  # the CLI resolves specs through foundry.hub
        assert main(["plan", str(source), "--tokens", "1B", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["model"]["params"] == config.num_params()
    assert plan(model=str(tmp_path / "m.yaml"), tokens="1B")["model"]["params"] == config.num_params()
    with pytest.raises(UserError, match="foundry.hub.resolve_model_source"):
        plan(model=str(ckpt), tokens="1B")  # the planner itself reads only presets and config files


def test_json_and_table_output(capsys):
    assert main(["plan", "tiny", "--tokens", "1B", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"training", "memory", "inference", "hardware", "layout"} <= set(result)
    assert main(["plan", "llama3-70b", "--tokens", "15T", "--gpus", "512", "--tp", "8", "--zero", "1"]) == 0
    out = capsys.readouterr().out
    assert "Memory per device" in out and "Inference" in out and "days" in out


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_cpu_is_measured_on_the_spot():
    import numpy as np

    hardware.measure_cpu.cache_clear()  # measured now, beside the test's own timing
    hw = plan(model="tiny", tokens="1M", hardware="cpu")["hardware"]
    assert hw["name"] == "cpu" and hw["measured"]
    # An independent timing of other sizes, here and now. A broken measurement (a wrong count of FLOPs or
    # bytes, a unit slip, a timer around nothing) is off by far more than the factor of 4 that load explains.
    a = np.random.default_rng(1).standard_normal((1024, 1024), dtype=np.float32)
    flops = 2 * 1024**3 / _best_seconds(lambda: a @ a)
    src = np.ones(32 * 2**20, dtype=np.float32)  # 128 MiB
    dst = np.empty_like(src)
    bandwidth = 2 * src.nbytes / _best_seconds(lambda: np.copyto(dst, src))
    assert 1 / 4 < hw["peak_flops"] / flops < 4, (hw["peak_flops"], flops)
    assert 1 / 4 < hw["bandwidth"] / bandwidth < 4, (hw["bandwidth"], bandwidth)


def test_cpu_figures_are_the_work_its_label_names_over_the_time(monkeypatch):
    # A clock that advances 0.25 s per reading makes every timed call take exactly 0.25 s.
    ticks = iter(range(10**6))
    monkeypatch.setattr(hardware, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) * 0.25))
    hw = hardware.measure_cpu.__wrapped__()  # uncached
    n, mib = re.fullmatch(r"numpy fp32 (\d+)x\1 matmul and (\d+) MiB copy, best of 3", hw.spec_source).groups()
    assert hw.peak_flops == pytest.approx(2 * int(n) ** 3 / 0.25)
    assert hw.bandwidth == pytest.approx(2 * int(mib) * 2**20 / 0.25)  # read and write


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc/meminfo")
def test_cpu_memory_is_the_os_figure():
    total = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024
    hw = plan(model="tiny", tokens="1M", hardware="cpu")["hardware"]
    assert hw["memory_bytes"] == pytest.approx(total, rel=0.01)


def test_runs_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from foundry.cli import main\n"
            "assert main(['plan', 'llama3-8b', '--tokens', '15T', '--gpus', '64', '--json']) == 0\n"
            "assert main(['plan', '--budget-dollars', '1M']) == 0\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("argv,message", [
    (["--params", "-5"], "--params must be positive, got -5"),
    (["--params", "0"], "--params must be positive, got 0"),
    (["tiny", "--tokens", "0"], "--tokens must be positive, got 0"),
    (["tiny", "--gpus", "0"], "--gpus must be positive, got 0"),
    (["tiny", "--seq-len", "-1"], "--seq-len must be positive, got -1"),
    (["tiny", "--micro-batch", "0"], "--micro-batch must be positive, got 0"),
    (["--budget-flops=-1e20"], "--budget-flops must be positive"),
    (["tiny", "--tokens", "lots"], "--tokens must be a number such as 7e9 or 7B, got 'lots'"),
    (["tiny", "--hardware", "tpu-v9"], ("unknown hardware 'tpu-v9'; known: a100-40gb, a100-80gb, h100-sxm, "
                                        "h100-pcie, h800, h200, b200, mi300x, l4, cpu")),
    (["tiny", "--gpus", "16", "--dp", "2", "--tp", "4"],
     "layout dp x tp x pp = 2 x 4 x 1 = 8 does not equal --gpus 16"),
    (["tiny", "--gpus", "10", "--tp", "4"], "--gpus 10 is not a multiple of tp x pp = 4 x 1 = 4"),
    (["tiny", "--tp", "8"], "--tp 8 is larger than the model's 4 attention heads"),
    (["tiny", "--mfu", "1.5"], "--mfu must be in (0, 1], got 1.5"),
    (["no-such-model"], "model 'no-such-model' is not a preset"),
    ([], "give a model (preset, config file or model directory), --params, or a budget"),
    (["tiny", "--params", "7B"], "give a model or --params, not both"),
])
def test_bad_input_is_one_clear_line(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("foundry plan: error: ") and message in err
