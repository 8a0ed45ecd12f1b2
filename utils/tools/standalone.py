"""Standalone copies of the chapter notebooks for Colab and Kaggle (hand-written maintainer
tool; the README's "Colab and Kaggle" section says how learners use them).

    python -m utils.tools.standalone           # (re)write standalone/*.ipynb
    python -m utils.tools.standalone --check   # list copies that are out of date; exit 1 if any

A notebook uploaded on its own cannot `import utils`. Its standalone copy is the notebook with
a few cells put in front of the chapter: a short note, a cell that installs what the platform
lacks (never PyTorch, which Colab and Kaggle ship), and one `%%writefile` cell per module of
`utils` that the chapter needs (its imports and theirs, found by reading the code), holding
the module's source as readable text, and the saved benchmark results the chapter prints.
Saved outputs are cleared, and what is said only of the clone changes: the setup cell says
where `utils` comes from, solutions are pointed to in the repository, and a cell whose
metadata has `"standalone": {"text": ...}` takes that text (an empty one drops the cell; for
sentences about the saved outputs, which a copy does not have). The copies are generated:
never edit them; `tests/test_standalone.py` fails when one is out of date.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

from utils.core.paths import REPO_ROOT
from utils.tools.nbcompare import IGNORE_TAG, cell_problems

__all__ = ["SETUP_CELL", "COPY_SETUP_CELL", "CHAPTER_NOTEBOOKS", "BENCHMARK_FILES",
           "modules_needed", "build_standalone", "write_all", "stale_copies"]

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
STANDALONE_DIR = REPO_ROOT / "standalone"
CHAPTER_NOTEBOOKS = sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb"))
# What every notebook's setup and export cells import, whatever else it needs.
ALWAYS = ["__init__", "core/__init__", "core/paths", "core/device", "tools/__init__",
          "tools/export"]
# The saved benchmark results a chapter prints (paths below benchmarks/), carried by its copy.
BENCHMARK_FILES = {
    "02b_bpe_from_scratch.ipynb": ["bpe/cpu-2core.json"],
    "08_going_faster.ipynb": sorted(p.name for p in (REPO_ROOT / "benchmarks").glob("*.json")),
    "09_gpt_to_llama.ipynb": ["09_gpt_to_llama/gpt2-vs-llama-the-verdict.json"],
    "11_reasoning_rl.ipynb": ["11_reasoning/full_run.json"],
}
PACKAGES = ["torch", "tiktoken", "safetensors", "tqdm", "numpy", "pandas", "matplotlib"]
_IMPORT = re.compile(r"^\s*(?:from\s+utils\.([\w.]+)\s+import|import\s+utils\.([\w.]+))", re.M)
# A command the chapter's text tells the learner to run (`python -m utils.cli.chat`): its module
# is carried too, so that the command runs in the copy (in a cell, after `!`).
_COMMAND = re.compile(r"-m utils\.(cli\.\w+)")

# The first code cell of every chapter notebook starts with these lines. What it prints (the
# PyTorch build, the device, package versions) differs between machines, so the cell is tagged
# IGNORE_TAG in its metadata, with the reason (utils/tools/nbcompare.py), never in its code.
SETUP_CELL = '''\
# Setup: run this cell and read on. It imports the course package `utils` (installed by
# `pip install -r requirements.txt`) and picks where to compute: an NVIDIA GPU (CUDA), else
# an Apple GPU (MPS), else the CPU.
from utils.core.device import get_device

device = get_device()'''
# The same cell in a standalone copy, where `utils` comes from the cells above it.
COPY_SETUP_CELL = '''\
# Setup: run this cell and read on. It imports the course package `utils` (written into
# ./utils by the cells above) and picks where to compute: an NVIDIA GPU (CUDA), else an
# Apple GPU (MPS), else the CPU.
from utils.core.device import get_device

device = get_device()'''
_SOLUTIONS = re.compile(r"Worked solutions are in `solutions/([\w.]+)`")
# A maintainer tool the text names as the source of a figure (`python -m utils.tools.NAME`):
# a copy does not carry the tools (they import every chapter), so it says where the tool is.
_TOOL = re.compile(r"`python -m utils\.tools\.(\w+)([^`]*)`")
_TOOL_IN_A_COPY = r"`python -m utils.tools.\1\2` (a tool in the course's repository)"
# The sentence before a notebook's export cell, which in a copy has nothing to export.
_EXPORT = re.compile(r"The next cell writes the `#\| export` cells[^(]*\([^)]*\)\.")
_EXPORT_IN_A_COPY = ("In a clone of the course, the next cell writes the `#| export` cells into "
                     "the module; in this copy the module came with the cells at the top, so "
                     "the cell only says that there is nothing to export here.")

_NOTE = """\
**Running this copy on Colab or Kaggle.** The chapter starts after the setup below. This
copy carries the parts of the course package `utils` that the chapter needs, one module per
cell: run the next cells in order (they install what the platform lacks and write the
modules into `./utils`) and go on to the chapter. You need not read the modules now: a
chapter's module is built, step by step, in the chapter named in its first lines; the ones
under `core/` and `tools/` (downloads, paths, devices, exporting) are the course's plumbing,
written by hand and built in no chapter. A command the chapter mentions (`python -m
utils.cli...`) runs in a code cell of this copy with `!` in front of it (the chat command
reads what you type: run it where you have a terminal). On Colab
and Kaggle each notebook runs on a machine of its own: a file that an earlier chapter saved
(a checkpoint) must be downloaded from that notebook's files and uploaded here, into the same
folder. In a clone of the course, open `notebooks/` instead, where `utils` is already
installed and every chapter finds what the earlier ones saved.
"""

_INSTALL = """\
# Installs what this platform lacks (PyTorch comes with Colab and Kaggle) and makes ./utils.
import importlib.util, os, subprocess, sys

