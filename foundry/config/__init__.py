"""Model configuration: `ModelConfig`, the named presets and how each open family spells config.json.

Torch-free and network-free, so the planner runs where torch is not installed. May import only
`foundry.core` (and PyYAML to read config files).
"""

from foundry.config.model_config import ACTIVATIONS, LAYER_TYPES, ROPE_TYPES, ModelConfig
from foundry.config.presets import PRESETS, preset
from foundry.config.config_file import read_config_file

__all__ = ["ModelConfig", "PRESETS", "preset", "read_config_file", "ACTIVATIONS", "ROPE_TYPES", "LAYER_TYPES"]
from foundry.config.vision_config import VISION_PRESETS, ImageProcessing, ViTConfig, vision_preset  # noqa: E402,F401
