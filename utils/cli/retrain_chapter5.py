"""Chapter 5's training run retrained with chapter 8's speed-ups, next to the run as chapter 5
does it (hand-written command; notebook 08 prints and plots a saved run).

    python -m utils.cli.retrain_chapter5              # GPT-2 124M, the-verdict, 10 epochs (~12 min on 2 CPU cores)
    python -m utils.cli.retrain_chapter5 --quick      # the tiny config, context 64, 1 epoch: seconds
    python -m utils.cli.retrain_chapter5 --json benchmarks/my-machine-chapter5.json --plot curves.png
    python -m utils.cli.retrain_chapter5 --data my_story.txt   # another text, same recipe

It trains chapter 5's model (the-verdict or `--data`, 90/10 split, batch 2 x 256, AdamW, an
evaluation every 5 steps over 5 batches, a sample after every epoch) twice, each in a fresh
process (`utils.core.timing.run_in_fresh_process`), one after the other: as chapter 5 does
(`train_model_simple`, teaching modules, AdamW, float32), and with every speed-up of chapter 8
that applies on the machine (`train_model_fast`, fast modules, fused AdamW, the fused
cross-entropy, the number format `choose_precision` picks (bfloat16 autocast where native,
float16 with loss scaling on GPUs such as the T4), `keep_freed_memory()` on Linux). Each run
prints its training log as chapter 5 does. The comparison is built from the records the
training loops return (`TrainingHistory.records`: epoch, step, losses, tokens seen and the
seconds since the run started, at every evaluation), never from the printed log.

The results: `results["runs"]["chapter5"]` and `results["runs"]["fast"]`, each with its
`label`, `wall_seconds`, `evals` (the records) and `samples`; `time_ratio` = fast / chapter 5.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from utils.cli.speed_paths import MODELS
from utils.core.download import fetch
from utils.core.timing import describe_machine, run_in_fresh_process, save_results
from utils.fast import (bf16_supported, choose_precision, fused_adamw, keep_freed_memory,
                        set_impl, train_model_fast)
from utils.model import GPTModel
from utils.text import create_dataloader_v1, get_gpt2_tokenizer
from utils.train import train_model_simple

__all__ = ["RUN_KINDS", "retrain", "compare_runs", "run_chapter5_comparison", "format_chapter5",
           "plot_chapter5", "main"]

RUN_KINDS = ("chapter5", "fast")  # run in this order
# Chapter 5's settings (notebook 05): evaluation every 5 steps over 5 batches, this prompt.
TRAINING = {"batch_size": 2, "eval_freq": 5, "eval_iter": 5,
            "start_context": "Every effort moves you"}


def _read_text(data: str | None) -> str:
    """The text file `data`, or chapter 5's story (fetched once, offline if set)."""
    if data is None:
        data = fetch("the-verdict")
    return Path(data).read_text(encoding="utf-8")


def _loaders(text: str, context: int):
    """Chapter 5's loaders: 90% of `text` for training (shuffled), 10% for validation."""
    split_idx = int(0.90 * len(text))
    torch.manual_seed(123)
    train_loader = create_dataloader_v1(
        text[:split_idx], batch_size=TRAINING["batch_size"], max_length=context, stride=context,
        drop_last=True, shuffle=True, num_workers=0)
    val_loader = create_dataloader_v1(
        text[split_idx:], batch_size=TRAINING["batch_size"], max_length=context, stride=context,
        drop_last=False, shuffle=False, num_workers=0)
    return train_loader, val_loader


_PRECISION_LABELS = {"bf16": "bf16 autocast", "fp16": "fp16 autocast, loss scaling",
                     "fp32": "float32"}


def _label(kind: str, precision: str, kept: bool) -> str:
    if kind == "chapter5":
        return "chapter 5: teaching modules, AdamW, float32"
    return ("chapter 8: fast modules, fused AdamW, fused CE, " + _PRECISION_LABELS[precision]
            + ", KV-cache samples" + (", freed memory kept" if kept else ""))


def retrain(kind: str, model: str = "gpt2-small", context: int = 256, epochs: int = 10,
            device="cpu", precision: str = "auto", data: str | None = None) -> dict:
    """One run of chapter 5's training on the text file `data` (default the-verdict):
    "chapter5" as notebook 05 runs it, "fast" with `train_model_fast` and every speed-up that
    applies here. Returns its record: label, wall seconds, the loop's evaluation records and
    samples."""
    device = torch.device(device)
    cfg = dataclasses.replace(MODELS[model], context_length=context)
    tokenizer = get_gpt2_tokenizer()
    train_loader, val_loader = _loaders(_read_text(data), context)
    fast = kind == "fast"
    chosen = choose_precision(device, precision).name if fast else "fp32"
    kept = keep_freed_memory() if fast else False
    torch.manual_seed(123)
    net = GPTModel(cfg).to(device)
    if fast:
        optimizer = fused_adamw(set_impl(net, "fast").parameters(), lr=0.0004, weight_decay=0.1)
        train, extra = train_model_fast, {"precision": chosen}
    else:
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.0004, weight_decay=0.1)
        train, extra = train_model_simple, {}
    start = time.perf_counter()
    history = train(net, train_loader, val_loader, optimizer, device, num_epochs=epochs,
                    eval_freq=TRAINING["eval_freq"], eval_iter=TRAINING["eval_iter"],
                    start_context=TRAINING["start_context"], tokenizer=tokenizer, **extra)
    wall = time.perf_counter() - start
    return {"label": _label(kind, chosen, kept), "wall_seconds": wall, "precision": chosen,
            "bf16": chosen == "bf16",
            "freed_memory_kept": kept, "evals": [dict(r) for r in history.records],
            "samples": list(history.samples)}


