"""Comparing a notebook cell's fresh output with its saved output, with a tolerance for
numbers (hand-written maintainer tool), and the pytest plugin that makes nbval use it.

nbval compares outputs character by character, but the last digits of floating-point results
differ between CPUs, thread counts and kernels. Here an output matches its saved version when
its words are identical and every number in it agrees within a tolerance:

- by default, whole numbers exactly and decimals to within one unit of their last printed
  digit (a saved "6.452" accepts 6.451 to 6.453; "7.4540e-05" accepts a difference of 1e-9);
- a cell whose numbers legitimately drift further declares a wider tolerance in a comment of
  its own, with the reason, which then applies to every number in that cell:

      # NBVAL_TOLERANCE rel=0.02 abs=0.01 -- the losses of a long run drift between CPUs

Words are compared after collapsing runs of spaces (numbers of another width shift aligned
columns); line breaks count. Torch's printed tensors are just numbers between brackets.

`pyproject.toml` loads the plugin (`-p utils.tools.nbcompare`); it wraps nbval's own check
and only looks closer at outputs that nbval found different.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["Tolerance", "parse_tolerance", "compare_text", "TOLERANCE_MARKER"]

TOLERANCE_MARKER = "NBVAL_TOLERANCE"
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
                     r"(?!\d|\.\d|,\d{3})")
_SPACES = re.compile(r"[ \t]+")


@dataclass(frozen=True)
class Tolerance:
    """How far a number may move: `rel` (of its size) or `abs`, whichever allows more, and
    never less than one unit of the saved number's last printed decimal."""

    rel: float = 0.0
    abs: float = 0.0

    @property
    def is_default(self) -> bool:
        return self.rel == 0.0 and self.abs == 0.0

    def allowed(self, saved: str, saved_value: float, new_value: float) -> float:
        return max(self.abs, self.rel * max(abs(saved_value), abs(new_value)), _last_digit(saved))

    def __str__(self) -> str:
        if self.is_default:
            return "default (whole numbers exact, decimals to their last digit)"
        return ", ".join(f"{k}={v:g}" for k, v in (("rel", self.rel), ("abs", self.abs)) if v)


def _last_digit(number: str) -> float:
    """One unit of the last printed decimal of `number`; 0 for whole numbers."""
    mantissa, _, exponent = number.lower().partition("e")
    if "." not in mantissa:
        return 0.0 if not exponent else 10.0 ** int(exponent)
    decimals = len(mantissa.split(".")[1])
    return 10.0 ** (int(exponent or 0) - decimals)


def parse_tolerance(source: str) -> Tolerance:
    """The tolerance a cell declares with `# NBVAL_TOLERANCE rel=... abs=... -- reason` (else
    the default); a marker without its reason is an error."""
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("#") and TOLERANCE_MARKER in text:
            settings = dict(re.findall(r"\b(rel|abs)=([0-9.eE+-]+)", text))
            if not settings:
                raise ValueError(f"{TOLERANCE_MARKER} needs rel=... and/or abs=..., got {text!r}")
            reason = text.partition(" -- ")[2].strip()
            if not reason:
                raise ValueError(f"{TOLERANCE_MARKER} needs its reason after ' -- ' (why the "
                                 f"numbers of this cell drift), got {text!r}")
            values = {k: float(v) for k, v in settings.items()}
            if any(not math.isfinite(v) or v < 0 for v in values.values()):
                raise ValueError(f"{TOLERANCE_MARKER} values must be non-negative: {text!r}")
            return Tolerance(**values)
    return Tolerance()


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


# --- the pytest plugin -------------------------------------------------------------------

def _flatten(cell, outputs, skip_compare) -> dict[str, list]:
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
                    flat.setdefault(name, []).append(cell.sanitize(item))
    return flat


def _tolerant_compare(cell, test, ref, skip_compare) -> list[str]:
    tolerance = parse_tolerance(cell.cell.source)
    new, saved = _flatten(cell, test, skip_compare), _flatten(cell, ref, skip_compare)
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


def pytest_configure(config):
    """Wrap nbval's comparison: what it finds equal stays equal; the rest is compared again
    with the numeric tolerance."""
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval missing: nothing to wrap
        return
    if getattr(IPyNbCell.compare_outputs, "_tolerant", False):
        return
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

    compare_outputs._tolerant = True
    IPyNbCell.compare_outputs = compare_outputs
