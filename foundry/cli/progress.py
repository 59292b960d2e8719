"""Progress for people: a rich bar on a terminal, plain lines when output is piped (logs, CI)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from foundry.core.units import human_duration
from foundry.train.progress import TrainReporter


class ConsoleTrainReporter(TrainReporter):
    """The training loop's reporter for the command line.

    The ETA of a run fitted to a time budget comes from the budget (the run ends when it is spent, whatever
    its pace), so the first line already shows a real one; otherwise from the pace of the steps so far."""

    def __init__(self, log_every_s: float = 10.0):
        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.log_every_s = log_every_s
        self.progress: Progress | None = None

    def start(self, total_steps: int | None, start_step: int, tokens_per_step: int,
              time_left: float | None = None) -> None:
        super().start(total_steps, start_step, tokens_per_step, time_left)
        self.tokens_per_step = tokens_per_step
        self._t0, self._step0, self._last_line = time.perf_counter(), start_step, float("-inf")
        if self.live:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                     TextColumn("eta {task.fields[eta]}"), console=self.console)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="",
                                               eta=_duration(time_left) if time_left is not None else "?")
            self.progress.start()

    def note(self, text: str) -> None:
        if self.live:
            self.console.print(text, highlight=False)
        else:  # piped: plain lines, never wrapped mid-number at 80 columns
            print(text, file=sys.stderr, flush=True)

    def set_total(self, total_steps: int) -> None:
        super().set_total(total_steps)
        if self.progress is not None:
            self.progress.update(self.task, total=total_steps)

    def eta(self, step: int) -> float | None:
        """Seconds left: from the time budget when there is one, else from the pace so far (None: unknown)."""
        elapsed = time.perf_counter() - self._t0
        if self.time_left is not None:
            return max(self.time_left - elapsed, 0.0)
        if self.total_steps is None or step <= self._step0:
            return None
        return (self.total_steps - step) * elapsed / (step - self._step0)

    def update(self, step: int, loss: float, lr: float) -> None:
        elapsed = time.perf_counter() - self._t0
        tok_s = (step - self._step0) * self.tokens_per_step / max(elapsed, 1e-9)
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s"
        eta = self.eta(step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=stats, eta=_duration(eta))
        elif time.perf_counter() - self._last_line > self.log_every_s or step == self.total_steps:
            self._last_line = time.perf_counter()
            total = "?" if self.total_steps is None else self.total_steps
            print(f"step {step}/{total}  {stats}  eta {_duration(eta)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _duration(seconds: float | None) -> str:
    return "?" if seconds is None else human_duration(seconds)


class PrepareBar:
    """`prepare`'s progress callback: bytes tokenized, documents, time remaining (terminal only)."""

    def __init__(self) -> None:
        console = Console(stderr=True)
        # Off when stderr is not a terminal: a log file gets nothing useful from a bar, only a stray newline.
        self.progress = Progress(TextColumn("tokenizing"), BarColumn(), DownloadColumn(),
                                 TextColumn("{task.fields[docs]}"), TimeRemainingColumn(), console=console,
                                 transient=True, disable=not console.is_terminal)
        self.task = None

    def __enter__(self) -> "PrepareBar":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, done_bytes: int, total_bytes: int | None, docs: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("prepare", total=total_bytes, docs="")
        self.progress.update(self.task, completed=done_bytes, docs=f"{docs:,} docs")
