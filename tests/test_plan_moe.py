"""The planner on mixtures of experts and latent attention: DeepSeek-V3's published training cost, expert
parallelism's memory, the latent KV cache, and bad --ep input."""

from __future__ import annotations

import json

import pytest

from foundry.cli import main
from foundry.config import preset
from foundry.plan import PlanRequest, activation_bytes, hardware, make_plan

DEEPSEEK_V3_TOKENS = 14.8e12
# DeepSeek-V3 Technical Report (arXiv:2412.19437), Table 1: H800 GPU-hours of pre-training, context extension and
# post-training, and the $2/GPU-hour it prices them at; Sec. 1: "each trillion tokens needs 180K H800 GPU hours".
PRETRAINING_HOURS, TOTAL_HOURS, TOTAL_COST, HOURS_PER_TRILLION = 2664e3, 2788e3, 5.576e6, 180e3


def plan(**kwargs):
    return make_plan(PlanRequest(**kwargs))


def close(value: float, target: float, rel: float) -> bool:
    return abs(value / target - 1) <= rel


def test_deepseek_v3_training_takes_the_reports_h800_hours(capsys):
    argv = ["plan", "deepseek-v3", "--tokens", "14.8T", "--hardware", "h800", "--gpus", "2048"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    training = result["training"]
    assert close(training["device_hours"], TOTAL_HOURS, 0.10)  # 2.647M: -5.0%
    assert close(training["cost"], TOTAL_COST, 0.10)
    # The plan covers pre-training, which the report's 2664K is: within the MFU's rounding to 45%.
    assert close(training["device_hours"], PRETRAINING_HOURS, 0.01)
    assert close(training["days"], PRETRAINING_HOURS / 2048 / 24, 0.01)  # "less than two months"
    # FLOPs count the 37.55B parameters a token runs through, not the 671B the memory holds.
    config = preset("deepseek-v3")
    active = config.num_params(active_only=True)
    assert 37.5e9 < active < 37.6e9 and result["model"]["active_params"] == active
    assert training["flops_6nd"] == pytest.approx(6 * active * DEEPSEEK_V3_TOKENS)
    assert training["flops"] == pytest.approx(config.train_flops_per_token(4096) * DEEPSEEK_V3_TOKENS)
    assert result["memory"]["weights"] == pytest.approx(2 * config.num_params())
    # The assumptions are printed with the plan.
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert "MFU 45%" in out and "arXiv:2412.19437" in out and "44.7% of the bf16 dense peak" in out
    assert "37.55B active parameters" in out and "671.03B" in out and "ep 1" in out


def test_h800_mfu_is_derived_from_the_reports_throughput():
    hw = hardware.lookup("h800")
    assert hw.peak_flops == hardware.lookup("h100-sxm").peak_flops and hw.memory_bytes == 80e9
    tokens_per_gpu_second = 1e12 / (HOURS_PER_TRILLION * 3600)
    achieved = tokens_per_gpu_second * preset("deepseek-v3").train_flops_per_token(4096)  # FLOP/s per GPU
    assert abs(hw.mfu - achieved / hw.peak_flops) < 0.005
    assert f"{achieved / 1e12:.0f} TFLOP/s" in hw.mfu_source and f"{achieved / hw.peak_flops:.1%}" in hw.mfu_source
    assert hardware.lookup("H800-SXM") == hw


# ---- expert parallelism -----------------------------------------------------------------------

def _states(params: float, dp: int, zero: int) -> float:
    """Mixed-precision Adam's 2 + 2 + 12 bytes a parameter, ZeRO-sharded over dp (Rajbhandari et al. 2020)."""
    return params * (2 / (dp if zero >= 3 else 1) + 2 / (dp if zero >= 2 else 1) + 12 / (dp if zero >= 1 else 1))


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_doubling_ep_halves_the_experts_unsharded_states_and_leaves_the_rest(zero):
    config = preset("deepseek-v3")
    routed = 58 * 256 * 3 * config.hidden_size * config.expert_size  # 58 MoE layers of 256 SwiGLU experts
    # dp = 2048 / 16 = 128
    layout = {"model": "deepseek-v3", "tokens": "1T", "hardware": "h800", "gpus": 2048, "pp": 16, "zero": zero}
    base, double = plan(ep=8, **layout)["memory"], plan(ep=16, **layout)["memory"]
    assert base["routed_expert_params"] == double["routed_expert_params"] == routed
    # The rest: over pp, ZeRO over all 128 data-parallel ranks, whatever ep is.
    assert double["dense_states"] == base["dense_states"] == pytest.approx(
        _states((config.num_params() - routed) / 16, 128, zero))
    assert double["activations"] == base["activations"]
    # The experts: over pp x ep, ZeRO over the dp / ep ranks holding the same experts. ep x (dp / ep) = dp, so
    # what ZeRO shards is already split 128 ways; the rest of their states halves when ep doubles.
    for ep, memory in ((8, base), (16, double)):
        assert memory["expert_states"] == pytest.approx(_states(routed / (16 * ep), 128 // ep, zero))
    unsharded = {0: 16, 1: 4, 2: 2, 3: 0}[zero]
    assert base["total"] - double["total"] == pytest.approx(unsharded * routed / (16 * 16))


def test_expert_parallelism_on_top_of_tensor_parallelism():
    memory = plan(model="mixtral-8x7b", tokens="1T", gpus=64, tp=4, ep=8)["memory"]  # dp = 16
    config = preset("mixtral-8x7b")
    routed = 32 * 8 * 3 * 4096 * 14336
    assert memory["expert_states"] == pytest.approx(16 * routed / (4 * 8))
    assert memory["dense_states"] == pytest.approx(16 * (config.num_params() - routed) / 4)


def test_ep_defaults_the_devices_and_shows_in_the_output(capsys):
    assert main(["plan", "moe-tiny", "--tokens", "1M", "--ep", "8", "--json"]) == 0
    layout = json.loads(capsys.readouterr().out)["layout"]
    assert (layout["gpus"], layout["dp"], layout["ep"]) == (8, 8, 8)
    assert main(["plan", "mixtral-8x7b", "--tokens", "1T", "--gpus", "64", "--ep", "8", "--zero", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ep 8," in out and "routed experts" in out and "split over ep 8" in out
    assert "ZeRO shards them over the dp / ep = 8 ranks" in out


def test_a_model_directorys_experts_are_split(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(preset("qwen3-30b-a3b").to_hf_dict()))
    assert main(["plan", str(tmp_path), "--tokens", "1T", "--gpus", "16", "--ep", "16", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["routed_expert_params"] == 48 * 128 * 3 * 2048 * 768
    assert main(["plan", str(tmp_path), "--tokens", "1T", "--gpus", "96", "--ep", "96"]) == 2
    assert "--ep 96 does not divide the model's 128 experts per layer" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["llama3-8b", "--gpus", "8", "--ep", "2"], "--ep 2: the model has no experts (a dense model)"),
    (["--params", "7B", "--ep", "2"], "--ep 2 needs a model (preset, config file or model directory), not --params"),
    (["moe-tiny", "--gpus", "6", "--ep", "3"], "--ep 3 does not divide the model's 8 experts per layer"),
    (["moe-tiny", "--gpus", "4", "--ep", "8"], "--ep 8 is more than the 4 devices; give --gpus at least 8"),
    (["moe-tiny", "--gpus", "8", "--tp", "4", "--ep", "4"], "--ep 4 must divide the data-parallel degree dp = 2"),
    (["moe-tiny", "--ep", "0"], "--ep must be positive, got 0"),
])
def test_bad_ep_is_one_clear_line(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("foundry plan: error: ") and message in err


# ---- activations and the KV cache ------------------------------------------------------------

def test_routed_copies_are_the_moe_activation_term():
    # moe-tiny is tiny with 8 experts of 192, two a token: the same 384 channels per token as tiny's MLP.
    tiny, moe = preset("tiny"), preset("moe-tiny")
    assert moe.num_experts_per_tok * moe.expert_size == tiny.intermediate_size
    seq, batch = 256, 4
    dense = activation_bytes(tiny, seq=seq, micro_batch=batch)
    sparse = activation_bytes(moe, seq=seq, micro_batch=batch)
    # Per layer, each of a token's 2 routed copies keeps its dispatched input and its expert's output (bf16).
    assert sparse - dense == pytest.approx(4 * 2 * 2 * 2 * seq * batch * 128)


def test_latent_attention_caches_its_latent():
    inference = plan(model="deepseek-v3", hardware="h800", pp=16, context=32768)["inference"]
    assert inference["kv_per_token"] == 61 * (512 + 64) * 2  # 70,272 bytes, bf16
    assert inference["kv_per_request"] == inference["kv_per_token"] * 32768
    expanded = 61 * 128 * (192 + 128) * 2  # the per-head keys and values it stands for
    assert expanded / inference["kv_per_token"] > 70
    dense = plan(model="llama3-8b", context=8192)["inference"]
    assert dense["kv_per_token"] == 2 * 32 * 8 * 128 * 2  # GQA unchanged: K and V per KV head
