"""`foundry export --format gguf`: files that two independent readers take back as our model. gguf's own
GGUFReader sees llama.cpp's names, shapes, types and our tokenizer; transformers' GGUF loader (which
dequantises and undoes llama.cpp's q/k row order itself) computes our logits from it."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import numpy as np
import pytest
import torch

from foundry import hub
from foundry.cli import main
from foundry.config import ModelConfig
from foundry.model import Transformer

SHAPE = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 80, "max_position_embeddings": 256, "eos_token_id": 0}
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")


def _config(architecture: str, **changes) -> ModelConfig:
    return ModelConfig.from_hf_dict({"architectures": [architecture], **SHAPE, **changes})


def _trained(config: ModelConfig, batch: torch.Tensor, steps: int = 20) -> Transformer:
    """A model whose logits are far from flat (random-init logits are nearly uniform), so that relative
    logit error and top-1 agreement mean something."""
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def batch(tiny_tokenizer, sample_texts) -> torch.Tensor:
    ids = tiny_tokenizer.encode("\n".join(sample_texts)[:20_000])
    return torch.tensor(ids[:8 * 129]).reshape(8, 129)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer, batch):
    """Llama with an untied head and grouped-query attention; ffn_down's rows (80) are not a multiple of 32."""
    return hub.save(tmp_path_factory.mktemp("gguf") / "llama", _trained(_config("LlamaForCausalLM"), batch),
                    tiny_tokenizer)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, tiny_tokenizer, batch):
    """Qwen2: q/k/v biases and a tied head."""
    config = _config("Qwen2ForCausalLM", tie_word_embeddings=True)
    return hub.save(tmp_path_factory.mktemp("gguf") / "qwen2", _trained(config, batch), tiny_tokenizer)


