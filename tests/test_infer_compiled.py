"""The compiled decode step (Engine(compile=True)): the eager tokens, from two programs cached on disk."""

import pytest

import foundry.infer.compiled as compiled_module
from foundry.infer.engine import Engine
from foundry.model import Transformer
from test_infer_scheduler import REQUESTS, _model, greedy, llama_config, mistral_config, prompt


@pytest.fixture(autouse=True)
def _caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv(compiled_module.CACHE_ENV, str(tmp_path / "foundry"))
    # Freezing without max-autotune: the same programs and shapes, but not the ~60 s of benchmarking C++
    # GEMM kernels per program on two cores (which kernel inductor picks is its own business, not ours).
    monkeypatch.setattr(compiled_module, "CPU_OPTIONS",
                        {k: v for k, v in compiled_module.CPU_OPTIONS.items() if not k.startswith("max_autotune")})


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens_for_every_batch_size():
    model = _model(mistral_config)  # Llama's layers with a sliding window: a mask per layer type
    eager = Engine(model, prefill_chunk=8)
    compiled = Engine(model, prefill_chunk=8, compile=True)
    compiled.warm_up()
    step = compiled.compiled_step
    assert set(step.programs) == {"one", "many"} and not any(step.loaded_from_cache.values())
    ids = [ids for ids, _ in REQUESTS.values()]
    params = [greedy(n) for _, n in REQUESTS.values()]
    # Rows join and leave: the decode batch runs through sizes 1..4 at many lengths, past the window.
    assert [c.token_ids for c in compiled.generate(ids, params)] == [c.token_ids for c in eager.generate(ids, params)]
    alone = prompt(9, 5)
    assert compiled.generate([alone], greedy(12))[0].token_ids == eager.generate([alone], greedy(12))[0].token_ids
    assert set(step.programs) == {"one", "many"}  # never one program per batch size or position


@pytest.mark.slow
def test_a_new_engine_loads_the_programs_from_disk_and_other_weights_get_their_own():
    first, second = _model(llama_config), Transformer(llama_config())
    second.init_weights(seed=1)
    alone = prompt(9, 5)
    built = Engine(first, compile=True)
    expected = built.generate([alone], greedy(12))[0].token_ids
    assert built.compiled_step.loaded_from_cache == {"one": False}
    again = Engine(_model(llama_config), compile=True)  # the same weights: a later process's engine
    assert again.generate([alone], greedy(12))[0].token_ids == expected
    assert again.compiled_step.loaded_from_cache == {"one": True}
    other = Engine(second, compile=True)  # the same shapes, other weights: its own program
    tokens = other.generate([alone], greedy(12))[0].token_ids
    assert other.compiled_step.loaded_from_cache == {"one": False}
    assert tokens == Engine(second).generate([alone], greedy(12))[0].token_ids != expected
    assert len(list((compiled_module.cache_dir()).glob("*.pt2"))) == 2  # no temporaries left


def test_rows_outside_the_programs_range_take_the_eager_step(monkeypatch):
    # The last position of a KV slot is past the programs' length range: that step runs eagerly (no compile).
    model = _model(llama_config)
    engine = Engine(model, compile=True, kv_cache_memory=None)
    monkeypatch.setattr(compiled_module.AheadOfTimeStep, "_program", lambda *a: pytest.fail("compiled"))
    slot_len = engine.scheduler.pool.slot_len
    ids = prompt(7, slot_len - 1)  # the one decode step writes the slot's last position
    plain = Engine(model).generate([ids], greedy(2))[0]
    got = engine.generate([ids], greedy(2))[0]
    assert got.token_ids == plain.token_ids and got.finish_reason == plain.finish_reason
