"""Vision model configs: how images are prepared (`ImageProcessing`, preprocessor_config.json) and the shape of
a ViT image classifier (`ViTConfig`, config.json of transformers' ViTForImageClassification); the named vision
presets at the end.

Torch-free, like the rest of foundry.config.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from foundry.config.labels import id2label_names
from foundry.config.model_config import ACTIVATIONS, checked_fields
from foundry.core.errors import UserError

# PIL's resampling filters by number, as preprocessor_config.json stores them (PIL.Image.Resampling).
RESAMPLE_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
VIT_ARCHITECTURE = "ViTForImageClassification"


def _positive_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def _square(value: Any, name: str, where: str) -> Any:
    """An int from transformers' int-or-[height, width] spelling; foundry's vision models are square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UserError(f"{where}: {name} {list(value)} is not square; foundry's ViT takes square images "
                            f"and patches only")
        return value[0]
    return value


def _per_channel(values: Any, channels: int, name: str, where: str) -> list[float]:
    """One float per channel from a list, one number for all (ViTImageProcessor allows it), or empty/None (0.5)."""
    if values is None or (isinstance(values, (list, tuple)) and not values):
        values = 0.5
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values] * channels
    if (not isinstance(values, (list, tuple)) or len(values) != channels
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise UserError(f"{where}: {name} must be {channels} number(s), one per channel, got {values!r}")
    return [float(v) for v in values]


# ---- preprocessing ----------------------------------------------------------------------------

@dataclass
class ImageProcessing:
    """What preprocessor_config.json (ViTImageProcessor) says: resize to size x size, rescale, normalise.

    pixel = (value * rescale_factor - image_mean[c]) / image_std[c], after a resize with PIL filter `resample`.
    An empty image_mean / image_std means ViTImageProcessor's default, 0.5 for every channel."""

    size: int  # height = width after resizing
    num_channels: int = 3
    image_mean: list[float] = field(default_factory=list)  # one per channel
    image_std: list[float] = field(default_factory=list)
    rescale_factor: float = 1 / 255
    resample: int = 2  # PIL's bilinear, as ViTImageProcessor

    def __post_init__(self) -> None:
        where = "image processing"
        _positive_int(self.size, "size", where)
        _positive_int(self.num_channels, "num_channels", where)
        for name in ("image_mean", "image_std"):
            setattr(self, name, _per_channel(getattr(self, name), self.num_channels, name, where))
        if any(s <= 0 for s in self.image_std):
            raise UserError(f"{where}: image_std must be positive, got {self.image_std}")
        if not isinstance(self.rescale_factor, (int, float)) or self.rescale_factor <= 0:
            raise UserError(f"{where}: rescale_factor must be a positive number, got {self.rescale_factor!r}")
        if self.resample not in RESAMPLE_FILTERS:
            raise UserError(f"{where}: resample must be one of PIL's filters "
                            f"{', '.join(f'{k} ({v})' for k, v in RESAMPLE_FILTERS.items())}, got {self.resample!r}")

    def to_hf_dict(self) -> dict[str, Any]:
        """preprocessor_config.json contents, as ViTImageProcessor writes them."""
        return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                "size": {"height": self.size, "width": self.size}, "resample": self.resample,
                "do_rescale": True, "rescale_factor": self.rescale_factor, "do_normalize": True,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std)}

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], where: str = "preprocessor_config.json",
                     num_channels: int | None = None) -> "ImageProcessing":
        """Read a ViTImageProcessor's preprocessor_config.json dict; num_channels (the model's) sizes a mean or
        std given as one number, and must agree with per-channel lists."""
        if not isinstance(raw, dict):
            raise UserError(f"{where} is not a JSON object")
        kind = raw.get("image_processor_type", "ViTImageProcessor")
        if kind not in ("ViTImageProcessor", "ViTImageProcessorFast", "ViTImageProcessorPil"):
            raise UserError(f"{where}: image_processor_type {kind!r} is not ViTImageProcessor; foundry reads only "
                            f"ViT's resize-rescale-normalise preprocessing")
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if raw.get(flag, True) is not True:
                raise UserError(f"{where}: {flag} is {raw[flag]!r}; foundry's ViT preprocessing always resizes, "
                                f"rescales and normalises (set it to true, with size, rescale_factor, mean and std)")
        size = raw.get("size", {"height": 224, "width": 224})
        if isinstance(size, dict):
            if "height" not in size or "width" not in size:
                raise UserError(f"{where}: size must give height and width, got {size!r}")
            size = _square([size["height"], size["width"]], "size", where)
        mean = raw.get("image_mean", 0.5)
        std = raw.get("image_std", 0.5)
        if num_channels is None:  # a list names the channels; ViTImageProcessor's one number fits any (say RGB)
            lists = [v for v in (mean, std) if isinstance(v, (list, tuple))]
            num_channels = len(lists[0]) if lists else 3
        try:
            return cls(size=size, num_channels=num_channels, image_mean=mean, image_std=std,
                       rescale_factor=raw.get("rescale_factor", 1 / 255), resample=raw.get("resample", 2))
        except UserError as exc:
            raise UserError(f"{where}: {str(exc).removeprefix('image processing: ')}") from None


