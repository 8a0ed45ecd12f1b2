"""Run the notebook tests under several CPU configurations (hand-written maintainer tool).

The saved outputs must hold on every learner's CPU: 1 to 16 threads, AVX2 laptops, AVX-512
and AMX servers. This runs `pytest` once per configuration, each in a fresh process with the
environment below, and prints one line per configuration:

    python -m utils.tools.configs                          # the whole suite, every configuration
    python -m utils.tools.configs --only 1-thread --only avx2   # some configurations
    python -m utils.tools.configs notebooks/03_attention.ipynb notebooks/solutions
    python -m utils.tools.configs --mirror ../shared/data  # offline, as CI runs

Configurations (more threads than cores is fine for this purpose):

    default      all cores, the best kernels PyTorch finds
    1-thread     OMP_NUM_THREADS=1
    4-threads    OMP_NUM_THREADS=4
    avx2         kernels restricted to AVX2, as on an older laptop
    no-vector    ATEN_CPU_CAPABILITY=default: no vector kernels in PyTorch's own operators

and, run only when asked for (`--only avx2-1-thread`, as .ci/run does), one thread with
AVX2-only kernels.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from utils.core.download import ENV_MIRROR, ENV_OFFLINE
from utils.core.paths import REPO_ROOT

__all__ = ["CONFIGURATIONS", "run_configuration", "main"]

CONFIGURATIONS: dict[str, dict[str, str]] = {
    "default": {},
    "1-thread": {"OMP_NUM_THREADS": "1"},
    "4-threads": {"OMP_NUM_THREADS": "4"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "no-vector": {"ATEN_CPU_CAPABILITY": "default"},
    # not one of the five: the second configuration .ci/run uses (an older laptop, 1 thread)
    "avx2-1-thread": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2",
                      "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
DEFAULT_RUN = ["default", "1-thread", "4-threads", "avx2", "no-vector"]
_SUMMARY = re.compile(r"=+ (.*? in [\d.]+s.*?) =+\s*$", re.M)


def run_configuration(name: str, targets: list[str], extra_env: dict[str, str] | None = None,
                      verbose: bool = False) -> tuple[bool, str]:
    """Run pytest on `targets` under configuration `name`; (passed, pytest's summary)."""
    env = {**os.environ, **CONFIGURATIONS[name], **(extra_env or {})}
    for variable in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                     "MKL_ENABLE_INSTRUCTIONS"):
        if variable not in CONFIGURATIONS[name] and variable not in (extra_env or {}):
            env.pop(variable, None)  # each configuration starts from the machine's default
    cmd = [sys.executable, "-m", "pytest", "-q", "-c", str(REPO_ROOT / "pyproject.toml"),
           "--rootdir", str(REPO_ROOT), *targets]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if verbose or result.returncode != 0:
        sys.stderr.write(result.stdout[-6000:] + result.stderr[-2000:])
    found = _SUMMARY.findall(result.stdout)
    summary = found[-1] if found else (result.stdout.strip().splitlines() or ["no output"])[-1]
    return result.returncode == 0, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the test suite under several CPU "
                                                 "configurations.")
    parser.add_argument("targets", nargs="*", default=[],
                        help="test files, notebooks or folders (default: the whole suite, "
                             "unit tests and every notebook, as plain `pytest` runs it)")
    parser.add_argument("--only", action="append", choices=list(CONFIGURATIONS), metavar="CONFIG",
                        help=f"run only this one of {', '.join(CONFIGURATIONS)} (repeatable)")
    parser.add_argument("--mirror", type=Path, help="offline mirror folder (turns offline on)")
    parser.add_argument("--verbose", action="store_true", help="show pytest's output")
    args = parser.parse_args(argv)
    extra = {}
    if args.mirror is not None:
        extra = {ENV_MIRROR: str(args.mirror.resolve()), ENV_OFFLINE: "1"}
    results = []
    for name in args.only or DEFAULT_RUN:
        start = time.perf_counter()
        passed, summary = run_configuration(name, args.targets, extra, args.verbose)
        minutes = (time.perf_counter() - start) / 60
        line = f"{name:<10} {'PASS' if passed else 'FAIL'}  {summary}  ({minutes:.1f} min)"
        print(line, flush=True)
        results.append(passed)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
