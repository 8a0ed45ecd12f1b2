"""Speed of chapter 8's fast paths against the teaching code, measured side by side
(hand-written command; notebook 08 explains the paths and prints saved runs).

    python -m utils.cli.benchmark                    # GPT-2 124M, batch 2 x 256 (~13 min on 2 CPU cores)
    python -m utils.cli.benchmark --quick            # the tiny config: well under a minute
    python -m utils.cli.benchmark --json benchmarks/my-machine.json   # also save the results
    python -m utils.cli.benchmark --device cuda      # on a GPU: batch 16 x 1024, compiled, with MFU

How it measures. One model is built once; every round runs one training step of *every*
path in turn (and a float32 and a bfloat16 matrix product of 2048 x 2048 x 2048, the
machine's peak), rotating the order, so a slow moment of the machine hits all of them alike
(`utils.core.timing.paired_rounds`). Generation rounds do the same with one whole greedy
generation per path. Each row shows the median over the rounds and the slowest and fastest
round; every ratio is the quotient of two printed medians. One warm-up round is not counted.

The 16-bit rows follow chapter 8's `choose_precision`: bfloat16 autocast where it is native,
float16 autocast with loss scaling on GPUs that have fast float16 but no bfloat16 (Colab's
T4, V100, P100); `--bf16` and `--fp16` force them on or off.

Training speed is also given as model FLOP/s: (6 N + 12 L H Q T) FLOPs per token, with N the
parameters outside the embedding tables (PaLM, appendix B), and as a fraction of the measured
matmul peak of the row's number format; on CUDA also against the data-sheet 16-bit peak
(bfloat16, or float16 on a T4 or V100: model FLOPs utilisation, MFU). Peak memory: on CUDA the allocator's peak during the row's
runs; on CPU the peak resident size of a fresh process that runs only that row
(`utils.core.timing.run_in_fresh_process`; Python and PyTorch included, about 0.3 GB); not
on an Apple GPU (MPS), which keeps no peak counter (the results say so under `skipped`). On
GPUs every clock is read after the device has finished its queued work (`sync_device`).

The paths, each under a stable key, are in utils/cli/speed_paths.py (TRAIN_PATHS, GEN_PATHS).
The results: `results["train"]` and `results["generate"]` hold one row per path under its key
(e.g. `results["train"]["fast_fused_ce_bf16"]`), each with its printed `label`, the seconds
of every round, `tokens_per_s` (median, min, max) and the `ratio` to the baseline row
(`teaching_fp32`, `no_cache`); `peak_gflops` by number format; `profile` by path key
(utils.cli.profile_step). Chapter 5's run retrained with these paths is
`python -m utils.cli.retrain_chapter5`.

Every argument is checked before any work starts (the device exists, the sizes are at least 1
and fit the model, the `--json` and `--plot` paths can be written); a bad one ends the command
with one line `error: ...` that says what to pass instead, and exit status 2. An existing
`--json` file is replaced only once the results are ready.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import uuid
from pathlib import Path

import torch

from utils.cli.profile_step import format_profile, profile_paths
from utils.cli.speed_paths import (GEN_BASELINE, MODELS, PROMPT, TRAIN_BASELINE, GenPath,
                                   PathGenerator, PathSettings, PathTrainer, TrainPath,
                                   flops_per_token, matmul_dtypes, matmul_seconds,
                                   resolve_settings, select_gen_paths, select_train_paths)
from utils.core.device import get_device, unavailable_reason
from utils.core.timing import (cuda_peak_bytes, describe_machine, paired_rounds, rate_table,
                               reset_cuda_peak, run_in_fresh_process, save_results, spread)
from utils.fast import bf16_supported, keep_freed_memory

__all__ = ["run_benchmark", "format_results", "plot_results", "data_sheet_bf16_tflops",
           "PEAK_BF16_TFLOPS", "main"]

QUICK = {"model": "tiny", "batch_size": 2, "context": 64, "repeats": 3, "new_tokens": 50,
         "matmul_size": 512}
LEGEND = ("fast modules = SDPA attention + F.layer_norm + F.gelu (set_impl 'fast'); AdamW = "
          "torch.optim.AdamW as chapter 5 builds it; CE = cross-entropy (fused: "
          "fused_cross_entropy); bf16 autocast keeps float32 weights and casts them per forward "
          "pass; fp16 autocast does the same in float16, with GradScaler's loss scaling; "
          "bf16 weights = bf16_inference_model (converted once, bfloat16 KV cache); "
          "freed memory kept = keep_freed_memory()")

# Dense 16-bit tensor-core peaks from the vendors' data sheets, in TFLOPS (first match wins):
# bfloat16, or float16 for the GPUs without bfloat16 (T4, V100), whose 16-bit rows are float16.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0, "T4": 65.0, "V100": 125.0}


def data_sheet_bf16_tflops(gpu_name: str) -> float | None:
    """The dense bfloat16 peak of a GPU named like torch.cuda.get_device_name() says."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu_name), None)


