"""`foundry info`: the numbers a user asks first."""

import json

import torch

from foundry import hub
from foundry.cli import main
from foundry.config import ModelConfig, preset
from foundry.model import Transformer


def _info_json(capsys, *args: str) -> dict:
    assert main(["info", *args, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object, one line
    return json.loads(out)


def test_info_of_a_preset_shows_exact_counts_and_memory(capsys):
    assert main(["info", "llama3-405b"]) == 0
    out = capsys.readouterr().out
    assert "405,853,388,800" in out and "755.96 GiB" in out  # bf16 weights: 2 bytes a parameter
    config = preset("llama3-405b")
    assert f"{config.train_flops_per_token(4096):.4g}" in out


def test_the_table_has_column_headers_and_context_settings(capsys):
    assert main(["info", "llama3-405b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("property" in line and "value" in line for line in lines[:4])  # the header row, under the title
    text = "\n".join(lines)
    assert "131,072 tokens" in text
    assert "RoPE, theta 500000, llama3 scaling x8 of an original 8,192 tokens" in text
    assert "full (causal) in every layer" in text
    assert "checkpoint dtype" not in text and "trained" not in text  # a preset has neither


def test_json_of_a_preset(capsys):
    info = _info_json(capsys, "llama3-405b")
    assert info["parameters"] == 405_853_388_800 and info["context_length"] == 131072
    assert info["rope"] == {"theta": 500000.0, "scaling": "llama3", "factor": 8.0, "original_context": 8192,
                            "rotary_dim": 128, "head_dim": 128, "sliding_theta": None}
    assert (info["sliding_window"], info["dtype"], info["step"], info["val_loss"]) == (None, None, None, None)


def test_info_reads_a_model_directory(tmp_path, capsys):
    config = preset("tiny").replace(vocab_size=300)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    assert main(["info", str(tmp_path)]) == 0
    assert f"{config.num_params():,}" in capsys.readouterr().out


def test_a_sliding_window_model(tmp_path, capsys):
    config = ModelConfig(vocab_size=300, architecture="MistralForCausalLM", model_type="mistral", sliding_window=64,
                         rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
    (tmp_path / "config.json").write_text(json.dumps({**config.to_hf_dict(), "torch_dtype": "bfloat16"}))
    info = _info_json(capsys, str(tmp_path))
    assert (info["sliding_window"], info["sliding_layers"], info["dtype"]) == (64, config.num_hidden_layers, "bfloat16")
    assert (info["rope"]["scaling"], info["rope"]["factor"]) == ("yarn", 4.0)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sliding window of 64 tokens in every layer" in out and "bfloat16" in out


def test_a_run_directory_shows_its_step_and_last_validation_loss(tmp_path, capsys):
    model = Transformer(ModelConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, intermediate_size=64))
    run = tmp_path / "run"
    run.mkdir()
    hub.save(run / "step-000040", model, meta={"step": 40, "tokens": 5120, "eval": {"val_loss": 3.5}})
    (run / "latest").write_text("step-000040\n")
    records = [{"step": 20, "val_loss": 4.25}, {"step": 30, "loss": 3.9}, {"step": 40, "val_loss": 3.5},
               {"step": 50, "val_loss": 3.25}]  # step 50 came after the checkpoint: not its loss
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6')
    info = _info_json(capsys, str(run))
    assert (info["step"], info["tokens"], info["val_loss"], info["val_loss_step"]) == (40, 5120, 3.5, 40)
    assert info["dtype"] == "float32" and info["model_dir"] == str(run / "step-000040")
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step 40, 5,120 tokens" in out and "3.5000 (step 40)" in out


def test_the_dtype_comes_from_the_weights_when_config_json_omits_it(tmp_path, capsys):
    model = Transformer(ModelConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, intermediate_size=64))
    path = hub.save(tmp_path / "m", model, dtype=torch.bfloat16)
    raw = json.loads((path / "config.json").read_text())
    raw.pop("torch_dtype", None)
    raw.pop("dtype", None)
    (path / "config.json").write_text(json.dumps(raw))
    assert _info_json(capsys, str(path))["dtype"] == "bfloat16"


def test_info_of_an_unknown_model_is_one_line(capsys):
    assert main(["info", "llama9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a preset" in err and "tiny" in err


def test_deepseek_v3_experts_dense_layers_and_latent_kv_cache(capsys):
    assert main(["info", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671,026,404,352 (671B)" in out and "active per token               37,552,282,624 (37.6B)" in out
    assert "256 routed of width 2,048, top-8 per token + a shared expert of width 2,048" in out
    assert "sigmoid scores, within the best 4 of 8 groups, weights renormalised, scaled x2.5" in out
    assert "layers 0-2 (MLP 18,432); experts in the other 58" in out
    assert "keys and values from a rank-512 latent, queries from a rank-1,536 latent; per head q/k 128 + rope 64" in out
    # bf16 bytes per token, all 61 layers: the latent (512 + 64), the expanded heads (128 x (192 + 128)), and
    # a GQA of 8 KV heads of 128 (K and V).
    latent, expanded, gqa = 61 * 576 * 2, 61 * 128 * 320 * 2, 61 * 8 * 256 * 2
    assert f"{latent:,} B/token (68.62 KiB): latent 512 + rope 64 per layer" in out
    assert f"{expanded:,} B/token (4.77 MiB): {expanded / latent:.1f}x the latent" in out and "71.1x" in out
    assert f"{gqa:,} B/token (244.00 KiB): {gqa / latent:.2f}x the latent" in out and "3.56x" in out
    info = _info_json(capsys, "deepseek-v3")
    assert info["experts"]["dense_layers"] == [0, 1, 2] and info["experts"]["routed"] == 256
    assert info["kv_cache"]["bytes_per_token_bf16"] == latent
    assert (info["kv_cache"]["expanded_bytes_per_token_bf16"], info["kv_cache"]["gqa_bytes_per_token_bf16"]) == (
        expanded, gqa)


def test_moe_tiny_has_experts_in_every_layer_and_a_gqa_cache(capsys):
    config = preset("moe-tiny")
    assert (round(config.num_params() / 1e6, 1), round(config.num_params(active_only=True) / 1e6, 1)) == (3.1, 1.3)
    assert main(["info", "moe-tiny"]) == 0
    out = capsys.readouterr().out
    assert f"{config.num_params():,}" in out and f"{config.num_params(active_only=True):,}" in out
    assert "8 routed of width 192, top-2 per token" in out and "shared expert" not in out
    assert "softmax scores, weights renormalised" in out and "none: all 4 layers are mixture-of-experts" in out
    assert "1,024 B/token (1.00 KiB): 2 KV heads x (32 + 32) per layer" in out  # 4 layers x 2 x 2 x 32 x 2 bytes
    assert "expanded heads" not in out and "latent" not in out
    info = _info_json(capsys, "moe-tiny")
    assert info["experts"]["top_k"] == 2 and info["experts"]["dense_layers"] == []
    assert info["latent_attention"] is None and info["kv_cache"]["latent"] is False


def test_a_moe_model_directory_names_its_dense_layers(tmp_path, capsys):
    # Qwen-MoE's mlp_only_layers and decoder_sparse_step keep some layers dense.
    config = preset("qwen3-30b-a3b").replace(num_hidden_layers=8, mlp_only_layers=[0, 1, 2], decoder_sparse_step=2)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    info = _info_json(capsys, str(tmp_path))
    assert info["experts"]["dense_layers"] == [0, 1, 2, 4, 6] and info["parameters"] == config.num_params()
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layers 0-2, 4, 6 (MLP 6,144); experts in the other 3" in out
    assert f"{config.num_params(active_only=True):,}" in out


def test_dense_models_show_their_kv_cache_and_no_experts(capsys):
    info = _info_json(capsys, "llama3-8b")
    assert info["experts"] is None and info["active_parameters"] is None
    assert info["kv_cache"]["bytes_per_token_bf16"] == 2 * 32 * 8 * 128 * 2  # 128 KiB
