"""Running the app under uvicorn: the model loads in the background (/health says 503 until then), and
SIGTERM drains: new requests get 503, running ones get a grace period, then the process exits 0."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from foundry.infer.constrained import ll_tokenizer
from foundry.infer.engine import Engine
from foundry.serve.app import create_app
from foundry.serve.backend import Backend
from foundry.serve.config import ServeConfig

log = logging.getLogger("foundry.serve")


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM/SIGINT drains the queue before stopping."""

    def __init__(self, config: uvicorn.Config, backend: Backend, grace_s: float):
        super().__init__(config)
        self.backend, self.grace_s = backend, grace_s
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler re-raises the signal after shutdown, which would end the process by the
        # signal instead of with status 0: the first signal only starts the drain.
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.grace_s
            self.backend.draining = True
            log.info("%s: draining (up to %.1f s for running requests)", signal.Signals(sig).name, self.grace_s)
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            stats = self.backend.stats()
            if stats.running + stats.waiting == 0:
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                log.warning("grace period over: aborting %d running and %d waiting requests",
                            stats.running, stats.waiting)
                self.backend.abort_all()
                self.should_exit = True
        return await super().on_tick(counter)


def serve(config: ServeConfig, load: Callable[[], Engine]) -> None:
    """Listen at once, load the model with `load` on a thread, serve until SIGTERM; re-raises a failed load."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    backend = Backend(config.max_queued_requests)
    app = create_app(config, backend)
    # Responses still being written when the drain ends get a few seconds more, then uvicorn cancels them.
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                               timeout_graceful_shutdown=5, server_header=False)
    server = _DrainingServer(uv_config, backend, config.shutdown_grace_s)
    failure: list[BaseException] = []

    def load_in_background() -> None:
        try:
            engine = load()
            if engine.tokenizer is not None:  # built once here, not on the event loop at the first request
                ll_tokenizer(engine.tokenizer)
            backend.start(engine)
            log.info("model %s loaded: ready", config.model_name)
        except BaseException as exc:  # noqa: BLE001 - reported by serve() once uvicorn has stopped
            failure.append(exc)
            server.should_exit = True

    threading.Thread(target=load_in_background, name="foundry-load", daemon=True).start()
    server.run()
    backend.close()
    if failure:
        raise failure[0]
