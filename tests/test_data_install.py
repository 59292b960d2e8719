"""prepare --overwrite killed at the worst moments: a complete data directory is always there, and leftovers go.

A child process runs prepare() with the file-system calls that install the new directory (os.replace,
os.rename, shutil.rmtree, the atomic exchange) wrapped so that the N-th one SIGKILLs the process first.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from foundry.data.shards import TokenShards, prepare

CHILD = textwrap.dedent("""
    import os, shutil, signal, sys
    kill_at, mode, corpus, tokenizer, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    import foundry.data.shards as shards
    calls, active = 0, False

    def killing(function):
        def wrapper(*args, **kwargs):
            global calls
            if active:
                calls += 1
                if calls == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return wrapper

    os.replace, os.rename, shutil.rmtree = killing(os.replace), killing(os.rename), killing(shutil.rmtree)
    try:
        import foundry.core.staging as staging
    except ImportError:  # before the fix there was no exchange
        staging = None
    if staging is not None:
        staging.exchange = killing(staging.exchange if mode == "exchange" else (lambda a, b: False))
    install = shards._install

    def tracked(*args, **kwargs):
        global active
        active = True
        return install(*args, **kwargs)

    shards._install = tracked
    if mode == "midway":  # killed while writing shards, not while installing them
        shards.prepare([corpus], tokenizer, out, overwrite=True, progress=lambda *a: os.kill(os.getpid(), signal.SIGKILL))
    shards.prepare([corpus], tokenizer, out, overwrite=True, val_fraction=0.2)
""")


def _corpus(directory: Path, first: int) -> Path:
    directory.mkdir()
    for d in range(8):
        (directory / f"doc{d}.txt").write_text(" ".join(f"w{first + 10 * d + i}" for i in range(10)))
    return directory


def _run(kill_at: int, mode: str, corpus: Path, tokenizer: Path, out: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", CHILD, str(kill_at), mode, str(corpus), str(tokenizer), str(out)],
                          check=False, env=env, capture_output=True, text=True).returncode


def _stream(data: Path) -> list[int]:
    shards = TokenShards(data, "train")
    return shards.read(0, len(shards)).tolist()


@pytest.fixture
def setting(tmp_path, counting_tokenizer):
    counting_tokenizer(200).save(tmp_path / "tok")
    old, new = _corpus(tmp_path / "old", 1), _corpus(tmp_path / "new", 100)
    prepare([str(new)], tmp_path / "tok", tmp_path / "reference", val_fraction=0.2)
    return tmp_path, old, new


@pytest.mark.parametrize("mode", ["exchange", "renames"])
def test_overwrite_killed_at_every_step_leaves_a_complete_data_dir(setting, mode):
    tmp_path, old, new = setting
    data = tmp_path / "data"
    prepare([str(old)], tmp_path / "tok", data, val_fraction=0.2)
    old_stream, new_stream = _stream(data), _stream(tmp_path / "reference")
    assert old_stream != new_stream
    for kill_at in range(1, 10):
        code = _run(kill_at, mode, new, tmp_path / "tok", data)
        # Whenever the process died, a reader finds a complete data directory: the old one or the new one.
        assert _stream(data) in (old_stream, new_stream), f"killed at step {kill_at}"
        if code == 0:
            assert _stream(data) == new_stream
            break
        assert code == -signal.SIGKILL
        prepare([str(old)], tmp_path / "tok", data, val_fraction=0.2, overwrite=True)  # back to the old data
    else:
        pytest.fail("prepare never finished")
    assert kill_at > 2  # the install really has several steps to be killed at
    prepare([str(old)], tmp_path / "tok", data, val_fraction=0.2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "new", "old", "reference", "tok"]


def test_a_killed_prepare_leaves_nothing_after_the_next_one(setting):
    """A prepare killed while writing leaves its staging directory; the next prepare into the same place removes it."""
    tmp_path, old, new = setting
    data = tmp_path / "data"
    prepare([str(old)], tmp_path / "tok", data, val_fraction=0.2)
    assert _run(0, "midway", new, tmp_path / "tok", data) == -signal.SIGKILL
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("data", "new", "old", "reference", "tok"))
    assert left, "the killed run should have left its staging directory"
    prepare([str(new)], tmp_path / "tok", data, val_fraction=0.2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "new", "old", "reference", "tok"]
    assert _stream(data) == _stream(tmp_path / "reference")