def _export(model_dir, out, *flags: str) -> None:
    assert main(["export", str(model_dir), "--format", "gguf", *flags, "--out", str(out)]) == 0
    assert out.is_file() and not list(out.parent.glob(f".{out.name}.*"))  # no temporary left beside it


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _logits(model_dir, gguf_path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(foundry's fp32 logits from the model directory, transformers' logits from the GGUF file)."""
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                               dtype=torch.float32).eval()
    ours = hub.load(model_dir, dtype=torch.float32).model
    with torch.no_grad():
        return ours(ids), theirs(ids).logits


def _errors(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float, float]:
    """(max abs error, relative error ||theirs - ours|| / ||ours||, top-1 agreement)."""
    diff = theirs - ours
    return diff.abs().max().item(), (diff.norm() / ours.norm()).item(), \
        (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()


def test_gguf_reader_sees_llama_cpp_names_shapes_types_and_our_tokenizer(llama_dir, tiny_tokenizer, tmp_path):
    out = tmp_path / "llama-f16.gguf"
    _export(llama_dir, out, "--type", "f16")
    reader = gguf.GGUFReader(out)
    expected_meta = {"general.architecture": "llama", "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
                     "llama.context_length": 256, "llama.embedding_length": 64, "llama.block_count": 2,
                     "llama.feed_forward_length": 80, "llama.attention.head_count": 4,
                     "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.vocab_size": 512,
                     "llama.rope.freq_base": 10000.0, "tokenizer.ggml.model": "gpt2",
                     "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.eos_token_id": tiny_tokenizer.eos_id,
                     "tokenizer.ggml.padding_token_id": tiny_tokenizer.pad_id, "tokenizer.ggml.add_bos_token": False,
                     "tokenizer.chat_template": tiny_tokenizer.chat_template}
    assert {key: _field(reader, key) for key in expected_meta} == expected_meta
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert "tokenizer.ggml.bos_token_id" not in reader.fields  # ours has none; llama.cpp must not add one

    ours = {name: tuple(t.shape) for name, t in hub.load(llama_dir).model.state_dict().items()}
    tensors = {t.name: t for t in reader.tensors}
    names = {"token_embd.weight", "output_norm.weight", "output.weight",
             *(f"blk.{i}.{part}.weight" for i in range(2) for part in LAYER_TENSORS)}
    assert set(tensors) == names
    hf = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
          "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight",
          "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}
    for name, hf_name in hf.items():  # GGUF lists dimensions innermost first
        assert tuple(int(n) for n in reversed(tensors[name].shape)) == ours[hf_name], name
    for name, t in tensors.items():
        assert t.tensor_type.name == ("F32" if name.endswith("norm.weight") else "F16"), name

    vocab = tiny_tokenizer.backend.get_vocab()
    assert _field(reader, "tokenizer.ggml.tokens") == [tiny_tokenizer.id_to_token(i) for i in range(512)]
    specials = {tiny_tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")}
    assert _field(reader, "tokenizer.ggml.token_type") == [
        int(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL) for i in range(len(vocab))]
    merges = json.loads(tiny_tokenizer.backend.to_str())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]


@pytest.mark.parametrize("kind, max_abs, max_rel, min_top1", [
    ("f32", 1e-4, 1e-6, 1.0),
    # f16 rounds each weight by <= 2^-11 relative; over dot products of 64-80 terms the logits moved by ~9e-5
    # relative (abs 7e-4 on logits of std ~1.2) when measured: 1e-3 leaves a 10x margin.
    ("f16", 1e-2, 1e-3, 0.98),
    # q8_0 rounds each weight to 1/254 of its 32-block's largest |w|: measured ~2e-3 relative (abs 0.02):
    # 1e-2 leaves a 5x margin, and argmax may only flip where two logits are that close.
    ("q8_0", 1e-1, 1e-2, 0.95),
])
def test_transformers_runs_the_file_with_our_logits(llama_dir, batch, tmp_path, capsys, kind, max_abs, max_rel,
                                                     min_top1):
    out = tmp_path / f"llama-{kind}.gguf"
    _export(llama_dir, out, "--type", kind)
    printed = capsys.readouterr().out
    ours, theirs = _logits(llama_dir, out, batch[:2, :64])
    assert ours.std() > 0.5  # trained, not flat: top-1 agreement is a real test
    abs_error, rel_error, top1 = _errors(ours, theirs)
    print(f"{kind}: max abs {abs_error:.3g}, relative {rel_error:.3g}, top-1 {top1:.3f}")  # shown with pytest -s
    assert abs_error <= max_abs and rel_error <= max_rel and top1 >= min_top1, (abs_error, rel_error, top1)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    if kind == "q8_0":  # rows of 80 cannot be cut into 32-blocks: those stay f16, and the command says so
        assert {n for n, t in types.items() if t == "F16"} == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
        assert types["blk.0.ffn_up.weight"] == types["token_embd.weight"] == "Q8_0"
        assert "2 tensors kept in f16" in printed and "blk.1.ffn_down.weight" in printed
    else:
        assert "kept in f16" not in printed


def test_qwen2_is_llama_cpp_qwen2_with_biases_and_a_tied_head(qwen2_dir, batch, tmp_path):
    out = tmp_path / "qwen2.gguf"
    _export(qwen2_dir, out, "--type", "f32")
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert _field(reader, "general.architecture") == "qwen2"
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd for the head
    assert {f"blk.0.attn_{p}.bias" for p in "qkv"} <= set(tensors) and "blk.0.attn_output.bias" not in tensors
    assert tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"
    abs_error, rel_error, top1 = _errors(*_logits(qwen2_dir, out, batch[:2, :64]))
    assert abs_error <= 1e-4 and top1 == 1.0, (abs_error, rel_error)


def test_transformers_reads_the_tokenizer_back_with_our_ids(llama_dir, tiny_tokenizer, sample_texts, tmp_path):
    import transformers

    out = tmp_path / "llama.gguf"
    _export(llama_dir, out)  # the default type
    assert _field(gguf.GGUFReader(out), "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = sample_texts[0][:5000] + " 1234567 don't\n\n<|im_start|>user\nhi<|im_end|>"
    assert theirs.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)


def test_mistral_is_llama_to_llama_cpp_and_its_window_is_reported(tiny_tokenizer, batch, tmp_path, capsys):
    model = Transformer(_config("MistralForCausalLM", sliding_window=128))
    model.init_weights(seed=1)
    model_dir = hub.save(tmp_path / "tiny-mistral", model.eval(), tiny_tokenizer)
    out = tmp_path / "gguf" / "mistral.gguf"
    _export(model_dir, out, "--type", "f32")
    assert "note: sliding_window=128 is not carried" in capsys.readouterr().out
    assert _field(gguf.GGUFReader(out), "general.architecture") == "llama"
    abs_error, _, _ = _errors(*_logits(model_dir, out, batch[:1, :64]))  # 64 tokens: inside the window
    assert abs_error <= 1e-4


def test_llama3_rope_scaling_is_written_as_the_rope_freqs_transformers_computes(tiny_tokenizer, tmp_path):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model = Transformer(_config("LlamaForCausalLM", rope_theta=500000.0, rope_scaling=scaling))
    model.init_weights(seed=2)
    model_dir = hub.save(tmp_path / "llama3", model.eval(), tiny_tokenizer)
    out = tmp_path / "llama3.gguf"
    _export(model_dir, out, "--type", "q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert tensors["rope_freqs.weight"].tensor_type.name == "F32"
    config = transformers.AutoConfig.from_pretrained(model_dir)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    # llama.cpp divides each pair's frequency by its factor
    np.testing.assert_allclose(tensors["rope_freqs.weight"].data, (plain / scaled).numpy(), rtol=1e-6)


def test_linear_rope_scaling_is_llama_cpp_metadata_and_the_api_takes_a_loaded_model(tiny_tokenizer, tmp_path):
    from foundry.hub.gguf import write_gguf

    model = Transformer(_config("LlamaForCausalLM", rope_scaling={"rope_type": "linear", "factor": 4.0}))
    model.init_weights(seed=3)
    loaded = hub.load(hub.save(tmp_path / "linear", model.eval(), tiny_tokenizer))
    result = write_gguf(loaded, tmp_path / "linear.gguf", "f32")
    assert result.architecture == "llama" and result.kept_f16 == () and result.notes == ()
    assert result.tensor_types["blk.0.attn_q.weight"] == result.tensor_types["blk.0.attn_norm.weight"] == "F32"
    reader = gguf.GGUFReader(result.path)
    assert _field(reader, "llama.rope.scaling.type") == "linear"
    assert _field(reader, "llama.rope.scaling.factor") == 4.0
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}


def test_refusals_are_one_line_and_exit_2(llama_dir, tmp_path, capsys):
    phi3 = hub.save(tmp_path / "phi3", Transformer(_config("Phi3ForCausalLM")))
    untokenized = hub.save(tmp_path / "bare", Transformer(_config("LlamaForCausalLM")))
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    yarn_dir = hub.save(tmp_path / "yarn", Transformer(_config("LlamaForCausalLM", rope_scaling=yarn)))
    (tmp_path / "taken.gguf").write_bytes(b"x")
    out = str(tmp_path / "x.gguf")
    cases = [
        (["export", str(phi3), "--format", "gguf", "--out", out], "Phi3ForCausalLM is not yet"),
        (["export", str(untokenized), "--format", "gguf", "--out", out], "has no tokenizer.json"),
        (["export", str(yarn_dir), "--format", "gguf", "--out", out], "rope_scaling type 'yarn' is not supported"),
        (["export", str(llama_dir), "--format", "gguf", "--out", str(tmp_path / "taken.gguf")], "already exists"),
        (["export", str(llama_dir), "--type", "q8_0", "--out", str(tmp_path / "hf")],
         "--type applies to --format gguf only"),
        (["export", str(llama_dir), "--format", "gguf", "--dtype", "bf16", "--out", out],
         "--dtype applies to --format hf only"),
        (["export", str(llama_dir), "--format", "gguf", "--shard-size", "1GB", "--out", out],
         "--shard-size applies to --format hf only"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("foundry export: error: ") and message in errors[0], errors
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "hf").exists()
    assert (tmp_path / "taken.gguf").read_bytes() == b"x"
    assert not list(tmp_path.glob(".x.gguf.*"))
