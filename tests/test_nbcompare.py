"""The tolerant comparison of notebook outputs (utils/tools/nbcompare.py): numbers within the
tolerance pass, numbers beyond it and changed words fail with a readable report, whole numbers
stay exact and exponent notation keeps its significant digits unless a cell's metadata says
otherwise, malformed test settings are refused, every notebook keeps its settings in metadata,
nbval is the pinned version whose internals the plugin wraps, and nbval really uses it."""

import inspect
import re
import subprocess
import sys
import textwrap
from importlib.metadata import version

import nbformat
import pytest
from nbval.plugin import IPyNbCell

from utils.core.paths import REPO_ROOT
from utils.tools import nbcompare
from utils.tools.nbcompare import (IGNORE_TAG, NBVAL_VERSION, Tolerance, cell_problems,
                                   cell_tolerance, compare_text, nbval_mismatch)

LOG = "Ep 1 (Step 000005): Train loss 6.452, Val loss 8.339, tokens seen 3,072\n"
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb")) + \
    sorted((REPO_ROOT / "notebooks" / "solutions").glob("*.ipynb"))
REASON = "the losses of a long run drift between CPUs"


def cell(source: str = "x = 1", **metadata) -> nbformat.NotebookNode:
    """A code cell with `metadata` (e.g. tags=[...], nbcompare={...})."""
    new = nbformat.v4.new_code_cell(source)
    new.metadata.update(metadata)
    return new


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


def test_a_declared_tolerance_widens_the_decimals():
    tolerance = cell_tolerance(cell(nbcompare={"rel": 0.02, "reason": REASON}))
    assert tolerance == Tolerance(rel=0.02)
    assert compare_text(LOG, LOG.replace("6.452", "6.521"), tolerance) == []  # 1.1%
    assert compare_text(LOG, LOG.replace("6.452", "6.652"), tolerance) != []  # 3.1%
    absolute = cell_tolerance(cell(nbcompare={"abs": 0.5, "reason": "accuracies of a few "
                                                                    "finetuning steps"}))
    assert compare_text("accuracy 87.50%", "accuracy 87.90%", absolute) == []
    assert compare_text("accuracy 87.50%", "accuracy 88.10%", absolute) != []


def test_whole_numbers_stay_exact_under_a_declared_tolerance():
    # Before: rel/abs widened every number, so 13,294,592 parameters could move by ~400,000
    # and "of 16 pairs" could read 9 to 23.
    wide = Tolerance(rel=0.03)
    parameters = "model: 2 blocks of width 128, 13,294,592 parameters; epochs: 15"
    assert compare_text(parameters, parameters.replace("13,294,592", "13,294,593"), wide) != []
    assert compare_text(parameters, parameters.replace("15", "16"), Tolerance(abs=7)) != []
    pairs = "accuracy: before DPO 62.5%, after 62.5% (10 -> 10 of 16 pairs)"
    dpo = Tolerance(rel=0.05, abs=7)
    assert compare_text(pairs, pairs.replace("16 pairs", "17 pairs"), dpo) != []
    assert compare_text(pairs, pairs.replace("after 62.5%", "after 68.8%"), dpo) == []  # decimal
    assert compare_text(LOG, LOG.replace("3,072", "3,100"), Tolerance(rel=0.5, abs=100)) != []


def test_whole_says_how_far_whole_numbers_may_move():
    tolerance = cell_tolerance(cell(nbcompare={"rel": 0.05, "abs": 7, "whole": 1,
                                               "reason": "a pair near a zero margin can flip"}))
    assert tolerance == Tolerance(rel=0.05, abs=7, whole=1)
    pairs = "(10 -> 10 of 16 pairs)"
    assert compare_text(pairs, "(10 -> 11 of 16 pairs)", tolerance) == []
    assert compare_text(pairs, "(10 -> 12 of 16 pairs)", tolerance) != []
    assert "whole=1" in str(tolerance)


def test_exponent_notation_compares_significant_digits():
    # Before: one unit of the single mantissa digit was allowed, so 1e-05 matched 2e-05 (100%).
    assert compare_text("lr 1e-05", "lr 2e-05") != []
    assert compare_text("grad 2.5e-03", "grad 2.6e-03") != []  # a unit is 4% of the number
    assert compare_text("grad 2.5e-03", "grad 2.5e-03") == []
    assert compare_text("tensor([7.4540e-05])", "tensor([7.4541e-05])") == []  # 0.001%
    assert compare_text("tensor([7.4540e-05])", "tensor([7.4542e-05])") != []
    assert compare_text("lr 1e-05", "lr 1.2e-05", Tolerance(rel=0.2)) == []  # declared: wider


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


