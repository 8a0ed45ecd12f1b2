"""The re-execution tool (utils/tools/rerun.py): it saves exactly what a run prints, in the
notebook's folder, under the test settings, and leaves a notebook untouched when a cell fails."""

import os
import subprocess
import sys

import nbformat

from utils.core.paths import REPO_ROOT
from utils.tools.rerun import rerun_notebook


def make_notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)
    return path


def test_outputs_are_saved_from_the_notebooks_folder(tmp_path):
    (tmp_path / "here.txt").write_text("found")
    path = make_notebook(tmp_path / "nb.ipynb", "print(open('here.txt').read())",
                         "import os\nprint(os.environ.get('LLM_COURSE_FALLBACK'), "
                         "os.environ.get('LLM_COURSE_DEVICE'))", "6 * 7")
    result = subprocess.run([sys.executable, "-m", "utils.tools.rerun", str(path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items()
                                 if k not in ("LLM_COURSE_FALLBACK", "LLM_COURSE_DEVICE")})
    assert result.returncode == 0, result.stderr
    cells = nbformat.read(path, as_version=4).cells
    assert cells[0].outputs[0].text == "found\n"
    assert cells[1].outputs[0].text == "1 cpu\n"  # the stand-in on the CPU, as the tests run
    assert cells[2].outputs[0].data["text/plain"] == "42"
    assert [c.execution_count for c in cells] == [1, 2, 3]


def test_a_failing_notebook_is_left_untouched(tmp_path):
    path = make_notebook(tmp_path / "bad.ipynb", "print('fine')", "raise ValueError('broken')")
    before = path.read_bytes()
    try:
        rerun_notebook(path, timeout=120)
    except Exception as exc:  # nbclient's CellExecutionError
        assert "broken" in str(exc)
    else:
        raise AssertionError("the failing cell should have raised")
    assert path.read_bytes() == before


def test_cells_tagged_remove_output_run_but_keep_no_output(tmp_path):
    path = make_notebook(tmp_path / "t.ipynb", "x = 6 * 7\nprint('timing', x)", "print(x)")
    nb = nbformat.read(path, as_version=4)
    nb.cells[0].metadata["tags"] = ["nbval-ignore-output", "remove-output"]
    nbformat.write(nb, path)
    rerun_notebook(path, timeout=120)
    cells = nbformat.read(path, as_version=4).cells
    assert cells[0].outputs == [] and cells[1].outputs[0].text == "42\n"  # it did run


def test_every_cell_without_saved_output_is_ignored_by_nbval():
    for path in sorted((REPO_ROOT / "notebooks").rglob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if "remove-output" in cell.metadata.get("tags", []):
                assert "nbval-ignore-output" in cell.metadata["tags"], path.name
