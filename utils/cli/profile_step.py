"""Where one training step spends its time, by group of PyTorch operators (hand-written
command; notebook 08 prints a saved profile with `format_profile`).

PyTorch's profiler runs over one step; the self time of its operators is sorted into groups
(matrix products, dropout masks, copies, the optimizer, ...), and the minor page faults the
step caused are counted (each one the operating system handing over a fresh page).

    python -m utils.cli.profile_step                 # GPT-2 124M, batch 2 x 256, on the CPU
    python -m utils.cli.profile_step --quick         # the tiny config, batch 2 x 64
    python -m utils.cli.profile_step --json profile.json

It profiles two of the benchmark's training paths (utils/cli/speed_paths.py): the fast modules
with fused AdamW, and the fastest path (adding the fused cross-entropy, and keeping freed
memory on Linux), in bfloat16 autocast where the CPU has it natively. `python -m
utils.cli.benchmark` records the same two profiles in its results. Every profiled step runs
once unprofiled first, so the allocator and caches are as in a running loop.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Callable

from utils.cli.speed_paths import (MODELS, PathSettings, PathTrainer, TrainPath, best_train_key,
                                   resolve_settings, select_train_paths)
from utils.core.timing import save_results
from utils.fast import keep_freed_memory

__all__ = ["OPERATOR_GROUPS", "profile_step", "profile_paths", "profile_training",
           "format_profile", "main"]

# Operator groups of the profile (the first group whose name prefixes match wins).
OPERATOR_GROUPS = [
    ("matrix products (mm, addmm, bmm)", ("aten::mm", "aten::addmm", "aten::bmm",
                                          "aten::baddbmm", "mkldnn::")),
    ("dropout masks (random numbers)", ("aten::bernoulli", "aten::native_dropout",
                                        "aten::uniform", "aten::rand")),
    ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::clone")),
    ("optimizer step", ("aten::_fused_adam", "aten::_foreach", "aten::addcdiv",
                        "aten::addcmul", "aten::lerp", "aten::sqrt")),
    ("filling memory with zeros", ("aten::fill_", "aten::zero_")),
    ("loss: log-softmax and cross-entropy", ("aten::_log_softmax", "aten::nll_loss",
                                             "aten::logsumexp", "aten::exp",
                                             "aten::scatter_add", "aten::gather")),
    ("attention: softmax and masks", ("aten::_softmax", "aten::where", "aten::isneginf",
                                      "aten::all", "aten::_scaled_dot_product")),
    ("LayerNorm and GELU", ("aten::native_layer_norm", "aten::gelu")),
    ("everything else (additions, views, Python, autograd)", ("",))]


@contextlib.contextmanager
def _quiet_stderr():
    """Send C-level stderr to os.devnull (the profiler prints its start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _minor_faults() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def profile_step(step: Callable[[], object], label: str) -> dict:
    """Profile one call of `step` (after one unprofiled call): milliseconds of operator self
    time per group, their total, the minor page faults and the 12 costliest operators."""
    from torch.profiler import profile
    step()  # the allocator and caches as in a running loop
    faults = _minor_faults()
    with _quiet_stderr(), profile() as prof:
        step()
    faults = None if faults is None else _minor_faults() - faults
    events = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]
    groups = {name: 0.0 for name, _ in OPERATOR_GROUPS}
    for key, ms, _ in events:
        groups[next(n for n, prefixes in OPERATOR_GROUPS if key.startswith(prefixes))] += ms
    top = sorted(events, key=lambda e: -e[1])[:12]
    return {"label": label, "total_ms": sum(groups.values()), "page_faults": faults,
            "groups": groups, "top_ops": [{"op": k, "ms": ms, "calls": n} for k, ms, n in top]}


def profile_paths(trainer: PathTrainer, paths: dict[str, TrainPath], s: PathSettings) -> dict:
    """The fastest path's step and the same without the fused cross-entropy or kept memory,
    profiled on `trainer`, by path key."""
    keys = [f"fast_fused_adamw_{'bf16' if s.bf16 else 'fp32'}", best_train_key(s)]
    return {key: profile_step(functools.partial(trainer.step, paths[key]), paths[key].label)
            for key in keys}


def profile_training(model: str = "gpt2-small", batch_size: int = 2, context: int = 256,
                     bf16: str | bool = "auto") -> dict:
    """The two profiled training steps on a fresh model on the CPU, by path key."""
    s, _ = resolve_settings(model, batch_size, context, 1, 1, "cpu", bf16, False, True, 0)
    try:
        return profile_paths(PathTrainer(s), select_train_paths(s), s)
    finally:
        if s.keep_memory:
            keep_freed_memory(False)


def format_profile(profiled: dict) -> str:
    """Profiled steps (by key, as `profile_step` returns them) side by side: seconds and
    share of the step per operator group."""
    steps = list(profiled.values())
    names = [f"({chr(97 + i)})" for i in range(len(steps))]
    lines = ["one training step, profiled (self time of PyTorch's operators, by group):"]
    lines += [f"  {n} {p['label']}" for n, p in zip(names, steps)]
    lines.append(f"  {'':<52}" + "".join(f"{n:>16}" for n in names))
    for group in steps[0]["groups"]:
        lines.append(f"  {group:<52}" + "".join(
            f"{p['groups'][group] / 1e3:>8.2f} s {100 * p['groups'][group] / p['total_ms']:>4.0f}%"
            for p in steps))
    lines.append(f"  {'total':<52}" + "".join(f"{p['total_ms'] / 1e3:>8.2f} s      "
                                              for p in steps))
    if all(p["page_faults"] is not None for p in steps):
        lines.append(f"  {'minor page faults during the step':<52}"
                     + "".join(f"{p['page_faults']:>14,}  " for p in steps))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.cli.profile_step",
                                     description="Profile one training step by operator group.")
    parser.add_argument("--quick", action="store_true", help="the tiny config, batch 2 x 64")
    parser.add_argument("--model", choices=list(MODELS), help="default gpt2-small")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--context", type=int, help="tokens per sequence (default 256)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--json", type=Path, help="also write the profiles here")
    args = parser.parse_args(argv)
    profiled = profile_training(args.model or ("tiny" if args.quick else "gpt2-small"),
                                args.batch_size, args.context or (64 if args.quick else 256),
                                {"auto": "auto", "on": True, "off": False}[args.bf16])
    print(format_profile(profiled))
    if args.json:
        save_results(profiled, args.json)
        print(f"profiles written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
