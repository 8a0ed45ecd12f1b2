"""The GPU check (hand-written maintainer tool): every chapter notebook run on CUDA and
compared with its saved CPU outputs, then the speed benchmark on the GPU, in one report.

    python -m utils.tools.gpu_check --mirror ../shared/data     # on a machine with an NVIDIA GPU
    python -m utils.tools.gpu_check notebooks/05_pretraining.ipynb --no-benchmark
    python -m utils.tools.gpu_check --dry-run notebooks/03_attention.ipynb   # the same, on the CPU

Each notebook runs as the tests run it (this environment's kernel, the notebook's folder,
`SAVED_OUTPUT_SETTINGS`) but with `LLM_COURSE_DEVICE=cuda`, and is never written back. Each
cell nbval compares is compared with its saved output (`utils.tools.nbcompare`) under the wider
of the cell's own tolerance and a GPU allowance (`--rel 0.05 --abs 0.02` for decimals; whole
numbers as the cell says unless `--whole`): on a GPU, dropout draws from another random
generator and kernels sum in another order, so trained numbers move by a few percent, while a
broken path moves them by far more or breaks the words. A hidden cell after each cell (kept
out of the history, leaving no names) reads the peak memory and resets it: CUDA's
`max_memory_allocated()`, on the CPU the kernel's peak resident size (Linux: VmHWM, reset via
/proc/self/clear_refs). The notebooks save checkpoints in `<out>/checkpoints`, a copy of
`checkpoints/`, whose printed paths are read as `checkpoints/...`.

The report, `report.md` and `report.json` in `--out` (default `gpu-check/`): the GPU, torch;
per notebook the wall time, peak memory, cells compared / matched / differing, the first
differences, the error of a cell that raised (the next notebook still runs), the three cells
with the largest peaks; the benchmark's tokens/s and MFU per row, compiled too. Exit status 0
only if every notebook passes and the benchmark ran; 2 for a bad argument, such as no CUDA
without `--dry-run`, which runs the same on the CPU with a benchmark of seconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import torch
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbval.kernel import CURRENT_ENV_KERNEL_NAME, NbvalKernelspecManager
from nbval.plugin import coalesce_streams, get_sanitize_patterns

from utils.core.device import ENV_DEVICE, describe_device, unavailable_reason
from utils.core.download import ENV_MIRROR, ENV_OFFLINE
from utils.core.paths import ENV_CHECKPOINTS, REPO_ROOT, checkpoint_dir, shown_path
from utils.core.runinfo import SAVED_OUTPUT_SETTINGS
from utils.tools.nbcompare import UNCHECKED_TAGS, Tolerance, cell_tolerance, output_differences

__all__ = ["GPU_ALLOWANCE", "SANITIZE_FILE", "NotebookCheck", "gpu_tolerance", "make_sanitizer",
           "compare_cell", "check_notebook", "run_speed_benchmark", "run_check", "format_report",
           "main"]

GPU_ALLOWANCE = Tolerance(rel=0.05, abs=0.02)  # a few percent: see the module docstring
DEFAULT_OUT = REPO_ROOT / "gpu-check"
DEFAULT_TIMEOUT = 600  # seconds one cell (and the benchmark) may take
SANITIZE_FILE = REPO_ROOT / "tests" / "nbval_sanitize.cfg"  # the one pyproject.toml gives nbval
SKIP_TAG = "nbval-skip"  # nbval does not even run these cells
TOP_CELLS = 3  # cells with the largest peaks, per notebook
SHOWN_DIFFERENCES = 5  # differing cells the Markdown report shows per notebook
GPU_BENCHMARK = ["--device", "cuda"]  # its CUDA defaults: batch 16 x 1024, a compiled row, MFU
DRY_RUN_BENCHMARK = ["--device", "cpu", "--quick", "--no-memory", "--no-profile", "--repeats",
                     "1", "--new-tokens", "8", "--matmul-size", "128"]  # seconds, on 2 cores
_PROBE_KEY, _PROBE_MARK = "gpu_check_probe", "gpu-check-peak"
_PROBE = '''\
def _gpu_check_peak(cuda):
    import json, os, sys
    if cuda:
        torch = sys.modules.get("torch")
        ready = torch is not None and torch.cuda.is_initialized()  # never start CUDA here
        peak = torch.cuda.max_memory_allocated() if ready else 0
        if ready:
            torch.cuda.reset_peak_memory_stats()
        return json.dumps({"bytes": peak, "per_cell": True})
    if os.path.exists("/proc/self/clear_refs"):  # Linux (ru_maxrss keeps the forking parent's)
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as f:  # the peak starts again from the present
            f.write("5")
        return json.dumps({"bytes": peak, "per_cell": True})
    try:  # elsewhere: the peak since the kernel started, never reset
        import resource
    except ImportError:  # Windows
        return json.dumps({"bytes": 0, "per_cell": False})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, else KiB
    return json.dumps({"bytes": peak * (1 if sys.platform == "darwin" else 1024),
                       "per_cell": False})
'''


def gpu_tolerance(own: Tolerance, allowance: Tolerance = GPU_ALLOWANCE) -> Tolerance:
    """The wider of a cell's own tolerance and the GPU allowance, setting by setting."""
    return Tolerance(rel=max(own.rel, allowance.rel), abs=max(own.abs, allowance.abs),
                     whole=max(own.whole, allowance.whole))


