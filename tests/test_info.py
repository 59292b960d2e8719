"""`foundry info`: the numbers a user asks first."""

import json

from foundry.cli import main
from foundry.config import preset


def test_info_of_a_preset_shows_exact_counts_and_memory(capsys):
    assert main(["info", "llama3-405b"]) == 0
    out = capsys.readouterr().out
    assert "405,853,388,800" in out and "755.96 GiB" in out  # bf16 weights: 2 bytes a parameter
    config = preset("llama3-405b")
    assert f"{config.train_flops_per_token(4096):.4g}" in out


def test_info_reads_a_model_directory(tmp_path, capsys):
    config = preset("tiny").replace(vocab_size=300)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    assert main(["info", str(tmp_path)]) == 0
    assert f"{config.num_params():,}" in capsys.readouterr().out


def test_info_of_an_unknown_model_is_one_line(capsys):
    assert main(["info", "llama9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a preset" in err and "tiny" in err
