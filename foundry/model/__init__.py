"""nn.Modules only: the decoder transformer (every supported family), its layers, RoPE and the KV-cache protocol.

Knows nothing of files, training or HTTP. May import only torch, `foundry.config` and `foundry.core`.
"""

from foundry.model.kv_cache import KVCache
from foundry.model.transformer import Transformer

__all__ = ["KVCache", "Transformer"]
from foundry.model.vit import ViT  # noqa: E402,F401
from foundry.model.dit import DiT  # noqa: E402,F401
