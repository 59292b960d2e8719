"""The inference engine: batched KV-cached decoding, sampling, stop rules, streaming and chat sessions.

Everything that generates (`generate`, `chat`, later evaluation and the server) goes through `Engine`.
May import `foundry.hub`, `foundry.model`, `foundry.tokenizer`, `foundry.config` and `foundry.core`;
never `train`, `serve` or `cli`.
"""

from foundry.infer.chat import ChatSession
from foundry.infer.engine import Completion, Delta, Engine
from foundry.infer.sampling import SamplingParams

__all__ = ["ChatSession", "Completion", "Delta", "Engine", "SamplingParams"]
