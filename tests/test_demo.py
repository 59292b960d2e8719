"""`foundry demo`, end to end on a few stdlib packages with a fixed number of steps (no wall-clock budget).

The checks are ones a model that learned nothing fails: the validation loss sits well below the unigram
baseline, and the completion of the prompt reads as Python: indented lines and names the corpus uses. The
same checks are run on an untrained model and on a unigram sample, which must fail them.
"""

import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from foundry import hub
from foundry.cli import main
from foundry.cli.demo import PROMPT, SAMPLE_STOP, SAMPLING, run_demo
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams

# ~650 KB of ordinary code: the tokenizer trains in a second and 150 steps see each token about once.
PACKAGES = ("email", "json", "logging", "concurrent")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _code_likeness(texts: list[str], names: set[str]) -> tuple[int, float, float]:
    """(lines after the first, share of them indented by a positive multiple of 4 spaces, share of known names)."""
    lines = [line for text in texts for line in text.split("\n")[1:] if line.strip()]
    indented = [line for line in lines if line.startswith(" ") and (len(line) - len(line.lstrip(" "))) % 4 == 0]
    found = [name for text in texts for name in NAME.findall(text)]
    return len(lines), len(indented) / max(len(lines), 1), sum(n in names for n in found) / max(len(found), 1)


def _reads_as_python(texts: list[str], names: set[str]) -> bool:
    lines, indented, known = _code_likeness(texts, names)
    return lines >= 3 * len(texts) and indented >= 0.8 and known >= 0.6


def _samples(engine: Engine, seeds: range) -> list[str]:
    params = [SamplingParams(max_new_tokens=96, stop=SAMPLE_STOP, **{**SAMPLING, "seed": s}) for s in seeds]
    return [c.text for c in engine.generate([PROMPT] * len(params), params)]


@pytest.mark.slow
def test_demo_trains_a_model_that_completes_python(tmp_path, capsys):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [str(stdlib / name) for name in PACKAGES]
    figures = run_demo(tmp_path / "demo", preset_name="tiny", vocab_size=2048, steps=150, corpus=corpus,
                       batch_size=8, seq_len=128)
    assert figures["steps"] == 150 and figures["tokens"] == 150 * 8 * 128
    # The unigram baseline knows every token's frequency; beating it by half a nat needs context.
    assert figures["val_loss"] < figures["baseline_loss"] - 0.5, figures
    assert (tmp_path / "demo" / "run" / "loss.png").is_file()
    out = capsys.readouterr().out
    assert "unigram baseline" in out and PROMPT + figures["sample"] in out  # the sample as printed, unwrapped
    assert f"try it in a browser: foundry serve {figures['checkpoint']}, then open http://127.0.0.1:8000/" in out

    # The completion itself: new text, whole characters, and Python to look at.
    sample, ids = figures["sample"], figures["sample_token_ids"]
    loaded = hub.load(figures["checkpoint"])
    assert sample.strip() and "\ufffd" not in sample
    assert loaded.tokenizer.decode(ids).startswith(sample)
    names = {name for source in corpus for path in Path(source).rglob("*.py")
             for name in NAME.findall(path.read_text(encoding="utf-8"))}
    engine = Engine(loaded.model, loaded.tokenizer)
    trained = _samples(engine, range(4))
    assert trained[0] == sample  # the demo's own settings and seed
    assert _reads_as_python(trained, names), (_code_likeness(trained, names), trained)

    # A model that learned nothing fails the same check: random weights, and a unigram sample.
    loaded.model.init_weights(0)
    untrained = _samples(engine, range(4))
    assert not _reads_as_python(untrained, names), untrained
    train_ids = np.fromfile(next((tmp_path / "demo" / "data").glob("train_*.bin")), dtype=np.uint16)
    counts = np.bincount(train_ids, minlength=loaded.tokenizer.vocab_size)
    rng = np.random.default_rng(0)
    unigram = [loaded.tokenizer.decode(rng.choice(len(counts), 96, p=counts / counts.sum()).tolist())
               for _ in range(4)]
    assert not _reads_as_python(unigram, names), unigram


def test_demo_refuses_to_replace_what_it_did_not_write(tmp_path, capsys):
    (tmp_path / "old" / "run").mkdir(parents=True)  # an earlier demo
    assert main(["demo", "--out", str(tmp_path / "old"), "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "mine"), "--overwrite"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["demo", "--out", str(tmp_path / "new"), "--steps", "0"]) == 2
    assert "--steps must be positive, got 0" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
