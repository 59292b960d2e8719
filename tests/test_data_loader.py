"""foundry.data.loader: determinism, exact resume, rank disjointness and the evaluation stream."""

import pytest
import torch

from foundry.data.loader import BatchLoader, eval_batches
from foundry.data.shards import TokenShards, prepare
from foundry.core.errors import UserError


@pytest.fixture(scope="module")
def shards(tmp_path_factory, counting_tokenizer):
    """~2,000 train tokens in shards of 500, every non-separator token distinct (ids 1..2000)."""
    root = tmp_path_factory.mktemp("loader")
    (root / "corpus").mkdir()
    for d in range(40):
        words = range(1 + 50 * d, 1 + 50 * (d + 1))
        (root / "corpus" / f"doc{d:03d}.txt").write_text(" ".join(f"w{i}" for i in words))
    prepare([str(root / "corpus")], counting_tokenizer(2000), root / "data", val_fraction=0.1,
            shard_tokens=500)
    return TokenShards(root / "data", "train"), TokenShards(root / "data", "val")


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_shifted_windows_of_the_stream(shards):
    train, _ = shards
    loader = BatchLoader(train, batch_size=4, seq_len=15, seed=0)
    stream = train.read(0, len(train)).tolist()
    windows = {tuple(stream[s:s + 16]) for s in range(0, len(stream) - 15, 16)}
    for x, y in take(loader, 5):
        assert x.shape == y.shape == (4, 15) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert tuple(row_x + row_y[-1:]) in windows


def test_same_seed_same_batches_other_seed_other_order(shards):
    train, _ = shards
    a = take(BatchLoader(train, 4, 15, seed=1), 10)
    b = take(BatchLoader(train, 4, 15, seed=1), 10)
    c = take(BatchLoader(train, 4, 15, seed=2), 10)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_every_window_once_per_epoch_then_a_new_order(shards):
    train, _ = shards
    loader = BatchLoader(train, batch_size=1, seq_len=15, seed=0)
    per_epoch = loader.num_windows
    assert per_epoch == len(train) // 16
    first = [tuple(x[0].tolist()) for x, _ in take(loader, per_epoch)]
    second = [tuple(x[0].tolist()) for x, _ in take(loader, per_epoch)]
    assert len(set(first)) == per_epoch and set(first) == set(second) and first != second
    assert (loader.epoch, loader.position) == (2, 0)


@pytest.mark.parametrize("stop", [3, 7, 20])  # mid-epoch, and past the end of the first epoch
def test_resume_yields_exactly_the_uninterrupted_batches(shards, stop):
    train, _ = shards
    uninterrupted = take(BatchLoader(train, 8, 15, seed=5), 30)
    first = BatchLoader(train, 8, 15, seed=5)
    take(first, stop)
    state = first.state_dict()
    resumed = BatchLoader(train, 8, 15, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (ux, uy) in zip(take(resumed, 30 - stop), uninterrupted[stop:]):
        assert torch.equal(x, ux) and torch.equal(y, uy)


def test_resume_refuses_other_settings(shards):
    train, _ = shards
    state = BatchLoader(train, 8, 15, seed=5).state_dict()
    with pytest.raises(UserError, match="saved with seq_len=15, now seq_len=31"):
        BatchLoader(train, 8, 31, seed=5).load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        BatchLoader(train, 8, 15, seed=6).load_state_dict(state)


def test_ranks_see_disjoint_windows(shards):
    train, _ = shards
    world = 3
    seen = []
    for rank in range(world):
        loader = BatchLoader(train, batch_size=1, seq_len=15, seed=0, rank=rank, world_size=world)
        seen.append({tuple(x[0].tolist()) for x, _ in take(loader, int(loader.windows_per_rank))})
    assert all(len(s) == len(train) // 16 // world for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    with pytest.raises(UserError, match="rank 3 is outside world size 3"):
        BatchLoader(train, 1, 15, seed=0, rank=3, world_size=3)


def _global_batches(train, world, batch, steps, state=None):
    """Each step's rows over all ranks, rank by rank, as tuples of window tokens."""
    loaders = [BatchLoader(train, batch, 15, seed=4, rank=r, world_size=world) for r in range(world)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        out.append(sorted(tuple(row.tolist()) for loader in loaders for row in next(loader)[0]))
    return out, loaders[0].state_dict()


def test_a_step_sees_the_same_windows_at_any_world_size_and_resumes_across_them(shards):
    """1 rank x 6 rows, 2 x 3 and 3 x 2 draw the same windows each step, across epoch ends (num_windows is
    not a multiple of 6), and a state saved at one world size continues exactly at another."""
    train, _ = shards
    steps = 40  # ~2 epochs of 124 windows
    one, _ = _global_batches(train, 1, 6, steps)
    two, _ = _global_batches(train, 2, 3, steps)
    three, _ = _global_batches(train, 3, 2, steps)
    assert one == two == three
    _, state = _global_batches(train, 2, 3, 25)
    resumed, _ = _global_batches(train, 3, 2, steps - 25, state)
    assert resumed == one[25:]


def test_sequence_too_long_for_the_data(shards):
    train, _ = shards
    with pytest.raises(UserError, match="sequence length 5000 is too long .*lower the sequence length"):
        BatchLoader(train, 2, 5000, seed=0)
    with pytest.raises(UserError, match="too long"):
        BatchLoader(train, 2, len(train) // 2, seed=0, world_size=4)  # 1 window for 4 ranks
    # A batch larger than an epoch is fine: it simply spans epochs.
    small = BatchLoader(train, batch_size=4, seq_len=len(train) // 2 - 1, seed=0)
    assert next(small)[0].shape == (4, len(train) // 2 - 1)


def test_eval_batches_cover_the_split_in_order(shards):
    _, val = shards
    stream = val.read(0, len(val))
    batches = list(eval_batches(val, batch_size=3, seq_len=10))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    count = (len(val) - 1) // 10
    assert xs.shape == (count, 10) and all(x.shape[0] == 3 for x, _ in batches[:-1])
    # Every token but the first is a target exactly once, in order.
    assert ys.flatten().tolist() == stream[1:1 + 10 * count].tolist()
    assert xs.flatten().tolist() == stream[:10 * count].tolist()
    assert len(list(eval_batches(val, 3, 10, max_batches=2))) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, eval_batches(val, 3, 10)))
    with pytest.raises(UserError, match="too long"):
        next(eval_batches(val, 1, len(val)))


def test_a_sample_of_eval_batches_is_fixed_and_spread_over_the_split(shards):
    """With max_batches, the same windows at every call, evenly spaced from the split's start to its end."""
    train, _ = shards
    count = (len(train) - 1) // 10
    sample = list(eval_batches(train, 3, 10, max_batches=2))
    again = list(eval_batches(train, 3, 10, max_batches=2))
    assert [x.shape for x, _ in sample] == [(3, 10), (3, 10)]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(sample, again))
    starts = [train.read(i * count // 6 * 10, 10).tolist() for i in range(6)]
    assert torch.cat([x for x, _ in sample]).tolist() == starts
    assert count // 6 * 5 * 10 > len(train) // 2  # the last window lies in the second half of the split
    # Asking for at least the whole split gives the whole split.
    assert sum(len(x) for x, _ in eval_batches(train, 3, 10, max_batches=count)) == count
