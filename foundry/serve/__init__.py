"""The OpenAI-compatible HTTP server: request schemas, errors in OpenAI's shape, auth, metrics, and the
backend that runs the engine on one worker thread behind a bounded admission queue.

May import `foundry.infer`, `foundry.hub`, `foundry.model`, `foundry.tokenizer`, `foundry.config` and
`foundry.core`; never `train` or `cli`. Models are reached only through `foundry.infer`'s Engine.
"""

from foundry.serve.config import ServeConfig

__all__ = ["ServeConfig"]
