"""The compiled decode step: two compiled programs serve every batch size and position, cached on disk.

On CPU the step is exported (`torch.export`) and compiled ahead of time by AOTInductor with freezing (the
weights become constants, packed once for the GEMM kernels) and max-autotune with inductor's C++ GEMM template;
the package is written to the disk cache and loaded by every later process in well under a second, where a
compile takes tens of seconds on two cores. The program takes the token ids, each row's position, the KV pool's
tensors (it writes the new keys and values into them in place) and a tensor whose length is the longest row's
length + 1, so the batch size and the length are symbolic: one program for batch 1 and one for 2..slots. Rows
at a length outside the programs' range (the last position of a slot) take the eager step.

The cache key covers everything the program bakes in: the weights (a hash of every tensor), the config, the
KV pool's shape and dtype, torch's version, the CPU's capability and the compile options. On other devices the
step is `torch.compile`d in process (not cached between processes).

Freezing reads the weights once: the model must not change after the first step (the engine owns it)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from foundry.core.errors import UserError
from foundry.core.version import __version__
from foundry.infer.kv_pool import position_mask

# Inductor settings for the CPU programs.
CPU_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
               "max_autotune_report_choices_stats": False}
CACHE_ENV = "FOUNDRY_CACHE_DIR"


def cache_dir() -> Path:
    """Where compiled decode programs are kept: $FOUNDRY_CACHE_DIR/decode, else ~/.cache/foundry/decode."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "foundry"
    return Path(root) / "decode"


def compile_step(step: Callable[..., torch.Tensor], model: nn.Module, device: torch.device) -> Callable[..., torch.Tensor]:
    """The engine's decode step (`step`, its eager bound method) compiled for `device`."""
    if device.type == "cpu":
        return AheadOfTimeStep(model, step)
    return _torch_compiled(step)


class AheadOfTimeStep:
    """The decode step as AOTInductor programs, built or loaded at first use: "one" (batch 1) and "many" (2..slots)
    for one token a row; "span-one" / "span-many" for speculative verification's 2..MAX_SPAN tokens a row."""

    def __init__(self, model: nn.Module, eager: Callable[..., torch.Tensor]):
        self.model = model
        self.eager = eager
        self.programs: dict[str, Any] = {}  # kind -> the loaded program
        self.loaded_from_cache: dict[str, bool] = {}  # what the last build of each did (for tests and logs)
        self._weights_hash: str | None = None

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, pad_mask: torch.Tensor | None,
                 every: bool = False) -> torch.Tensor:
        kind = _kind(cache, every, pad_mask)
        if kind is None:
            return self.eager(ids, positions, cache, pad_mask, every)
        pool = cache.pool
        program = self.programs.get(kind) or self._program(kind, pool)
        span = _span(cache.end, pool.keys[0].device)
        return program(ids, positions if kind.startswith("span") else positions[:, 0], span, *pool.keys, *pool.values)

    def prepare(self, kinds: list[str], pool: Any) -> None:
        """Build (or load) these kinds of program now, for `pool`'s shape: those its slots can use."""
        for kind in kinds:
            if kind not in self.programs and (kind.endswith("one") or pool.num_slots > 1):
                self._program(kind, pool)

    def _program(self, kind: str, pool: Any) -> Any:
        """Load this kind's program from the disk cache, compiling and storing it first if it is not there."""
        from torch._inductor import aoti_compile_and_package, aoti_load_package

        path = cache_dir() / f"{self._key(kind, pool)}.pt2"
        if path.exists():
            try:
                self.programs[kind] = aoti_load_package(str(path))
                self.loaded_from_cache[kind] = True
                return self.programs[kind]
            except Exception:  # noqa: BLE001 - a cache entry that does not load (another build of torch...)
                path.unlink(missing_ok=True)  # is rebuilt below
        self.loaded_from_cache[kind] = False
        exported = _export(self.model, kind, pool)
        import torch._inductor.select_algorithm as select_algorithm

        select_algorithm.PRINT_AUTOTUNE = False  # its per-GEMM timing tables would land on the user's stderr
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            aoti_compile_and_package(exported, package_path=str(tmp), inductor_configs=dict(CPU_OPTIONS))
            os.replace(tmp, path)  # whole or not at all: another process may be reading the cache
        except OSError as exc:
            raise UserError(f"cannot write the compiled decode step to {path.parent} ({exc.strerror or exc}): set "
                            f"{CACHE_ENV} to a writable directory, or run eagerly (--eager)") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self.programs[kind] = aoti_load_package(str(path))
        return self.programs[kind]

    def _key(self, kind: str, pool: Any) -> str:
        """A digest of everything the program depends on."""
        if self._weights_hash is None:
            self._weights_hash = weights_digest(self.model)
        config = getattr(self.model, "config", None)
        facts = {"kind": kind, "weights": self._weights_hash, "foundry": __version__, "torch": torch.__version__,
                 "cpu": torch.backends.cpu.get_cpu_capability(), "options": CPU_OPTIONS,
                 "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config),
                 "modules": sorted({type(m).__qualname__ for m in self.model.modules()}),
                 "pool": [pool.num_slots, pool.slot_len, str(pool.keys[0].dtype), len(pool.keys)]}
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter's and buffer's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        data = tensor.detach().contiguous().cpu()
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


MAX_SPAN = 16  # the most tokens a row may feed to a span program (speculation's k + 1)


