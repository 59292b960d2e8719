"""The one place the server meets the engine: a worker thread, a bounded admission queue, cancellation.

The worker thread alone owns `engine.scheduler` (continuous batching over one KV pool): each submitted
request's choices become scheduler requests that join the running batch between steps, and an abort
frees their slots at the next step boundary. The event loop only hands requests and aborts to the worker
(through `_inbox` and `_aborts`, under `_cond`) and reads a snapshot of the scheduler's figures. While a
backend runs, nothing else may use its engine's scheduler (Engine.generate/stream included)."""

from __future__ import annotations

import dataclasses

import asyncio
import collections
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from foundry.core.errors import UserError
from foundry.infer.engine import Delta, Engine
from foundry.infer.sampling import SamplingParams

log = logging.getLogger("foundry.serve")
_END = object()


class QueueFull(Exception):
    """The admission queue holds --max-queued-requests waiting choices already."""


class Draining(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Stats:
    """Choices (sequences) generating and waiting for a KV slot, and the scheduler's KV figures."""

    running: int
    waiting: int
    kv_used_tokens: int = 0  # KV positions held by running sequences
    kv_capacity_tokens: int = 0  # KV positions the pool holds in all
    kv_cached_tokens: int = 0  # KV positions the prefix cache keeps in idle slots
    prefix_cache_hit_tokens: int = 0  # prompt tokens of finished choices served from the prefix cache, since start


class Generation:
    """One submitted request: an async iterator of its engine Deltas; abort() drops it at once."""

    def __init__(self, backend: Backend, prompts: list[list[int]], params: list[SamplingParams]):
        self.prompts, self.params = prompts, params
        self._backend = backend
        self._loop = asyncio.get_running_loop()
        self._out: asyncio.Queue[Any] = asyncio.Queue()  # at most n * max_tokens deltas: bounded by flags
        self.cancelled = threading.Event()
        self.done = False
        self.key: int | None = None  # its scheduler request ids are ("serve", key, choice), once added

    def put(self, item: Any) -> None:
        """Hand a delta (or an exception, or the end) from the worker thread to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._out.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more (the worker then drops it)
            self.cancelled.set()

    def fail(self, exc: BaseException) -> None:
        """End the iteration with `exc` (called on the event loop, e.g. when the client left)."""
        self._out.put_nowait(exc)

    def abort(self) -> None:
        """Stop this request: dropped from the queue if waiting, its sequences freed if running."""
        if not self.done:
            self.cancelled.set()
            self._backend._drop(self)

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self

    async def __anext__(self) -> Delta:
        if self.done:
            raise StopAsyncIteration
        item = await self._out.get()
        if item is _END:
            self.done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item


class Backend:
    """Runs an Engine's scheduler on one worker thread, fed by a bounded queue of Generations."""

    def __init__(self, max_queued: int):
        self.max_queued = max_queued
        self.engine: Engine | None = None
        self.draining = False
        self.aborted = 0  # requests stopped before their end (client gone, or shutdown)
        self._cond = threading.Condition()
        self._inbox: collections.deque[Generation] = collections.deque()  # submitted, not yet added
        self._aborts: collections.deque[Generation] = collections.deque()  # added, to be aborted
        # id -> (request, its unfinished choices); only the worker changes it
        self._active: dict[int, tuple[Generation, set[int]]] = {}
        self._ids = itertools.count()
        self._snapshot = Stats(0, 0)  # the scheduler's figures after the worker's last change, read under _cond
        self._hit_tokens = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self, engine: Engine) -> None:
        """Begin serving with a loaded engine."""
        scheduler = engine.scheduler  # allocates the KV pool now, before the worker (then its only user) starts
        with self._cond:
            self._update(scheduler)  # so that /metrics shows the pool's capacity from the first 200 of /health
        self.engine = engine
        self._thread = threading.Thread(target=self._work, name="foundry-engine", daemon=True)
        self._thread.start()

    def submit(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> Generation:
        """Queue a request (prompts already encoded and checked); raises QueueFull or Draining. Call on the loop."""
        if self.draining:
            raise Draining()
        gen = Generation(self, list(prompts), list(params))
        with self._cond:
            if self._waiting() >= self.max_queued:
                raise QueueFull()
            self._inbox.append(gen)
            self._cond.notify()
        return gen

    def stats(self) -> Stats:
        """How many choices run and wait now, and the KV cache's use."""
        with self._cond:
            s = self._snapshot
            return Stats(s.running, self._waiting(), s.kv_used_tokens, s.kv_capacity_tokens, s.kv_cached_tokens,
                         self._hit_tokens)

    def abort_all(self) -> None:
        """Stop every request, waiting or running (the end of a shutdown's grace period)."""
        with self._cond:
            everyone = list(self._inbox) + [gen for gen, _ in self._active.values()]
        for gen in everyone:
            gen.abort()
            gen.put(Draining())

    def close(self) -> None:
        """Stop the worker once nothing waits or runs."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ---- internals ---------------------------------------------------------------------

    def _waiting(self) -> int:
        """Choices not yet in a KV slot: the scheduler's queue plus those not handed to it (hold _cond)."""
        return self._snapshot.waiting + sum(len(gen.prompts) for gen in self._inbox)

    def _drop(self, gen: Generation) -> None:
        with self._cond:
            if gen in self._inbox:
                self._inbox.remove(gen)
                self.aborted += 1
            else:  # the worker aborts its sequences (and counts it, if it had not finished) before its next step
                self._aborts.append(gen)
                self._cond.notify()

    def _work(self) -> None:
        assert self.engine is not None
        scheduler = self.engine.scheduler
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or scheduler.has_work() or self._closed):
                    self._cond.wait()
                if self._closed and not (self._inbox or scheduler.has_work()):
                    return
                # Aborts first: a request whose client left while it was queued never takes a slot.
                gone = list(self._aborts) + [g for g, _ in self._active.values() if g.cancelled.is_set()]
                self._aborts.clear()
                for gen in gone:
                    self._abort(scheduler, gen)
                while self._inbox:
                    self._add(scheduler, self._inbox.popleft())
                self._update(scheduler)
            if not scheduler.has_work():
                continue
            try:
                deltas = scheduler.step()
            except Exception as exc:  # the engine failed: fail what ran, keep serving the rest
                log.exception("generation failed")
                with self._cond:
                    for gen, _ in list(self._active.values()):
                        gen.put(exc)  # before the end that _abort sends, so the client hears of it
                        self._abort(scheduler, gen, counted=False)
                    self._update(scheduler)
                continue
            with self._cond:
                for delta in deltas:
                    self._dispatch(delta)
                self._update(scheduler)

    def _add(self, scheduler: Any, gen: Generation) -> None:
        """Hand one request's choices to the scheduler (worker thread, _cond held)."""
        if gen.cancelled.is_set():  # its client left between submit and here
            self.aborted += 1
            gen.put(_END)
            return
        key, added = next(self._ids), 0
        try:
            for prompt, params in zip(gen.prompts, gen.params):
                scheduler.add_request(("serve", key, added), prompt, params)
                added += 1
        except Exception as exc:  # prompts were checked before submit, so this is rare
            if not isinstance(exc, UserError):  # a UserError is said as a 400; anything else is a bug
                log.exception("adding a request failed")
            for j in range(added):
                scheduler.abort(("serve", key, j))
            gen.put(exc)
            return
        self._active[key] = (gen, set(range(len(gen.prompts))))
        gen.key = key

    def _abort(self, scheduler: Any, gen: Generation, counted: bool = True) -> None:
        """Free an unfinished request's sequences now (worker thread, _cond held); finished ones are ignored."""
        key = gen.key
        if key not in self._active:
            return
        _, pending = self._active.pop(key)
        for i in pending:
            scheduler.abort(("serve", key, i))
        if counted:
            self.aborted += 1
        gen.put(_END)

    def _dispatch(self, delta: Delta) -> None:
        """Send a scheduler delta to its request's queue, indexed by choice (worker thread, _cond held)."""
        _, key, i = delta.index
        if key not in self._active:
            return
        gen, pending = self._active[key]
        gen.put(dataclasses.replace(delta, index=i))
        if delta.completion is not None:
            self._hit_tokens += delta.completion.cached_tokens
            pending.discard(i)
            if not pending:
                del self._active[key]
                gen.put(_END)

    def _update(self, scheduler: Any) -> None:
        """Refresh the figures stats() reports (worker thread, _cond held)."""
        self._snapshot = Stats(scheduler.running, scheduler.waiting, scheduler.kv_used_tokens,
                               scheduler.kv_capacity_tokens, scheduler.kv_cached_tokens)