# ---- the ViT classifier ----------------------------------------------------------------------

@dataclass
class ViTConfig:
    """Shape of a ViT image classifier, in transformers' ViTConfig terms (square images and patches)."""

    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    labels: list[str] = field(default_factory=list)  # id2label in order; len = number of classes
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the first inconsistent field."""
        where = "ViT config"
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size"):
            _positive_int(getattr(self, name), name, where)
        if self.image_size % self.patch_size:
            raise UserError(f"{where}: image_size ({self.image_size}) must be a multiple of patch_size "
                            f"({self.patch_size})")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"{where}: hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                            f"({self.num_attention_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"{where}: hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise UserError(f"{where}: {name} must be in [0, 1), got {value!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            raise UserError(f"{where}: layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range <= 0:
            raise UserError(f"{where}: initializer_range must be positive, got {self.initializer_range!r}")
        if not isinstance(self.qkv_bias, bool):
            raise UserError(f"{where}: qkv_bias must be true or false, got {self.qkv_bias!r}")
        self.labels = _checked_labels(self.labels, where)

    @property
    def num_patches(self) -> int:
        """Patches of one image_size x image_size image (the position table has one more, the class token's)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (a patch or the class token; seq_len of them per image): 6 x the weights each
        token meets (patch projection, attention and MLP), attention's 12 * L * hidden * seq_len (PaLM, App. B),
        and the head, which reads one token per image, shared over the image's tokens."""
        d, p2 = self.hidden_size, self.patch_size ** 2
        per_token = self.num_channels * p2 * d + self.num_hidden_layers * (4 * d * d + 2 * d * self.intermediate_size)
        return 6 * per_token + 12 * self.num_hidden_layers * d * seq_len + 6 * d * max(self.num_labels, 1) / seq_len

    def with_labels(self, labels: list[str]) -> "ViTConfig":
        """A copy of this config classifying into `labels` (output i is labels[i])."""
        return dataclasses.replace(self, labels=list(labels))

    def replace(self, **changes: Any) -> "ViTConfig":
        """A copy with some fields changed (an override from YAML or a flag), checked again."""
        checked_fields(type(self), changes, "ViT override")
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents of transformers' ViTForImageClassification: every field its ViTConfig has."""
        return {"architectures": [VIT_ARCHITECTURE], "model_type": "vit",
                "image_size": self.image_size, "patch_size": self.patch_size, "num_channels": self.num_channels,
                "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads, "intermediate_size": self.intermediate_size,
                "hidden_act": self.hidden_act, "hidden_dropout_prob": self.hidden_dropout_prob,
                "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
                "initializer_range": self.initializer_range, "layer_norm_eps": self.layer_norm_eps,
                "qkv_bias": self.qkv_bias,
                # Masked-image-modelling and pooler settings foundry never uses, written so the file is whole:
                # encoder_stride = patch_size is what reconstructs an image of the input's size.
                "encoder_stride": self.patch_size, "pooler_output_size": self.hidden_size, "pooler_act": "tanh",
                "id2label": {str(i): label for i, label in enumerate(self.labels)},
                "label2id": {label: i for i, label in enumerate(self.labels)},
                "problem_type": "single_label_classification"}

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], where: str = "config.json") -> "ViTConfig":
        """Read transformers' ViT config.json (ViTForImageClassification, or a bare ViTModel's given labels later);
        transformers' defaults fill missing fields, its LABEL_i names a missing id2label."""
        if not isinstance(raw, dict):
            raise UserError(f"{where} is not a JSON object")
        if raw.get("model_type") != "vit":
            raise UserError(f"{where}: model_type is {raw.get('model_type')!r}, not 'vit'")
        archs = raw.get("architectures") or [VIT_ARCHITECTURE]
        if not isinstance(archs, list) or archs[0] not in (VIT_ARCHITECTURE, "ViTModel"):
            raise UserError(f"{where}: architectures is {archs!r}; foundry reads {VIT_ARCHITECTURE} directories")
        defaults = {"image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_size": 768,
                    "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "qkv_bias": True, "hidden_dropout_prob": 0.0,
                    "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02}
        values = {name: raw.get(name, default) for name, default in defaults.items()}
        for name in ("image_size", "patch_size"):
            values[name] = _square(values[name], name, where)
        try:
            return cls(labels=_labels_of(raw, where), **values)
        except UserError as exc:
            raise UserError(f"{where}: {str(exc).removeprefix('ViT config: ')}") from None


def _checked_labels(labels: Any, where: str) -> list[str]:
    if not isinstance(labels, (list, tuple)):
        raise UserError(f"{where}: labels must be a list of class names, got {labels!r}")
    labels = [str(label) for label in labels]
    if len(set(labels)) != len(labels):
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        raise UserError(f"{where}: label names must be distinct, {', '.join(map(repr, repeated))} repeat")
    return labels


def _labels_of(raw: dict[str, Any], where: str) -> list[str]:
    id2label = raw.get("id2label")
    if id2label is None:
        count = raw.get("num_labels", 2)  # transformers' PreTrainedConfig default
        _positive_int(count, "num_labels", where)
        return [f"LABEL_{i}" for i in range(count)]
    return id2label_names(id2label, where)


# ---- presets ---------------------------------------------------------------------------------

VISION_PRESETS: dict[str, object] = {
    # ~0.3M parameters: the 8x8 grayscale handwritten digits of scikit-learn (load_digits), 4 patches of 4x4.
    # (Patches of 2x2 learn more slowly per second on a CPU: 96% after 5 minutes where 4x4 reaches 97% in one.)
    "vit-tiny": ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=96, num_hidden_layers=4,
                          num_attention_heads=4, intermediate_size=192, labels=[str(d) for d in range(10)]),
}


