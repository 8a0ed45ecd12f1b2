"""Comparing a notebook cell's fresh output with its saved output, with a tolerance for
numbers (hand-written maintainer tool), and the pytest plugin that makes nbval use it.

nbval compares outputs character by character, but the last digits of floating-point results
differ between CPUs, thread counts and kernels. Here an output matches its saved version when
its words are identical and every number in it agrees within a tolerance:

- whole numbers ("16", "3,072") exactly;
- decimals to within one unit of their last printed digit (a saved "6.452" accepts 6.451 to
  6.453);
- numbers in exponent notation by their significant digits: to within one unit of the last
  digit of the mantissa where that unit is at most 1% of the number ("7.4540e-05" accepts a
  difference of 1e-9), else exactly ("1e-05" does not accept 2e-05, nor "2.5e-03" 2.6e-03).

The test settings of a cell live in its metadata, never in its code (learners read the code):

- an output that cannot be the same on another computer (download progress, paths, timings,
  text generated after training) is not compared: nbval's tag "nbval-ignore-output", with
  the reason under "nbcompare", e.g.

      "tags": ["nbval-ignore-output"],
      "nbcompare": {"reason": "prints download progress and a local path"}

- a cell whose numbers legitimately drift further widens the tolerance, with the reason:

      "nbcompare": {"rel": 0.02, "abs": 0.01, "reason": "the losses of a long run drift ..."}

  `rel` (of the number's size) and `abs` widen the decimals of that cell (whichever allows
  more); whole numbers stay exact unless `whole` (an absolute allowance, e.g. 1 for a count
  of correct answers after training) says how far they may move.

`cell_problems` says what is wrong with a cell's settings (an `NBVAL_` comment marker in the
code, an ignore tag without a reason, unknown keys, negative values, a missing reason); the
plugin fails such a cell, and `tests/test_nbcompare.py` checks every notebook.

`output_differences(saved, new, tolerance, sanitize)` compares a whole cell's outputs as the
plugin does, for tools that run notebooks themselves (`utils/tools/gpu_check.py`).

Words are compared after collapsing runs of spaces (numbers of another width shift aligned
columns); line breaks count. Torch's printed tensors are just numbers between brackets.

`pyproject.toml` loads the plugin (`-p utils.tools.nbcompare`). nbval offers no extension
point for the comparison, so the plugin wraps `IPyNbCell.compare_outputs` of the nbval version
that requirements.txt pins (`NBVAL_VERSION`) and only looks closer at outputs that nbval found
different; if nbval's internals are not the ones it was written against, it stops the test
run with a usage error instead of silently comparing character by character.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import pytest

__all__ = ["Tolerance", "compare_text", "flatten_outputs", "output_differences", "cell_problems",
           "cell_tolerance", "nbval_mismatch", "IGNORE_TAG", "UNCHECKED_TAGS", "METADATA_KEY",
           "NBVAL_VERSION", "NBVAL_SKIP_COMPARE"]

NBVAL_VERSION = "0.11.0"  # the nbval whose IPyNbCell.compare_outputs the plugin wraps
IGNORE_TAG = "nbval-ignore-output"  # nbval's own tag: run the cell, do not compare its output
UNCHECKED_TAGS = (IGNORE_TAG, "nbval-skip")  # tags that leave a cell's output unchecked
# The output keys nbval leaves out of the comparison (IPyNbFile.skip_compare, without --nbdime)
NBVAL_SKIP_COMPARE = ("metadata", "traceback", "prompt_number", "output_type", "name",
                      "execution_count", "application/vnd.jupyter.widget-view+json",
                      "image/png", "image/jpeg")
METADATA_KEY = "nbcompare"  # cell.metadata["nbcompare"]: rel, abs, whole, reason
_WIDENING_KEYS = ("rel", "abs", "whole")
MIN_REASON_WORDS = 4  # "varies" or "flaky" says nothing; a reason says what varies and why
_MARKER = re.compile(r"^\s*#.*\b(NBVAL_[A-Z_]+|PYTEST_VALIDATE_IGNORE_OUTPUT)\b", re.M)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
                     r"(?!\d|\.\d|,\d{3})")
_SPACES = re.compile(r"[ \t]+")


@dataclass(frozen=True)
class Tolerance:
    """How far a number may move. Decimals: `rel` (of their size) or `abs`, whichever allows
    more, and never less than the default of their notation. Whole numbers: `whole`."""

    rel: float = 0.0
    abs: float = 0.0
    whole: int = 0

    @property
    def is_default(self) -> bool:
        return self.rel == 0.0 and self.abs == 0.0 and self.whole == 0

    def allowed(self, saved: str, saved_value: float, new_value: float) -> float:
        """How far `new_value` may be from the number printed as `saved`."""
        if _is_whole(saved):
            return float(self.whole)
        return max(self.abs, self.rel * max(abs(saved_value), abs(new_value)),
                   _last_digit(saved, saved_value))

    def __str__(self) -> str:
        if self.is_default:
            return "default (whole numbers exact, decimals to their last digit)"
        return ", ".join(f"{k}={v:g}" for k, v in
                         (("rel", self.rel), ("abs", self.abs), ("whole", self.whole)) if v)


def _is_whole(number: str) -> bool:
    return "." not in number and "e" not in number.lower()


def _last_digit(number: str, value: float) -> float:
    """The default allowance of a decimal: one unit of its last printed digit; in exponent
    notation only where that unit is at most 1% of the number (else 0: equal digits)."""
    mantissa, _, exponent = number.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    unit = 10.0 ** (int(exponent or 0) - decimals)
    if exponent and unit > 0.01 * abs(value):
        return 0.0  # "1e-05" or "2.5e-03": one unit of the last digit is too much of it
    return unit


# --- a cell's settings: metadata, checked ------------------------------------------------

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _reason_problem(reason, what: str) -> str | None:
    if not isinstance(reason, str) or not reason.strip():
        return f"{what} needs a reason: metadata {METADATA_KEY}.reason, saying why"
    if len(reason.split()) < MIN_REASON_WORDS:
        return (f"{what} needs a reason of substance (what varies and why, at least "
                f"{MIN_REASON_WORDS} words), got {reason!r}")
    return None


def _value_problems(settings: dict) -> list[str]:
    """Unknown keys and values out of range in a cell's `nbcompare` mapping."""
    problems = []
    unknown = sorted(set(settings) - {"reason", *_WIDENING_KEYS})
    if unknown:
        problems.append(f"metadata {METADATA_KEY} has unknown keys {unknown} (allowed: rel, "
                        f"abs, whole, reason)")
    for key in ("rel", "abs"):
        value = settings.get(key, 0)
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            problems.append(f"metadata {METADATA_KEY}.{key} must be a non-negative number, "
                            f"got {value!r}")
    whole = settings.get("whole", 0)
    if not isinstance(whole, int) or isinstance(whole, bool) or whole < 0:
        problems.append(f"metadata {METADATA_KEY}.whole must be a non-negative whole number, "
                        f"got {whole!r}")
    return problems