def _kind(cache: Any, every: bool, pad_mask: torch.Tensor | None) -> str | None:
    """Which program serves this call of the step; None: the eager step (a shape outside every program's range)."""
    pool = getattr(cache, "pool", None)
    if pool is None or pad_mask is not None or not 2 <= cache.end < pool.slot_len:
        return None
    if not every:  # a DecodeView: one token a row, rows 0..n-1
        return "one" if len(cache.rows) == 1 else "many"
    # A SpanView of the pool's first rows (speculative verification), logits at every position.
    width, slots = getattr(cache, "width", 0), getattr(cache, "slots", None)
    if not 2 <= width <= MAX_SPAN or slots != list(range(len(slots or []))):
        return None
    return "span-one" if len(slots) == 1 else "span-many"


class _Step(nn.Module):
    """What is exported: the model's step over the pool's tensors, the length given by `span`'s.

    One token a row (ids [n, 1], positions [n]: next-token logits [n, V]), or for a span T tokens a row (ids and
    positions [n, T]: logits [n, T, V])."""

    def __init__(self, model: nn.Module, every: bool):
        super().__init__()
        self.model = model
        self.every = every

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, span: torch.Tensor,
                *kv: torch.Tensor) -> torch.Tensor:
        layers = len(kv) // 2
        per_token = positions if self.every else positions[:, None]
        cache = _StepView(list(kv[:layers]), list(kv[layers:]), per_token, span.shape[0])
        hidden = self.model.hidden_states(ids, per_token, cache, None)
        return self.model.logits(hidden if self.every else hidden[:, -1]).float()


class _StepView:
    """The KVCache interface over tensors only: the token of row r at column t writes at positions[r, t].

    A span's padding (kv_pool.SpanView repeats a row's last token at its last position) writes that same token's
    key and value again at the same place: the same numbers, so it needs no mask of its own."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor, end: Any):
        self.keys, self.values, self.positions, self.end = keys, values, positions, end
        n, t = positions.shape
        self.rows = torch.arange(n, device=positions.device)[:, None].expand(n, t).reshape(-1)
        self.length = 0  # unused: positions are given

    def reserve(self, new_tokens: int, pad_mask: torch.Tensor | None) -> None:
        pass

    def advance(self, new_tokens: int) -> None:
        pass

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        n, heads, t, dim = k.shape
        flat = self.positions.reshape(-1)
        keys[self.rows, :, flat] = k.transpose(1, 2).reshape(n * t, heads, dim)
        values[self.rows, :, flat] = v.transpose(1, 2).reshape(n * t, heads, dim)
        return keys[:n, :, :self.end], values[:n, :, :self.end]

    def attention_mask(self, new_tokens: int, window: int | None = None) -> torch.Tensor:
        return position_mask(self.positions, self.end, window)


def _export(model: nn.Module, kind: str, pool: Any) -> Any:
    """The step exported for `kind` (see AheadOfTimeStep) and every length 2..slot_len-1."""
    device = pool.keys[0].device
    every = kind.startswith("span")
    rows = 1 if kind.endswith("one") else 2
    width = 2 if every else 1
    ids = torch.zeros(rows, width, dtype=torch.long, device=device)
    positions = torch.zeros(rows, width, dtype=torch.long, device=device) if every else ids[:, 0]
    length = torch.export.Dim("length", min=2, max=pool.slot_len - 1)
    kv = tuple(pool.keys + pool.values)
    # A batch dimension needs a range: batch 1 is its own program, and 2 slots leave only batch 2.
    batch = torch.export.Dim("batch", min=2, max=pool.num_slots) if rows == 2 and pool.num_slots > 2 else None
    row_dims = {} if batch is None else {0: batch}
    if every:
        tokens = torch.export.Dim("tokens", min=2, max=MAX_SPAN)
        row_dims = {**row_dims, 1: tokens}
    shapes = (row_dims or None, row_dims or None, {0: length}, tuple(None for _ in kv))
    with torch.no_grad():
        return torch.export.export(_Step(model, every).eval(), (ids, positions, _span(2, device), *kv),
                                   dynamic_shapes=shapes)


_SPANS: dict[torch.device, torch.Tensor] = {}


def _span(end: int, device: torch.device) -> torch.Tensor:
    """A tensor of length `end` (its values unused): views of one buffer, so a step allocates nothing."""
    buffer = _SPANS.get(device)
    if buffer is None or len(buffer) < end:
        buffer = _SPANS[device] = torch.empty(max(end, 4096), device=device, dtype=torch.uint8)
    return buffer[:end]


def _torch_compiled(step: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`step` (an engine's bound method) through torch.compile, dynamic in batch and length."""
    # No guards on the model's modules and parameters (checking them costs ~0.3 ms a step): so each engine
    # compiles its own copy of the step's code, or dynamo's per-code-object cache would hand a second engine
    # the first one's graphs.
    compiled = torch.compile(_own_code(step), dynamic=True,
                             options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    import torch.fx.experimental._config as shape_config

    def run(*args: Any) -> torch.Tensor:
        # No duck sizing: a batch of 2 must not be assumed equal to the 2 KV heads it was first seen beside.
        with shape_config.patch(use_duck_shape=False):
            return compiled(*args)

    return run


def _own_code(method: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The bound method `method` with a fresh (equal) code object, so that dynamo's cache for it is its own."""
    func = method.__func__  # type: ignore[attr-defined]
    fresh = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                               func.__closure__)
    fresh.__kwdefaults__ = func.__kwdefaults__
    return types.MethodType(fresh, method.__self__)  # type: ignore[attr-defined]
