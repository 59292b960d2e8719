"""The learning-rate schedule: warm-up, then a cosine that ends exactly on its floor."""

import math

import pytest

from foundry.train.schedule import lr_at


@pytest.mark.parametrize("total, warmup", [(10, 0), (10, 3), (100, 10), (2, 1), (1, 0), (5, 4)])
def test_the_last_step_gets_the_floor_exactly(total, warmup):
    assert lr_at(total - 1, 3e-3, warmup, total, 0.1) == 3e-3 * 0.1
    assert lr_at(total + 5, 3e-3, warmup, total, 0.1) == 3e-3 * 0.1  # past the end: stays on the floor


def test_warmup_rises_to_the_peak_then_the_cosine_only_falls():
    lrs = [lr_at(step, 1.0, 4, 20, 0.1) for step in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0  # the decay starts from the peak
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == 0.1 and min(lrs) == 0.1
    # Step 12 is 8 of the 15 decay intervals between step 4 (the peak) and step 19 (the floor).
    assert lr_at(12, 1.0, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 15)))