missing = [name for name in {packages!r} if importlib.util.find_spec(name) is None]
if "torch" in missing:
    raise ModuleNotFoundError("PyTorch is missing: install it for your platform (pytorch.org)")
if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
for folder in {folders!r}:
    os.makedirs(folder, exist_ok=True)
print("ready:", "installed " + ", ".join(missing) if missing else "nothing to install")
"""


def _imports(code: str) -> set[str]:
    return {(a or b).replace(".", "/") for a, b in _IMPORT.findall(code)}


def _module_path(name: str) -> Path:
    return REPO_ROOT / "utils" / f"{name}.py"


def modules_needed(nb_path: Path) -> list[str]:
    """The `utils` modules (as paths below utils/, e.g. "core/download") a notebook imports or
    exports or whose commands its text names, with everything those import and the
    packages' `__init__` files."""
    nb = nbformat.read(nb_path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    exported = set(re.findall(r"^#\| default_exp (\w+)", code, re.M))  # as if it had exported
    commands = {m.replace(".", "/") for c in nb.cells for m in _COMMAND.findall(c.source)}
    todo = _imports(code) | exported | commands | set(ALWAYS)
    done: set[str] = set()
    while todo:
        name = todo.pop()
        if not _module_path(name).is_file():
            raise FileNotFoundError(f"{nb_path.name} needs utils/{name}.py, which is missing")
        done.add(name)
        if "/" in name:
            todo |= {name.split("/")[0] + "/__init__"} - done
        if not name.endswith("__init__"):  # a package's docstring names every module
            todo |= _imports(_module_path(name).read_text(encoding="utf-8")) - done
    return sorted(done, key=lambda n: (n.count("/") == 0, n))  # infrastructure first


def _setup_index(nb, name: str, setup: str = SETUP_CELL) -> int:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            if not cell.source.startswith(setup):
                raise ValueError(f"{name}: the first code cell must start with the setup cell "
                                 f"(utils.tools.standalone.SETUP_CELL)")
            if IGNORE_TAG not in cell.metadata.get("tags", []) or cell_problems(cell):
                raise ValueError(f"{name}: the setup cell's output differs between machines: "
                                 f"tag it {IGNORE_TAG!r} with its reason (metadata nbcompare)")
            return i
    raise ValueError(f"{name} has no code cell")


def _as_in_a_copy(nb, index: int) -> None:
    """Change, in place, what the notebook says that is true only in a clone."""
    nb.cells[index].source = COPY_SETUP_CELL + nb.cells[index].source[len(SETUP_CELL):]
    kept = []
    for cell in nb.cells:
        alternative = cell.metadata.pop("standalone", None)
        if alternative is not None:
            if not alternative["text"]:
                continue  # a sentence about saved outputs, which a copy has none of
            cell.source = alternative["text"]
        if cell.cell_type == "markdown":
            cell.source = _SOLUTIONS.sub(r"Worked solutions are in the course's repository, in "
                                         r"`notebooks/solutions/\1`", cell.source)
            cell.source = _EXPORT.sub(_EXPORT_IN_A_COPY, cell.source)
            cell.source = _TOOL.sub(_TOOL_IN_A_COPY, cell.source)
        kept.append(cell)
    nb.cells = kept


def build_standalone(nb_path: Path) -> str:
    """The text of the standalone copy of the notebook at `nb_path`."""
    nb = nbformat.read(nb_path, as_version=4)
    index = _setup_index(nb, nb_path.name)
    _as_in_a_copy(nb, index)
    index = _setup_index(nb, nb_path.name, COPY_SETUP_CELL)
    modules = modules_needed(nb_path)
    benchmarks = [f"benchmarks/{b}" for b in BENCHMARK_FILES.get(nb_path.name, [])]
    folders = sorted({f"utils/{m}".rsplit("/", 1)[0] for m in modules}
                     | {b.rsplit("/", 1)[0] for b in benchmarks})
    carried = [nbformat.v4.new_markdown_cell(_NOTE.strip()),
               nbformat.v4.new_code_cell(_INSTALL.format(packages=PACKAGES, folders=folders).strip())]
    for name in modules:
        source = _module_path(name).read_text(encoding="utf-8")
        carried.append(nbformat.v4.new_code_cell(f"%%writefile utils/{name}.py\n{source}".rstrip()))
    for path in benchmarks:  # the saved results the chapter prints and discusses
        source = (REPO_ROOT / path).read_text(encoding="utf-8")
        carried.append(nbformat.v4.new_code_cell(f"%%writefile {path}\n{source}".rstrip()))
    nb.cells[index:index] = carried
    for c in nb.cells:
        c.pop("id", None)  # fresh ids would make every build differ
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    nb.metadata["colab"] = {"provenance": []}  # lets Colab open it from GitHub without fuss
    nb.nbformat_minor = 4  # no cell ids: stable files
    return nbformat.writes(nb) + "\n"


def stale_copies(out_dir: Path = STANDALONE_DIR) -> list[str]:
    """Names of standalone copies that are missing or differ from a fresh build."""
    stale = []
    for name in CHAPTER_NOTEBOOKS:
        target = Path(out_dir) / name
        fresh = build_standalone(NOTEBOOKS_DIR / name)
        if not target.is_file() or target.read_text(encoding="utf-8") != fresh:
            stale.append(name)
    return stale


def write_all(out_dir: Path = STANDALONE_DIR) -> list[Path]:
    """Write the standalone copy of every chapter notebook into `out_dir` (and remove copies
    whose notebook is gone)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.ipynb"):
        if old.name not in CHAPTER_NOTEBOOKS:
            old.unlink()
    written = []
    for name in CHAPTER_NOTEBOOKS:
        (out_dir / name).write_text(build_standalone(NOTEBOOKS_DIR / name), encoding="utf-8")
        written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build standalone notebooks for Colab/Kaggle.")
    parser.add_argument("--check", action="store_true", help="only report out-of-date copies")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_copies()
        for name in stale:
            print(f"standalone/{name} is out of date: run python -m utils.tools.standalone")
        return 1 if stale else 0
    for path in write_all():
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