def make_sanitizer(replacements: tuple[tuple[str, str], ...] = ()):
    """nbval's sanitize patterns (SANITIZE_FILE), after plain `replacements`, as a function."""
    patterns = dict(get_sanitize_patterns(SANITIZE_FILE.read_text(encoding="utf-8")))

    def sanitize(value):
        if not isinstance(value, str):
            return value
        for old, new in replacements:
            value = value.replace(old, new)
        for regex, replace in patterns.items():
            value = re.sub(regex, replace, value)
        return value
    return sanitize


def compare_cell(saved_cell, new_outputs: list, allowance: Tolerance = GPU_ALLOWANCE,
                 sanitize=None) -> list[str] | None:
    """The differences of a code cell's new outputs from its saved ones ([] = match) under the
    GPU tolerance; None where nbval compares nothing (an unchecked tag, or never run)."""
    tags = saved_cell.metadata.get("tags", [])
    if any(tag in tags for tag in UNCHECKED_TAGS) or saved_cell.get("execution_count") is None:
        return None
    try:
        tolerance = gpu_tolerance(cell_tolerance(saved_cell), allowance)
    except ValueError as err:
        return [f"Malformed test settings in this cell's metadata: {err}"]
    saved = coalesce_streams(copy.deepcopy(list(saved_cell.outputs)))  # as nbval does
    new = coalesce_streams(copy.deepcopy(list(new_outputs)))
    return output_differences(saved, new, tolerance, sanitize)


# --- running one notebook ----------------------------------------------------------------

@dataclasses.dataclass
class NotebookCheck:
    """One notebook's run. Cells are numbered as nbval numbers them (code cells, from 0)."""
    notebook: str
    wall_s: float
    peak_bytes: int = 0  # the largest of the cells' peaks
    per_cell_peaks: bool = True  # False: each cell's peak includes the earlier cells'
    compared: int = 0
    matched: int = 0
    differences: list = dataclasses.field(default_factory=list)  # {"cell", "lines"}
    errors: list = dataclasses.field(default_factory=list)  # {"cell", "error"}
    top_cells: list = dataclasses.field(default_factory=list)  # {"cell", "peak_bytes", "code"}

    @property
    def passed(self) -> bool:
        return not self.differences and not self.errors

    def as_record(self) -> dict:
        return {**dataclasses.asdict(self), "peak_gb": self.peak_bytes / 1e9,
                "differing": len(self.differences), "passed": self.passed}


def _run_copy(nb, cuda: bool):
    """A copy of `nb`'s code cells that nbval runs, each followed by the memory probe, and,
    for each cell of the copy, its nbval number (None for a probe)."""
    probe = nbformat.v4.new_code_cell(
        _PROBE + f"print({_PROBE_MARK!r}, _gpu_check_peak({cuda}))\ndel _gpu_check_peak",
        metadata={_PROBE_KEY: True})
    run, numbers = nbformat.v4.new_notebook(metadata=copy.deepcopy(nb.metadata)), []
    for number, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        if SKIP_TAG not in cell.metadata.get("tags", []):
            fresh = nbformat.v4.new_code_cell(cell.source, metadata=copy.deepcopy(cell.metadata))
            run.cells += [fresh, copy.deepcopy(probe)]
            numbers += [number, None]
    return run, numbers


