"""The notebook -> utils exporter, and that every generated module matches its notebook."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import nbformat
import pytest

from utils.tools.export import (GENERATED_MARKER, NOTEBOOKS_DIR, REPO_ROOT, UTILS_DIR,
                                ExportError, export_notebook, render_modules,
                                render_package_docstring, stale_modules)


def test_every_generated_module_matches_its_notebook():
    assert stale_modules() == [], "run `python -m utils.tools.export` and commit the result"


def test_the_package_tables_are_generated_from_the_code():
    assert (UTILS_DIR / "__init__.py").read_text() == render_package_docstring(), \
        "run `python -m utils.tools.export` and commit the result"
    text = render_package_docstring()
    assert "- `utils.fast` (notebooks/08_going_faster.ipynb): " in text
    assert "`utils.checkpoint` (notebooks/05_pretraining.ipynb, hand-written)" in text
    assert "`utils.cli.chat`: Chat with your instruction-finetuned model" in text


def test_every_generated_module_names_an_existing_notebook_that_exports_it():
    for module in UTILS_DIR.glob("*.py"):
        text = module.read_text(encoding="utf-8")
        if not text.startswith(GENERATED_MARKER):
            continue  # hand-written
        source = text.split("\n", 1)[0][len(GENERATED_MARKER):].split(" -- ")[0].strip()
        assert module in [r.path for r in render_modules(REPO_ROOT / source)], module.name


def test_a_hand_edited_module_is_detected(tmp_path):
    shutil.copytree(NOTEBOOKS_DIR, tmp_path / "notebooks")
    shutil.copytree(UTILS_DIR, tmp_path / "utils")
    assert stale_modules(tmp_path / "notebooks", tmp_path / "utils") == []
    text_py = tmp_path / "utils" / "text.py"
    text_py.write_text(text_py.read_text().replace("return len(self.input_ids)",
                                                   "return len(self.input_ids) - 1"))
    assert stale_modules(tmp_path / "notebooks", tmp_path / "utils") == [
        "utils/text.py (from 02_text_data.ipynb)"]


def make_notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A title")]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


HEAD = '#| default_exp toy\n"""A toy module."""\nimport math\n'


def test_module_layout_header_docstring_all_and_code(tmp_path):
    nb = make_notebook(tmp_path / "toy.ipynb", HEAD,
                       "print('not exported')",
                       "#| export\ndef area(r):\n    return math.pi * r * r",
                       "#| export\n_cache = {}\nclass Circle:\n    pass\nUNIT = 1.0")
    [rendered] = render_modules(nb, utils_dir=tmp_path / "utils")
    lines = rendered.source.splitlines()
    assert lines[0].startswith(f"{GENERATED_MARKER} toy.ipynb -- do not edit.")
    assert ast.get_docstring(ast.parse(rendered.source)) == "A toy module."
    assert '__all__ = ["area", "Circle", "UNIT"]' in lines  # no private names, no imports
    assert "not exported" not in rendered.source
    namespace: dict = {}
    exec(compile(rendered.source, "toy.py", "exec"), namespace)
    assert round(namespace["area"](1.0), 5) == 3.14159


def test_export_writes_and_refuses_hand_written_modules(tmp_path, capsys):
    nb = make_notebook(tmp_path / "toy.ipynb", HEAD, "#| export\ndef f():\n    return 1")
    [path] = export_notebook(nb, utils_dir=tmp_path)
    assert path == tmp_path / "toy.py" and path.read_text().startswith(GENERATED_MARKER)
    assert "utils/toy.py exports: f" in capsys.readouterr().out
    path.write_text('"""Hand-written."""\n')
    with pytest.raises(ExportError, match="hand-written module"):
        export_notebook(nb, utils_dir=tmp_path)
    assert path.read_text() == '"""Hand-written."""\n'  # nothing overwritten


@pytest.mark.parametrize("cells,message", [
    (["#| export\nx = 1"], "'#| export' cell before any '#| default_exp MODULE' cell"),
    (["#| default_exp toy\nimport math"], "start the '#| default_exp' cell with the module's"),
    ([HEAD, HEAD], "two '#| default_exp toy' cells"),
    (["#| default_exp not-a-name\n'''doc'''"], "must name a module"),
    ([HEAD, "#| export\ndef broken(:"], "not valid Python"),
])
def test_malformed_directives_are_clear_errors(tmp_path, cells, message):
    nb = make_notebook(tmp_path / "bad.ipynb", *cells)
    with pytest.raises(ExportError, match=message.replace("|", r"\|").replace("(", r"\(")):
        render_modules(nb, utils_dir=tmp_path)


def test_notebook_without_directives_exports_nothing(tmp_path):
    assert render_modules(make_notebook(tmp_path / "plain.ipynb", "x = 1")) == []


def test_one_notebook_can_fill_two_modules(tmp_path):
    nb = make_notebook(tmp_path / "two.ipynb", HEAD, "#| export\ndef f():\n    return 1",
                       '#| default_exp other\n"""Another."""', "#| export\ndef g():\n    return 2")
    first, second = render_modules(nb, utils_dir=tmp_path / "utils")
    assert (first.module, first.names, second.module, second.names) == ("toy", ["f"], "other", ["g"])
    assert "def g" not in first.source and "def f" not in second.source