def test_well_formed_settings_pass():
    assert cell_problems(cell("x = 1  # an ordinary cell")) == []
    assert cell_tolerance(cell()) == Tolerance()
    ignored = cell(tags=[IGNORE_TAG, "remove-output"],
                   nbcompare={"reason": "live timing in seconds on this machine"})
    assert cell_problems(ignored) == []
    assert cell_problems(nbformat.v4.new_markdown_cell("# NBVAL_IGNORE_OUTPUT")) == []


@pytest.mark.parametrize("bad, problem", [
    (cell(tags=[IGNORE_TAG]), "needs a reason"),
    (cell(tags=[IGNORE_TAG], nbcompare={"reason": "flaky"}), "reason of substance"),
    (cell(tags=["nbval-skip"]), "needs a reason"),
    (cell(nbcompare={"rel": 0.02}), "needs a reason"),
    (cell(nbcompare={"rel": 0.02, "reason": "  "}), "needs a reason"),
    (cell(nbcompare={"rell": 0.02, "reason": REASON}), "unknown keys ['rell']"),
    (cell(nbcompare={"rel": -0.02, "reason": REASON}), "rel must be a non-negative number"),
    (cell(nbcompare={"abs": "0.5", "reason": REASON}), "abs must be a non-negative number"),
    (cell(nbcompare={"abs": float("inf"), "reason": REASON}), "non-negative number"),
    (cell(nbcompare={"whole": 1.5, "reason": REASON}), "whole must be a non-negative whole"),
    (cell(nbcompare={"whole": -1, "reason": REASON}), "whole must be a non-negative whole"),
    (cell(nbcompare={"reason": REASON}), "widens nothing"),
    (cell(nbcompare=[0.02]), "must be a mapping"),
    (cell(tags=[IGNORE_TAG], nbcompare={"rel": 0.1, "reason": REASON}), "means nothing"),
    (cell(tags="nbval-ignore-output"), "tags must be a list"),
])
def test_malformed_settings_are_refused(bad, problem):
    problems = cell_problems(bad)
    assert any(problem in p for p in problems), problems
    with pytest.raises(ValueError, match=re.escape(problem)):
        cell_tolerance(bad)


@pytest.mark.parametrize("source", [
    "# NBVAL_IGNORE_OUTPUT\nx = 1",
    "# NBVAL_TOLERANCE rel=0.02 -- losses drift between CPUs\nx = 1",
    "x = 1\n    #   NBVAL_SKIP",
    "# PYTEST_VALIDATE_IGNORE_OUTPUT\nx = 1",
])
def test_a_marker_comment_in_code_is_refused(source):
    # Before: the comment was how a cell was marked, in the code learners read.
    problems = cell_problems(cell(source))
    assert problems and "comment marker" in problems[0]


def test_every_notebook_keeps_its_test_settings_in_metadata():
    found = {"ignored": 0, "widened": 0}
    for path in NOTEBOOKS:
        for n, code in enumerate(nbformat.read(path, as_version=4).cells):
            if code.cell_type != "code":
                continue
            where = f"{path.relative_to(REPO_ROOT)}, cell {n}"
            assert "NBVAL_" not in "".join(line for line in code.source.splitlines()
                                           if line.lstrip().startswith("#")), where
            assert cell_problems(code) == [], where
            settings = code.metadata.get("nbcompare", {})
            found["ignored"] += IGNORE_TAG in code.metadata.get("tags", [])
            found["widened"] += any(k in settings for k in ("rel", "abs", "whole"))
    assert found["ignored"] > 50 and found["widened"] > 15, found  # the walk saw the notebooks


def test_nbval_is_the_pinned_version():
    pins = re.findall(r"^nbval==([\w.]+)", (REPO_ROOT / "requirements.txt").read_text(), re.M)
    assert pins == [NBVAL_VERSION], "requirements.txt must pin nbval==NBVAL_VERSION exactly"
    assert "-r requirements.txt" in (REPO_ROOT / "environment.yml").read_text()  # conda too
    assert version("nbval") == NBVAL_VERSION
    original = getattr(IPyNbCell.compare_outputs, "_exact", IPyNbCell.compare_outputs)
    assert list(inspect.signature(original).parameters) == ["self", "test", "ref",
                                                            "skip_compare"]
    assert nbval_mismatch() is None


def _changed_compare(self, test, ref, skip_compare=None, strict=True):
    return True


def _runtest_without_compare(self):
    pass


