"""Model directories: Hub ids, sharded and pickled weights, export, and one clear line for each bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from foundry import hub  # noqa: E402
from foundry.cli import main  # noqa: E402
from foundry.config import ModelConfig  # noqa: E402
from foundry.core.errors import UserError  # noqa: E402
from foundry.model import Transformer  # noqa: E402

CONFIG = ModelConfig(vocab_size=1001, hidden_size=96, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=20, intermediate_size=200, max_position_embeddings=256,
                     bos_token_id=1, eos_token_id=2)
GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _model(config: ModelConfig = CONFIG) -> Transformer:
    model = Transformer(config)
    model.init_weights(seed=0)
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 1001, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved model directory with a tokenizer, a generation config and foundry.json."""
    return hub.save(tmp_path_factory.mktemp("hub") / "model", _model(), tiny_tokenizer, GENERATION,
                    meta={"recipe": "test"})


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "copy"))


def _error(spec, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        hub.load(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- the Hub path -------------------------------------------------------------------------------

def _hub_cache(model_dir: Path, cache: Path) -> None:
    # The layout huggingface_hub keeps: refs/main names a snapshot folder holding the repository's files.
    repo = cache / "models--acme--tiny-llama"
    shutil.copytree(model_dir, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


def test_hub_ids_resolve_from_the_cache_offline_and_configs_without_torch(model_dir, tmp_path):
    _hub_cache(model_dir, tmp_path / "cache")
    script = (
        "import sys, foundry\n"
        "from foundry.hub import resolve_model_source\n"
        "config, snapshot = resolve_model_source('acme/tiny-llama')  # info and plan: config.json only\n"
        "assert 'torch' not in sys.modules and config.head_dim == 20\n"
        "for spec in ('acme/tiny-llama', 'acme/tiny-llama@" + REVISION + "', snapshot):\n"
        "    loaded = foundry.load(spec)\n"
        "    print(loaded.config.architecture, loaded.generation_config['eos_token_id'], loaded.path.name)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"LlamaForCausalLM [2, 7] {REVISION}"] * 3


def test_hub_id_outside_the_cache_offline_is_one_clear_line(tmp_path):
    message = _error("acme/absent-model", cache_dir=tmp_path)
    assert "acme/absent-model" in message and "cache" in message


def test_a_missing_path_is_neither_a_directory_nor_a_hub_id(tmp_path):
    assert "not found" in _error(str(tmp_path / "nowhere" / "..." / "x"))


# ---- bad input ----------------------------------------------------------------------------------

def test_directory_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(tmp_path / "empty")


def test_unsupported_architecture_lists_the_supported_ones(model_dir, tmp_path):
    path = _copy(model_dir, tmp_path)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "architectures": ["MambaForCausalLM"]}))
    message = _error(path)
    assert "MambaForCausalLM" in message
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Phi3ForCausalLM", "Gemma2ForCausalLM", "Olmo2ForCausalLM", "GPT2LMHeadModel"):
        assert supported in message


def test_shape_mismatch_names_the_tensor_and_both_shapes(model_dir, tmp_path):
    path = _copy(model_dir, tmp_path)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "intermediate_size": 256}))
    message = _error(path)
    assert "model.layers.0.mlp.down_proj.weight" in message and "(96, 200)" in message and "(96, 256)" in message