def _with_cuda_peak(run, s: PathSettings, peaks_mb: dict, key: str):
    """`run`, keeping the CUDA allocator's peak (MB) under `key` (as is on other devices)."""
    device = torch.device(s.device)
    if device.type != "cuda":
        return run

    def measured():
        reset_cuda_peak(device)
        seconds = run()
        peaks_mb[key] = max(peaks_mb.get(key, 0), cuda_peak_bytes(device) / 1e6)
        return seconds
    return measured


def _time_training(s: PathSettings, paths: dict[str, TrainPath], profile: bool,
                   progress: bool) -> tuple[dict, dict, dict]:
    """Paired rounds of every training path and the matmul peaks: seconds by key, the
    CUDA peaks (MB) and the profiled steps (on the CPU, if asked)."""
    device = torch.device(s.device)
    trainer = PathTrainer(s, next((p for p in paths.values() if p.compiled), None))
    cuda_peaks = {}
    contenders = {f"matmul_{name}": functools.partial(matmul_seconds, dtype, s.matmul_size,
                                                      device)
                  for name, dtype in matmul_dtypes(s).items()}
    for key, path in paths.items():
        contenders[key] = _with_cuda_peak(functools.partial(trainer.step, path), s,
                                          cuda_peaks, key)
    seconds = paired_rounds(contenders, s.repeats, "training" if progress else None)
    profiled = profile_paths(trainer, paths, s) if profile and device.type == "cpu" else {}
    if s.keep_memory:
        keep_freed_memory(False)
    return seconds, cuda_peaks, profiled


def _time_generation(s: PathSettings, paths: dict[str, GenPath],
                     progress: bool) -> tuple[dict, dict, dict]:
    """Paired rounds of every generation path: seconds, generated tokens and CUDA peaks (MB),
    by key."""
    generator = PathGenerator(s, any(p.precision == "bf16 weights" for p in paths.values()))
    outputs, cuda_peaks = {}, {}

    def contender(key: str):
        def run():
            seconds, outputs[key] = generator.run(paths[key], s.new_tokens)
            return seconds
        return _with_cuda_peak(run, s, cuda_peaks, key)

    seconds = paired_rounds({key: contender(key) for key in paths}, s.generation_repeats,
                            "generation" if progress else None)
    return seconds, outputs, cuda_peaks


def _run_one_path(s: PathSettings, path: TrainPath | GenPath) -> None:
    """What a fresh process runs to measure one path's memory: two steps, or one generation."""
    if isinstance(path, TrainPath):
        trainer = PathTrainer(s, path if path.compiled else None)
        for _ in range(2):
            trainer.step(path)
    else:
        PathGenerator(s, path.precision == "bf16 weights").run(path, s.new_tokens)


