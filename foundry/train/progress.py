"""Live training progress: a rich bar with loss, learning rate, throughput and ETA."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """A progress bar on a terminal; plain loss lines when output is piped (logs, CI)."""

    def __init__(self, total_steps: int, start_step: int, tokens_per_step: int, log_every_s: float = 10.0):
        self.console = Console(stderr=True)
        self.total = total_steps
        self.tokens_per_step = tokens_per_step
        self.live = self.console.is_terminal
        self.log_every_s = log_every_s
        self._last_line = 0.0
        self._t0, self._step0 = time.perf_counter(), start_step
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=self.console, disable=not self.live)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def note(self, text: str) -> None:
        """A line above the bar (or on its own when piped)."""
        self.console.print(text, highlight=False)

    def set_total(self, total: int) -> None:
        self.total = total
        self.progress.update(self.task, total=total)

    def update(self, step: int, loss: float, lr: float) -> None:
        elapsed = time.perf_counter() - self._t0
        tok_s = (step - self._step0) * self.tokens_per_step / max(elapsed, 1e-9)
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s"
        self.progress.update(self.task, completed=step, stats=stats)
        if not self.live and (time.perf_counter() - self._last_line > self.log_every_s or step == self.total):
            self._last_line = time.perf_counter()
            remaining = (self.total - step) * elapsed / max(step - self._step0, 1)
            print(f"step {step}/{self.total}  {stats}  eta {remaining:.0f}s", file=sys.stderr, flush=True)
