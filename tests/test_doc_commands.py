"""Every command line README.md and docs/*.md show (fenced blocks and inline code) names only flags
and config keys that exist: `gdt-tune SUB` flags from its argparse parser (torchrun's for `train`),
`python bench/X.py` and `python -m gdt_tune.X` flags from the script's own `add_argument` calls,
and `key=value` / `~key` overrides from the typed config and the component's signature. A renamed
flag or key cannot leave a stale doc. (That the documented commands *run*: CI's bench/smoke.py and
the tests that launch them.)"""

import argparse
import ast
import inspect
import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = re.compile(r"(?:^|[;&|(]\s*|\s)((?:gdt-tune|python3? bench/\S+\.py|python3? -m gdt_tune[\w.]*|tune run)\b.*)")


def _command_lines(text: str) -> list[str]:
    """The lines of fenced blocks (continuations joined) and the inline code spans."""
    lines, fenced = [], re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    for block in fenced:
        lines += block.replace("\\\n", " ").splitlines()
    outside = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", outside)]  # a span may wrap a line
    return lines


def commands() -> list[tuple[str, str]]:
    """(where, command) of every command a doc shows."""
    found = []
    for doc in DOCS:
        for line in _command_lines(doc.read_text()):
            if line.lstrip().startswith("#"):  # a comment line
                continue
            line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
            for part in re.split(r"&&|;|\|\|?", line):
                m = PROGRAMS.search(part)
                if m:
                    found.append((doc.name, m.group(1).strip()))
    return found


def _flags_in_source(path: Path) -> set[str]:
    """Option strings of the ``add_argument`` calls in a script (ast: nothing is run)."""
    flags = {"-h", "--help"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from gdt_tune.cli.main import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _torchrun_flags() -> set[str]:
    from torch.distributed.run import get_args_parser

    return {s for a in get_args_parser()._actions for s in a.option_strings}


def _config(name: str | None):
    from gdt_tune.cli.main import resolve_config

    try:
        return OmegaConf.load(resolve_config(name or "tiny_gdt_cpu"))
    except (ValueError, OSError, SystemExit):  # a user's own file (my.yaml): the 8B config's components
        return OmegaConf.load(resolve_config("llama3_1_8b_gdt_full"))


def override_problem(key: str, cfg, overrides: dict[str, str]) -> str | None:
    """Why ``key`` (of ``key=value`` or ``~key``) is not a key of this recipe's config, or None."""
    from gdt_tune.training.config import COMPONENTS, _component, known_keys

    top, _, rest = key.lstrip("~").partition(".")
    if top not in known_keys():
        return f"'{top}' is not a config key"
    if not rest or rest == "_component_" or top not in COMPONENTS:
        return None
    path = overrides.get(f"{top}._component_") or (cfg.get(top) or {}).get("_component_")
    if path is None:
        return None
    params = inspect.signature(_component(path, top)).parameters
    arg = rest.split(".")[0]
    if arg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return f"'{arg}' is not an argument of {path}"


def problems(command: str) -> list[str]:
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    words = [w for w in words if not re.fullmatch(r"\.\.\.|…|\[.*\]|key=value", w)]  # placeholders
    out, overrides, config = [], [], None
    if words[:2] == ["tune", "run"]:
        flags, rest = _torchrun_flags() | {"--config"}, words[2:]
    elif words[0] == "gdt-tune" or words[1:3] == ["-m", "gdt_tune.cli.main"]:
        rest = words[1:] if words[0] == "gdt-tune" else words[3:]
        if not rest or rest[0].startswith("-"):
            return []
        subs = _subparsers()
        if rest[0] not in subs:
            return [f"no subcommand {rest[0]!r}"]
        sub, rest = subs[rest[0]], rest[1:]
        flags = {s for a in sub._actions for s in a.option_strings} | {"-h", "--help"}
        if words[0] == "gdt-tune" and command.split()[1] == "train":
            flags |= _torchrun_flags() | {"--config"}
    elif words[1] == "-m":
        path = REPO.joinpath(*words[2].split(".")).with_suffix(".py")
        if not path.is_file():
            return [f"no module {words[2]}"]
        flags, rest = _flags_in_source(path), words[3:]
    else:
        path = REPO / words[1]
        if not path.is_file():
            return [f"no script {words[1]}"]
        flags, rest = _flags_in_source(path), words[2:]
    for i, word in enumerate(rest):
        if word.startswith("-") and not re.fullmatch(r"-\d.*", word):
            flag = word.split("=", 1)[0]
            if flag not in flags:
                out.append(f"unknown flag {flag}")
            if flag == "--config":
                config = word.split("=", 1)[1] if "=" in word else (rest[i + 1] if i + 1 < len(rest) else None)
        elif re.fullmatch(r"~?[A-Za-z_][\w.]*(=.*)?", word) and ("=" in word or word.startswith("~")):
            overrides.append(word)
    if overrides and not (words[:2] == ["python", "bench/smoke.py"] or "bench/" in " ".join(words[:2])):
        cfg = _config(config)
        given = dict(w.split("=", 1) for w in overrides if "=" in w)
        out += [f"{w}: {p}" for w in overrides if (p := override_problem(w.split("=", 1)[0], cfg, given))]
    return out


def test_the_docs_show_commands_of_every_kind():
    shown = commands()
    kinds = {c.split()[0] if not c.startswith("python") else " ".join(c.split()[:2])[:16] for _, c in shown}
    assert len(shown) > 40 and {"gdt-tune", "tune"} <= kinds and any(k.startswith("python bench/") for k in kinds)


@pytest.mark.parametrize("where, command", sorted(set(commands())))
def test_a_documented_command_names_only_flags_and_keys_that_exist(where, command):
    assert problems(command) == [], f"{where}: {command}"


def test_the_check_sees_a_renamed_flag_and_a_mistyped_key():
    assert problems("gdt-tune evaluate --checkpoint X --data D --max-sample 3") == ["unknown flag --max-sample"]
    assert problems("gdt-tune train --nproc_per_node 2 --config tiny_gdt_cpu bacth_size=2") == [
        "bacth_size=2: 'bacth_size' is not a config key"]
    assert problems("gdt-tune train --config tiny_gdt_cpu dataset.data_file=/d") == [
        "dataset.data_file=/d: 'data_file' is not an argument of gdt_tune.datasets.cgdb_instruct_dataset"]
    assert problems("python bench/recipe_step.py --repeats 2") == ["unknown flag --repeats"]
    assert problems("python -m gdt_tune.data.synthetic --patient 3 --out d") == ["unknown flag --patient"]
    assert problems("gdt-tune train --nproc_per_node 2 --config tiny_gdt_cpu ~lr_scheduler save_every_n_steps=5") == []


def test_every_test_the_docs_name_exists():
    """`tests/test_x.py::test_name` in README.md and docs/*.md: the file defines that test."""
    refs = {m for doc in DOCS for m in re.findall(r"tests/(test_\w+\.py)::(\w+)", doc.read_text())}
    assert len(refs) > 10
    missing = [f"{f}::{name}" for f, name in sorted(refs)
               if not re.search(rf"^def {name}\(", (REPO / "tests" / f).read_text(), flags=re.M)]
    assert missing == []