def _cpu_memory_mb(s: PathSettings, paths: dict, progress: bool) -> dict[str, float]:
    """Peak resident memory (MB) of a fresh process running only each path, by key."""
    peaks = {}
    for key, path in paths.items():
        if progress:
            print(f"  memory: {key} in a fresh process", file=sys.stderr, flush=True)
        _, peak = run_in_fresh_process(_run_one_path, s, path)
        peaks[key] = peak / 1e6
    return peaks


def _matmul_peaks(s: PathSettings, seconds: dict) -> dict:
    """GFLOP/s of the matrix product per number format: spread and every round."""
    flop = 2 * s.matmul_size**3
    peaks = {}
    for name in matmul_dtypes(s):
        rates = [flop / t / 1e9 for t in seconds[f"matmul_{name}"]]
        peaks[name] = {**spread(rates), "rounds": rates}
    return peaks


def _train_rows(s: PathSettings, paths: dict[str, TrainPath], seconds: dict, matmul_peaks: dict,
                memory_mb: dict, data_sheet: float | None) -> dict:
    """One row per training path, by key: speed, model FLOP/s, share of the peak, memory."""
    rates = rate_table({key: seconds[key] for key in paths}, s.batch_size * s.context,
                       TRAIN_BASELINE, "tokens_per_s")
    per_token = flops_per_token(s.cfg, s.context)
    rows = {}
    for key, path in paths.items():
        median = rates[key]["tokens_per_s"]["median"]
        gflops = median * per_token / 1e9 if median else None
        peak = matmul_peaks.get(path.dtype, {}).get("median")
        rows[key] = {"label": path.label, "dtype": path.dtype, **rates[key], "gflops": gflops,
                     "fraction_of_peak": gflops / peak if gflops and peak else None,
                     "peak_mem_mb": memory_mb.get(key)}
        if data_sheet and (path.bf16 or path.fp16) and gflops:
            rows[key]["mfu"] = gflops / (data_sheet * 1e3)
    return rows


def _gen_rows(s: PathSettings, paths: dict[str, GenPath], seconds: dict, memory_mb: dict) -> dict:
    rates = rate_table(seconds, s.new_tokens, GEN_BASELINE, "tokens_per_s")
    return {key: {"label": path.label, **rates[key], "peak_mem_mb": memory_mb.get(key)}
            for key, path in paths.items()}


def _greedy_agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many generated tokens agree before the first difference."""
    differ = (a[0, len(PROMPT):] != b[0, len(PROMPT):]).nonzero()
    return int(differ[0]) if len(differ) else a.shape[1] - len(PROMPT)


def _checks(outputs: dict) -> dict:
    """Greedy tokens with the cache against without; bfloat16 weights against float32."""
    checks = {"greedy_identical_with_cache": torch.equal(outputs["no_cache"],
                                                         outputs["cache_fast"])}
    if "cache_fast_bf16_weights" in outputs:
        checks["bf16_weights_greedy_agreement"] = _greedy_agreement(
            outputs["cache_fast"], outputs["cache_fast_bf16_weights"])
    return checks


def _bf16_generation_ratio(rows: dict) -> float | None:
    if "cache_fast_bf16_weights" not in rows:
        return None
    return (rows["cache_fast_bf16_weights"]["tokens_per_s"]["median"]
            / rows["cache_fast"]["tokens_per_s"]["median"])


MPS_MEMORY = ("peak memory: not measured on mps, as PyTorch keeps no peak counter for the "
              "Apple GPU (torch.mps.driver_allocated_memory() is the allocator's reserved "
              "pool, not a peak)")


def _memory_measure(s: PathSettings, memory: bool) -> str | None:
    """How this run measures each row's peak memory (None: it does not)."""
    kind = torch.device(s.device).type
    if kind == "cuda":
        return "cuda allocator peak"
    if kind == "cpu" and memory:
        return "peak RSS of a process running one path"
    return None  # MPS: no peak counter (MPS_MEMORY)


