"""nn.Modules of the model layer: they import only torch and foundry.config."""

from foundry.model.kv_cache import KVCache
from foundry.model.transformer import Transformer

__all__ = ["KVCache", "Transformer"]
