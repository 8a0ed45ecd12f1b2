"""Chapter 11's full run: the starting model, then rejection-sampling finetuning, GRPO with
KL and GRPO without KL from it, side by side, with the chapter's settings (hand-written
command; notebook 11 prints and plots a saved run).

    python -m utils.cli.reasoning_run                      # 300 rounds per method, ~8 min on 2 CPU cores
    python -m utils.cli.reasoning_run --rl-steps 40 --json my_run.json
    python -m utils.cli.reasoning_run --json benchmarks/11_reasoning/full_run.json --force

It trains the starting model as notebook 11 does (`REASONING_TINY` seeded with 123,
`SFT_STEPS` steps of `train_sft`), runs `compare_methods` with `RLConfig` changed only in
its number of rounds and evaluation interval, and writes one JSON record: the settings, the
machine, the starting accuracy, and per method its history, final accuracy and seconds. An
existing results file is kept unless `--force` is given; the file is written whole or not at
all. Runs on the CPU, where models this small are fastest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from utils.core.timing import describe_machine
from utils.model import GPTModel
from utils.reasoning import (ARITHMETIC_TOKENIZER, REASONING_TINY, SFT_STEPS, RLConfig,
                             accuracy, chapter_problems, compare_methods, train_sft)

__all__ = ["full_run", "write_json_atomically", "main"]


def full_run(rl_steps: int = 300, eval_every: int = 20, progress: bool = True) -> dict:
    """The starting model and the three methods of chapter 11, as one results record."""
    began = time.perf_counter()
    tokenizer = ARITHMETIC_TOKENIZER
    held_out, sft_problems, rl_problems = chapter_problems()
    torch.manual_seed(123)
    model = GPTModel(REASONING_TINY)
    train_sft(model, sft_problems, tokenizer, steps=SFT_STEPS)
    start_accuracy = accuracy(model, held_out, tokenizer)
    if progress:
        print(f"starting model: held-out accuracy {start_accuracy:.3f}")
    cfg = RLConfig(steps=rl_steps, eval_every=eval_every)
    methods = compare_methods(model, rl_problems, held_out, tokenizer, cfg, progress=progress)
    return {"rl_steps": rl_steps, "config": dataclasses.asdict(cfg), "sft_steps": SFT_STEPS,
            "threads": torch.get_num_threads(), "machine": describe_machine("cpu"),
            "start_accuracy": start_accuracy, "methods": methods,
            "total_seconds": time.perf_counter() - began}


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None  # JSON has no NaN: RFT's records have no KL
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def write_json_atomically(results: dict, path: Path) -> None:
    """Write `results` as JSON to `path` through a temporary file beside it, so that an
    interrupted write leaves the earlier file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_nan_to_none(results), f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rl-steps", type=int, default=300, help="rounds per method (300)")
    parser.add_argument("--eval-every", type=int, default=20,
                        help="rounds between held-out evaluations (20)")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    args = parser.parse_args(argv)
    if args.rl_steps < 1 or args.eval_every < 1:
        parser.error("--rl-steps and --eval-every must be at least 1")
    if args.json is not None and args.json.exists() and not args.force:
        parser.error(f"{args.json} exists; pass --force to replace it, or choose another file")
    results = full_run(args.rl_steps, args.eval_every)
    print(f"\n{'':<26} {'held-out accuracy':>17} {'minutes':>8}")
    print(f"{'start (SFT)':<26} {results['start_accuracy']:>17.3f}")
    for method, result in results["methods"].items():
        print(f"{method:<26} {result['accuracy']:>17.3f} {result['seconds'] / 60:>8.1f}")
    print(f"total: {results['total_seconds'] / 60:.1f} minutes")
    if args.json is not None:
        write_json_atomically(results, args.json)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
