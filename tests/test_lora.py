"""LoRA and QLoRA against peft, the reference: foundry's adapters load in peft and peft's in foundry with equal
logits, `foundry merge` writes a model transformers loads with the adapted logits, and the memory claims hold.

Every adapter gets a random (non-zero) lora_B, so an adapter that was dropped or misnamed changes the logits.
"""

import json
import warnings

import peft  # the reference: missing, collection fails loudly instead of skipping
import pytest
import torch
import transformers

from foundry import hub
from foundry.cli.main import main
from foundry.config import ModelConfig, preset
from foundry.core.errors import UserError
from foundry.hub.adapter import (
    ADAPTER_CONFIG,
    base_fingerprint,
    is_adapter_dir,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from foundry.model import Transformer
from foundry.model.lora import (
    LoRALinear,
    LoRASettings,
    adapters_disabled,
    apply_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
)
from foundry.model.quantized import QuantizedLinear, memory_bytes, quantize_frozen

transformers.logging.set_verbosity_error()

SHAPE = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 160, "max_position_embeddings": 128, "bos_token_id": 1,
         "eos_token_id": 2}
HF_CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "mistral": transformers.MistralConfig, "phi3": transformers.Phi3Config}
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _config(family: str) -> ModelConfig:
    extra = {"pad_token_id": 0} if family == "phi3" else {}
    return ModelConfig.from_hf_dict(HF_CONFIGS[family](**SHAPE, **extra).to_dict())


