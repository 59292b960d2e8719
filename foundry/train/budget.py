"""Fitting a run's length to a wall-clock budget (`--time-budget`), refitted as the machine's pace changes."""

from __future__ import annotations

FIRST_FIT_STEPS = 3    # timed steps before the first fit (an invocation's first step, compiling, is not timed)
MIN_WINDOW_STEPS = 2   # a refit measures the pace over at least this many steps
REFIT_FRACTION = 0.1   # refit each time another tenth of the time left has passed
MARGIN = 0.02          # of the budget, kept for what is not measured (the last metric lines, closing files)


class TimeBudget:
    """The total step count that fits `seconds` of wall-clock time, refitted as the run goes.

    A fit projects the time left from the pace of the training steps since the previous fit (so a
    machine that gets loaded, or freed, is followed within a tenth of the time left), plus the measured
    cost of each evaluation and save times how many of them the remaining steps bring, plus the final
    evaluation and save. Time already spent (earlier invocations of a resumed run, setup, evaluations,
    saves) is in the `elapsed` the loop passes in."""

    def __init__(self, seconds: float, max_steps: int, micro_batches: int, eval_every: int,
                 eval_batches: int, save_every: int, final_eval_batches: int):
        self.seconds, self.max_steps, self.micro_batches = seconds, max_steps, micro_batches
        self.eval_every, self.eval_batches = eval_every, eval_batches  # a periodic evaluation's batches
        self.save_every, self.final_eval_batches = save_every, final_eval_batches
        self.pace: float | None = None  # seconds per training step, evaluation and saving excluded
        self.eval_batch_seconds: float | None = None
        self.save_seconds = 0.0  # unknown before the first save: a small model saves in well under a step
        self._window_seconds, self._window_steps = 0.0, 0
        self._next_fit: float | None = None  # elapsed seconds of the next refit (None: not fitted yet)

    def timed_step(self, seconds: float) -> None:
        """One training step (with its logging) took `seconds`."""
        self._window_seconds += seconds
        self._window_steps += 1

    def timed_eval(self, seconds: float, batches: int) -> None:
        """An evaluation of `batches` batches took `seconds`."""
        self.eval_batch_seconds = seconds / max(batches, 1)

    def timed_save(self, seconds: float) -> None:
        """A checkpoint save (with the plot) took `seconds`."""
        self.save_seconds = seconds

    def due(self, elapsed: float) -> bool:
        """Whether to refit now."""
        if elapsed >= self.seconds * (1 - MARGIN):
            return True  # out of time, however few steps were timed
        if self._next_fit is None:
            return self._window_steps >= FIRST_FIT_STEPS
        return self._window_steps >= MIN_WINDOW_STEPS and elapsed >= self._next_fit

    def fit(self, step: int, elapsed: float) -> int:
        """The run's total steps, from `step` done and `elapsed` seconds spent; starts a new pace window."""
        if self._window_steps:
            self.pace = self._window_seconds / self._window_steps
        self._window_seconds, self._window_steps = 0.0, 0
        self._next_fit = elapsed + REFIT_FRACTION * max(self.seconds - elapsed, 0.0)
        left = self.seconds * (1 - MARGIN) - elapsed - self._final_seconds()
        if left <= 0 or self.pace is None:
            return step
        per_step = self.pace
        if self.eval_every and self.eval_batches:
            per_step += self._eval_seconds(self.eval_batches) / self.eval_every
        if self.save_every:
            per_step += self.save_seconds / self.save_every
        return max(step, min(self.max_steps, step + int(left / max(per_step, 1e-9))))

    def _eval_seconds(self, batches: int) -> float:
        if self.eval_batch_seconds is not None:
            return self.eval_batch_seconds * batches
        # Not measured yet: a forward pass over a micro-batch costs about a third of its forward + backward.
        return (self.pace or 0.0) / self.micro_batches / 3 * batches

    def _final_seconds(self) -> float:
        return self._eval_seconds(self.final_eval_batches) + self.save_seconds