def _settings_problems(settings, unchecked: list[str]) -> list[str]:
    """What is wrong with a cell's `nbcompare` metadata, given its unchecked-output tags."""
    if not isinstance(settings, dict):
        return [f"metadata {METADATA_KEY} must be a mapping, got {settings!r}"]
    problems = _value_problems(settings)
    widening = [key for key in _WIDENING_KEYS if key in settings]
    if unchecked and widening:
        problems.append(f"tag {unchecked[0]!r} leaves the output unchecked, so "
                        f"{METADATA_KEY}.{widening[0]} means nothing: keep one of the two")
    if not unchecked and not widening:
        problems.append(f"metadata {METADATA_KEY} widens nothing (no rel, abs or whole) and the "
                        f"cell has no tag {IGNORE_TAG!r}: it explains nothing")
    what = f"tag {unchecked[0]!r}" if unchecked else f"a widened tolerance ({METADATA_KEY})"
    reason = _reason_problem(settings.get("reason"), what)
    return problems + ([reason] if reason else [])


def cell_problems(cell) -> list[str]:
    """What is wrong with a code cell's test settings ([] = nothing): a comment marker in
    its code, an unchecked output without a reason, malformed `nbcompare` metadata."""
    if cell.get("cell_type") != "code":
        return []
    source = cell.get("source", "")
    source = "".join(source) if isinstance(source, list) else source
    problems = [f"the code holds a comment marker {marker}: test settings belong in the cell's "
                f"metadata (tag {IGNORE_TAG!r}, {METADATA_KEY!r})"
                for marker in _MARKER.findall(source)]
    metadata = cell.get("metadata", {})
    tags = metadata.get("tags", [])
    if not isinstance(tags, list):
        return problems + [f"metadata tags must be a list, got {tags!r}"]
    unchecked = [tag for tag in UNCHECKED_TAGS if tag in tags]
    if METADATA_KEY in metadata:
        return problems + _settings_problems(metadata[METADATA_KEY], unchecked)
    if unchecked:
        problems.append(f"tag {unchecked[0]!r} needs a reason: metadata {METADATA_KEY}.reason, "
                        f"saying why the output cannot be compared")
    return problems