def _base(config: ModelConfig, seed: int) -> Transformer:
    model = Transformer(config)
    model.init_weights(seed)
    with torch.no_grad():  # biases and norm scales away from zeros and ones
        gen = torch.Generator().manual_seed(seed + 100)
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory, tiny_tokenizer):
    """family -> a saved random base model directory (with a tokenizer)."""
    root = tmp_path_factory.mktemp("bases")
    return {family: hub.save(root / family, _base(_config(family), seed=i), tiny_tokenizer)
            for i, family in enumerate(("llama", "qwen2", "mistral"))}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, SHAPE["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(7))


def _randomise_lora(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.2)


def _foundry_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def _hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _peft(base_dir, adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # adapter_config.json holds only fields peft knows
        return peft.PeftModel.from_pretrained(_hf(base_dir), str(adapter_dir)).eval()


def _adapted(base_dir, settings, seed=0):
    model = hub.load(base_dir).model
    fingerprint = base_fingerprint(model)
    apply_lora(model, settings)
    _randomise_lora(model, seed)
    return model.eval(), fingerprint


# ---- foundry -> peft -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_foundry_adapter_loads_in_peft_with_equal_logits(family, base_dirs, ids, tmp_path):
    model, fingerprint = _adapted(base_dirs[family], LoRASettings(rank=4, alpha=12.0))
    ours = _foundry_logits(model, ids)
    with adapters_disabled(model):
        assert (ours - _foundry_logits(model, ids)).abs().max() > 1e-3  # the adapter changes the outputs
    save_adapter(tmp_path / "adapter", model, LoRASettings(rank=4, alpha=12.0), str(base_dirs[family]), fingerprint)
    written = read_adapter_config(tmp_path / "adapter")
    assert written["target_modules"] == sorted({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"})
    assert json.loads((tmp_path / "adapter" / "foundry_adapter.json").read_text()) == {"base_fingerprint": fingerprint}
    torch.testing.assert_close(_hf_logits(_peft(base_dirs[family], tmp_path / "adapter"), ids), ours,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("settings", [
    LoRASettings(rank=8, alpha=4.0, rslora=True, targets=["q_proj", "v_proj"]),
    LoRASettings(rank=4, alpha=8.0, dropout=0.3, targets=["re:model\\.layers\\.0\\.mlp\\..*"]),
    LoRASettings(rank=2, alpha=2.0, targets=["model.layers.1.self_attn.o_proj", "down_proj"]),
], ids=["rslora", "dropout-regex-one-layer", "full-names"])
def test_settings_carry_over_to_peft(settings, base_dirs, ids, tmp_path):
    model, fingerprint = _adapted(base_dirs["llama"], settings)
    save_adapter(tmp_path / "adapter", model, settings, "tiny-llama", fingerprint)
    reference = _peft(base_dirs["llama"], tmp_path / "adapter")
    # peft wrapped exactly the modules foundry did (a regex target_modules when short names would wrap more).
    wrapped = {name.removeprefix("base_model.model.") for name, m in reference.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == set(lora_layers(model))
    torch.testing.assert_close(_hf_logits(reference, ids), _foundry_logits(model, ids), atol=ATOL, rtol=0)


# ---- peft -> foundry -----------------------------------------------------------------------------

@pytest.mark.parametrize("lora_config", [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "o_proj", "up_proj"], "lora_dropout": 0.1},
    {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "use_rslora": True},
], ids=["named", "all-linear-rslora"])
def test_peft_adapter_loads_in_foundry_with_equal_logits(lora_config, base_dirs, ids, tmp_path):
    torch.manual_seed(0)
    reference = peft.get_peft_model(_hf(base_dirs["qwen2"]), peft.LoraConfig(task_type="CAUSAL_LM", **lora_config))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                weight = module.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.2)
    reference.save_pretrained(tmp_path / "adapter")
    assert is_adapter_dir(tmp_path / "adapter")
    expected = _hf_logits(reference.eval(), ids)

    model = hub.load(base_dirs["qwen2"]).model
    settings = load_adapter(model, tmp_path / "adapter", base_fingerprint(model))
    model.eval()
    assert settings.rank == lora_config["r"] and settings.rslora == lora_config.get("use_rslora", False)
    assert "lm_head" not in lora_layers(model)
    torch.testing.assert_close(_foundry_logits(model, ids), expected, atol=ATOL, rtol=0)


# ---- merging -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_adapter(base_dirs, tmp_path_factory, ids):
    """(adapter directory, foundry's logits with the adapter applied)."""
    settings = LoRASettings(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
    model, fingerprint = _adapted(base_dirs["llama"], settings, seed=5)
    path = save_adapter(tmp_path_factory.mktemp("adapter") / "a", model, settings, "tiny-llama", fingerprint)
    return path, _foundry_logits(model, ids)


def test_merge_gives_the_adapted_logits(base_dirs, ids):
    model, _ = _adapted(base_dirs["llama"], LoRASettings(rank=4, alpha=8.0, rslora=True), seed=2)
    adapted = _foundry_logits(model, ids)
    names = merge_lora(model)
    assert names and not lora_layers(model)
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in names)
    torch.testing.assert_close(_foundry_logits(model, ids), adapted, atol=ATOL, rtol=0)


def test_merge_cli_writes_a_model_transformers_loads(base_dirs, llama_adapter, ids, tmp_path, capsys):
    adapter_dir, adapted = llama_adapter
    out = tmp_path / "merged"
    assert main(["merge", str(base_dirs["llama"]), str(adapter_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert (out / "tokenizer.json").read_bytes() == (base_dirs["llama"] / "tokenizer.json").read_bytes()
    assert not (out / ADAPTER_CONFIG).exists()
    torch.testing.assert_close(_hf_logits(_hf(out), ids), adapted, atol=ATOL, rtol=0)
    torch.testing.assert_close(_hf_logits(_peft(base_dirs["llama"], adapter_dir), ids), adapted, atol=ATOL, rtol=0)


def test_merge_cli_refuses_an_existing_out(base_dirs, llama_adapter, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(base_dirs["llama"]), str(llama_adapter[0]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


# ---- refusals ------------------------------------------------------------------------------------

def test_fingerprint_is_stable_and_tells_bases_apart(base_dirs, llama_adapter, tmp_path, capsys):
    llama = base_dirs["llama"]
    loaded = hub.load(llama).model
    in_bf16 = hub.load(llama, dtype=torch.bfloat16).model
    assert base_fingerprint(llama) == base_fingerprint(loaded) == base_fingerprint(in_bf16)
    other_dir = hub.save(tmp_path / "other", _base(_config("llama"), seed=42))
    other = hub.load(other_dir).model
    assert base_fingerprint(other) != base_fingerprint(loaded)
    apply_lora(loaded, LoRASettings())
    assert base_fingerprint(loaded) == base_fingerprint(llama)  # LoRA layers are looked through
    with pytest.raises(UserError, match="trained on another base model"):
        load_adapter(other, llama_adapter[0], base_fingerprint(other))
    assert not lora_layers(other)  # refused before anything was applied
    assert main(["merge", str(other_dir), str(llama_adapter[0]), "--out", str(tmp_path / "m")]) == 2
    assert "trained on another base model" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_bad_targets_and_adapters_are_refused(base_dirs, llama_adapter, tmp_path):
    model = hub.load(base_dirs["llama"]).model
    with pytest.raises(UserError, match="match no linear layer.*q_proj"):
        apply_lora(model, LoRASettings(targets=["qkv", "attn"]))
    tied = Transformer(preset("tiny"))
    with pytest.raises(UserError, match="shares its weight"):
        apply_lora(tied, LoRASettings(targets=["lm_head"]))
    phi3 = Transformer(_config("phi3"))
    apply_lora(phi3, LoRASettings(targets=["q_proj"]))  # fused with k_proj and v_proj in phi3's checkpoints
    with pytest.raises(UserError, match="renamed or fused"):
        save_adapter(tmp_path / "phi3", phi3, LoRASettings(), "phi3", None)
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "IA3", "target_modules": ["q_proj"]}))
    with pytest.raises(UserError, match="peft_type 'IA3'"):
        load_adapter(model, ia3)
    dora = tmp_path / "dora"
    dora.mkdir()
    raw = read_adapter_config(llama_adapter[0])
    (dora / ADAPTER_CONFIG).write_text(json.dumps({**raw, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        load_adapter(model, dora)
    narrower = Transformer(ModelConfig(**{**SHAPE, "hidden_size": 32}))
    with pytest.raises(UserError, match="has shape .* needs .*made for another model"):
        load_adapter(narrower, llama_adapter[0])
    assert not lora_layers(narrower)
    assert not lora_layers(model)


# ---- budgets: parameters, optimizer state, QLoRA memory ------------------------------------------

def test_lora_trains_a_few_percent_of_the_parameters():
    model = Transformer(preset("tiny"))
    model.init_weights(0)
    full_optimizer = torch.optim.AdamW(model.parameters())
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoRASettings(rank=8, targets=["q_proj", "v_proj"]))  # peft's default targets for Llama
    trainable, counted_total = trainable_parameters(model)
    assert counted_total == total + trainable and trainable / counted_total < 0.05
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))

    def state_numel(optimizer, params) -> int:
        optimizer.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        optimizer.step()
        return sum(t.numel() for s in optimizer.state.values() for k, t in s.items() if k != "step")

    lora_params = [p for p in model.parameters() if p.requires_grad]
    lora_state = state_numel(torch.optim.AdamW(lora_params), lora_params)
    for p in model.parameters():
        p.requires_grad_(True)
    full_state = state_numel(full_optimizer, list(model.parameters()))
    assert lora_state == 2 * trainable and lora_state / full_state < 0.05
    # all-linear on a real shape (built on the meta device: no memory) trains well under 1%.
    with torch.device("meta"):
        big = Transformer(preset("llama3-8b"))
    apply_lora(big, LoRASettings(rank=8))
    trainable, total = trainable_parameters(big)
    assert trainable / total < 0.01


@pytest.mark.parametrize("kind,budget,tolerance", [("int8", 0.30, 0.02), ("nf4", 0.16, 0.15)])
def test_qlora_base_is_small_close_and_frozen(kind, budget, tolerance, base_dirs, ids):
    torch.manual_seed(0)  # lora_A's initialisation
    fp32 = hub.load(base_dirs["llama"]).model
    quantized = hub.load(base_dirs["llama"]).model
    fp32_linear_bytes = sum(memory_bytes(m) for n, m in fp32.named_modules()
                            if isinstance(m, torch.nn.Linear) and n != "lm_head")
    replaced = quantize_frozen(quantized, kind)
    assert "lm_head" not in replaced and len(replaced) == 7 * SHAPE["num_hidden_layers"]
    base_bytes = sum(memory_bytes(m) for m in quantized.modules() if isinstance(m, QuantizedLinear))
    assert base_bytes < budget * fp32_linear_bytes
    assert memory_bytes(quantized.model.layers) < budget * memory_bytes(fp32.model.layers) + 4096  # + norms

    settings = LoRASettings(rank=4, alpha=8.0)
    apply_lora(fp32, settings)
    apply_lora(quantized, settings)
    assert all(isinstance(layer.base, QuantizedLinear) for layer in lora_layers(quantized).values())
    _randomise_lora(fp32)
    quantized.load_state_dict(lora_state_dict(fp32), strict=False)
    exact, approx = _foundry_logits(fp32, ids), _foundry_logits(quantized, ids)
    assert (approx - exact).norm() < tolerance * exact.norm()  # measured: int8 0.3-0.8%, nf4 4-7%

    quantized.train()
    quantized(ids).logsumexp(-1).mean().backward()
    for name, param in quantized.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert param.requires_grad == is_lora, name
        assert (param.grad is not None and param.grad.abs().sum() > 0) == is_lora, name
    assert not any(b.requires_grad for b in quantized.buffers())


def test_adapters_disabled_is_the_base_and_restores(base_dirs, ids):
    base_logits = _foundry_logits(hub.load(base_dirs["mistral"]).model, ids)
    model, _ = _adapted(base_dirs["mistral"], LoRASettings(rank=4))
    adapted = _foundry_logits(model, ids)
    with adapters_disabled(model):
        torch.testing.assert_close(_foundry_logits(model, ids), base_logits, atol=0, rtol=0)
    torch.testing.assert_close(_foundry_logits(model, ids), adapted, atol=0, rtol=0)
    assert all(isinstance(m, LoRALinear) and m.enabled for m in lora_layers(model).values())
    assert set(lora_state_dict(model)) == {f"{n}.lora_{ab}.weight" for n in lora_layers(model) for ab in "AB"}


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_linear_keeps_the_weight_within_half_a_step(kind):
    from foundry.model.quantized import NF4_BLOCK, NF4_LEVELS

    linear = torch.nn.Linear(100, 37)  # 3700 weights: the last NF4 block is partial
    holder = torch.nn.Sequential(linear)
    quantize_frozen(holder, kind, skip=())
    layer = holder[0]
    weight, restored = linear.weight.detach(), layer.dequantize()
    if kind == "int8":
        step = weight.abs().amax(dim=1, keepdim=True) / 127
    else:
        levels = torch.tensor(NF4_LEVELS)
        gap = (levels[1:] - levels[:-1]).max()
        absmax = torch.nn.functional.pad(weight.reshape(-1), (0, 12)).view(-1, NF4_BLOCK).abs().amax(dim=1)
        step = (gap * absmax).repeat_interleave(NF4_BLOCK)[:weight.numel()].view_as(weight)
    assert ((restored - weight).abs() <= step / 2 + 1e-6).all()
    torch.testing.assert_close(layer.bias, linear.bias.detach(), atol=0, rtol=0)
    x = torch.randn(3, 100)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, restored, linear.bias), atol=1e-5, rtol=0)
