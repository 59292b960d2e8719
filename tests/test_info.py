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
