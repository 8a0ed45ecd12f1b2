"""Measuring speed and memory fairly, for every benchmark command (hand-written; no chapter
teaches it, chapter 8 and notebook 02b show what the benchmarks measured with it).

- `paired_rounds(contenders, rounds)`: one uncounted warm-up call of every contender, then
  `rounds` rounds over all of them in an order rotated from round to round, so that a slow
  moment of the machine hits every contender alike. Each contender returns its own seconds
  (or None where it could not run, e.g. out of memory); `timed(fn)` makes one of a plain
  function.
- `spread(values)`: median, min and max; `rate_table(seconds, work, baseline, unit)`: one row
  per contender, by its key: work per second (median, min, max over the rounds) and the
  ratio of its median to the baseline's.
- `sync_device(device)`: wait until a GPU (CUDA or Apple MPS) has done the work queued on
  it, so that a clock read after it counts that work; GPUs run asynchronously.
- `describe_machine(device)`: the CPU (model name and the flags that matter), threads, CPU
  count, torch and Python versions, ATen's CPU capability, the GPU and CUDA version on CUDA,
  the Apple GPU and macOS version on MPS.
- `peak_rss_bytes()`: this process's peak resident memory; `reset_cuda_peak(device)` and
  `cuda_peak_bytes(device)`: the CUDA allocator's peak. MPS has no such counter (PyTorch
  offers only the memory held now, and the allocator's reserved pool).
- `save_results(results, path)`: a command's results as a JSON file, its folder made.
- `run_in_fresh_process(fn, *args)`: `fn(*args)` in a new Python process (multiprocessing,
  "spawn"); returns its result and that process's peak resident memory.

    from utils.core.timing import paired_rounds, rate_table, timed
    seconds = paired_rounds({"a": timed(f), "b": timed(g)}, rounds=5)
    rows = rate_table(seconds, work=1e6, baseline="a", unit="items_per_s")
    rows["b"]["ratio"]  # b's median items/s over a's

Nothing here imports a chapter module: only torch, the standard library and
`utils.core.device`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from utils.core.device import describe_device

__all__ = ["paired_rounds", "timed", "spread", "rate_table", "CPU_FLAGS", "sync_device",
           "describe_machine", "peak_rss_bytes", "reset_cuda_peak", "cuda_peak_bytes",
           "save_results", "run_in_fresh_process"]

# The vector and matrix instructions that decide float32 and bfloat16 speed on a CPU.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


def paired_rounds(contenders: dict[str, Callable[[], float | None]], rounds: int,
                  label: str | None = None) -> dict[str, list[float | None]]:
    """Call every contender once (warm-up, not counted), then `rounds` times each, round by
    round, starting each round one contender later; returns the seconds each one reported,
    by key. With a `label`, says on stderr when each round is done."""
    keys = list(contenders)
    for key in keys:
        contenders[key]()
    seconds = {key: [] for key in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            seconds[key].append(contenders[key]())
        if label:
            print(f"  {label}: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return seconds


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """`fn` as a contender for `paired_rounds`: it calls `fn` and returns the wall seconds."""
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def spread(values: list[float | None]) -> dict:
    """Median, min and max of the values that are not None (all None where none is)."""
    done = [v for v in values if v is not None]
    if not done:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(done), "min": min(done), "max": max(done)}


def rate_table(seconds: dict[str, list], work: float, baseline: str, unit: str) -> dict:
    """One row per contender, by key: its seconds per round, their median (`median_s`),
    `unit` = the spread of work / seconds over the rounds, and `ratio` = its median rate over
    the baseline's (None where either did not run)."""
    rows = {}
    for key, times in seconds.items():
        rates = [None if s is None else work / s for s in times]
        rows[key] = {"seconds": times, "median_s": spread(times)["median"], unit: spread(rates)}
    base = rows[baseline][unit]["median"]
    for row in rows.values():
        median = row[unit]["median"]
        row["ratio"] = median / base if median and base else None
    return rows


def _cpu_info() -> dict:
    """The CPU's model name and which of CPU_FLAGS it has (Linux; elsewhere what platform says)."""
    info = {"cpu": platform.processor() or platform.machine(), "cpu_flags": []}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["cpu"] = value.strip()
            elif key.strip() == "flags":
                info["cpu_flags"] = [f for f in CPU_FLAGS if f in value.split()]
    return info


def sync_device(device) -> None:
    """Wait for the work queued on a GPU (nothing to wait for on a CPU), so a clock reads true."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def describe_machine(device="cpu") -> dict:
    """What a measurement ran on; callers add their own keys (e.g. native bfloat16)."""
    device = torch.device(device)
    info = {"device": str(device), "torch": torch.__version__,
            "python": platform.python_version(), "os": platform.system(),
            "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), **_cpu_info()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    elif device.type == "mps":
        info["gpu"] = describe_device(device)  # the chip and the macOS release
    return info


def peak_rss_bytes() -> int:
    """The peak resident memory of this process so far, in bytes."""
    status = Path("/proc/self/status")
    if status.is_file():  # Linux: VmHWM starts afresh at exec, unlike ru_maxrss (inherited)
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # not on Windows
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS bytes, Linux KiB


def reset_cuda_peak(device) -> None:
    """Start the CUDA allocator's peak afresh."""
    torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_bytes(device) -> int:
    """The most memory the CUDA allocator held for tensors since the last reset."""
    return torch.cuda.max_memory_allocated(device)


def save_results(results: dict, path) -> None:
    """Write `results` to `path` as indented JSON (making its folder) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"results written to {path}")


def _call_and_measure(fn, args, kwargs) -> tuple[object, int]:
    result = fn(*args, **kwargs)
    return result, peak_rss_bytes()


def run_in_fresh_process(fn: Callable, *args, **kwargs) -> tuple[object, int]:
    """Run `fn(*args, **kwargs)` in a new Python process and return (its result, that
    process's peak resident memory in bytes, Python and its imports included). `fn`, its
    arguments and its result travel by pickle: `fn` must be defined at a module's top level.
    An exception in `fn` is raised here."""
    spawn = multiprocessing.get_context("spawn")  # a new interpreter, not a copy of this one
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(_call_and_measure, fn, args, kwargs).result()