def cell_tolerance(cell) -> Tolerance:
    """The tolerance a code cell declares in its metadata (else the default); malformed
    settings are an error (ValueError) naming the problem."""
    problems = cell_problems(cell)
    if problems:
        raise ValueError("; ".join(problems))
    settings = cell.get("metadata", {}).get(METADATA_KEY, {})
    return Tolerance(rel=float(settings.get("rel", 0.0)), abs=float(settings.get("abs", 0.0)),
                     whole=settings.get("whole", 0))


# --- comparing two outputs ---------------------------------------------------------------

def _split(line: str) -> tuple[list[str], list[str]]:
    """The words between the numbers of `line` (spaces collapsed), and the numbers."""
    numbers = _NUMBER.findall(line)
    words = [_SPACES.sub(" ", w) for w in _NUMBER.split(line)]
    return words, numbers


def _value(number: str) -> float:
    return float(number.replace(",", ""))


def compare_text(saved: str, new: str, tolerance: Tolerance = Tolerance(),
                 max_reports: int = 8) -> list[str]:
    """The differences between two outputs beyond `tolerance`, as readable lines ([] = match)."""
    saved_lines, new_lines = saved.split("\n"), new.split("\n")
    problems = []
    if len(saved_lines) != len(new_lines):
        problems.append(f"the output has {len(new_lines)} lines, the saved one {len(saved_lines)}")
    for n, (old, fresh) in enumerate(zip(saved_lines, new_lines), start=1):
        (old_words, old_numbers), (new_words, new_numbers) = _split(old), _split(fresh)
        if old_words != new_words or len(old_numbers) != len(new_numbers):
            problems.append(f"line {n}: the words differ\n    saved: {old.strip()!r}\n"
                            f"    new:   {fresh.strip()!r}")
        else:
            for k, (a, b) in enumerate(zip(old_numbers, new_numbers), start=1):
                va, vb = _value(a), _value(b)
                allowed = tolerance.allowed(a, va, vb)
                if abs(va - vb) > allowed * (1 + 1e-9):
                    problems.append(f"line {n}, number {k}: saved {a}, new {b} (differs by "
                                    f"{abs(va - vb):.3g}; allowed {allowed:.3g})\n"
                                    f"    saved: {old.strip()!r}\n    new:   {fresh.strip()!r}")
        if len(problems) >= max_reports:
            problems.append("... (more differences not shown)")
            break
    return problems


def flatten_outputs(outputs, sanitize=None,
                    skip_compare=NBVAL_SKIP_COMPARE) -> dict[str, list]:
    """nbval's view of a cell's outputs: {stream name or mime type: [sanitized values]}."""
    from nbval.plugin import transform_streams_for_comparison

    flat: dict[str, list] = {}
    for output in transform_streams_for_comparison(outputs):
        for key, value in output.items():
            if key in skip_compare:
                continue
            items = value.items() if key == "data" else [(key, value)]
            for name, item in items:
                if name not in skip_compare:
                    flat.setdefault(name, []).append(sanitize(item) if sanitize else item)
    return flat


def output_differences(saved, new, tolerance: Tolerance = Tolerance(), sanitize=None,
                       skip_compare=NBVAL_SKIP_COMPARE) -> list[str]:
    """The differences between a cell's saved and new outputs (lists of output records, their
    streams coalesced as nbval does) beyond `tolerance`, as readable lines ([] = match).
    `sanitize(text)` normalises each value first, as nbval's sanitize patterns do."""
    saved, new = (flatten_outputs(outputs, sanitize, skip_compare) for outputs in (saved, new))
    if set(new) != set(saved):
        return [f"the output has parts {sorted(new)}, the saved one {sorted(saved)}"]
    problems = []
    for key in saved:
        if len(new[key]) != len(saved[key]):
            problems.append(f"{key}: {len(new[key])} outputs, saved {len(saved[key])}")
            continue
        for old, fresh in zip(saved[key], new[key]):
            if old == fresh:
                continue
            if isinstance(old, str) and isinstance(fresh, str):
                problems += [f"{key}, {p}" for p in compare_text(old, fresh, tolerance)]
            else:
                problems.append(f"{key}: differs")
    if problems:
        problems.insert(0, f"Outputs differ beyond the tolerance ({tolerance}):")
    return problems


