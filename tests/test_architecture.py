"""Imports run one way (docs/architecture.md): read from the source with ast, function-level
imports included, so that a lazy import cannot hide an arrow that runs back up. Also the shape of
the house: no loose modules at the package root, the marker's name spelled in one module, and a
recipe class that delegates."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gdt_tune"
TOOLS = ("gdt_tune.cli", "gdt_tune.eval")
#: each layer may import only the layers listed after it (and itself)
LAYERS = ["gdt_tune.cli", "gdt_tune.eval", "gdt_tune.recipes", "gdt_tune.trained", "gdt_tune.training",
          "gdt_tune.clinical", "gdt_tune.datasets", "gdt_tune.data", "gdt_tune.runtime"]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] in ("__init__", "__main__") else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            found |= {t for t in targets if t in modules}
        graph.setdefault(name, set()).update(found)
    return graph


def _is(module: str, prefixes) -> bool:
    """``module`` is one of ``prefixes`` or inside one (``gdt_tune.clinical`` is not ``gdt_tune.cli``)."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _layer(module: str) -> int | None:
    return next((i for i, prefix in enumerate(LAYERS) if _is(module, (prefix,))), None)


def _reached(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_recipe_reaches_no_tool_and_data_and_training_reach_nothing_above_them():
    graph = _graph()
    recipe = _reached(graph, "gdt_tune.recipes.full_finetune_fsdp_ckpt")
    assert "gdt_tune.training.checkpointing" in recipe and "gdt_tune.trained.serving" in recipe  # the check sees imports
    assert "gdt_tune.clinical.event_scoring" in recipe
    assert not {m for m in recipe if _is(m, TOOLS)}, sorted(m for m in recipe if _is(m, TOOLS))
    for base in (m for m in graph if _is(m, ("gdt_tune.data", "gdt_tune.training", "gdt_tune.clinical",
                                             "gdt_tune.runtime"))):
        above = {m for m in _reached(graph, base) if _is(m, (*TOOLS, "gdt_tune.recipes", "gdt_tune.trained"))}
        assert not above, (base, sorted(above))
    assert not any(m.startswith("gdt_tune.recipes") for deps in graph.values() for m in deps)


def test_every_import_runs_down_the_layers_of_the_folder_list():
    """docs/architecture.md's folder list, top to bottom; ``gdt_tune`` (its lazy ``prompt``) aside."""
    graph = _graph()
    up = [(m, d) for m, deps in graph.items() for d in deps
          if _layer(m) is not None and _layer(d) is not None and _layer(d) < _layer(m)]
    assert not up, up
    documented = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert all(f"`{prefix.split('.')[1]}/`" in documented for prefix in LAYERS)


def test_the_package_root_holds_only_folders():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py"]


def test_the_markers_name_is_spelled_in_one_module():
    """Readers import ``training.step_dirs`` instead of spelling the format again."""
    spelled = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"\bCOMPLETE\b", node.value):
                spelled.add(_module(path))
    assert spelled == {"gdt_tune.training.step_dirs"}


def test_the_recipe_delegates():
    """torchtune's and torchtitan's trainers keep 10-13 methods; ours at most 18 (issue 36)."""
    path = PACKAGE / "recipes" / "full_finetune_fsdp_ckpt.py"
    tree = ast.parse(path.read_text())
    recipe = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FullFinetuneRecipe")
    methods = [n.name for n in recipe.body if isinstance(n, ast.FunctionDef)]
    assert len(methods) <= 18, methods
    assert len(path.read_text().splitlines()) <= 520
    assert len((PACKAGE / "training" / "checkpointing.py").read_text().splitlines()) <= 420
