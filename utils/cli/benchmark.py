"""Speed of the fast paths against the teaching implementation, measured side by side
(hand-written command; notebook 08 explains the paths).

    python -m utils.cli.benchmark                     # GPT-2 124M, batch 2, context 256 (~10 min on 2 CPU cores)
    python -m utils.cli.benchmark --model tiny        # the tiny config: seconds
    python -m utils.cli.benchmark --batch-size 16 --context 1024 --compile   # on a GPU
    python -m utils.cli.benchmark --json benchmarks/my-machine.json          # also save the results

How it measures. One model is built once; every repeat runs one training step (and one
whole generation) of *every* path in turn, rotating the order, so a slow moment of the
machine hits all paths alike. Each path's speed and its ratio to the teaching path are taken
per repeat, and the median over the repeats is reported. One warm-up round is not counted.
Peak memory: on CUDA, the allocator's peak during the path's runs; on CPU, the peak resident
size of a fresh process that runs only that path (it includes Python and PyTorch, ~0.3 GB).
On CUDA it also reports model FLOPs utilisation: (6 N + 12 L H Q T) FLOPs per token, with N
the parameters outside the embedding tables, against the device's dense bfloat16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.fast import CachedGPT, autocast_bf16, bf16_supported, compile_model, fused_adamw, set_impl
from utils.generation import generate
from utils.model import GPT2_SMALL_124M, GPT_TINY, GPTModel
from utils.train import calc_loss_batch

__all__ = ["run_benchmark", "format_results", "plot_results", "PEAK_BF16_TFLOPS"]

MODELS = {  # name -> config; GPT-2 small keeps chapter 5's dropout of 0.1
    "gpt2-small": GPT2_SMALL_124M,
    "tiny": GPT_TINY,
}
PROMPT = [15496, 11, 314, 716]  # "Hello, I am" in GPT-2 BPE: a short prompt

# Dense bfloat16 tensor-core peaks from the vendors' data sheets, in TFLOPS (first match wins).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0, "T4": 65.0, "V100": 125.0}


@dataclasses.dataclass(frozen=True)
class _TrainPath:
    name: str
    impl: str
    fused_optimizer: bool = False
    bf16: bool = False
    compiled: bool = False


@dataclasses.dataclass(frozen=True)
class _GenPath:
    name: str
    impl: str
    use_cache: bool
    bf16: bool = False


def _train_paths(bf16: bool, compile_: bool) -> list[_TrainPath]:
    paths = [_TrainPath("teaching", "teaching"),
             _TrainPath("sdpa attention", "sdpa"),
             _TrainPath("fused kernels", "fast"),
             _TrainPath("fast path (+ fused AdamW)", "fast", fused_optimizer=True)]
    if bf16:  # autocast alone on the teaching model, then with the fast path
        paths.append(_TrainPath("teaching + bf16 autocast", "teaching", bf16=True))
        paths.append(_TrainPath("fast path + bf16", "fast", True, bf16=True))
    if compile_:
        name = "fast path + bf16 + compile" if bf16 else "fast path + compile"
        paths.append(_TrainPath(name, "fast", True, bf16=bf16, compiled=True))
    return paths


def _gen_paths(bf16: bool) -> list[_GenPath]:
    paths = [_GenPath("teaching, no cache", "teaching", use_cache=False),
             _GenPath("teaching + KV cache", "teaching", use_cache=True),
             _GenPath("fast + KV cache", "fast", use_cache=True)]
    if bf16:
        paths.append(_GenPath("fast + KV cache + bf16", "fast", use_cache=True, bf16=True))
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trainer:
    """One model, its optimizers and (optionally) a compiled copy, stepping any path."""

    def __init__(self, cfg, batch_size: int, context: int, device, compiled: bool,
                 compiled_bf16: bool = False):
        torch.manual_seed(123)
        self.device = device
        self.model = GPTModel(cfg).to(device).train()
        self.optimizers = {False: torch.optim.AdamW(self.model.parameters(), lr=4e-4,
                                                    weight_decay=0.1),
                           True: fused_adamw(self.model.parameters(), lr=4e-4,
                                             weight_decay=0.1)}
        self.x = torch.randint(0, cfg.vocab_size, (batch_size, context), device=device)
        self.y = torch.randint(0, cfg.vocab_size, (batch_size, context), device=device)
        self.compiled = None
        if compiled:
            fast = set_impl(GPTModel(cfg), "fast").to(device).train()
            fast.load_state_dict(self.model.state_dict())
            autocast_bf16(fast, compiled_bf16)  # build the graph that will run
            fast = compile_model(fast, self.x)
            self.compiled = (fast, fused_adamw(fast.parameters(), lr=4e-4, weight_decay=0.1))

    def step(self, path: _TrainPath) -> float:
        if path.compiled:
            model, optimizer = self.compiled
        else:
            model, optimizer = set_impl(self.model, path.impl), self.optimizers[path.fused_optimizer]
            autocast_bf16(model, path.bf16)
        _sync(self.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = calc_loss_batch(self.x, self.y, model, self.device)
        loss.backward()
        optimizer.step()
        _sync(self.device)
        return time.perf_counter() - start


def _generate_once(model, path: _GenPath, new_tokens: int, device) -> tuple[float, torch.Tensor]:
    set_impl(model, path.impl)
    autocast_bf16(model, path.bf16)
    runner = CachedGPT(model) if path.use_cache else model
    prompt = torch.tensor([PROMPT], device=device)
    _sync(device)
    start = time.perf_counter()
    out = generate(runner, prompt, new_tokens, model.cfg.context_length)
    _sync(device)
    return time.perf_counter() - start, out


def _paired(paths, run_one, repeats: int, progress: bool, label: str) -> dict:
    """Warm-up round, then `repeats` rounds over all paths in rotating order."""
    for path in paths:
        run_one(path)
    seconds = {p.name: [] for p in paths}
    for r in range(repeats):
        order = paths[r % len(paths):] + paths[:r % len(paths)]
        for path in order:
            seconds[path.name].append(run_one(path))
        if progress:
            print(f"  {label}: round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return seconds


def _summary(paths, seconds: dict, tokens_per_run: int) -> list[dict]:
    base = seconds[paths[0].name]
    rows = []
    for path in paths:
        times = seconds[path.name]
        rows.append({"path": path.name,
                     "tokens_per_s": tokens_per_run / statistics.median(times),
                     "ratio": statistics.median(b / t for b, t in zip(base, times)),
                     "seconds": times})
    return rows


def _peak_rss_bytes() -> int:
    status = Path("/proc/self/status")
    if status.is_file():  # Linux: VmHWM starts afresh at exec, unlike ru_maxrss (inherited)
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS bytes, Linux KiB


def _cpu_peaks(kind: str, paths, args: dict) -> list[float]:
    """Peak resident memory (MB) of a fresh process running only each path."""
    peaks = []
    for index in range(len(paths)):
        cmd = [sys.executable, "-m", "utils.cli.benchmark", "--peak-worker", f"{kind}:{index}",
               "--worker-args", json.dumps(args)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout.strip().splitlines()[-1]) / 2**20)
    return peaks


def _peak_worker(spec: str, args: dict) -> None:
    kind, index = spec.split(":")
    cfg, device = MODELS[args["model"]], torch.device("cpu")
    if kind == "train":
        path = _train_paths(args["bf16"], args["compile"])[int(index)]
        trainer = _Trainer(cfg, args["batch_size"], args["context"], device, path.compiled,
                           path.bf16)
        for _ in range(2):
            trainer.step(path)
    else:
        path = _gen_paths(args["bf16"])[int(index)]
        torch.manual_seed(123)
        _generate_once(GPTModel(cfg).eval(), path, args["new_tokens"], device)
    print(_peak_rss_bytes())


def _flops_per_token(cfg, context: int) -> float:
    n = sum(p.numel() for p in GPTModel(cfg).parameters()) - (cfg.vocab_size + cfg.context_length) * cfg.emb_dim
    head_dim = cfg.emb_dim // cfg.n_heads
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * head_dim * context


def _peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _cpu_name() -> str:
    """The CPU model and its bfloat16 instructions, where Linux says (else the platform's name)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.processor() or platform.machine()
    name, flags = platform.machine(), set()
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    bf16 = sorted(f for f in flags if f in {"avx512_bf16", "amx_bf16"})
    return f"{name} ({', '.join(bf16) if bf16 else 'no bf16 instructions'})"


def _machine(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": bf16_supported(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = _cpu_name()
    return info


def run_benchmark(model: str = "gpt2-small", batch_size: int = 2, context: int = 256,
                  repeats: int = 5, new_tokens: int = 200, device="cpu", memory: bool = True,
                  compile: bool = False, bf16: str | bool = "auto",
                  peak_tflops: float | None = None, progress: bool = True) -> dict:
    """Time every training and generation path against the teaching one; return a dict."""
    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r}; choose one of {list(MODELS)}")
    cfg, device = MODELS[model], torch.device(device)
    if context > cfg.context_length or len(PROMPT) + new_tokens > cfg.context_length:
        raise ValueError(f"{model} has context_length {cfg.context_length}: use --context <= "
                         f"{cfg.context_length} and --new-tokens <= {cfg.context_length - len(PROMPT)}")
    use_bf16 = bf16_supported(device) if bf16 == "auto" else bool(bf16)
    skipped = [] if use_bf16 else [f"bf16: {device} has no native bfloat16 "
                                   f"(CPU capability {torch.backends.cpu.get_cpu_capability()}); "
                                   f"it would be emulated, so it is left out (--bf16 on forces it)"]
    train_paths, gen_paths = _train_paths(use_bf16, compile), _gen_paths(use_bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    trainer = _Trainer(cfg, batch_size, context, device, compile, use_bf16)
    train_peaks = {}

    def train_one(path):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = trainer.step(path)
        if device.type == "cuda":
            train_peaks[path.name] = max(train_peaks.get(path.name, 0),
                                         torch.cuda.max_memory_allocated(device) / 2**20)
        return seconds

    train_seconds = _paired(train_paths, train_one, repeats, progress, "training")
    train_rows = _summary(train_paths, train_seconds, batch_size * context)
    del trainer

    torch.manual_seed(123)
    gen_model = GPTModel(cfg).to(device).eval()
    outputs, gen_peaks = {}, {}

    def gen_one(path):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, outputs[path.name] = _generate_once(gen_model, path, new_tokens, device)
        if device.type == "cuda":
            gen_peaks[path.name] = max(gen_peaks.get(path.name, 0),
                                       torch.cuda.max_memory_allocated(device) / 2**20)
        return seconds

    gen_seconds = _paired(gen_paths, gen_one, max(1, repeats // 2 + 1), progress, "generation")
    gen_rows = _summary(gen_paths, gen_seconds, new_tokens)
    identical = torch.equal(outputs[gen_paths[0].name], outputs[gen_paths[1].name])

    if memory and device.type == "cpu":
        worker_args = {"model": model, "batch_size": batch_size, "context": context,
                       "new_tokens": new_tokens, "bf16": use_bf16, "compile": compile}
        train_peaks = dict(zip([p.name for p in train_paths],
                               _cpu_peaks("train", train_paths, worker_args)))
        gen_peaks = dict(zip([p.name for p in gen_paths], _cpu_peaks("gen", gen_paths, worker_args)))
    for rows, peaks in ((train_rows, train_peaks), (gen_rows, gen_peaks)):
        for row in rows:
            row["peak_mem_mb"] = peaks.get(row["path"])

    peak = _peak_tflops(device, peak_tflops) if device.type == "cuda" else None
    if peak:
        flops = _flops_per_token(cfg, context)
        for row in train_rows:
            row["mfu"] = row["tokens_per_s"] * flops / (peak * 1e12)
    return {"machine": _machine(device),
            "setup": {"model": model, "batch_size": batch_size, "context": context,
                      "repeats": repeats, "new_tokens": new_tokens, "prompt_tokens": len(PROMPT),
                      "dropout": cfg.drop_rate, "peak_tflops": peak,
                      "memory": "cuda allocator peak" if device.type == "cuda" else
                                ("peak RSS of a process running one path" if memory else None)},
            "train": train_rows, "generate": gen_rows,
            "greedy_identical_with_cache": identical, "skipped": skipped}


def format_results(results: dict) -> str:
    """The results as a plain-text table."""
    s, m = results["setup"], results["machine"]
    where = m.get("gpu") or f"{m.get('cpu')}, {m['cpu_threads']} threads, {m['cpu_capability']}"
    lines = [f"{s['model']} on {m['device']} ({where}), torch {m['torch']}",
             f"training: batch {s['batch_size']} x context {s['context']}, dropout "
             f"{s['dropout']}; generation: {s['new_tokens']} new tokens from a "
             f"{s['prompt_tokens']}-token prompt; medians of {s['repeats']} paired rounds"]
    for title, rows, unit in (("training", results["train"], "tokens/s"),
                              ("generation", results["generate"], "tokens/s")):
        lines.append("")
        lines.append(f"{title:<28} {unit:>10} {'vs teaching':>12} {'peak mem':>10}"
                     + ("  {:>5}".format("MFU") if any("mfu" in r for r in rows) else ""))
        for r in rows:
            mem = f"{r['peak_mem_mb']:,.0f} MB" if r.get("peak_mem_mb") else "-"
            line = f"{r['path']:<28} {r['tokens_per_s']:>10,.1f} {r['ratio']:>11.2f}x {mem:>10}"
            if "mfu" in r:
                line += f"  {100 * r['mfu']:>4.1f}%"
            lines.append(line)
    lines.append("")
    lines.append(f"greedy tokens identical with and without the cache: "
                 f"{results['greedy_identical_with_cache']}")
    lines.extend(f"skipped: {reason}" for reason in results["skipped"])
    return "\n".join(lines)


def plot_results(results: dict, path=None):
    """Bar charts of each path's speed relative to the teaching path."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, key, title in ((axes[0], "train", "training step"), (axes[1], "generate", "generation")):
        rows = results[key]
        ax.barh([r["path"] for r in rows][::-1], [r["ratio"] for r in rows][::-1], color="tab:blue")
        ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        for i, r in enumerate(rows[::-1]):
            ax.text(r["ratio"], i, f" {r['ratio']:.2f}x", va="center", fontsize=8)
        ax.set_title(f"{title}: speed vs teaching")
        ax.set_xlim(0, max(r["ratio"] for r in rows) * 1.25)
    fig.suptitle(f"{results['setup']['model']}, {results['machine']['device']}", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the fast paths side by side.")
    parser.add_argument("--model", default="gpt2-small", choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--context", type=int, default=None,
                        help="training tokens per sequence (default 256; 64 for tiny)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="generated tokens (default 200; 50 for tiny)")
    parser.add_argument("--repeats", type=int, default=5, help="paired training rounds")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best found)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory runs")
    parser.add_argument("--peak-tflops", type=float, help="device bf16 peak, for MFU")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also save the bar chart here")
    parser.add_argument("--peak-worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_worker:
        _peak_worker(args.peak_worker, json.loads(args.worker_args))
        return 0
    tiny = args.model == "tiny"
    if args.device is None:
        from utils.core.device import get_device
        args.device = get_device(verbose=False)
    results = run_benchmark(
        args.model, args.batch_size, args.context or (64 if tiny else 256), args.repeats,
        args.new_tokens or (50 if tiny else 200), args.device, memory=not args.no_memory,
        compile=args.compile, bf16={"auto": "auto", "on": True, "off": False}[args.bf16],
        peak_tflops=args.peak_tflops)
    print(format_results(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"results written to {args.json}")
    if args.plot:
        plot_results(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
