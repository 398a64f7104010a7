"""Imports point down the layers (README, "Layout"): a module may import its own layer and the
ones below it, never one above. Every import counts, those inside functions too: a lazy import
that breaks a cycle still makes the lower module depend on the higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vimarl"

LAYERS = (
    ("vimarl.errors", "vimarl.fields"),
    ("vimarl.envs",),
    ("vimarl.nn", "vimarl.buffer"),
    ("vimarl.algos", "vimarl.config", "vimarl.checkpoint"),
    ("vimarl.train", "vimarl.logging", "vimarl.stats", "vimarl.plots", "vimarl.video"),
    ("vimarl.sweep", "vimarl.report"),
    ("vimarl.cli", "vimarl"),
)
"""Bottom to top: settings and errors; environments; networks and the replay; algorithms with
the configs that resolve them and the checkpoints that rebuild them; the trainer and its outputs;
sweeps and reports; the command line and the package's public API."""


def layer(module: str) -> int:
    """Index in LAYERS of the longest prefix naming `module` (vimarl.envs.traffic.env -> 1)."""
    best = None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (index, name)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_imports.py: add it to LAYERS")
    return best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str) -> list[tuple[int, str]]:
    """(line, module) of every vimarl module the source imports; `from vimarl import x` names
    vimarl.x when x is a submodule."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "vimarl"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "vimarl":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (PACKAGE.parent / Path(*sub.split("."))).is_dir()
                found.append((node.lineno, sub if is_module else node.module))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    own = module_name(path)
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} (layer {layer(target)} above {layer(own)})"
              for line, target in imported(path.read_text()) if layer(target) > layer(own)]
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import():
    """The rule itself: an env importing the trainer (even inside a function) is caught."""
    assert layer("vimarl.envs.traffic.env") == 1 and layer("vimarl.train") == 4 and layer("vimarl") == 6
    source = "def f():\n    from vimarl.train import train\n    from vimarl import checkpoint, VimarlError\n"
    assert imported(source) == [(2, "vimarl.train"), (3, "vimarl.checkpoint"), (3, "vimarl")]
