"""Imports run one way (docs/architecture.md): read from the source with ast, function-level
imports included, so that a lazy import cannot hide an arrow that runs back up."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gdt_tune"
TOOLS = ("gdt_tune.cli", "gdt_tune.eval", "gdt_tune.export", "gdt_tune.launcher", "gdt_tune.demo_assets")


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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
        graph[name] = found
    return graph


def _is(module: str, prefixes) -> bool:
    """``module`` is one of ``prefixes`` or inside one (``gdt_tune.clinical`` is not ``gdt_tune.cli``)."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


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
    assert "gdt_tune.training.checkpointing" in recipe and "gdt_tune.serving" in recipe  # the check sees imports
    assert "gdt_tune.clinical.event_scoring" in recipe
    assert not {m for m in recipe if _is(m, TOOLS)}, sorted(m for m in recipe if _is(m, TOOLS))
    for base in (m for m in graph if _is(m, ("gdt_tune.data", "gdt_tune.training", "gdt_tune.clinical"))):
        above = {m for m in _reached(graph, base) if _is(m, (*TOOLS, "gdt_tune.recipes"))}
        assert not above, (base, sorted(above))
    assert not any(m.startswith("gdt_tune.recipes") for deps in graph.values() for m in deps)