def compare_runs(runs: dict, setup: dict, machine: dict) -> dict:
    """The results of the two runs (records by kind, as `retrain` returns them)."""
    return {"format": 3, "machine": machine, "setup": setup, "runs": runs,
            "time_ratio": runs["fast"]["wall_seconds"] / runs["chapter5"]["wall_seconds"]}


def run_chapter5_comparison(model: str = "gpt2-small", context: int = 256, epochs: int = 10,
                            device="cpu", precision: str = "auto", data: str | None = None,
                            progress: bool = True) -> dict:
    """Chapter 5's run and the fast retrain, each in a fresh process, one after the other."""
    runs = {}
    for kind in RUN_KINDS:
        if progress:
            print(f"  chapter 5 retrain: running {kind} ...", file=sys.stderr, flush=True)
        runs[kind], _ = run_in_fresh_process(retrain, kind, model, context, epochs, str(device),
                                             precision, data)
    setup = {"model": model, "context": context, "epochs": epochs, **TRAINING,
             "data": f"{Path(data).name if data else 'the-verdict'}, 90/10 split",
             "order": "chapter 5 first, then the fast retrain, each in a fresh process"}
    machine = {**describe_machine(device), "native_bf16": bf16_supported(device)}
    return compare_runs(runs, setup, machine)


def format_chapter5(results: dict) -> str:
    """The two runs of chapter 5 as a table: wall time, final and best losses."""
    s, m = results["setup"], results["machine"]
    width = max(len(run["label"]) for run in results["runs"].values())
    lines = [f"chapter 5 retrained on {m.get('gpu') or m['cpu']} ({m['cpu_threads']} threads, "
             f"torch {m['torch']}): {s['model']}, context {s['context']}, {s['epochs']} epochs, "
             f"batch {s['batch_size']}",
             f"{'run':<{width}} {'wall time':>9} {'final train':>11} {'final val':>9} {'best val':>8}"]
    for run in results["runs"].values():
        last = run["evals"][-1]
        best = min(e["val_loss"] for e in run["evals"])
        lines.append(f"{run['label']:<{width}} {run['wall_seconds'] / 60:>5.1f} min "
                     f"{last['train_loss']:>11.3f} {last['val_loss']:>9.3f} {best:>8.3f}")
    lines.append(f"fast retrain / chapter 5 wall time: {100 * results['time_ratio']:.0f}%")
    return "\n".join(lines)


def plot_chapter5(results: dict, path=None):
    """Training and validation loss of both runs against wall-clock minutes."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9.5, 3.6))
    names = {"chapter5": ("chapter 5", "tab:blue"), "fast": ("fast retrain", "tab:orange")}
    for kind, run in results["runs"].items():
        name, color = names[kind]
        minutes = [e["seconds"] / 60 for e in run["evals"]]
        ax.plot(minutes, [e["train_loss"] for e in run["evals"]], marker="o", markersize=3,
                color=color, label=f"{name}: training loss")
        ax.plot(minutes, [e["val_loss"] for e in run["evals"]], marker="s", markersize=3,
                linestyle="-.", color=color, label=f"{name}: validation loss")
        ax.axvline(run["wall_seconds"] / 60, color=color, linewidth=0.8, linestyle=":",
                   label=f"{name}: end of the run")
    ax.set_xlabel("wall-clock time (minutes)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the curves
    ax.set_title(f"{results['setup']['model']}, {results['setup']['epochs']} epochs on "
                 f"{results['machine'].get('gpu') or results['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.cli.retrain_chapter5",
                                     description="Retrain chapter 5 as taught and with every "
                                                 "speed-up of chapter 8, side by side.")
    parser.add_argument("--quick", action="store_true", help="the tiny config, context 64, 1 epoch")
    parser.add_argument("--model", choices=list(MODELS), help="default gpt2-small")
    parser.add_argument("--context", type=int, help="tokens per sequence (default 256)")
    parser.add_argument("--epochs", type=int, help="default 10 (1 with --quick)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best found)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                        help="number format of the fast run (auto: bfloat16 where native, "
                             "float16 with loss scaling on GPUs such as the T4, else float32)")
    parser.add_argument("--data", help="a text file to train on (default: the-verdict)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also save the loss curves here")
    args = parser.parse_args(argv)
    if args.device is None:
        from utils.core.device import get_device
        args.device = str(get_device(verbose=False))
    results = run_chapter5_comparison(
        args.model or ("tiny" if args.quick else "gpt2-small"),
        args.context or (64 if args.quick else 256), args.epochs or (1 if args.quick else 10),
        args.device, args.precision, args.data)
    print(format_chapter5(results))
    if args.json:
        save_results(results, args.json)
    if args.plot:
        plot_chapter5(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
