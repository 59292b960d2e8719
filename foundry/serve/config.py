"""The server's settings: one dataclass, filled from `foundry serve` flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from foundry.core.errors import UserError


@dataclass
class ServeConfig:
    """Where the server listens, who may call it, and the bounds every request is held to."""

    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list, repr=False)  # never printed, never logged
    max_queued_requests: int = 64  # sequences waiting for a KV slot; a request arriving at that many gets 429
    max_tokens: int = 4096  # the most tokens one choice may ask for
    max_n: int = 8  # the most choices one request may ask for
    max_body_bytes: int = 1 << 20
    shutdown_grace_s: float = 30.0  # SIGTERM: running requests get this long to finish
    retry_after_s: int = 1  # the Retry-After a 429 carries
    playground: bool = True  # the browser page at / and /playground

    def __post_init__(self) -> None:
        for name in ("max_queued_requests", "max_tokens", "max_n", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise UserError(f"--port must be in 0..65535, got {self.port}")
        if self.shutdown_grace_s < 0:
            raise UserError(f"--shutdown-grace must be >= 0 seconds, got {self.shutdown_grace_s}")
        if any(not k for k in self.api_keys):
            raise UserError("--api-key must not be empty")
