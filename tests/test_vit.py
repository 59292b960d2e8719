"""The ViT image classifier against transformers' ViTForImageClassification: directories each side loads from
the other with equal logits, the same tensor names on disk, position interpolation, features, the preprocessor
settings, and bad input refused with a UserError."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from foundry.config.vision_config import VISION_PRESETS, ImageProcessing, ViTConfig, vision_preset
from foundry.core.errors import UserError
from foundry.hub.vision import is_vit_dir, load_vit, save_vit
from foundry.model.vit import ViT

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
SHAPES = {
    # the digits' layout (vit-tiny's) at a smaller width
    "gray8": dict(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, labels=[str(d) for d in range(10)]),
    "rgb16": dict(image_size=16, patch_size=4, num_channels=3, hidden_size=48, num_hidden_layers=2,
                  num_attention_heads=3, intermediate_size=80, labels=["cat", "dog", "bird"]),
    "rgb12-nobias-tanh": dict(image_size=12, patch_size=3, num_channels=3, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=48, labels=["x", "y"], qkv_bias=False,
                              hidden_act="gelu_new", layer_norm_eps=1e-6),
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Every parameter moved off its initial value (zero biases and unit norms would hide a mix-up)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)


def _foundry_vit(shape: str, seed: int = 0) -> ViT:
    model = ViT(ViTConfig(**SHAPES[shape]))
    model.init_weights(seed)
    _perturb(model, seed + 1)
    return model.eval()


def _pixels(config: ViTConfig, height: int | None = None, width: int | None = None, batch: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(batch, config.num_channels, height or config.image_size, width or config.image_size,
                       generator=gen)


def _file_names(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _hf_from(model_dir):
    model, info = transformers.ViTForImageClassification.from_pretrained(model_dir, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _hf_random(shape: str, seed: int = 3):
    spec = dict(SHAPES[shape])
    labels = spec.pop("labels")
    config = transformers.ViTConfig(**spec, id2label=dict(enumerate(labels)),
                                    label2id={name: i for i, name in enumerate(labels)})
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(config)
    _perturb(model, seed)
    return model.eval()


# ---- 1. foundry's directory is transformers' ViTForImageClassification -------------------------------------

@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_saved_vit_loads_in_transformers_with_equal_logits(shape, tmp_path):
    model = _foundry_vit(shape)
    processing = ImageProcessing(size=model.config.image_size, num_channels=model.config.num_channels)
    out = save_vit(tmp_path / "vit", model, processing, meta={"recipe": "test"})
    hf = _hf_from(out)
    assert hf.config.id2label == dict(enumerate(model.config.labels))
    x = _pixels(model.config)
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff < TOL, f"max |logits diff| {diff:.2e}"
    # and back: foundry reads its own directory exactly
    loaded = load_vit(out)
    assert loaded.model.config == model.config and loaded.processing == processing
    assert loaded.meta == {"recipe": "test"} and loaded.labels == model.config.labels
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_config_json_has_every_field_of_transformers_vit_config(tmp_path):
    out = save_vit(tmp_path / "vit", _foundry_vit("rgb16"), ImageProcessing(size=16))
    raw = json.loads((out / "config.json").read_text())
    assert set(transformers.ViTConfig.__annotations__) <= set(raw)
    reference = transformers.ViTConfig.from_pretrained(out)
    for name in transformers.ViTConfig.__annotations__:
        assert getattr(reference, name) == raw[name], name
    assert raw["architectures"] == ["ViTForImageClassification"] and raw["model_type"] == "vit"
    assert raw["label2id"] == {"cat": 0, "dog": 1, "bird": 2}
    assert ViTConfig.from_hf_dict(raw) == ViTConfig(**SHAPES["rgb16"])


@pytest.mark.parametrize("channels, mode, resample", [(1, "L", 2), (3, "RGB", 3)])
def test_preprocessor_settings_round_trip_through_transformers(channels, mode, resample, tmp_path):
    processing = ImageProcessing(size=8, num_channels=channels, image_mean=[0.2, 0.4, 0.6][:channels],
                                 image_std=[0.3, 0.5, 0.7][:channels], rescale_factor=1 / 255, resample=resample)
    spec = dict(SHAPES["gray8"], num_channels=channels)
    out = save_vit(tmp_path / "vit", ViT(ViTConfig(**spec)), processing)
    reference = transformers.AutoImageProcessor.from_pretrained(out)
    assert reference.size == {"height": 8, "width": 8} and int(reference.resample) == resample
    assert list(reference.image_mean) == processing.image_mean and list(reference.image_std) == processing.image_std
    assert reference.rescale_factor == processing.rescale_factor
    assert reference.do_resize and reference.do_rescale and reference.do_normalize
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (13, 11) if channels == 1 else (13, 11, channels), dtype=np.uint8)
    image = Image.fromarray(array, mode)
    theirs = reference(images=image, return_tensors="pt").pixel_values[0].numpy()
    # what ImageProcessing's numbers say: PIL resize, rescale, normalise per channel
    resized = np.asarray(image.resize((8, 8), resample=processing.resample), dtype=np.float32)
    resized = resized[None] if channels == 1 else resized.transpose(2, 0, 1)
    mean = np.asarray(processing.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(processing.image_std, dtype=np.float32)[:, None, None]
    ours = (resized * processing.rescale_factor - mean) / std
    assert theirs.shape == (channels, 8, 8)
    assert np.abs(theirs - ours).max() < 1e-5
    assert ImageProcessing.from_hf_dict(reference.to_dict()) == processing


# ---- 2. transformers' directory loads in foundry ------------------------------------------------------------

@pytest.mark.parametrize("shape", ["gray8", "rgb12-nobias-tanh"])
def test_transformers_saved_vit_loads_with_equal_logits_and_the_same_file_names(shape, tmp_path):
    hf = _hf_random(shape)
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_vit(tmp_path / "hf")
    x = _pixels(loaded.model.config)
    with torch.no_grad():
        diff = (hf(x).logits - loaded.model(x)).abs().max().item()
    assert diff < TOL, f"max |logits diff| {diff:.2e}"
    assert loaded.model.config.labels == SHAPES[shape]["labels"]
    # no preprocessor_config.json: ViTImageProcessor's defaults at the model's size
    assert loaded.processing == ImageProcessing(size=loaded.model.config.image_size,
                                                num_channels=loaded.model.config.num_channels)
    ours = save_vit(tmp_path / "ours", loaded.model, loaded.processing)
    assert _file_names(ours) == _file_names(tmp_path / "hf")


def test_transformers_image_processor_file_is_read(tmp_path):
    hf = _hf_random("rgb16")
    hf.save_pretrained(tmp_path / "hf")
    transformers.ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.485, 0.456, 0.406],
                                      image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp_path / "hf")
    loaded = load_vit(tmp_path / "hf")
    assert loaded.processing == ImageProcessing(size=16, num_channels=3, image_mean=[0.485, 0.456, 0.406],
                                                image_std=[0.229, 0.224, 0.225])


def test_a_file_under_transformers_5_in_memory_names_loads(tmp_path):
    # transformers 5 names ViT's modules vit.layers.N.attention.q_proj, ... in memory (and accepts files so named)
    hf = _hf_random("rgb16")
    hf.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(".q_proj." in name for name in state)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_vit(tmp_path / "hf", dtype=torch.bfloat16)
    assert loaded.model.classifier.weight.dtype == torch.bfloat16
    x = _pixels(loaded.model.config)
    with torch.no_grad():
        diff = (hf(x).logits - loaded.model(x).float()).abs().max().item()
    assert diff < 0.1, f"bf16 max |logits diff| {diff:.2e}"


# ---- 3. position interpolation for other image sizes ----------------------------------------------------

@pytest.mark.parametrize("height, width", [(24, 24), (8, 8), (16, 32), (8, 32), (16, 16)])
def test_interpolated_positions_match_transformers(height, width, tmp_path):
    model = _foundry_vit("rgb16")
    hf = _hf_from(save_vit(tmp_path / "vit", model, ImageProcessing(size=16)))
    x = _pixels(model.config, height, width)
    with torch.no_grad():
        theirs = hf(x, interpolate_pos_encoding=True).logits
        diff = (theirs - model(x, interpolate_pos_encoding=True)).abs().max().item()
    assert diff < TOL, f"{height}x{width}: max |logits diff| {diff:.2e}"


# ---- 4. bad input --------------------------------------------------------------------------------------

def test_bad_configs_are_refused():
    with pytest.raises(UserError, match="multiple of patch_size"):
        ViTConfig(**dict(SHAPES["rgb16"], image_size=18))
    with pytest.raises(UserError, match="num_attention_heads"):
        ViTConfig(**dict(SHAPES["rgb16"], num_attention_heads=5))
    with pytest.raises(UserError, match="hidden_act"):
        ViTConfig(**dict(SHAPES["rgb16"], hidden_act="swiglu"))
    with pytest.raises(UserError, match="distinct"):
        ViTConfig(**dict(SHAPES["rgb16"], labels=["a", "a"]))
    with pytest.raises(UserError, match="not square"):
        ViTConfig.from_hf_dict({"model_type": "vit", "image_size": [16, 32]})
    with pytest.raises(UserError, match="model_type"):
        ViTConfig.from_hf_dict({"model_type": "llama"})
    with pytest.raises(UserError, match="needs labels"):
        ViT(ViTConfig(**dict(SHAPES["rgb16"], labels=[])))
    with pytest.raises(UserError, match="one per channel"):
        ImageProcessing(size=8, num_channels=3, image_mean=[0.5])
    with pytest.raises(UserError, match="one per channel"):
        ImageProcessing.from_hf_dict({"size": {"height": 8, "width": 8}, "image_mean": [0.5, 0.5]}, num_channels=1)
    with pytest.raises(UserError, match="do_normalize"):
        ImageProcessing.from_hf_dict({"size": {"height": 8, "width": 8}, "do_normalize": False})


def test_bad_pixels_are_refused():
    model = _foundry_vit("rgb16")
    with pytest.raises(UserError, match="channel"):
        model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(UserError, match="multiple of the patch size"):
        model(torch.zeros(1, 3, 18, 16), interpolate_pos_encoding=True)
    with pytest.raises(UserError, match="interpolate_pos_encoding"):
        model(torch.zeros(1, 3, 24, 24))
    with pytest.raises(UserError, match=r"\[batch, channels"):
        model(torch.zeros(3, 16, 16))


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    out = save_vit(tmp_path / "vit", _foundry_vit("rgb16"), ImageProcessing(size=16))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}

    def rewrite(tensors):
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    name = "vit.encoder.layer.1.attention.attention.key.weight"
    rewrite({k: v for k, v in state.items() if k != name})
    with pytest.raises(UserError, match=f"missing: {name}"):
        load_vit(out)
    rewrite({**state, "vit.encoder.layer.2.output.dense.bias": torch.zeros(48)})
    with pytest.raises(UserError, match="unexpected: vit.encoder.layer.2.output.dense.bias"):
        load_vit(out)
    rewrite({**state, "classifier.weight": torch.zeros(4, 48)})
    with pytest.raises(UserError, match="classifier.weight has shape"):
        load_vit(out)
    rewrite({**state, "vit.pooler.dense.weight": torch.zeros(48, 48)})  # a ViTModel's pooler: passed over
    load_vit(out)


def test_save_refuses_a_full_directory_and_mismatched_processing(tmp_path):
    model = _foundry_vit("rgb16")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        save_vit(tmp_path / "full", model, ImageProcessing(size=16))
    with pytest.raises(UserError, match="channel"):
        save_vit(tmp_path / "new", model, ImageProcessing(size=16, num_channels=1))
    with pytest.raises(UserError, match="resizes to 8x8"):
        save_vit(tmp_path / "new", model, ImageProcessing(size=8))
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == [tmp_path / "full"]
    assert not is_vit_dir(tmp_path / "full")
    assert is_vit_dir(save_vit(tmp_path / "new", model, ImageProcessing(size=16)))


# ---- 5. features are the head's input -----------------------------------------------------------------

def test_features_are_transformers_final_normed_class_token(tmp_path):
    model = _foundry_vit("gray8")
    hf = _hf_from(save_vit(tmp_path / "vit", model, ImageProcessing(size=8, num_channels=1)))
    x = _pixels(model.config)
    with torch.no_grad():
        ours = model.features(x)
        last = hf.vit(x).last_hidden_state[:, 0]  # ViTModel applies its final LayerNorm
        states = hf(x, output_hidden_states=True).hidden_states  # before the final LayerNorm
        normed = hf.vit.layernorm(states[-1][:, 0])
        assert ours.shape == (3, model.config.hidden_size)
        assert (ours - last).abs().max().item() < TOL
        assert (ours - normed).abs().max().item() < TOL
        assert (hf.classifier(last) - model(x)).abs().max().item() < TOL


# ---- presets and initialisation ------------------------------------------------------------------

def test_vit_tiny_preset_is_a_copy_of_the_digits_shape():
    tiny = vision_preset("vit-tiny")
    assert isinstance(tiny, ViTConfig) and tiny is not VISION_PRESETS["vit-tiny"]
    assert (tiny.image_size, tiny.patch_size, tiny.num_channels, tiny.num_patches) == (8, 4, 1, 4)
    assert tiny.labels == [str(d) for d in range(10)]
    tiny.labels.append("x")
    assert len(VISION_PRESETS["vit-tiny"].labels) == 10
    assert vision_preset("no-such-model") is None
    assert tiny.with_labels(["a", "b"]).num_labels == 2


def test_init_weights_is_seeded_and_shaped_like_transformers_init(tmp_path):
    model = ViT(ViTConfig(**SHAPES["rgb16"]))
    model.init_weights(5)
    again = ViT(ViTConfig(**SHAPES["rgb16"]))
    again.init_weights(5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    # transformers' own init: the same tensors constant (zero biases, unit norms), the others of its spread
    torch.manual_seed(0)
    spec = {k: v for k, v in SHAPES["rgb16"].items() if k != "labels"}
    transformers.ViTForImageClassification(transformers.ViTConfig(**spec, num_labels=3)).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        theirs = {name: f.get_tensor(name) for name in f.keys()}
    ours = model.state_dict()
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        ref = theirs[name]
        if ref.std() == 0:
            assert torch.equal(value, ref), name
        else:
            assert abs(value.std().item() - ref.std().item()) < 0.005, name
