"""Weight-only int8 / int4 (`foundry quantize`, foundry.model.weight_only): the directory is compressed-tensors'
layout, checked by two readers no one here wrote (compressed-tensors' own unpacking, transformers' loader, which
decompresses through compressed-tensors), and on a trained model the quantised logits stay close to fp32's."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open
from train_helpers import make_data_dir

import foundry.infer.compiled as compiled_module
from foundry import hub
from foundry.cli import main
from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.data.shards import TokenShards
from foundry.eval.perplexity import evaluate
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams
from foundry.model import Transformer
from foundry.model.quantized import memory_bytes
from foundry.model.weight_only import (Int4WeightLinear, Int8WeightLinear, dequantize_model, pack_int32, quantize_model,
                                       quantize_weight, unpack_int32)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

# An untied head (so lm_head is quantised too); inputs of 64 (attention, gate/up, head) and 256 (down_proj).
SHAPE = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 256, "max_position_embeddings": 256, "eos_token_id": None}
SEQ = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_texts, tiny_tokenizer):
    return make_data_dir(tmp_path_factory, sample_texts, tiny_tokenizer)


@pytest.fixture(scope="module")
def trained(data_dir) -> Transformer:
    """~0.19M parameters, 500 AdamW steps on the stdlib corpus: logits far from flat, so that top-1 agreement and
    perplexity mean something."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE))
    model.init_weights(seed=0)
    train = TokenShards(data_dir, "train")
    tokens = torch.from_numpy(train.read(0, len(train)).astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    steps = 500
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (1 - 0.9 * step / steps)
        starts = torch.randint(0, len(tokens) - SEQ - 1, (8,), generator=gen).tolist()
        batch = torch.stack([tokens[s:s + SEQ + 1] for s in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained, tiny_tokenizer):
    return hub.save(tmp_path_factory.mktemp("quantize") / "fp32", trained, tiny_tokenizer)


@pytest.fixture(scope="module")
def ids(data_dir) -> torch.Tensor:
    return torch.from_numpy(TokenShards(data_dir, "val").read(0, 4 * SEQ).astype(np.int64)).view(4, SEQ)


def _copy(model: Transformer) -> Transformer:
    twin = Transformer(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def _quantize_cli(model_dir, out, *flags: str) -> None:
    assert main(["quantize", str(model_dir), *flags, "--out", str(out)]) == 0
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary left beside it


def test_packing_is_compressed_tensors_packing():
    gen = torch.Generator().manual_seed(0)
    for bits in (8, 4):
        for shape in ((16, 64), (24, 100), (3, 7)):  # 100 and 7: a last word only partly filled
            q = torch.randint(-(1 << bits - 1), 1 << bits - 1, shape, generator=gen).to(torch.int8)
            assert torch.equal(pack_int32(q, bits), pack_to_int32(q, bits)), (bits, shape)
            assert torch.equal(unpack_int32(pack_int32(q, bits), bits, shape[1]), q)
            assert torch.equal(unpack_from_int32(pack_int32(q, bits), bits, torch.Size(shape)), q)


@pytest.mark.parametrize("cls, group_size, out_features, kernel", [
    (Int8WeightLinear, None, 48, True),
    (Int4WeightLinear, 32, 48, True),   # _weight_int4pack_mm_for_cpu
    (Int4WeightLinear, 16, 48, False),  # a group the kernel refuses: dequantise and matmul
    (Int4WeightLinear, 32, 40, False),  # rows not a multiple of 16: the same
])
def test_modules_are_a_dequantised_matmul_eager_and_compiled(cls, group_size, out_features, kernel):
    linear = torch.nn.Linear(128, out_features)
    torch.nn.init.normal_(linear.weight, std=0.5)
    module = cls.from_linear(linear, group_size)
    assert getattr(module, "kernel_layout", True) == kernel
    q, scale = quantize_weight(linear.weight, cls.bits, group_size)
    assert torch.equal(module.int_weight(), q)  # the kernel's packed layout gives the integers back exactly
    qmax = (1 << cls.bits - 1) - 1
    assert -qmax - 1 <= q.min() and q.max() <= qmax and (q.abs() == qmax).any()
    x = torch.randn(2, 3, 128)  # any leading shape
    reference = F.linear(x, (q.float().view(out_features, scale.shape[1], -1) * scale[..., None]).flatten(1),
                         linear.bias)
    eager = module(x)
    if kernel:  # the kernels meet the integers with bf16 activations: the inputs and outputs rounded to bf16
        in_bf16 = F.linear(x.bfloat16().float(), (q.float().view(out_features, scale.shape[1], -1)
                                                   * scale.bfloat16().float()[..., None]).flatten(1), linear.bias)
        assert ((eager - in_bf16).norm() / in_bf16.norm()) < 4e-3  # bf16 keeps 8 bits: ~2e-3 a rounding
        assert ((eager - reference).norm() / reference.norm()) < 1e-2
    else:
        torch.testing.assert_close(eager, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.compile(module)(x), eager, rtol=1e-5, atol=1e-5)
    # bf16 activations in and out: bf16 rounding of ~128-term sums, ~1e-2 relative
    relative = (module(x.bfloat16()).float() - reference).norm() / reference.norm()
    assert relative < 2e-2, relative.item()


@pytest.mark.parametrize("scheme, bits, strategy, group_size", [("int8", 8, "channel", None),
                                                                 ("int4", 4, "group", 32)])
def test_transformers_loads_the_directory_with_our_logits(model_dir, trained, ids, tmp_path, scheme, bits,
                                                          strategy, group_size):
    import transformers

    out = tmp_path / scheme
    _quantize_cli(model_dir, out, "--scheme", scheme)
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(raw)  # compressed-tensors' own schema
    weights = parsed.config_groups["group_0"].weights
    assert (parsed.quant_method, parsed.format, parsed.quantization_status) == \
        ("compressed-tensors", "pack-quantized", "compressed")
    assert (weights.num_bits, weights.strategy, weights.group_size, weights.symmetric, weights.type) == \
        (bits, strategy, group_size, True, "int")
    assert parsed.ignore == []  # the head is untied: quantised too
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()

    ours = hub.load(out).model
    original = dict(trained.named_modules())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
            module = ours.get_submodule(name)
            assert isinstance(module, Int8WeightLinear if bits == 8 else Int4WeightLinear)
            packed, scale = f.get_tensor(f"{name}.weight_packed"), f.get_tensor(f"{name}.weight_scale")
            shape = f.get_tensor(f"{name}.weight_shape")
            assert packed.dtype == torch.int32 and scale.dtype == torch.float32
            assert shape.tolist() == list(original[name].weight.shape)
            values = unpack_from_int32(packed, bits, torch.Size(shape.tolist()))
            assert torch.equal(values, module.int_weight())
            assert torch.equal(values, quantize_weight(original[name].weight, bits, group_size)[0])
    assert not any(n.endswith("proj.weight") or n == "lm_head.weight" for n in names)
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= names  # embeddings and norms unquantised

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits, reference = ours(ids), theirs(ids).logits
        dequantize_model(ours)
        exact = ours(ids)
    # The same integers and scales in fp32: only summation order differs (measured ~2e-7).
    assert (exact - reference).abs().max() < 1e-4
    # The kernels' bf16 activations: ~1% of the logits' scale (measured 0.06 on logits up to ~6).
    assert (logits - reference).norm() / reference.norm() < 2e-2


def test_fused_and_tied_families_round_trip_through_transformers(tmp_path, ids):
    """Phi-3 stores q/k/v and gate/up fused (a fused module's rows are its parts'); Qwen2 here ties its head,
    which stays unquantised and is listed in `ignore`."""
    import transformers

    for arch, tied in (("Phi3ForCausalLM", False), ("Qwen2ForCausalLM", True)):
        config = ModelConfig.from_hf_dict({"architectures": [arch], **SHAPE, "tie_word_embeddings": tied})
        model = Transformer(config)
        model.init_weights(seed=1)
        assert quantize_model(model.eval(), "int4") == 2 * 7 + (not tied)
        out = hub.save(tmp_path / arch, model)
        ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
        assert ignore == (["lm_head"] if tied else [])
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            loaded = hub.load(out).model
            assert (loaded(ids[:1]) - model(ids[:1])).abs().max() == 0
            dequantize_model(loaded)  # fp32 activations, as transformers computes
            assert (loaded(ids[:1]) - theirs(ids[:1]).logits).abs().max() < 1e-4, arch


@pytest.mark.slow
def test_quality_on_a_trained_model(trained, data_dir):
    val = TokenShards(data_dir, "val")
    base = evaluate(trained, val, batch_size=8, seq_len=SEQ, max_batches=16)
    ids = torch.from_numpy(val.read(0, 8 * SEQ).astype(np.int64)).view(8, SEQ)
    with torch.no_grad():
        reference = trained(ids).log_softmax(-1)
    assert reference.exp().amax(-1).mean() > 0.15  # 1/512 if flat: top-1 agreement is a real test
    figures = {}
    for scheme in ("int8", "int4"):
        model = _copy(trained)
        quantize_model(model, scheme)
        ppl = evaluate(model, val, batch_size=8, seq_len=SEQ, max_batches=16)
        with torch.no_grad():
            logp = model(ids).log_softmax(-1)
        kl = F.kl_div(logp.flatten(0, 1), reference.flatten(0, 1), log_target=True, reduction="batchmean").item()
        top1 = (logp.argmax(-1) == reference.argmax(-1)).float().mean().item()
        figures[scheme] = (ppl.perplexity / base.perplexity - 1, kl, top1, memory_bytes(model))
    print(f"\nfp32 ppl {base.perplexity:.3f}, {memory_bytes(trained)} bytes; " + "; ".join(
        f"{s}: ppl {100 * d:+.2f}%, KL {kl:.2e}, top-1 {t:.3f}, {b} bytes" for s, (d, kl, t, b) in figures.items()))
    # Measured: int8 -0.00% ppl, KL 5e-5, top-1 0.992; int4 (group 32) +0.91%, KL 1.4e-2, top-1 0.912. The bounds
    # (1% and 5% ppl, as issue 11 asks) leave a wide margin; KL and top-1 bounds about 3x and 0.06 below them.
    assert figures["int8"][0] < 0.01 and figures["int8"][1] < 1e-3 and figures["int8"][2] > 0.98
    assert figures["int4"][0] < 0.05 and figures["int4"][1] < 5e-2 and figures["int4"][2] > 0.85
    assert figures["int4"][3] < figures["int8"][3] < memory_bytes(trained)


@pytest.mark.slow
def test_compiled_engine_gives_the_eager_greedy_tokens(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv(compiled_module.CACHE_ENV, str(tmp_path / "foundry"))
    monkeypatch.setattr(compiled_module, "CPU_OPTIONS", {"freezing": True})  # as test_infer_compiled does
    model = _copy(trained)
    quantize_model(model, "int4")
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    prompts = [[5, 17, 42, 99, 3], [7, 7, 300]]
    eager = [c.token_ids for c in Engine(model, prefill_chunk=8).generate(prompts, params)]
    compiled = [c.token_ids for c in Engine(model, prefill_chunk=8, compile=True).generate(prompts, params)]
    assert compiled == eager and all(len(t) == 8 for t in eager)


def test_a_quantised_directory_saves_again_and_gguf_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "int4-g64"
    _quantize_cli(model_dir, out, "--scheme", "int4", "--group-size", "64")
    assert "15 linears as int4 (groups of 64)" in capsys.readouterr().out
    again = tmp_path / "again"
    assert main(["export", str(out), "--out", str(again)]) == 0  # load (integers in memory) and save
    with safe_open(str(out / "model.safetensors"), "pt") as a, safe_open(str(again / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118 - not a dict
    assert json.loads((again / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]["group_size"] == 64
    capsys.readouterr()
    assert main(["export", str(out), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "weight-only quantised" in error[0] and "--type q8_0" in error[0]
    with pytest.raises(UserError, match="already quantised"):
        quantize_model(hub.load(out).model, "int8")


def test_refusals_are_one_line_and_exit_2(model_dir, tmp_path, capsys):
    gpt2 = ModelConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"], **SHAPE})
    gpt2_dir = hub.save(tmp_path / "gpt2", Transformer(gpt2))
    quantized = tmp_path / "int8"
    _quantize_cli(model_dir, quantized, "--scheme", "int8")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    out = str(tmp_path / "out")
    cases = [
        (["--scheme", "int3"], model_dir, out, "unknown quantisation scheme 'int3'; choose one of int8, int4"),
        (["--scheme", "int4", "--group-size", "128"], model_dir, out,
         "group size 128 does not divide model.layers.0.self_attn.q_proj's 64 input features; use --group-size 64"),
        (["--scheme", "int8", "--group-size", "32"], model_dir, out, "--group-size applies to int4 only"),
        (["--scheme", "int4"], quantized, out, "already quantised"),
        (["--scheme", "int8"], gpt2_dir, out, "GPT2LMHeadModel keeps its projections as Conv1D"),
        (["--scheme", "int8"], model_dir, str(tmp_path / "taken"), "already exists"),
    ]
    capsys.readouterr()
    for flags, source, target, message in cases:
        assert main(["quantize", str(source), *flags, "--out", target]) == 2, flags
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("foundry quantize: error: ") and message in errors[0], errors
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
