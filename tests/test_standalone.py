"""Standalone notebooks (utils/tools/standalone.py): up to date, their setup cell a no-op in a
clone, and each runs in an empty folder with no repository, offline against the mirror."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from utils.core.download import ENV_MIRROR
from utils.core.paths import REPO_ROOT
from utils.tools.standalone import (BENCHMARK_FILES, CHAPTER_NOTEBOOKS, COPY_SETUP_CELL,
                                    SETUP_CELL, STANDALONE_DIR, build_standalone,
                                    modules_needed, stale_copies)

# Run top to bottom in every test run (15 seconds together); the others only with
# LLM_COURSE_STANDALONE_ALL=1 (they retrain models: 22 minutes on 2 CPU cores, 12 of them
# chapter 5's full run, which chapters 6, 7 and E need for their offline fallback).
ALWAYS_RUN = ["02_text_data.ipynb", "03_attention.ipynb", "04_gpt_model.ipynb"]
# Run up to their setup cell in every test run, then made to import every module they use
# and read every benchmark file they carry: the two chapters that use the most of the
# package, and chapter 11, which carries a saved run; nbval already runs their computations
# in the repository (chapter 8's copy takes 45 seconds top to bottom).
SETUP_RUN = ["08_going_faster.ipynb", "10_modern_architectures.ipynb", "11_reasoning_rl.ipynb"]
RUN_ALL = os.environ.get("LLM_COURSE_STANDALONE_ALL", "") == "1"

# Hides this checkout from the kernel: drops the editable-install finder and the repository
# from sys.path, so `import utils` fails there as it would on Colab.
HIDE_REPO = textwrap.dedent(f"""
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)
                        and "__editable__" not in getattr(type(f), "__module__", "")]
    sys.path[:] = [p for p in sys.path if not p.startswith({str(REPO_ROOT)!r})
                   or p.startswith(sys.prefix)]  # a .venv inside the clone stays usable
