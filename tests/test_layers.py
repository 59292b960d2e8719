"""The layers of DESIGN.md, held by reading every module's imports (lazy ones included) with `ast`.

Each package of foundry may import only the packages below it (ALLOWED), some may use only certain
third-party libraries (THIRD_PARTY), nothing below `cli/` writes to a terminal, and the import graph
between packages has no cycle. The synthetic trees at the end show that each rule fails when broken.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "foundry"

BELOW_TRAIN = {"eval", "data", "hub", "model", "tokenizer", "config", "core"}
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "config": {"core"},
    "tokenizer": {"core"},
    "model": {"config", "core"},
    "hub": {"model", "tokenizer", "config", "core"},
    "data": {"tokenizer", "config", "core"},
    "eval": {"data", "model", "tokenizer", "config", "core"},
    "train": BELOW_TRAIN,
    "infer": {"hub", "model", "tokenizer", "config", "core"},
    "plan": {"config", "core"},
    "serve": {"infer", "hub", "model", "tokenizer", "config", "core"},
    "cli": {"train", "infer", "serve", "plan", *BELOW_TRAIN},
    "": {"cli", "hub", "core"},  # foundry/__init__.py and __main__.py
}
# Packages that may use only these non-stdlib libraries (the others use what their job needs).
THIRD_PARTY: dict[str, set[str]] = {
    "core": set(),
    "config": {"yaml"},
    "model": {"torch"},
    "plan": {"numpy"},  # the CPU's measured peak; never torch
}
# Writing for a person (a terminal, a progress bar) belongs to cli/ alone.
TERMINAL_MODULES = {"rich"}
TERMINAL_NAMES = {("sys", "stdout"), ("sys", "stderr"), ("sys", "stdin")}


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.text}"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package(module: str) -> str:
    """foundry.train.loop -> train; foundry -> '' (the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else ""


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import anywhere in the file, relative ones resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "foundry":  # `from foundry import hub` imports the package foundry.hub
                found += [(node.lineno, f"foundry.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return found


def _terminal_writes(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "input"):
            found.append((node.lineno, f"calls {node.func.id}()"))
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and (node.value.id, node.attr) in TERMINAL_NAMES):
            found.append((node.lineno, f"uses {node.value.id}.{node.attr}"))
    return found


def check_tree(root: Path) -> tuple[list[Violation], dict[str, set[str]]]:
    """Every rule broken under `root` (a foundry package directory), and the package import graph."""
    violations: list[Violation] = []
    graph: dict[str, set[str]] = {}
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path in sorted(root.rglob("*.py")):
        module = _module_name(root, path)
        package = _package(module)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph.setdefault(package, set())
        for line, target in _imports(tree, module, path.name == "__init__.py"):
            top = target.split(".")[0]
            if top == "foundry":
                other = _package(target)
                if other == package:
                    continue
                graph[package].add(other)
                if package in ALLOWED and other not in ALLOWED[package]:
                    violations.append(Violation(module, line, f"imports foundry.{other} ({package or 'foundry'}/ "
                                                               f"may import only {sorted(ALLOWED[package])})"))
            elif top not in stdlib:
                if package in THIRD_PARTY and top not in THIRD_PARTY[package]:
                    violations.append(Violation(module, line, f"imports {top} ({package}/ may use only "
                                                               f"{sorted(THIRD_PARTY[package]) or 'the stdlib'})"))
                if package != "cli" and top in TERMINAL_MODULES:
                    violations.append(Violation(module, line, f"imports {top}: only cli/ writes to a terminal"))
        if package != "cli":
            violations += [Violation(module, line, f"{text}: only cli/ writes to a terminal")
                           for line, text in _terminal_writes(tree)]
    return violations, graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the package graph as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# ---- the real tree ----------------------------------------------------------------------

def test_every_import_respects_the_layers():
    violations, _ = check_tree(ROOT)
    assert not violations, "layer rules broken:\n" + "\n".join(map(str, violations))


def test_no_cycle_between_packages():
    _, graph = check_tree(ROOT)
    assert find_cycle(graph) is None, f"import cycle between packages: {' -> '.join(find_cycle(graph))}"


def test_every_package_is_on_the_map_and_says_what_it_holds():
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert set(packages) == set(ALLOWED) - {""}, "a package is missing from ALLOWED (or ALLOWED names a ghost)"
    for name in packages:
        doc = ast.get_docstring(ast.parse((ROOT / name / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"foundry/{name}/__init__.py must say what it holds and may import"
    flat = sorted(p.name for p in ROOT.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not flat, f"modules outside a package: {flat}"


# ---- the checker fails on planted violations ------------------------------------------------

def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "foundry"
    for package in ALLOWED:
        if package:
            (root / package).mkdir(parents=True, exist_ok=True)
            (root / package / "__init__.py").write_text('"""x, may import nothing."""\n')
    (root / "__init__.py").write_text("")
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("name, text, expected", [
    ("model/bad.py", "from foundry.train.loop import train\n", "imports foundry.train"),
    ("model/bad.py", "def f():\n    import foundry.hub.directory\n", "imports foundry.hub"),  # lazy
    ("model/bad.py", "from foundry import hub\n", "imports foundry.hub"),
    ("model/bad.py", "import numpy\n", "imports numpy"),
    ("infer/bad.py", "from foundry.train import loop\n", "imports foundry.train"),
    ("infer/bad.py", "def f():\n    from ..train import loop\n", "imports foundry.train"),  # relative
    ("plan/bad.py", "def f():\n    import torch\n", "imports torch"),
    ("config/bad.py", "import torch.nn\n", "imports torch"),
    ("data/bad.py", "from foundry.cli.main import main\n", "imports foundry.cli"),
    ("train/bad.py", "print('step 1')\n", "calls print()"),
    ("infer/bad.py", "import sys\nsys.stdout.write('x')\n", "uses sys.stdout"),
    ("hub/bad.py", "from rich.console import Console\n", "imports rich"),
])
def test_checker_catches_a_planted_violation(tmp_path, name, text, expected):
    violations, _ = check_tree(_plant(tmp_path, {name: text}))
    assert any(expected in v.text for v in violations), violations


def test_checker_accepts_what_the_rules_allow(tmp_path):
    root = _plant(tmp_path, {"model/ok.py": "import torch\nfrom foundry.config import ModelConfig\n",
                             "cli/ok.py": "from foundry.train.loop import train\nprint('hi')\n",
                             "plan/ok.py": "import math\nfrom foundry.config import ModelConfig\n"})
    assert check_tree(root)[0] == []


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    root = _plant(tmp_path, {"data/a.py": "from foundry.eval import b\n", "eval/b.py": "from foundry.data import a\n"})
    violations, graph = check_tree(root)
    assert find_cycle(graph) in (["data", "eval", "data"], ["eval", "data", "eval"])
    assert find_cycle({"a": {"b"}, "b": set()}) is None
