"""Shared test fixtures. Keep this small: fixtures used by one test file live in that file."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Never reach for the network: a hub name that cannot be fetched otherwise retries for ~47 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled decode programs go to a cache of this test session's own (servers started by tests inherit it).
os.environ["FOUNDRY_CACHE_DIR"] = tempfile.mkdtemp(prefix="foundry-test-cache-")
atexit.register(shutil.rmtree, os.environ["FOUNDRY_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    """A few hundred KB of real text: the json and email packages of the running stdlib."""
    import email
    import json

    files = sorted(Path(json.__file__).parent.glob("*.py")) + sorted(Path(email.__file__).parent.glob("*.py"))
    return [f.read_text(encoding="utf-8") for f in files]


@pytest.fixture(scope="session")
def tiny_tokenizer(sample_texts):
    """A 512-token byte-level BPE of foundry's own kind (trains in well under a second)."""
    from foundry.tokenizer import Tokenizer

    return Tokenizer.train(sample_texts, 512)


@pytest.fixture(scope="session")
def counting_tokenizer():
    """Factory: a word-level tokenizer where "w{i}" is id i (1..n) and <|endoftext|> is 0, so that
    the token stream of a corpus is known in advance."""
    from functools import lru_cache

    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    from foundry.tokenizer import Tokenizer

    @lru_cache
    def make(n: int) -> Tokenizer:
        vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, n + 1)}, "[UNK]": n + 1}
        backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return Tokenizer(backend, {"eos_token": "<|endoftext|>"})

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: tiny models gain nothing from a second, and spinning threads crawl
    on a shared, busy CI host. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
