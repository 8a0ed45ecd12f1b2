"""The package's shape: imports point one way (infrastructure <- earlier chapters <- later
chapters <- commands and tools), no import circles, no private names across modules, and the
early chapters know nothing of chapter 8."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from utils.core.paths import REPO_ROOT
from utils.tools.export import COURSE_ORDER, module_notebook

UTILS = REPO_ROOT / "utils"
NOTEBOOKS = REPO_ROOT / "notebooks"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(UTILS.rglob("*.py"))}


def utils_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported utils module, names taken from it) for every import anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("utils"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("utils")]
    return found


def layer_of(name: str) -> str:
    for layer in ("core", "cli", "tools"):
        if name.startswith(f"utils.{layer}"):
            return layer
    return "package" if name == "utils" else "chapter"


def chapter_of(name: str, path: Path) -> str | None:
    """The notebook a chapter module belongs to; None for the package, core, cli and tools."""
    if layer_of(name) != "chapter":
        return None
    return module_notebook(path) or "unknown"


def test_every_chapter_module_belongs_to_a_known_chapter():
    for name, path in all_modules().items():
        chapter = chapter_of(name, path)
        if chapter is not None:
            assert chapter in COURSE_ORDER, f"{name}: add its notebook to COURSE_ORDER ({chapter})"


def test_imports_point_from_later_to_earlier_only():
    modules = all_modules()
    wrong = []
    for name, path in modules.items():
        layer, chapter = layer_of(name), chapter_of(name, path)
        for target, _ in utils_imports(path):
            if target not in modules:
                wrong.append(f"{name} imports {target}, which does not exist")
                continue
            target_layer = layer_of(target)
            if layer == "core" and target_layer != "core":
                wrong.append(f"{name} (infrastructure) imports {target}")
            elif layer == "chapter" and target_layer in ("cli", "tools", "package"):
                wrong.append(f"{name} (a chapter) imports {target} ({target_layer})")
            elif layer == "chapter" and target_layer == "chapter":
                target_chapter = chapter_of(target, modules[target])
                if COURSE_ORDER.index(target_chapter) > COURSE_ORDER.index(chapter):
                    wrong.append(f"{name} ({chapter}) imports {target} from a later chapter "
                                 f"({target_chapter})")
    assert wrong == []


def test_no_import_circles():
    modules = all_modules()
    graph = {name: {t for t, _ in utils_imports(path) if t in modules and t != name}
             for name, path in modules.items()}
    graph = {k: {t for t in v if not k.startswith(t + ".")} for k, v in graph.items()}  # parents
    state: dict[str, str] = {}
    circles = []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_no_module_imports_another_modules_private_names():
    private = [f"{name} imports {target}.{n}" for name, path in all_modules().items()
               for target, names in utils_imports(path) for n in names
               if n.startswith("_") and target != name]
    assert private == []


def notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("notebook", sorted(NOTEBOOKS.rglob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_import_only_public_names(notebook):
    private = re.findall(r"from utils[\w.]* import \(?([^)\n]*_\w+)", notebook_code(notebook))
    names = [n.strip() for group in private for n in group.split(",") if n.strip().startswith("_")]
    assert names == [], f"{notebook.name} imports private names"


LATER_CHAPTER_WORDS = re.compile(r"\bimpl\b|use_cache|bf16|bfloat16|autocast|KV cache|"
                                 r"key-value cache|torch\.compile|utils\.fast|CachedGPT", re.I)


@pytest.mark.parametrize("path", ["utils/model.py", "utils/train.py", "utils/generation.py",
                                  "notebooks/04_gpt_model.ipynb", "notebooks/05_pretraining.ipynb"])
def test_chapters_4_and_5_know_nothing_of_chapter_8(path):
    text = (REPO_ROOT / path).read_text(encoding="utf-8")
    if path.endswith(".ipynb"):
        cells = json.loads(text)["cells"]
        text = "\n".join("".join(c["source"]) for c in cells)  # code and prose, not outputs
    assert LATER_CHAPTER_WORDS.findall(text) == []


def test_no_function_in_utils_is_longer_than_60_lines():
    long = [f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for path in all_modules().values()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert long == []


# A model's context length is in its config, where every model (GPT-2, Llama, a wrapper with
# a cache) has it; asking GPTModel's position table would work for GPTModel only.
CONTEXT_FROM_INTERNALS = re.compile(r"pos_emb\.(weight\.shape|num_embeddings)")


def test_the_context_length_is_asked_through_the_config():
    readers = [f"{name}: {match.group(0)}" for name, path in all_modules().items()
               for match in CONTEXT_FROM_INTERNALS.finditer(path.read_text(encoding="utf-8"))]
    readers += [f"{nb.name}: {match.group(0)}" for nb in sorted(NOTEBOOKS.rglob("*.ipynb"))
                for match in CONTEXT_FROM_INTERNALS.finditer(notebook_code(nb))]
    assert readers == []