def vision_preset(name: str) -> object | None:
    """A copy of the named vision preset (ViTConfig, ...), or None for an unknown name."""
    config = VISION_PRESETS.get(name)
    return copy.deepcopy(config) if config is not None else None


__all__ = ["ImageProcessing", "ViTConfig", "VISION_PRESETS", "vision_preset", "RESAMPLE_FILTERS"]

# ---- diffusion transformer ----

DIT_CLASS = "DiTTransformer2DModel"
# What diffusers' DiTTransformer2DModel must say for foundry's DiT to compute the same function.
_DIT_FIXED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
              "norm_elementwise_affine": False}


@dataclass
class DiTConfig:
    """Shape of a class-conditional diffusion transformer, in diffusers' DiTTransformer2DModel terms.

    Square images of sample_size pixels cut into patch_size patches; epsilon (or v) prediction only, so the output
    has in_channels channels (no learned variance). diffusers always builds one label row more than num_classes
    (its null class, id num_classes); class_dropout_prob > 0 says that row was trained, with labels dropped to it
    at that rate, so classifier-free guidance can use it. diffusers' config.json has no such key: foundry keeps
    it under "_foundry", which diffusers passes over."""

    sample_size: int  # image side in pixels (height = width)
    patch_size: int
    in_channels: int
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    num_classes: int  # diffusers' num_embeds_ada_norm
    class_dropout_prob: float = 0.1
    norm_eps: float = 1e-5  # of the feed-forward's LayerNorm only: diffusers fixes the others at 1e-6

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the first inconsistent field."""
        where = "DiT config"
        for name in ("sample_size", "patch_size", "in_channels", "num_layers", "num_attention_heads",
                     "attention_head_dim", "num_classes"):
            _positive_int(getattr(self, name), name, where)
        if self.sample_size % self.patch_size:
            raise UserError(f"{where}: sample_size ({self.sample_size}) must be a multiple of patch_size "
                            f"({self.patch_size})")
        if self.inner_dim % 4:
            raise UserError(f"{where}: num_attention_heads x attention_head_dim ({self.inner_dim}) must be a "
                            f"multiple of 4 for the 2-D sin-cos position table")
        prob = self.class_dropout_prob
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob < 1:
            raise UserError(f"{where}: class_dropout_prob must be in [0, 1), got {prob!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or self.norm_eps <= 0:
            raise UserError(f"{where}: norm_eps must be positive, got {self.norm_eps!r}")

    @property
    def inner_dim(self) -> int:
        """Width of the token stream: heads x head dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def has_null_class(self) -> bool:
        """Whether label id num_classes is a trained "no class" (classifier-free guidance needs it)."""
        return self.class_dropout_prob > 0

    @property
    def num_patches(self) -> int:
        """Tokens per image."""
        return (self.sample_size // self.patch_size) ** 2

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per patch token (seq_len per image): 6 x the weights each token meets (patch projection,
        attention, the 4x MLP, the output projection), attention's 12 * L * inner * seq_len, and the conditioning
        (each block's timestep embedder and adaLN modulation, run once per image), shared over its tokens."""
        d, p2, c = self.inner_dim, self.patch_size ** 2, self.in_channels
        per_token = c * p2 * d + self.num_layers * 12 * d * d + d * p2 * c
        per_image = self.num_layers * (256 * d + d * d + 6 * d * d) + 2 * d * d
        return 6 * per_token + 12 * self.num_layers * d * seq_len + 6 * per_image / seq_len

    def replace(self, **changes: Any) -> "DiTConfig":
        """A copy with some fields changed (an override from YAML or a flag), checked again."""
        checked_fields(type(self), changes, "DiT override")
        return dataclasses.replace(self, **changes)

    def to_diffusers_dict(self) -> dict[str, Any]:
        """transformer/config.json contents of diffusers' DiTTransformer2DModel: every argument it takes."""
        return {"_class_name": DIT_CLASS, "num_attention_heads": self.num_attention_heads,
                "attention_head_dim": self.attention_head_dim, "in_channels": self.in_channels,
                "out_channels": self.in_channels, "num_layers": self.num_layers, "dropout": 0.0,
                "norm_num_groups": 32,  # unused by DiT; diffusers' default, written so the file is whole
                "attention_bias": True, "sample_size": self.sample_size, "patch_size": self.patch_size,
                "activation_fn": "gelu-approximate", "num_embeds_ada_norm": self.num_classes,
                "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
                "norm_eps": self.norm_eps, "_foundry": {"class_dropout_prob": self.class_dropout_prob}}

    @classmethod
    def from_diffusers_dict(cls, raw: dict[str, Any], where: str = "transformer/config.json") -> "DiTConfig":
        """Read a DiTTransformer2DModel config.json; diffusers' defaults fill missing keys. A file without
        foundry's "_foundry" section gets diffusers' own label dropout, 0.1 (its training drops labels at
        that rate into the null row it always builds)."""
        if not isinstance(raw, dict):
            raise UserError(f"{where} is not a JSON object")
        kind = raw.get("_class_name", DIT_CLASS)
        if kind != DIT_CLASS:
            raise UserError(f"{where}: _class_name is {kind!r}; foundry reads {DIT_CLASS} only")
        for key, value in _DIT_FIXED.items():
            if raw.get(key, value) != value:
                raise UserError(f"{where}: {key} is {raw[key]!r}; foundry's DiT computes {key} {value!r} only")
        if raw.get("dropout", 0.0) not in (0, 0.0):
            raise UserError(f"{where}: dropout is {raw['dropout']!r}; foundry's DiT has no dropout (set it to 0.0)")
        in_channels = raw.get("in_channels", 4)
        out_channels = raw.get("out_channels")
        if out_channels not in (None, in_channels):
            raise UserError(f"{where}: out_channels ({out_channels}) differs from in_channels ({in_channels}); "
                            f"foundry's DiT predicts noise only, without learned variance channels")
        if raw.get("num_embeds_ada_norm", 1000) is None:
            raise UserError(f"{where}: num_embeds_ada_norm is null; a class-conditional DiT needs its class count")
        extra = raw.get("_foundry") if isinstance(raw.get("_foundry"), dict) else {}
        try:
            return cls(sample_size=raw.get("sample_size", 32), patch_size=raw.get("patch_size", 2),
                       in_channels=in_channels, num_layers=raw.get("num_layers", 28),
                       num_attention_heads=raw.get("num_attention_heads", 16),
                       attention_head_dim=raw.get("attention_head_dim", 72),
                       num_classes=raw.get("num_embeds_ada_norm", 1000),
                       class_dropout_prob=extra.get("class_dropout_prob", 0.1), norm_eps=raw.get("norm_eps", 1e-5))
        except UserError as exc:
            raise UserError(f"{where}: {str(exc).removeprefix('DiT config: ')}") from None


# ~0.4M parameters: class-conditional generation of scikit-learn's 8x8 digits in pixel space, 16 patches of 2x2.
VISION_PRESETS["dit-tiny"] = DiTConfig(sample_size=8, patch_size=2, in_channels=1, num_layers=4,
                                       num_attention_heads=4, attention_head_dim=16, num_classes=10,
                                       class_dropout_prob=0.1)
__all__ += ["DiTConfig", "DIT_CLASS"]