@pytest.mark.parametrize("name, replacement, problem", [
    ("compare_outputs", _changed_compare, "has the signature"),
    ("compare_outputs", None, "has no method compare_outputs"),
    ("runtest", _runtest_without_compare, "no longer calls self.compare_outputs"),
])
def test_the_plugin_refuses_an_nbval_it_does_not_know(monkeypatch, name, replacement, problem):
    # Before: the plugin wrapped whatever it found, or silently nothing.
    if replacement is None:
        monkeypatch.delattr(IPyNbCell, name)
    else:
        monkeypatch.setattr(IPyNbCell, name, replacement)
    with pytest.raises(pytest.UsageError, match=f"nbval {re.escape(NBVAL_VERSION)}") as err:
        nbcompare.pytest_configure(config=None)
    assert problem in str(err.value) and f"nbval=={NBVAL_VERSION}" in str(err.value)


def run_nbval(tmp_path, metadata: dict, saved: str, new_output_code: str, source: str = ""):
    """Run nbval (with the course's plugin) on a one-cell notebook whose saved output is
    `saved` and whose metadata is `metadata`; the cell prints what `new_output_code` prints."""
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell((source + "\n" if source else "") + new_output_code)
    code.metadata.update(metadata)
    code.execution_count = 1
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text=saved)]
    nb.cells = [code]
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
    declared = {"nbcompare": {"rel": 0.02, "reason": "for this test of the plugin"}}
    ok = run_nbval(tmp_path, {}, "Train loss 6.452, tokens seen 3,072\n", code)
    assert ok.returncode == 0, ok.stdout
    far = run_nbval(tmp_path, {}, "Train loss 6.552, tokens seen 3,072\n", code)
    assert far.returncode != 0 and "saved 6.552, new 6.453" in far.stdout
    wide = run_nbval(tmp_path, declared, "Train loss 6.552, tokens seen 3,072\n", code)
    assert wide.returncode == 0, wide.stdout
    words = run_nbval(tmp_path, declared, "Val loss 6.452, tokens seen 3,072\n", code)
    assert words.returncode != 0 and "the words differ" in words.stdout
    whole = run_nbval(tmp_path, declared, "Train loss 6.453, tokens seen 3,073\n", code)
    assert whole.returncode != 0 and "saved 3,073, new 3,072" in whole.stdout


def test_nbval_refuses_malformed_settings(tmp_path, ini):
    """One notebook, one kernel: a cell per case; each cell's verdict and report are read
    from pytest's summary."""
    code, same, other = 'print("Train loss 6.453")', "Train loss 6.453\n", "Train loss 9.999\n"
    cases = [  # (metadata, saved output, first line of code, verdict, what the report says)
        ({"nbcompare": {"rell": 0.02, "reason": "for this test of the plugin"}}, same, "",
         "FAILED", "unknown keys ['rell']"),  # fails even though the output is the saved one
        ({"tags": [IGNORE_TAG]}, other, "", "FAILED", "needs a reason"),
        ({}, same, "# NBVAL_IGNORE_OUTPUT", "FAILED", "comment marker NBVAL_IGNORE_OUTPUT"),
        ({"tags": [IGNORE_TAG], "nbcompare": {"reason": "for this test: an output that is "
                                                        "not compared"}}, other, "", "PASSED", ""),
    ]
    nb = nbformat.v4.new_notebook()
    for n, (metadata, saved, first_line, _, _) in enumerate(cases, start=1):
        code_cell = cell((first_line + "\n" if first_line else "") + code, **metadata)
        code_cell.execution_count = n
        code_cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=saved)]
        nb.cells.append(code_cell)
    path = tmp_path / "settings.ipynb"
    nbformat.write(nb, path)
    run = subprocess.run([sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env",
                          "-p", "utils.tools.nbcompare", "-p", "no:cacheprovider", "-rA",
                          "-c", str(tmp_path / "empty.ini"), str(path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    reports = re.split(r"_{3,} settings.ipynb::Cell (\d+) _{3,}", run.stdout)
    reports = dict(zip(reports[1::2], reports[2::2]))  # cell number -> its failure report
    for n, (_, _, _, verdict, message) in enumerate(cases):
        assert re.search(rf"^{verdict} settings.ipynb::Cell {n}\b", run.stdout, re.M), run.stdout
        if message:
            assert message in reports[str(n)], run.stdout


def test_the_course_loads_the_plugin():
    assert "-p utils.tools.nbcompare" in (REPO_ROOT / "pyproject.toml").read_text()


def test_report_is_short_for_long_outputs():
    saved = "\n".join(f"line {i} value {i}.000" for i in range(100))
    new = saved.replace(".000", ".500")
    problems = compare_text(saved, new)
    assert len(problems) <= 9 and problems[-1].startswith("...")
    assert textwrap.dedent(problems[0]).startswith("line 1, number 2")