def test_shape_mismatch_in_a_fused_tensor_names_the_fused_tensor(tmp_path):
    raw = {**CONFIG.to_hf_dict(), "architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}
    raw.pop("head_dim")
    raw["num_attention_heads"], raw["num_key_value_heads"] = 8, 2
    path = hub.save(tmp_path / "phi3", _model(ModelConfig.from_hf_dict(raw)))
    assert "model.layers.0.self_attn.qkv_proj.weight" in load_file(path / "model.safetensors")  # fused on save
    (path / "config.json").write_text(json.dumps({**raw, "num_key_value_heads": 4}))
    message = _error(path)
    assert "model.layers.0.self_attn.qkv_proj.weight" in message and "(144, 96)" in message \
        and "(192, 96)" in message


def test_truncated_safetensors_file(model_dir, tmp_path):
    path = _copy(model_dir, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(path)


def test_index_naming_a_missing_shard(model_dir, tmp_path):
    path = tmp_path / "sharded"
    hub.save(path, _model(), shard_size="100KB")
    next(path.glob("model-00002-of-*.safetensors")).unlink()
    assert "missing shard" in _error(path)


def test_pickle_checkpoint_is_refused_unless_trusted_and_then_read_weights_only(model_dir, tmp_path):
    path = _copy(model_dir, tmp_path)
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    assert "--trust-pickle" in _error(path)
    loaded = hub.load(path, trust_pickle=True).model
    with torch.no_grad():
        assert torch.equal(loaded(_ids()), hub.load(model_dir).model(_ids()))
    torch.save({"payload": Exploit()}, path / "pytorch_model.bin")
    assert "weights_only" in _error(path, trust_pickle=True)


class Exploit:
    def __reduce__(self):
        return (print, ("pickle ran code",))


# ---- formats ------------------------------------------------------------------------------------

def test_sharded_save_writes_an_index_and_loads_back_equal(tmp_path):
    model = _model()
    path = hub.save(tmp_path / "sharded", model, shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(hub.load(path).model(_ids()), model(_ids()))


def test_load_keeps_the_checkpoint_dtype_unless_told(model_dir):
    loaded = hub.load(model_dir, with_tokenizer=False).model
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    bf16 = hub.load(model_dir, dtype=torch.bfloat16, with_tokenizer=False).model
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.inv_freq.dtype == torch.float32  # RoPE frequencies stay exact


def _mapped_spans(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of `path` (from /proc/self/maps)."""
    target, spans = os.path.realpath(path), []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to list memory mappings")
def test_load_is_memory_mapped_onto_the_safetensors_file(model_dir, tmp_path):
    # Every weight's bytes lie inside a mapping of the file itself: no copy was read into anonymous memory.
    path = hub.save(tmp_path / "sharded", _model(), shard_size="100KB")
    for directory in (model_dir, path):
        model = hub.load(directory, with_tokenizer=False).model
        spans = [span for f in directory.glob("*.safetensors") for span in _mapped_spans(f)]
        assert spans, f"no mapping of {directory}'s safetensors files"
        for name, p in model.named_parameters():
            assert any(start <= p.data_ptr() < end for start, end in spans), f"{name} is not backed by the file"


def test_gpt2_checkpoint_without_the_transformer_prefix_and_with_mask_buffers_loads(tmp_path):
    import transformers  # a reference library: missing, the test fails (never skips)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=1001, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    reference.save_pretrained(tmp_path / "gpt2")
    state = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "gpt2" / "model.safetensors").items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # the causal-mask buffer old checkpoints carry
    save_file(state, tmp_path / "gpt2" / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        ours = hub.load(tmp_path / "gpt2").model(_ids())
        assert (ours - reference(_ids()).logits).abs().max() < 1e-4


def test_a_switch_the_architecture_cannot_spell_is_refused_up_front():
    with pytest.raises(UserError, match="LlamaForCausalLM has no qk_norm='head'; .*Qwen3ForCausalLM"):
        CONFIG.replace(qk_norm="head")
    assert CONFIG.replace(qk_norm="head", architecture="Qwen3ForCausalLM").qk_norm == "head"


# ---- export -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cli_export_writes_shards_that_transformers_loads_with_equal_logits(model_dir, tmp_path, flag, dtype):
    import transformers  # a reference library: missing, the test fails (never skips)
    out = tmp_path / "export"
    assert main(["export", str(model_dir), "--out", str(out), "--dtype", flag, "--shard-size", "100KB"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "foundry.json"):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes(), name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert theirs.dtype == dtype
    source = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    ours = hub.load(out).model
    with torch.no_grad():
        assert torch.equal(theirs(_ids()).logits, source(_ids()).logits)
        assert torch.equal(ours(_ids()), theirs(_ids()).logits)
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [2, 7] and generation.temperature == 0.6


def test_cli_export_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert main(["export", str(model_dir), "--out", str(tmp_path / "out"), "--shard-size", "lots"]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", str(model_dir), "--out", str(tmp_path / "full")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("foundry export: error: ") for line in errors)
    assert not (tmp_path / "out").exists()
