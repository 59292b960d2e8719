"""The inference engine: batched KV-cached decoding, sampling, stop rules, streaming and chat."""

from foundry.infer.chat import ChatSession
from foundry.infer.engine import Completion, Delta, Engine
from foundry.infer.sampling import SamplingParams

__all__ = ["ChatSession", "Completion", "Delta", "Engine", "SamplingParams"]