""")


def test_standalone_copies_are_up_to_date():
    assert stale_copies() == [], "run: python -m utils.tools.standalone"


def test_every_chapter_notebook_starts_with_the_setup_cell():
    for name in CHAPTER_NOTEBOOKS:
        nb = nbformat.read(REPO_ROOT / "notebooks" / name, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert first.source.startswith(SETUP_CELL), name


def test_modules_needed_follow_imports():
    needed = modules_needed(REPO_ROOT / "notebooks" / "05_pretraining.ipynb")
    assert {"model", "attention", "text", "train", "generation", "checkpoint",
            "core/download", "core/paths", "tools/export"} <= set(needed)
    assert "cli/stand_in" in needed  # a command its text names (the stand-in of chapter 6 on)
    needed = modules_needed(REPO_ROOT / "notebooks" / "04_gpt_model.ipynb")  # names no command
    assert "fast" not in needed and "lora" not in needed and "classify" not in needed
    assert "lora" in modules_needed(REPO_ROOT / "notebooks" / "appendix_E_lora.ipynb")


def test_setup_cell_is_a_no_op_in_a_clone(tmp_path):
    nb = nbformat.read(REPO_ROOT / "notebooks" / "04_gpt_model.ipynb", as_version=4)
    setup = next(c for c in nb.cells if c.cell_type == "code").source
    code = setup + "\nimport utils\nprint(utils.__file__)\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "LLM_COURSE_DEVICE": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(REPO_ROOT / "utils" / "__init__.py")
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing installed


def test_a_standalone_copy_carries_readable_modules():
    nb = nbformat.reads(build_standalone(REPO_ROOT / "notebooks" / "04_gpt_model.ipynb"),
                        as_version=4)
    written = {c.source.split("\n", 1)[0].removeprefix("%%writefile ")
               for c in nb.cells if c.cell_type == "code" and c.source.startswith("%%writefile")}
    assert written == {f"utils/{m}.py" for m in
                       modules_needed(REPO_ROOT / "notebooks" / "04_gpt_model.ipynb")}
    model_cell = next(c.source for c in nb.cells if c.source.startswith("%%writefile utils/model.py"))
    assert model_cell.split("\n", 1)[1] == (REPO_ROOT / "utils" / "model.py").read_text().rstrip()
    setup = next(i for i, c in enumerate(nb.cells) if c.source.startswith(COPY_SETUP_CELL))
    assert all(not c.source.startswith("%%writefile") for c in nb.cells[setup:])  # before it
    assert "pip install -r requirements.txt" not in nb.cells[setup].source


def test_a_copy_says_only_what_is_true_where_it_runs():
    for name in CHAPTER_NOTEBOOKS:
        copy = nbformat.reads(build_standalone(REPO_ROOT / "notebooks" / name), as_version=4)
        text = "\n".join(c.source for c in copy.cells if c.cell_type == "markdown")
        assert "saved output" not in text.lower(), name  # a copy has no outputs
        assert "Worked solutions are in `solutions/" not in text, name
        if "Worked solutions" in text:
            assert "the course's repository, in `notebooks/solutions/" in text, name
        assert all("standalone" not in c.metadata for c in copy.cells), name
        carried = {c.source.split("\n", 1)[0].removeprefix("%%writefile ")
                   for c in copy.cells if c.source.startswith("%%writefile benchmarks/")}
        assert carried == {f"benchmarks/{b}" for b in BENCHMARK_FILES.get(name, [])}, name
        code = "\n".join(c.source for c in copy.cells if c.cell_type == "code"
                         and not c.source.startswith("%%writefile"))
        assert ("benchmarks" in code) == bool(carried), name  # what it reads, it carries
        assert "The next cell writes the `#| export` cells" not in text, name  # nothing to export
        modules = {c.source.split("\n", 1)[0].removeprefix("%%writefile utils/").removesuffix(".py")
                   for c in copy.cells if c.source.startswith("%%writefile utils/")}
        named = set(re.findall(r"-m utils\.cli\.(\w+)", text))
        assert {f"cli/{n}" for n in named} <= modules, name  # a command it names, it can run
        for tool in set(re.findall(r"-m utils\.tools\.(\w+)", text)) - {"export"}:
            assert f"tools/{tool}" in modules or re.search(  # or it says where the tool is
                rf"utils\.tools\.{tool}[^`]*` \(a tool in the course's repository\)", text), (name, tool)


def _run_standalone(name: str, folder: Path, check_after_setup: str | None = None
                    ) -> nbformat.NotebookNode:
    """Execute a copy in `folder` with the repository hidden; with `check_after_setup`, only
    its cells up to the setup cell, then that code."""
    site = folder.parent / "hide_repo"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HIDE_REPO)
    nb = nbformat.read(STANDALONE_DIR / name, as_version=4)
    if check_after_setup is not None:
        setup = next(i for i, c in enumerate(nb.cells) if c.source.startswith(COPY_SETUP_CELL))
        nb.cells = nb.cells[:setup + 1] + [nbformat.v4.new_code_cell(check_after_setup)]
    env = {**os.environ, "PYTHONPATH": str(site), "LLM_COURSE_OFFLINE": "1",
           "LLM_COURSE_DEVICE": "cpu", "LLM_COURSE_FALLBACK": "1"}
    env.pop("LLM_COURSE_DATA", None)
    env.pop("LLM_COURSE_CHECKPOINTS", None)
    assert env.get(ENV_MIRROR), "set LLM_COURSE_MIRROR to the offline data mirror"
    client = NotebookClient(nb, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(folder)}})
    old_env = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    return nb


@pytest.fixture(scope="module")
def course_folder(tmp_path_factory):
    """One empty folder shared by the standalone runs, as a Colab session's /content is."""
    return tmp_path_factory.mktemp("colab") / "content"


@pytest.mark.skipif(not os.environ.get(ENV_MIRROR), reason="needs the offline data mirror")
@pytest.mark.parametrize("name", [n for n in CHAPTER_NOTEBOOKS if n in ALWAYS_RUN or RUN_ALL])
def test_standalone_notebook_runs_in_an_empty_folder(name, course_folder):
    course_folder.mkdir(exist_ok=True)
    nb = _run_standalone(name, course_folder)
    written = {p.relative_to(course_folder / "utils").with_suffix("").as_posix()
               for p in (course_folder / "utils").rglob("*.py")}
    assert set(modules_needed(REPO_ROOT / "notebooks" / name)) <= written
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert errors == []


@pytest.mark.skipif(not os.environ.get(ENV_MIRROR), reason="needs the offline data mirror")
@pytest.mark.parametrize("name", [n for n in SETUP_RUN if not RUN_ALL])
def test_standalone_copy_imports_what_it_uses_in_an_empty_folder(name, course_folder):
    course_folder.mkdir(exist_ok=True)
    modules = modules_needed(REPO_ROOT / "notebooks" / name)
    check = (f"import importlib, json, pathlib\n"
             f"for m in {modules!r}:\n"
             f"    importlib.import_module('utils.' + m.replace('/', '.'))\n"
             f"for b in {BENCHMARK_FILES.get(name, [])!r}:\n"
             f"    json.loads(pathlib.Path('benchmarks', b).read_text())\n"
             f"import utils\n"
             f"print(pathlib.Path(utils.__file__).parent.parent == pathlib.Path.cwd())")
    nb = _run_standalone(name, course_folder, check_after_setup=check)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert errors == []
    assert nb.cells[-1].outputs[-1]["text"].strip() == "True"  # the copy's own utils
