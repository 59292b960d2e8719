"""What the training loop tells the person running it, as an interface: the CLI draws it as a progress bar.

The base class reports through `logging` (silent unless the caller configures logging), so the loop
never writes to a terminal itself.
"""

from __future__ import annotations

import logging

log = logging.getLogger("foundry.train")


class TrainReporter:
    """Receives the run's notes and per-step figures; subclasses draw them."""

    def start(self, total_steps: int | None, start_step: int, tokens_per_step: int,
              time_left: float | None = None) -> None:
        """The loop is about to run steps start_step+1 .. total_steps.

        total_steps is None while a time budget has yet to fit it; time_left is the seconds the run has
        left when it is fitted to a time budget (then the run ends about that much later, whatever its pace)."""
        self.total_steps = total_steps
        self.time_left = time_left

    def note(self, text: str) -> None:
        """A line worth reading (evaluation results, warnings, where things were saved)."""
        log.info(text)

    def set_total(self, total_steps: int) -> None:
        """The run's length changed (a time budget was fitted or refitted)."""
        self.total_steps = total_steps

    def update(self, step: int, loss: float, lr: float) -> None:
        """One optimizer step finished."""
        log.debug("step %d loss %.4f lr %.3g", step, loss, lr)

    def close(self) -> None:
        """The loop is done (finished, interrupted or failed)."""
