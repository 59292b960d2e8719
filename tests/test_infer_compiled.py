"""The compiled decode step (Engine(compile=True)): the eager tokens, from two graphs for every batch and length."""

import pytest
import torch
from torch._dynamo.utils import counters

import foundry.infer.compiled as compiled_module
from foundry.infer.engine import Engine
from test_infer_scheduler import REQUESTS, _model, greedy, llama_config, prompt


@pytest.fixture(autouse=True)
def _inductor_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # Freezing without max-autotune: the same graphs and shapes, but not the ~60 s of benchmarking C++
    # GEMM kernels per graph on two cores (which kernel inductor picks is its own business, not ours).
    monkeypatch.setattr(compiled_module, "CPU_OPTIONS", {"freezing": True})
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens_for_every_batch_size():
    # One family (each compile costs tens of seconds on two cores): Llama, whose 2 KV heads equal the
    # warm-up's batch of 2, the case where duck sizing would tie the batch to them and recompile per size.
    model = _model(llama_config)
    eager = Engine(model, prefill_chunk=8)
    compiled = Engine(model, prefill_chunk=8, compile=True)
    compiled.warm_up()
    warm = counters["stats"]["unique_graphs"]
    assert model.config.num_key_value_heads == 2  # the warm-up's batch of 2 meets a dimension of 2
    ids = [ids for ids, _ in REQUESTS.values()]
    params = [greedy(n) for _, n in REQUESTS.values()]
    # Rows join and leave: the decode batch runs through sizes 1..4 at many lengths.
    assert [c.token_ids for c in compiled.generate(ids, params)] == [c.token_ids for c in eager.generate(ids, params)]
    alone = prompt(9, 5)
    assert compiled.generate([alone], greedy(12))[0].token_ids == eager.generate([alone], greedy(12))[0].token_ids
    # Batch 1 and "more than one" (dynamic in size and length), plus the recompile that makes the first
    # graph's length symbolic: never one graph per batch size or position.
    assert 2 <= warm <= 3 and counters["stats"]["unique_graphs"] == warm  # the warm-up compiled them all