def _setup(s: PathSettings, memory: bool, data_sheet: float | None) -> dict:
    return {"model": s.model, "batch_size": s.batch_size, "context": s.context,
            "repeats": s.repeats, "generation_repeats": s.generation_repeats,
            "new_tokens": s.new_tokens, "prompt_tokens": len(PROMPT),
            "dropout": s.cfg.drop_rate, "flops_per_token": flops_per_token(s.cfg, s.context),
            "matmul_size": s.matmul_size, "data_sheet_bf16_tflops": data_sheet,
            "keep_memory_rows": s.keep_memory,
            "memory": _memory_measure(s, memory), "legend": LEGEND}


def _size_problem(model: str, batch_size: int, context: int, repeats: int, new_tokens: int,
                  matmul_size: int) -> str | None:
    """What is wrong with the sizes of a run (None: nothing), saying what to pass instead."""
    if model not in MODELS:
        return f"Unknown model {model!r}; choose one of {list(MODELS)}"
    for flag, value, meaning in (("--batch-size", batch_size, "sequences per training step"),
                                 ("--context", context, "training tokens per sequence"),
                                 ("--repeats", repeats, "paired rounds"),
                                 ("--new-tokens", new_tokens, "generated tokens"),
                                 ("--matmul-size", matmul_size, "side of the matrix product")):
        if value < 1:
            return f"{flag} must be at least 1 ({meaning}), got {value}; pass {flag} 1 or more"
    length = MODELS[model].context_length
    if context > length:
        return (f"--context {context} is longer than {model}'s context_length {length}; "
                f"pass --context {length} or less")
    if len(PROMPT) + new_tokens > length:
        most = length - len(PROMPT)
        return (f"--new-tokens {new_tokens} after the {len(PROMPT)}-token prompt is longer than "
                f"{model}'s context_length {length}; pass --new-tokens {most} or less")
    return None


def run_benchmark(model: str = "gpt2-small", batch_size: int = 2, context: int = 256,
                  repeats: int = 5, new_tokens: int = 200, device="cpu", memory: bool = True,
                  compile: bool = False, bf16: str | bool = "auto", fp16: str | bool = "auto",
                  keep_memory: bool = True,
                  matmul_size: int = 2048, peak_tflops: float | None = None,
                  profile: bool = True, progress: bool = True) -> dict:
    """Time every training and generation path side by side; returns the results, with one
    row per path under its key (see the module docstring)."""
    problem = _size_problem(model, batch_size, context, repeats, new_tokens, matmul_size)
    if problem:
        raise ValueError(problem)
    s, skipped = resolve_settings(model, batch_size, context, repeats, new_tokens, device,
                                  bf16, compile, keep_memory, matmul_size, fp16)
    train_paths, gen_paths = select_train_paths(s), select_gen_paths(s)
    seconds, memory_mb, profiled = _time_training(s, train_paths, profile, progress)
    gen_seconds, outputs, gen_memory_mb = _time_generation(s, gen_paths, progress)
    memory_mb.update(gen_memory_mb)
    kind = torch.device(s.device).type
    cuda = kind == "cuda"
    if memory and kind == "cpu":
        memory_mb.update(_cpu_memory_mb(s, {**train_paths, **gen_paths}, progress))
    elif memory and kind == "mps":
        skipped.append(MPS_MEMORY)
    data_sheet = peak_tflops or (data_sheet_bf16_tflops(torch.cuda.get_device_name(s.device))
                                 if cuda else None)
    peaks = _matmul_peaks(s, seconds)
    generated = _gen_rows(s, gen_paths, gen_seconds, memory_mb)
    return {"format": 3,
            "machine": {**describe_machine(s.device), "native_bf16": bf16_supported(s.device)},
            "setup": _setup(s, memory, data_sheet), "peak_gflops": peaks,
            "train": _train_rows(s, train_paths, seconds, peaks, memory_mb, data_sheet),
            "generate": generated, "bf16_generation_vs_float32": _bf16_generation_ratio(generated),
            "checks": _checks(outputs), "profile": profiled, "skipped": skipped}


