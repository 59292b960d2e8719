"""`--time-budget`: the run ends within ~10% of its budget whatever the machine's load does, resumed too.

Time is a fake clock in the loop module, moved only by what the test says the work costs, so these
tests never depend on the real machine's speed.
"""

import re
import shutil

import pytest

from foundry.train.checkpoint import load_trainer_state
from foundry.train.loop import train
from foundry.train.metrics import read_metrics
from train_helpers import FakeClock, charge, make_data_dir, step_losses, tiny_cfg

BUDGET = 60.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_texts, tiny_tokenizer):
    return make_data_dir(tmp_path_factory, sample_texts[:12], tiny_tokenizer)


@pytest.fixture
def clock():
    return FakeClock()


def _budget_cfg(data_dir, out, **changes):
    settings = dict(steps=100_000, batch_size=2, seq_len=16, warmup=5, time_budget=BUDGET, eval_every=25,
                    eval_batches=2, final_eval_batches=6, log_every=1)
    settings.update(changes)
    return tiny_cfg(data_dir, out, **settings)


@pytest.mark.parametrize("before, after", [(0.2, 0.6), (0.6, 0.2)], ids=["machine-gets-loaded", "machine-freed"])
def test_the_run_ends_within_a_tenth_of_its_budget_when_the_pace_changes(tmp_path, data_dir, clock, monkeypatch,
                                                                         before, after):
    # 40 micro-batches at one pace, then three times slower (or faster); evaluations and the save cost too.
    charge(monkeypatch, clock, lambda n: before if n <= 40 else after, eval_batch_seconds=0.5, save_seconds=0.5)
    result = train(_budget_cfg(data_dir, tmp_path / "run"))
    assert result.step == result.total_steps < 100_000 and not result.interrupted
    assert abs(clock.now - BUDGET) <= 0.1 * BUDGET, (clock.now, result.total_steps)
    assert result.wall_seconds == pytest.approx(clock.now)  # this invocation, on the loop's clock


def test_a_resumed_budget_run_continues_its_schedule_and_still_ends_on_time(tmp_path, data_dir, clock, monkeypatch):
    charge(monkeypatch, clock, lambda n: 0.2, eval_batch_seconds=0.5, save_seconds=0.2)
    settings = dict(time_budget=30.0, save_every=10, keep_checkpoints=0, eval_every=0)
    straight = train(_budget_cfg(data_dir, tmp_path / "straight", **settings))
    assert straight.step > 30
    # The same run as if it had stopped after its step-20 checkpoint (a crash or a signal), then resumed.
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "straight", split)
    for later in split.glob("step-*"):
        if int(later.name.split("-")[1]) > 20:
            shutil.rmtree(later)
    (split / "latest").write_text("step-000020\n")
    resumed = train(_budget_cfg(data_dir, split, resume=True, **settings))
    assert resumed.step == resumed.total_steps and abs(resumed.total_steps - straight.total_steps) <= 2
    # The whole run's time (the first invocation's 20 steps, then this one) is the budget.
    assert abs(load_trainer_state(resumed.checkpoint)["elapsed"] - 30.0) <= 3.0
    # The schedule went on where it stopped: same length, no second warm-up, the same next losses.
    lrs = {name: {r["step"]: r["lr"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "lr" in r}
           for name in ("straight", "split")}
    assert [lrs["split"][s] for s in (21, 22, 23)] == [lrs["straight"][s] for s in (21, 22, 23)]
    assert lrs["split"][21] < lrs["split"][20] == lrs["straight"][20]
    assert step_losses(split)[21] == step_losses(tmp_path / "straight")[21]


def test_the_first_progress_line_shows_an_eta_from_the_budget(tmp_path, data_dir, clock, monkeypatch, capsys):
    from foundry.cli.progress import ConsoleTrainReporter

    charge(monkeypatch, clock, lambda n: 0.2)
    train(_budget_cfg(data_dir, tmp_path / "run", time_budget=5.0, eval_every=0), ConsoleTrainReporter())
    err = capsys.readouterr().err  # not a terminal: plain lines
    first = next(line for line in err.splitlines() if line.startswith("step 1/"))
    assert first.startswith("step 1/? "), first  # the length is not known before the budget fits it
    eta = re.search(r"eta (\d+)s$", first)
    assert eta and int(eta.group(1)) <= 5, first