def _run_cells(run, folder: Path, env: dict, timeout: int) -> tuple[int, str | None]:
    """Execute the cells of `run` in one fresh kernel started in `folder`: how many ran without
    an error, and the error of the next one (None: all ran)."""
    km = KernelManager(kernel_name=CURRENT_ENV_KERNEL_NAME,
                       kernel_spec_manager=NbvalKernelspecManager())
    client = NotebookClient(run, km=km, timeout=timeout, record_timing=False,
                            skip_cells_with_tag="",  # nbval runs every cell but nbval-skip ones
                            resources={"metadata": {"path": str(folder)}})
    done = 0
    try:
        with client.setup_kernel(env=env):
            for done, cell in enumerate(run.cells):
                client.execute_cell(cell, done, store_history=_PROBE_KEY not in cell.metadata)
            done = len(run.cells)
    except CellExecutionError as err:
        return done, f"{err.ename}: {err.evalue}"
    except (TimeoutError, RuntimeError) as err:  # nbclient's cell timeout, a dead kernel
        return done, f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return done, None


def _probe_reading(outputs) -> dict:
    for output in outputs:
        if output.get("name") == "stdout" and output["text"].startswith(_PROBE_MARK):
            return json.loads(output["text"][len(_PROBE_MARK):])
    return {"bytes": 0, "per_cell": False}


def _first_code_line(cell) -> str:
    line = next((line for line in cell.source.splitlines() if line.strip()), "")
    return line if len(line) <= 60 else line[:57] + "..."


