"""The compiled decode step (Engine(compile=True)): the eager tokens, from two programs cached on disk."""

import pytest
import torch
import torch._inductor

import foundry.infer.compiled as compiled_module
from foundry.core.errors import UserError
from foundry.infer.engine import Engine
from foundry.infer.speculative import SpeculativeConfig
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
def test_compiled_decode_and_verification_give_the_eager_tokens_for_every_batch_size():
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

    # Speculative verification (n-gram drafts) runs the span programs, with the plain greedy tokens.
    speculating = Engine(model, compile=True, speculative=SpeculativeConfig(method="ngram", num_tokens=3))
    speculating.warm_up()
    assert set(speculating.compiled_step.programs) == {"one", "many", "span-one", "span-many"}
    assert speculating.compiled_step.loaded_from_cache["one"]  # this model's decode programs, from the cache
    looping = [prompt(11, 4) * 5, prompt(12, 3) * 6, prompt(13, 7)]  # repeats draw drafts; the last mostly not
    params = [greedy(24), greedy(16), greedy(10)]
    expected = [c.token_ids for c in eager.generate(looping, params)]
    assert [c.token_ids for c in speculating.generate(looping, params)] == expected
    assert [speculating.generate([p], q)[0].token_ids for p, q in zip(looping, params)] == expected  # batch 1
    assert speculating.spec_stats.steps > 0 and speculating.spec_stats.accepted > 0


@pytest.mark.slow
def test_a_new_engine_loads_the_programs_from_disk_other_weights_get_their_own_and_broken_ones_are_rebuilt():
    first, second = _model(llama_config), Transformer(llama_config())
    second.init_weights(seed=1)
    alone = prompt(9, 5)
    built = Engine(first, compile=True)
    broken = compiled_module.cache_dir() / f"{built.compiled_step._key('one', built.scheduler.pool)}.pt2"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"truncated")  # an entry that does not load is built anew
    expected = built.generate([alone], greedy(12))[0].token_ids
    assert built.compiled_step.loaded_from_cache == {"one": False} and broken.stat().st_size > 100
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


def test_an_unwritable_cache_is_one_clear_message(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv(compiled_module.CACHE_ENV, str(blocked))
    engine = Engine(_model(llama_config), compile=True)
    monkeypatch.setattr(compiled_module, "_export", lambda *a: None)  # the cache fails before any compile
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: None)
    with pytest.raises(UserError, match="cannot write the compiled decode step .* set FOUNDRY_CACHE_DIR"):
        engine.generate([prompt(9, 5)], greedy(3))

