"""Standalone copies of the chapter notebooks for Colab and Kaggle (hand-written maintainer
tool; the README's "Colab and Kaggle" section says how learners use them).

    python -m utils.standalone           # (re)write standalone/*.ipynb
    python -m utils.standalone --check   # list copies that are out of date; exit 1 if any

A notebook uploaded on its own cannot `import utils`. Every chapter notebook starts with the
same setup cell (SETUP_CELL below): in a clone it changes nothing. A standalone copy is the
notebook with that cell's `COURSE_MODULES = None` replaced by the `utils` modules the notebook
needs (its imports and theirs, found by reading the code), zlib-compressed and base64-encoded,
and with its saved outputs cleared. Run there, the cell installs the packages Colab or Kaggle
lack (never torch) and writes the modules to ./utils. The copies are generated: never edit
them; `tests/test_standalone.py` fails when one is out of date.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import zlib
from pathlib import Path

import nbformat

from utils.paths import REPO_ROOT

__all__ = ["SETUP_CELL", "CHAPTER_NOTEBOOKS", "modules_needed", "build_standalone",
           "write_all", "stale_copies"]

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
STANDALONE_DIR = REPO_ROOT / "standalone"
CHAPTER_NOTEBOOKS = sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb"))
ALWAYS = ["__init__", "paths", "device", "download", "assets", "export"]  # setup + export cells
_IMPORT = re.compile(r"^\s*(?:from\s+utils\.(\w+)\s+import|import\s+utils\.(\w+))", re.M)
_PLACEHOLDER = "COURSE_MODULES = None"

SETUP_CELL = '''\
# NBVAL_IGNORE_OUTPUT
# Setup. In a clone of the course (after `pip install -r requirements.txt`) the `if` block is
# skipped. A standalone copy of this notebook (standalone/ in the repository, see the
# README's "Colab and Kaggle") carries the course modules it needs in COURSE_MODULES: it
# installs what Colab or Kaggle lack (never torch, they ship their own) and writes ./utils.
COURSE_MODULES = None
import os
try:
    import utils.paths  # the course package; in a standalone folder, written by a copy
    standalone = os.path.dirname(utils.paths.__file__) == os.path.abspath("utils")
except ImportError:
    standalone = True
if standalone:
    import base64, importlib, importlib.util, json, subprocess, sys, zlib
    if COURSE_MODULES is None:
        raise ModuleNotFoundError(
            "The course package `utils` is missing. In a clone of the course, run "
            "`pip install -r requirements.txt` at its root. On Colab or Kaggle, open the "
            "standalone copy of this notebook (standalone/ in the repository) instead.")
    needed = ["torch", "tiktoken", "safetensors", "tqdm", "numpy", "pandas", "matplotlib"]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    hosted = "google.colab" in sys.modules or "KAGGLE_KERNEL_RUN_TYPE" in os.environ
    if "torch" in missing or (missing and not hosted):
        raise ModuleNotFoundError(f"Install these first: pip install {' '.join(missing)} "
                                  "(for PyTorch, follow pytorch.org for your platform)")
    if missing:  # Colab or Kaggle: add only what the platform lacks
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    modules, written = json.loads(zlib.decompress(base64.b64decode(COURSE_MODULES))), []
    for path, source in modules.items():
        old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if old != source:
            if old is not None:
                os.replace(path, path + ".old")  # keep what was there
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(source)
            written.append(path)
    sys.path.insert(0, os.getcwd())
    if "utils.paths" not in sys.modules:
        sys.modules.pop("utils", None)  # another package called utils may have been imported
    importlib.invalidate_caches()
    import utils.paths
    print(f"{os.path.abspath('utils')}: {len(modules)} carried modules, {len(written)} written")
'''


def _imports(code: str) -> set[str]:
    return {a or b for a, b in _IMPORT.findall(code)}


def modules_needed(nb_path: Path) -> list[str]:
    """The `utils` modules a notebook imports or exports, with everything those import."""
    nb = nbformat.read(nb_path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    exported = set(re.findall(r"^#\| default_exp (\w+)", code, re.M))  # as if it had exported
    todo = _imports(code) | exported | set(ALWAYS)
    done: set[str] = set()
    while todo:
        name = todo.pop()
        path = REPO_ROOT / "utils" / f"{name}.py"
        if not path.is_file():
            raise FileNotFoundError(f"{nb_path.name} imports utils.{name}, but {path} is missing")
        done.add(name)
        if name != "__init__":  # its docstring table names every module
            todo |= _imports(path.read_text(encoding="utf-8")) - done
    return sorted(done)


def _encode(modules: list[str]) -> str:
    files = {f"utils/{m}.py": (REPO_ROOT / "utils" / f"{m}.py").read_text(encoding="utf-8")
             for m in modules}
    blob = json.dumps(files, sort_keys=True).encode("utf-8")
    return base64.b64encode(zlib.compress(blob, 9)).decode("ascii")


def _setup_index(nb, name: str) -> int:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            if not cell.source.startswith(SETUP_CELL):
                raise ValueError(f"{name}: the first code cell must start with the setup cell "
                                 f"(utils.standalone.SETUP_CELL)")
            return i
    raise ValueError(f"{name} has no code cell")


def build_standalone(nb_path: Path) -> str:
    """The text of the standalone copy of the notebook at `nb_path`."""
    nb = nbformat.read(nb_path, as_version=4)
    cell = nb.cells[_setup_index(nb, nb_path.name)]
    modules = modules_needed(nb_path)
    cell.source = cell.source.replace(
        _PLACEHOLDER, f"# Carried: utils/{{{','.join(modules)}}}.py (generated by "
        f"`python -m utils.standalone`; do not edit)\nCOURSE_MODULES = \"{_encode(modules)}\"", 1)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    nb.metadata["colab"] = {"provenance": []}  # lets Colab open it from GitHub without fuss
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
    """Write the standalone copy of every chapter notebook into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
            print(f"standalone/{name} is out of date: run python -m utils.standalone")
        return 1 if stale else 0
    for path in write_all():
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