def check_notebook(path: Path, env: dict, allowance: Tolerance = GPU_ALLOWANCE,
                   timeout: int = DEFAULT_TIMEOUT, cuda: bool = True,
                   sanitize=None) -> NotebookCheck:
    """Run the notebook at `path` in a kernel with `env` and compare it with its saved outputs."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    run, numbers = _run_copy(nb, cuda)
    start = time.perf_counter()
    done, error = _run_cells(run, path.parent, env, timeout)
    result = NotebookCheck(shown_path(path), time.perf_counter() - start)
    if error:  # in the cell numbered at `done`, or in the probe after the one before it
        number = next((n for n in reversed(numbers[:done + 1]) if n is not None), None)
        result.errors.append({"cell": number, "error": error})
    peaks = {}
    for index in range(done):
        number, cell = numbers[index], run.cells[index]
        if number is None:  # the probe after the cell before it
            reading = _probe_reading(cell.outputs)
            peaks[numbers[index - 1]] = reading["bytes"]
            result.per_cell_peaks &= reading["per_cell"]
            continue
        problems = compare_cell(code[number], cell.outputs, allowance, sanitize)
        if problems is None:
            continue
        result.compared += 1
        if problems:
            result.differences.append({"cell": number, "lines": problems})
        else:
            result.matched += 1
    result.peak_bytes = max(peaks.values(), default=0)
    top = sorted(peaks, key=peaks.get, reverse=True)[:TOP_CELLS]
    result.top_cells = [{"cell": n, "peak_bytes": peaks[n], "code": _first_code_line(code[n])}
                        for n in top]
    return result


# --- the benchmark, the whole run --------------------------------------------------------

def _benchmark_rows(results: dict) -> dict:
    """The benchmark's rows the report shows, found by the benchmark's own keys."""
    def row(key: str, values: dict) -> dict:
        return {"key": key, "label": values["label"],
                "compiled": key.startswith("compiled_"),  # speed_paths's compiled copy
                "tokens_per_s": values["tokens_per_s"]["median"], "mfu": values.get("mfu"),
                "peak_mem_mb": values.get("peak_mem_mb")}
    return {"machine": results["machine"].get("gpu") or results["machine"]["cpu"],
            "model": results["setup"]["model"],
            "train": [row(k, v) for k, v in results["train"].items()],
            "generate": [row(k, v) for k, v in results["generate"].items()]}


def run_speed_benchmark(folder: Path, env: dict, dry_run: bool = False,
                        timeout: int = DEFAULT_TIMEOUT) -> dict:
    """Run `utils.cli.benchmark` (on CUDA; `dry_run`: its quickest CPU form) into
    folder/benchmark.json, its tables into benchmark.txt; the rows, or {"error": ...}."""
    path = folder / "benchmark.json"
    args = [*(DRY_RUN_BENCHMARK if dry_run else GPU_BENCHMARK), "--json"]
    record = {"command": " ".join(["python -m utils.cli.benchmark", *args, shown_path(path)])}
    path.unlink(missing_ok=True)  # never report an earlier run's numbers
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "utils.cli.benchmark", *args, str(path)],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**record, "error": f"stopped after {timeout} s (--timeout)"}
    record["seconds"] = time.perf_counter() - start
    (folder / "benchmark.txt").write_text(done.stdout, encoding="utf-8")
    if done.returncode != 0 or not path.is_file():
        return {**record, "error": f"exit status {done.returncode}; its output is in "
                                   f"{shown_path(folder / 'benchmark.txt')}"}
    return {**record, **_benchmark_rows(json.loads(path.read_text(encoding="utf-8")))}


def _size_and_time(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _seed_checkpoints(source: Path, folder: Path) -> None:
    """Make `folder` a copy of `source` (files already the same, by size and time, are kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    if source.resolve() == folder.resolve():
        return
    wanted = {p.relative_to(source) for p in source.rglob("*") if p.is_file()}
    for old in [p for p in folder.rglob("*") if p.is_file()]:
        if old.relative_to(folder) not in wanted:
            old.unlink()
    for name in sorted(wanted):
        src, dst = source / name, folder / name
        if not dst.is_file() or _size_and_time(dst) != _size_and_time(src):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def _kernel_env(device: str, mirror: Path | None, checkpoints: Path) -> dict[str, str]:
    """This environment with the tests' settings where not set, the device, the mirror and
    the check's checkpoint folder: for the kernels and the benchmark."""
    env = {**SAVED_OUTPUT_SETTINGS, **os.environ, ENV_DEVICE: device,
           ENV_CHECKPOINTS: str(checkpoints)}
    if mirror is not None:
        env.update({ENV_MIRROR: str(mirror.resolve()), ENV_OFFLINE: "1"})
    return env


def _summary(r: NotebookCheck) -> str:
    return (f"{r.notebook}: {'PASS' if r.passed else 'FAIL'}, {r.wall_s:.0f} s, "
            f"{r.peak_bytes / 1e9:.2f} GB peak, {r.compared} cells compared, "
            f"{len(r.differences)} differ, {len(r.errors)} errors")


def run_check(notebooks: list[Path], out: Path, allowance: Tolerance = GPU_ALLOWANCE,
              dry_run: bool = False, mirror: Path | None = None,
              timeout: int = DEFAULT_TIMEOUT, benchmark: bool = True) -> dict:
    """Check every notebook, then run the benchmark; the report as a record, printing
    progress lines."""
    device = torch.device("cpu" if dry_run else "cuda")
    checkpoints = out / "checkpoints"
    print(f"GPU check{' (dry run)' if dry_run else ''} on {describe_device(device)}, torch "
          f"{torch.__version__}; copying {shown_path(checkpoint_dir())} to "
          f"{shown_path(checkpoints)} for the notebooks", flush=True)
    _seed_checkpoints(checkpoint_dir(), checkpoints)
    inside = checkpoints.resolve().is_relative_to(REPO_ROOT)
    if not inside:
        print(f"note: {out} is outside the repository, so the cells that print checkpoint "
              f"paths print bare names and differ", file=sys.stderr)
    shown = checkpoints.resolve().relative_to(REPO_ROOT).as_posix() if inside else None
    sanitize = make_sanitizer(((f"{shown}/", "checkpoints/"),) if shown else ())
    env = _kernel_env(device.type, mirror, checkpoints)
    results = []
    for i, path in enumerate(notebooks, start=1):
        print(f"[{i}/{len(notebooks)}] {shown_path(path)} on {device.type} ...", flush=True)
        results.append(check_notebook(path, env, allowance, timeout, not dry_run, sanitize))
        print(f"[{i}/{len(notebooks)}] {_summary(results[-1])}", flush=True)
    bench = None
    if benchmark:
        print("benchmark ...", flush=True)
        bench = run_speed_benchmark(out, env, dry_run, timeout)
        print(f"benchmark: {bench.get('error') or 'done'} ({bench['command']})", flush=True)
    return {"format": 1, "mode": "dry run on the CPU" if dry_run else "CUDA",
            "device": describe_device(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "allowance": dataclasses.asdict(allowance),
            "timeout_s": timeout, "checkpoints": shown_path(checkpoints),
            "memory": ("CUDA allocator peak (torch.cuda.max_memory_allocated)" if not dry_run
                       else "the kernel's peak resident size (VmHWM or getrusage)"),
            "notebooks": [r.as_record() for r in results], "benchmark": bench,
            "passed": all(r.passed for r in results) and not (bench or {}).get("error")}


# --- the report --------------------------------------------------------------------------

def _code(text: str) -> str:
    """`text` as inline code in a Markdown table cell."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _notebook_lines(notebooks: list[dict]) -> list[str]:
    lines = ["## Notebooks", "",
             "| notebook | wall time s | peak memory GB | cells compared | matched | differing "
             "| errors | result |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['notebook']} | {r['wall_s']:.1f} | {r['peak_gb']:.2f} | {r['compared']} | "
              f"{r['matched']} | {r['differing']} | {len(r['errors'])} | "
              f"{'PASS' if r['passed'] else 'FAIL'} |" for r in notebooks]
    lines += ["", "## Cells with the largest peak memory", "",
              "| notebook | cell | peak memory GB | first line |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {r['notebook']} | {c['cell']} | {c['peak_bytes'] / 1e9:.2f} | "
              f"{_code(c['code'])} |" for r in notebooks for c in r["top_cells"]]
    if not all(r["per_cell_peaks"] for r in notebooks):
        lines += ["", "(This system cannot reset the peak between cells: a cell's peak here "
                      "includes the cells before it.)"]
    return lines


def _problem_lines(notebooks: list[dict]) -> list[str]:
    failed = [r for r in notebooks if not r["passed"]]
    lines = ["", "## Differences and errors"] if failed else []
    for r in failed:
        lines += ["", f"### {r['notebook']}"]
        lines += [f"- Cell {e['cell']} raised {e['error']}" for e in r["errors"]]
        for d in r["differences"][:SHOWN_DIFFERENCES]:
            lines += ["", f"Cell {d['cell']}:", "", "```", *d["lines"], "```"]
        if len(r["differences"]) > SHOWN_DIFFERENCES:
            lines.append(f"... and {len(r['differences']) - SHOWN_DIFFERENCES} more cells "
                         f"(report.json)")
    return lines


def _benchmark_lines(bench: dict | None) -> list[str]:
    if bench is None:
        return ["## Benchmark", "", "Not run (--no-benchmark)."]
    lines = ["## Benchmark", "", f"`{bench['command']}`", ""]
    if bench.get("error"):
        return lines + [f"Failed: {bench['error']}"]
    lines += [f"{bench['model']} on {bench['machine']}, {bench['seconds']:.0f} s.", "",
              "| training | compiled | tokens/s | MFU | peak memory MB |",
              "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['label']} | {'yes' if r['compiled'] else 'no'} | "
              f"{_number(r['tokens_per_s'], ',.0f')} | "
              f"{'-' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%'} | "
              f"{_number(r['peak_mem_mb'], ',.0f')} |" for r in bench["train"]]
    lines += ["", "| generation | compiled | tokens/s | peak memory MB |",
              "| --- | --- | ---: | ---: |"]
    lines += [f"| {r['label']} | {'yes' if r['compiled'] else 'no'} | "
              f"{_number(r['tokens_per_s'], ',.1f')} | {_number(r['peak_mem_mb'], ',.0f')} |"
              for r in bench["generate"]]
    return lines


def format_report(report: dict) -> str:
    """The report as Markdown: the machine, one row per notebook, the benchmark."""
    a = report["allowance"]
    head = [f"# GPU check: {'PASS' if report['passed'] else 'FAIL'}", "",
            f"- device: {report['device']} ({report['mode']})",
            f"- torch {report['torch']}, CUDA {report['cuda'] or '-'}",
            f"- tolerance: each cell's own, widened to the GPU allowance (rel {a['rel']:g}, "
            f"abs {a['abs']:g}, whole {a['whole']})",
            f"- peak memory: {report['memory']}; cells numbered as nbval numbers them",
            f"- the notebooks' checkpoints: {report['checkpoints']}", ""]
    return "\n".join(head + _notebook_lines(report["notebooks"])
                     + _problem_lines(report["notebooks"]) + [""]
                     + _benchmark_lines(report["benchmark"])) + "\n"


# --- the command -------------------------------------------------------------------------

class _UsageError(Exception):
    """A bad argument: the command stops with one line, before any work."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m utils.tools.gpu_check",
        description="Run every chapter notebook on CUDA against its saved CPU outputs, and "
                    "the speed benchmark, into one report.")
    add = parser.add_argument
    add("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    add("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
        help="report folder (default gpu-check/)")
    add("--mirror", type=Path, metavar="DIR", help="offline mirror folder (turns offline on)")
    add("--timeout", type=int, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help=f"seconds one cell, and the benchmark, may take (default {DEFAULT_TIMEOUT})")
    add("--rel", type=float, default=GPU_ALLOWANCE.rel,
        help=f"GPU allowance for decimals, of their size (default {GPU_ALLOWANCE.rel})")
    add("--abs", type=float, default=GPU_ALLOWANCE.abs,
        help=f"GPU allowance for decimals, absolute (default {GPU_ALLOWANCE.abs})")
    add("--whole", type=int, default=GPU_ALLOWANCE.whole,
        help="GPU allowance for whole numbers (default 0: as each cell says)")
    add("--dry-run", action="store_true", help="the same on the CPU, with a quick benchmark")
    add("--no-benchmark", action="store_true", help="skip the benchmark")
    return parser


def _check_args(args) -> list[Path]:
    """Every argument checked, before any work; the notebooks to run."""
    reason = unavailable_reason(torch.device("cuda"))
    if reason and not args.dry_run:
        raise _UsageError(f"the GPU check runs the notebooks on CUDA, but {reason}; run it on "
                          f"a machine with an NVIDIA GPU, or pass --dry-run to try it on the CPU")
    if args.timeout < 1:
        raise _UsageError(f"--timeout must be at least 1 (seconds one cell may take), got "
                          f"{args.timeout}")
    for flag, value in (("--rel", args.rel), ("--abs", args.abs), ("--whole", args.whole)):
        if not (math.isfinite(value) and value >= 0):
            raise _UsageError(f"{flag} must be a number of 0 or more, got {value}")
    notebooks = args.notebooks or sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
    for path in notebooks:
        if path.suffix != ".ipynb" or not path.is_file():
            raise _UsageError(f"{path} is not a notebook file; pass .ipynb paths, e.g. "
                              f"notebooks/03_attention.ipynb, or none for every chapter")
    if args.mirror is not None and not args.mirror.is_dir():
        raise _UsageError(f"--mirror {args.mirror} is not a folder; pass the folder of the "
                          f"data files, e.g. --mirror ../shared/data")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _UsageError(f"cannot write the report into --out {args.out} "
                          f"({exc.strerror or exc}); pass a folder you can write") from exc
    return [path.resolve() for path in notebooks]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        notebooks = _check_args(args)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = run_check(notebooks, args.out, Tolerance(args.rel, args.abs, args.whole),
                       args.dry_run, args.mirror, args.timeout, not args.no_benchmark)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (args.out / "report.md").write_text(format_report(report), encoding="utf-8")
    print(f"{'PASS' if report['passed'] else 'FAIL'}: report in "
          f"{shown_path(args.out / 'report.md')} and report.json", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
