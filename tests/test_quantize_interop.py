"""foundry loads what compressed-tensors itself writes (issue 11): a tiny random transformers Llama quantised and
saved with compressed-tensors' own API (no foundry code on the writing side), then read by foundry and by
transformers. llm-compressor is not installed, so its round-to-nearest step (the minmax observer) is done with the
compressed-tensors function that observer calls, `calculate_qparams`."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors import safe_open

from foundry import hub
from foundry.model.weight_only import (
    Int4WeightLinear,
    Int8WeightLinear,
    WeightOnlyLinear,
    dequantize_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

# hidden 64 and MLP 128: both multiples of the int4 group (32), and every output count a multiple of 16, so
# foundry's int4 layers take torch's CPU kernel rather than the dequantising fallback.
LLAMA = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128,
         "initializer_range": 0.1}  # larger than the default 0.02, so the logits are not all near zero
IDS = torch.tensor([[1, 5, 17, 42, 99, 200, 255, 3, 64, 128, 7, 0]])
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def _minmax_calibrate(model: torch.nn.Module) -> int:
    """Set every quantised module's weight_scale / weight_zero_point as llm-compressor's round-to-nearest does
    (MinMaxObserver: min and max of each channel or group, then compressed-tensors' calculate_qparams)."""
    count = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        weight = module.weight.detach()
        groups = weight.unflatten(-1, (-1, scheme.weights.group_size or weight.shape[-1]))  # channel: one group
        scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
        module.weight_scale.data.copy_(scale)
        module.weight_zero_point.data.copy_(zero_point)
        count += 1
    return count


def _write_with_compressed_tensors(out: Path, weights: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a tiny random Llama and save it as compressed-tensors / llm-compressor do; returns the float
    model's logits on IDS and compressed-tensors' own fake-quantised logits (before compression)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    with torch.no_grad():
        float_logits = model(IDS).logits
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    assert _minmax_calibrate(model) == 2 * len(PROJECTIONS)
    with torch.no_grad():
        fake_quantized = model(IDS).logits  # compressed-tensors' quantise-dequantise forward
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    return float_logits, fake_quantized


@pytest.mark.parametrize("bits, strategy, group_size, cls", [(8, "channel", None, Int8WeightLinear),
                                                              (4, "group", 32, Int4WeightLinear)])
def test_foundry_loads_a_compressed_tensors_directory(tmp_path, bits, strategy, group_size, cls):
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy, group_size=group_size)
    out = tmp_path / f"w{bits}a16"
    float_logits, fake_quantized = _write_with_compressed_tensors(out, weights)

    # What compressed-tensors wrote: its own config schema, and per linear weight_packed / _scale / _shape.
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    group = quant["config_groups"]["group_0"]
    assert (quant["quant_method"], quant["format"], quant["quantization_status"], quant["ignore"]) == \
        ("compressed-tensors", "pack-quantized", "compressed", ["lm_head"])
    assert (group["format"], group["targets"], group["input_activations"]) == ("pack-quantized", ["Linear"], None)
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == \
        {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "group_size": group_size}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
    assert not any(name.endswith("_proj.weight") or "zero_point" in name for name in stored)
    assert stored["lm_head.weight"].dtype == torch.float32  # ignored: kept in floating point

    ours = hub.load(out, with_tokenizer=False).model
    assert type(ours.lm_head) is torch.nn.Linear
    minimum = 0
    for layer in range(LLAMA["num_hidden_layers"]):
        for projection in PROJECTIONS:
            name = f"model.layers.{layer}.{projection}"
            module = ours.get_submodule(name)
            assert type(module) is cls, name  # integers in memory, not a dequantised nn.Linear
            packed, scale, shape = (stored[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape"))
            assert packed.dtype == torch.int32 and scale.dtype == torch.float32
            assert shape.tolist() == [module.out_features, module.in_features]
            assert scale.shape == (module.out_features, module.in_features // (group_size or module.in_features))
            values = unpack_from_int32(packed, bits, torch.Size(shape.tolist()))
            assert torch.equal(module.int_weight(), values) and torch.equal(module.weight_scale, scale)
            minimum = min(minimum, int(values.min()))
    # compressed-tensors' minmax scale is 2 * absmax / (2^bits - 1), so a channel or group whose absmax is negative
    # rounds it to -2^(bits-1); for int8 that is -128, which foundry's own quantiser (absmax / 127) never writes.
    assert minimum == -(1 << bits - 1)  # measured: 451 int8 values of -128, 1042 int4 values of -8
    assert sum(isinstance(m, WeightOnlyLinear) for m in ours.modules()) == 2 * len(PROJECTIONS)

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        reference, kernels = theirs(IDS).logits, ours(IDS)
        dequantize_model(ours)  # fp32 activations, as transformers computes
        logits = ours(IDS)
    # The same integers and scales in fp32 on both sides: only summation order differs (measured 1.6e-6 / 0).
    assert (logits - reference).abs().max() < 1e-4
    assert (logits - fake_quantized).abs().max() < 1e-4
    # foundry's CPU kernels meet the integers with bf16 activations: ~1% of the logits' scale.
    assert (kernels - reference).norm() / reference.norm() < 2e-2
    # ...and they are quantised logits, not the float model's (measured: int8 differs by up to 0.068, int4 by up to
    # 1.05, on logits up to ~3 in magnitude).
    assert (logits - float_logits).abs().max() > 1e-2