# --- printing and plotting -------------------------------------------------------------------

def _fmt_rate(row: dict) -> str:
    rate = row["tokens_per_s"]
    if rate["median"] is None:
        return f"{'out of memory':>30}"
    return f"{rate['median']:>10,.1f} {rate['min']:>9,.1f}-{rate['max']:<9,.1f}"


def _format_header(results: dict) -> list[str]:
    """Machine, setup and legend, one line each."""
    s, m = results["setup"], results["machine"]
    where = m.get("gpu") or f"{m['cpu']} [{' '.join(m['cpu_flags']) or 'no flags read'}]"
    lines = [f"machine: {m['device']}, {where}; {m['cpu_threads']} threads of {m['cpu_count']} "
             f"CPUs, ATen {m['cpu_capability']}; torch {m['torch']}, Python {m['python']}",
             f"model: {s['model']}; training batch {s['batch_size']} x {s['context']} tokens, "
             f"dropout {s['dropout']}, {s['flops_per_token'] / 1e6:,.0f} MFLOP per token; "
             f"generation: {s['new_tokens']} tokens after a {s['prompt_tokens']}-token prompt",
             f"each row: median of {s['repeats']} paired rounds ({s['generation_repeats']} for "
             f"generation), min-max over the rounds; ratios are quotients of the medians",
             f"legend: {s['legend']}"]
    if results.get("note"):
        lines.append(f"note: {results['note']}")
    return lines + [""]


def _format_peaks(results: dict) -> list[str]:
    if not results["peak_gflops"]:
        return ["matmul peak: not measured in this run"]
    size = results["setup"]["matmul_size"]
    lines = [f"{f'matmul peak ({size} x {size} x {size})':<70} {'GFLOP/s':>10} {'min-max':>19}"]
    for dtype, p in results["peak_gflops"].items():
        lines.append(f"{dtype:<70} {p['median']:>10,.1f} {p['min']:>9,.1f}-{p['max']:<9,.1f}")
    return lines


def _format_train(rows: dict) -> list[str]:
    mfu = any("mfu" in r for r in rows.values())
    header = (f"{'tokens/s':>10} {'min-max':>19} {'ratio':>6} {'GFLOP/s':>8} {'of peak':>8}"
              f" {'peak mem':>9}" + ("   MFU" if mfu else ""))
    lines = ["", f"{'training':<70} {header}"]
    for r in rows.values():
        line = f"{r['label']:<70} {_fmt_rate(r)}"
        if r["tokens_per_s"]["median"]:
            line += f" {r['ratio']:>5.2f}x {r['gflops']:>8,.1f}"
            line += f" {100 * r['fraction_of_peak']:>7.0f}%" if r["fraction_of_peak"] else f" {'-':>8}"
            line += f" {r['peak_mem_mb']:>6,.0f} MB" if r.get("peak_mem_mb") else f" {'-':>9}"
            line += f" {100 * r['mfu']:>5.1f}%" if "mfu" in r else ""
        lines.append(line)
    return lines


def _format_generation(results: dict) -> list[str]:
    rows, checks, s = results["generate"], results["checks"], results["setup"]
    lines = ["", f"{'generation':<70} {'tokens/s':>10} {'min-max':>19} {'ratio':>6} {'peak mem':>9}"]
    for r in rows.values():
        mem = f"{r['peak_mem_mb']:>6,.0f} MB" if r.get("peak_mem_mb") else f"{'-':>9}"
        ratio = f"{r['ratio']:>5.2f}x" if r["ratio"] else f"{'-':>6}"
        lines.append(f"{r['label']:<70} {_fmt_rate(r)} {ratio} {mem}")
    lines += ["", f"greedy tokens identical with and without the cache (float32): "
                  f"{checks['greedy_identical_with_cache']}"]
    if results.get("bf16_generation_vs_float32"):
        fast32, fast16 = rows["cache_fast"], rows["cache_fast_bf16_weights"]
        lines.append(f"bf16 weights vs float32, both fast modules + KV cache: "
                     f"{results['bf16_generation_vs_float32']:.2f}x "
                     f"({fast16['tokens_per_s']['median']:,.1f} vs "
                     f"{fast32['tokens_per_s']['median']:,.1f} tokens/s); greedy tokens equal "
                     f"float32's for the first {checks['bf16_weights_greedy_agreement']} of "
                     f"{s['new_tokens']}")
    return lines


