"""The public entry points keep working after the tree's reorganisation."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERBS = ("info", "pretrain", "demo", "tokenizer", "prepare", "generate", "chat", "plan", "export", "serve")


def test_python_dash_m_foundry_and_foundry_cli_list_every_verb():
    for module in ("foundry", "foundry.cli"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        assert all(verb in proc.stdout for verb in VERBS), proc.stdout


def test_the_documented_imports():
    import foundry
    from foundry.cli import main
    from foundry.hub import load
    from foundry.infer import Engine, SamplingParams
    from foundry.model import KVCache, Transformer

    assert foundry.load is load and callable(main) and callable(Engine.load)
    assert SamplingParams(max_new_tokens=3).max_new_tokens == 3
    assert issubclass(Transformer, __import__("torch").nn.Module) and KVCache.__name__ == "KVCache"


def test_help_and_plan_need_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from foundry.cli import main\n"
            "assert main(['plan', 'llama3-8b', '--tokens', '1T', '--json']) == 0\n"
            "assert main(['info', 'llama3-8b', '--json']) == 0\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