# --- the pytest plugin -------------------------------------------------------------------

def _tolerant_compare(cell, test, ref, skip_compare) -> list[str]:
    try:
        tolerance = cell_tolerance(cell.cell)
    except ValueError as err:
        return [f"Malformed test settings in this cell's metadata: {err}"]
    return output_differences(ref, test, tolerance, cell.sanitize, skip_compare)


def nbval_mismatch() -> str | None:
    """Why nbval is not the one this plugin wraps (None: it is): the method it replaces,
    with its signature, and the pieces of nbval the replacement uses."""
    try:
        from nbval import plugin
    except ImportError as err:
        return f"nbval cannot be imported ({err})"
    cell_class = getattr(plugin, "IPyNbCell", None)
    if cell_class is None:
        return "nbval.plugin has no IPyNbCell"
    method = getattr(cell_class, "compare_outputs", None)
    method = getattr(method, "_exact", method)  # the original, once the plugin wrapped it
    if not inspect.isfunction(method):
        return "nbval.plugin.IPyNbCell has no method compare_outputs"
    signature = str(inspect.signature(method))
    if signature != "(self, test, ref, skip_compare=None)":
        return f"IPyNbCell.compare_outputs has the signature {signature}"
    try:
        runtest, compare = inspect.getsource(cell_class.runtest), inspect.getsource(method)
    except (OSError, TypeError) as err:
        return f"nbval's source cannot be read to check it ({err})"
    if "self.compare_outputs(" not in runtest:
        return "IPyNbCell.runtest no longer calls self.compare_outputs"
    if "comparison_traceback" not in compare:
        return "IPyNbCell.compare_outputs no longer reports through comparison_traceback"
    for name in ("sanitize", "raise_cell_error"):
        if not callable(getattr(cell_class, name, None)):
            return f"nbval.plugin.IPyNbCell has no method {name}"
    if not callable(getattr(plugin, "transform_streams_for_comparison", None)):
        return "nbval.plugin has no transform_streams_for_comparison"
    return None


def pytest_configure(config):
    """Wrap nbval's comparison: what it finds equal stays equal; the rest is compared again
    with the numeric tolerance. Stops the run if nbval is not the version it expects."""
    problem = nbval_mismatch()
    if problem:
        raise pytest.UsageError(
            f"utils.tools.nbcompare wraps nbval {NBVAL_VERSION}'s IPyNbCell.compare_outputs, "
            f"and the nbval installed here does not fit: {problem}. Install the pinned "
            f"version (pip install nbval=={NBVAL_VERSION}, as requirements.txt says), or adapt "
            f"utils/tools/nbcompare.py to the new nbval and update the pin.")
    try:
        installed = version("nbval")
    except PackageNotFoundError:  # importable, but installed without its metadata
        installed = "of unknown version"
    if installed != NBVAL_VERSION:
        config.issue_config_time_warning(pytest.PytestConfigWarning(
            f"nbval {installed} is installed; utils.tools.nbcompare was written against nbval "
            f"{NBVAL_VERSION} (pinned in requirements.txt)"), stacklevel=2)
    from nbval.plugin import IPyNbCell

    if getattr(IPyNbCell.compare_outputs, "_exact", None) is not None:
        return  # already wrapped
    exact = IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, skip_compare=None):
        if exact(self, test, ref, skip_compare):
            return True
        problems = _tolerant_compare(self, test, ref, skip_compare or self.parent.skip_compare)
        if problems:
            self.comparison_traceback = problems + ["", "nbval's own report:"] + \
                self.comparison_traceback
            return False
        self.comparison_traceback = []
        return True

    compare_outputs._exact = exact
    IPyNbCell.compare_outputs = compare_outputs


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A notebook cell whose test settings are malformed fails (after it ran, so that the
    cells after it find what it defines), whether or not its output is compared."""
    result = yield
    from nbval.plugin import IPyNbCell

    if isinstance(item, IPyNbCell):
        problems = cell_problems(item.cell)
        if problems:
            pytest.fail(f"Cell {item.cell_num}: malformed test settings: "
                        + "; ".join(problems), pytrace=False)
    return result

