"""The tolerant comparison of notebook outputs (utils/tools/nbcompare.py): numbers within the
tolerance pass, numbers beyond it and changed words fail with a readable report, and nbval
really uses it."""

import subprocess
import sys
import textwrap

import nbformat
import pytest

from utils.core.paths import REPO_ROOT
from utils.tools.nbcompare import Tolerance, compare_text, parse_tolerance

LOG = "Ep 1 (Step 000005): Train loss 6.452, Val loss 8.339, tokens seen 3,072\n"


def test_identical_output_matches():
    assert compare_text(LOG, LOG) == []


def test_a_last_digit_difference_passes_by_default():
    assert compare_text(LOG, LOG.replace("6.452", "6.453")) == []
    assert compare_text("tensor([7.4540e-05, 3.1061e-05])", "tensor([7.4541e-05, 3.1061e-05])") == []
    assert compare_text("mean: -0.0000", "mean: 0.0000") == []


def test_a_larger_difference_fails_with_a_readable_report():
    problems = compare_text(LOG, LOG.replace("6.452", "6.461"))
    assert len(problems) == 1
    assert "line 1, number 3: saved 6.452, new 6.461" in problems[0]
    assert "allowed 0.001" in problems[0] and "Train loss 6.461" in problems[0]


def test_whole_numbers_are_exact_by_default():
    assert compare_text("token IDs [15496, 11, 466]", "token IDs [15496, 11, 467]") != []
    assert compare_text(LOG, LOG.replace("3,072", "3,073")) != []


def test_a_declared_tolerance_widens_the_match():
    tolerance = parse_tolerance("# NBVAL_TOLERANCE rel=0.02 -- losses drift between CPUs\nx = 1")
    assert tolerance == Tolerance(rel=0.02)
    assert compare_text(LOG, LOG.replace("6.452", "6.521"), tolerance) == []  # 1.1%
    assert compare_text(LOG, LOG.replace("6.452", "6.652"), tolerance) != []  # 3.1%
    absolute = parse_tolerance("# NBVAL_TOLERANCE abs=0.5 -- rounded accuracies")
    assert compare_text("accuracy 87.50%", "accuracy 87.90%", absolute) == []
    assert compare_text("accuracy 87.50%", "accuracy 88.10%", absolute) != []


def test_a_changed_word_fails_even_within_the_tolerance():
    tolerance = Tolerance(rel=0.5)
    problems = compare_text("Every effort moves you forward", "Every effort moves you closer",
                            tolerance)
    assert len(problems) == 1 and "the words differ" in problems[0]
    assert compare_text("3 lines\nmore", "3 lines", tolerance) != []  # a missing line


def test_printed_tensors_count_as_numbers():
    saved = "tensor([[ 0.3374, -0.1778, -0.1690],\n        [ 0.9178,  1.5810,  1.3010]])"
    new = "tensor([[ 0.3375, -0.1778, -0.1690],\n        [ 0.9178,  1.5811,  1.3009]])"
    assert compare_text(saved, new) == []
    assert compare_text(saved, new.replace("0.9178", "0.9190")) != []


def test_column_alignment_and_sentence_ends():
    assert compare_text("loss     9.99 at the end.", "loss    10.00 at the end.",
                        Tolerance(abs=0.02)) == []
    assert compare_text("torch 2.13.0+cpu", "torch 2.14.0+cpu") != []  # versions are words


def test_bad_markers_are_errors():
    with pytest.raises(ValueError, match="needs rel"):
        parse_tolerance("# NBVAL_TOLERANCE wide please")
    with pytest.raises(ValueError, match="needs its reason"):
        parse_tolerance("# NBVAL_TOLERANCE rel=0.5")  # a wider tolerance must say why
    assert parse_tolerance("x = 1  # an ordinary cell") == Tolerance()


def run_nbval(tmp_path, source: str, saved: str, new_output_code: str):
    """Run nbval (with the course's plugin) on a one-cell notebook whose saved output is
    `saved`; the cell prints what `new_output_code` prints."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source + "\n" + new_output_code)
    cell.execution_count = 1
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=saved)]
    nb.cells = [cell]
    path = tmp_path / "check.ipynb"
    nbformat.write(nb, path)
    return subprocess.run([sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env",
                           "-p", "utils.tools.nbcompare", "-p", "no:cacheprovider", "-q",
                           "-c", str(tmp_path / "empty.ini"), str(path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)


@pytest.fixture
def ini(tmp_path):
    (tmp_path / "empty.ini").write_text("[pytest]\n")


def test_nbval_uses_the_tolerance(tmp_path, ini):
    code = 'print("Train loss 6.453, tokens seen 3,072")'
    ok = run_nbval(tmp_path, "", "Train loss 6.452, tokens seen 3,072\n", code)
    assert ok.returncode == 0, ok.stdout
    far = run_nbval(tmp_path, "", "Train loss 6.552, tokens seen 3,072\n", code)
    assert far.returncode != 0 and "saved 6.552, new 6.453" in far.stdout
    declared = run_nbval(tmp_path, "# NBVAL_TOLERANCE rel=0.02 -- for this test",
                         "Train loss 6.552, tokens seen 3,072\n", code)
    assert declared.returncode == 0, declared.stdout
    words = run_nbval(tmp_path, "# NBVAL_TOLERANCE rel=0.02 -- for this test",
                      "Val loss 6.452, tokens seen 3,072\n", code)
    assert words.returncode != 0 and "the words differ" in words.stdout


def test_the_course_loads_the_plugin():
    assert "-p utils.tools.nbcompare" in (REPO_ROOT / "pyproject.toml").read_text()
    markers = [line for path in (REPO_ROOT / "notebooks").rglob("*.ipynb")
               for cell in nbformat.read(path, as_version=4).cells
               for line in cell.source.splitlines() if "NBVAL_TOLERANCE" in line]
    for line in markers:  # every widened tolerance says why
        assert " -- " in line and len(line.split(" -- ", 1)[1].strip()) > 10, line
        parse_tolerance(line)


def test_report_is_short_for_long_outputs():
    saved = "\n".join(f"line {i} value {i}.000" for i in range(100))
    new = saved.replace(".000", ".500")
    problems = compare_text(saved, new)
    assert len(problems) <= 9 and problems[-1].startswith("...")
    assert textwrap.dedent(problems[0]).startswith("line 1, number 2")