def format_results(results: dict) -> str:
    """The results as plain-text tables (machine and setup first)."""
    lines = (_format_header(results) + _format_peaks(results) + _format_train(results["train"])
             + _format_generation(results))
    if results.get("profile"):
        lines += ["", format_profile(results["profile"])]
    lines.extend(f"skipped: {reason}" for reason in results["skipped"])
    return "\n".join(lines)


def plot_results(results: dict, path=None):
    """Bar charts of each row's speed relative to the baseline row, with the rounds' min-max."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for ax, key, title in ((axes[0], "train", "training step"), (axes[1], "generate", "generation")):
        rows = [r for r in results[key].values() if r["ratio"]][::-1]
        ratios = [r["ratio"] for r in rows]  # min and max relative to the baseline, like the ratio:
        low = [r["ratio"] * (1 - r["tokens_per_s"]["min"] / r["tokens_per_s"]["median"]) for r in rows]
        high = [r["ratio"] * (r["tokens_per_s"]["max"] / r["tokens_per_s"]["median"] - 1) for r in rows]
        colors = ["tab:orange" if "bf16" in r["label"] or "fp16" in r["label"] else "tab:blue"
                  for r in rows]
        ax.barh(range(len(rows)), ratios, xerr=[low, high], color=colors, capsize=2)
        ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=7)
        ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        for i, r in enumerate(ratios):
            ax.text(r, i + 0.3, f" {r:.2f}x", va="center", fontsize=7)
        ax.set_xlabel("speed vs the baseline row (bar: median, line: min-max)")
        ax.set_title(title)
    m = results["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_threads']} threads, ATen {m['cpu_capability']}"
    fig.suptitle(f"{results['setup']['model']} on {where} (orange: 16-bit)", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# --- the command -------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m utils.cli.benchmark", description="Benchmark the fast paths side by side.",
        epilog="Chapter 5's run retrained: python -m utils.cli.retrain_chapter5. One step "
               "profiled: python -m utils.cli.profile_step.")
    add = parser.add_argument
    add("--quick", action="store_true",
        help="the tiny config: batch 2 x 64, 3 rounds, 50 tokens (seconds)")
    add("--model", choices=list(MODELS), help="default gpt2-small")
    add("--batch-size", type=int, help="default 2 (16 on CUDA)")
    add("--context", type=int, help="training tokens per sequence (default 256; 1024 on CUDA)")
    add("--new-tokens", type=int, help="generated tokens (default 200)")
    add("--repeats", type=int, help="paired training rounds (default 5)")
    add("--device", default=None, help="cpu, cuda, mps (default: best found)")
    add("--bf16", choices=["auto", "on", "off"], default="auto")
    add("--fp16", choices=["auto", "on", "off"], default="auto",
        help="float16 rows with loss scaling (auto: on GPUs with fast float16 but no bfloat16)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="also time compiled blocks (default: on for CUDA, off elsewhere)")
    add("--no-keep-memory", action="store_true", help="leave out the rows that keep freed memory")
    add("--no-memory", action="store_true", help="skip the CPU memory runs")
    add("--no-profile", action="store_true", help="skip the profiled steps")
    add("--matmul-size", type=int, help="side of the peak matrix product (default 2048; 8192 on CUDA)")
    add("--peak-tflops", type=float, help="device 16-bit peak (bf16, or fp16), for MFU")
    add("--json", type=Path, help="also write the results here")
    add("--plot", type=Path, help="also save the chart here")
    return parser


class _UsageError(Exception):
    """A bad argument: the command stops with one line, before any work."""


def _check_device(wanted: str | None) -> str:
    """The device to run on, checked to exist here: `wanted`, else the best one found."""
    if wanted is None:
        try:
            return str(get_device(verbose=False))
        except RuntimeError as exc:  # $LLM_COURSE_DEVICE names one that is not here
            raise _UsageError(f"{exc} Or pass --device cpu.") from exc
    try:
        device = torch.device(wanted)
    except RuntimeError as exc:
        raise _UsageError(f"--device {wanted} is not a device name; pass cpu, cuda, cuda:N or "
                          f"mps") from exc
    if device.type not in ("cpu", "cuda", "mps"):
        raise _UsageError(f"--device {wanted}: the benchmark runs on cpu, cuda or mps; pass "
                          f"one of those")
    reason = unavailable_reason(device)
    if reason:
        raise _UsageError(f"--device {wanted}, but {reason}; pass --device cpu, or leave "
                          f"--device out to use the best one found")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= count > 0:
        raise _UsageError(f"--device {wanted}, but this machine has {count} CUDA GPU(s); "
                          f"pass --device cuda:0 to cuda:{count - 1}")
    return wanted


def _check_writable(path: Path, flag: str) -> None:
    """`path` can be written when the results are ready: its folder exists (made here) and
    takes a file, and the file, if there, is not read-only. An existing file is not touched."""
    if path.is_dir():
        example = path / ("results.json" if flag == "--json" else "results.png")
        raise _UsageError(f"{flag} {path} is a folder; pass a file name, e.g. {flag} {example}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.write-test-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _UsageError(f"cannot write {flag} {path} ({exc.strerror or exc}); pass a path in "
                          f"a folder you can write") from exc
    if path.exists() and not os.access(path, os.W_OK):
        raise _UsageError(f"cannot write {flag} {path} (the file is read-only); pass another "
                          f"path")


def _check_plot_format(path: Path) -> None:
    suffix = path.suffix.lower().lstrip(".")
    if not suffix:
        return  # matplotlib's default format (PNG)
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise _UsageError(f"--plot {path}: matplotlib cannot write .{suffix} files; pass a "
                          f"name ending in one of {', '.join('.' + f for f in sorted(formats))}")


def _check_args(args) -> dict:
    """Every argument checked, before any work: the run's sizes, by run_benchmark's names."""
    args.device = _check_device(args.device)
    cuda = torch.device(args.device).type == "cuda"
    defaults = dict(QUICK) if args.quick else {
        "model": "gpt2-small", "batch_size": 16 if cuda else 2, "context": 1024 if cuda else 256,
        "repeats": 5, "new_tokens": 200, "matmul_size": 8192 if cuda else 2048}
    chosen = {name: value if (value := getattr(args, name)) is not None else default
              for name, default in defaults.items()}
    problem = _size_problem(**chosen)
    if problem:
        raise _UsageError(problem)
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops)
                                             and args.peak_tflops > 0):
        raise _UsageError(f"--peak-tflops must be a positive number (the device's bfloat16 "
                          f"peak in TFLOPS, e.g. 989 for an H100), got {args.peak_tflops}")
    if args.json:
        _check_writable(args.json, "--json")
    if args.plot:
        _check_plot_format(args.plot)
        _check_writable(args.plot, "--plot")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        chosen = _check_args(args)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cuda = torch.device(args.device).type == "cuda"
    results = run_benchmark(**chosen, device=args.device, memory=not args.no_memory,
                            compile=cuda if args.compile is None else args.compile,
                            bf16={"auto": "auto", "on": True, "off": False}[args.bf16],
                            fp16={"auto": "auto", "on": True, "off": False}[args.fp16],
                            keep_memory=not args.no_keep_memory, peak_tflops=args.peak_tflops,
                            profile=not args.no_profile)
    print(format_results(results))
    if args.json:
        save_results(results, args.json)
    if args.plot:
        plot_results(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
