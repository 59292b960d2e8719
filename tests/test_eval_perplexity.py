"""foundry.eval.perplexity.evaluate: every call with the same settings scores the same validation tokens."""

import pytest
import torch

from foundry.data.shards import TokenShards, prepare
from foundry.eval.perplexity import evaluate


class Recorder(torch.nn.Module):
    """Uniform logits over the vocabulary; remembers every input it was shown."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.seen = vocab_size, []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(*x.shape, self.vocab_size)


@pytest.fixture
def val(tmp_path, counting_tokenizer):
    (tmp_path / "corpus").mkdir()
    for d in range(60):
        (tmp_path / "corpus" / f"doc{d:03d}.txt").write_text(" ".join(f"w{1 + (d * 37 + i) % 300}" for i in range(30)))
    prepare([str(tmp_path / "corpus")], counting_tokenizer(300), tmp_path / "data", val_fraction=0.5)
    return TokenShards(tmp_path / "data", "val")


def test_periodic_evaluations_score_the_same_spread_sample(val):
    model = Recorder(302)
    first = evaluate(model, val, batch_size=4, seq_len=8, max_batches=3)
    seen_first, model.seen = torch.cat(model.seen), []
    second = evaluate(model, val, batch_size=4, seq_len=8, max_batches=3)
    assert first == second and first.tokens == 3 * 4 * 8
    assert torch.equal(torch.cat(model.seen), seen_first)
    # The sample reaches the last twelfth of the split, not only its first documents.
    count, n = (len(val) - 1) // 8, 12
    last = (n - 1) * count // n
    assert last * 8 > len(val) * (n - 1) / n - 8
    assert seen_first[-1].tolist() == val.read(last * 8, 8).tolist()
