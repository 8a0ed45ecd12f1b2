"""Speed of chapter 8's fast paths against the teaching code, measured side by side, and
chapter 5's training run retrained with them (hand-written command; notebook 08 explains
the paths).

    python -m utils.cli.benchmark                    # GPT-2 124M, batch 2 x 256 (~13 min on 2 CPU cores)
    python -m utils.cli.benchmark --quick            # the tiny config: well under a minute
    python -m utils.cli.benchmark --json benchmarks/my-machine.json   # also save the results
    python -m utils.cli.benchmark --chapter5 --json benchmarks/my-machine-chapter5.json
    python -m utils.cli.benchmark --device cuda      # on a GPU: batch 16 x 1024, compiled, with MFU

How it measures. One model is built once; every round runs one training step of *every*
path in turn (and a float32 and a bfloat16 matrix product of 2048 x 2048 x 2048, the
machine's peak), rotating the order, so a slow moment of the machine hits all of them alike.
Generation rounds do the same with one whole greedy generation per path. Each row shows the
median over the rounds and the slowest and fastest round; every ratio is the quotient of two
printed medians. One warm-up round is not counted.

Training speed is also given as model FLOP/s: (6 N + 12 L H Q T) FLOPs per token, with N the
parameters outside the embedding tables (PaLM, appendix B), and as a fraction of the measured
matmul peak of the row's number format; on CUDA also against the data-sheet bfloat16 peak
(model FLOPs utilisation, MFU). Peak memory: on CUDA the allocator's peak during the row's
runs; on CPU the peak resident size of a fresh process that runs only that row (Python and
PyTorch included, about 0.3 GB).

`--chapter5` retrains chapter 5's model (the-verdict, 10 epochs, batch 2 x 256, AdamW) twice,
each in a fresh process one after the other: exactly as chapter 5 does, and with every speed-up
of chapter 8 that applies on the machine; it records every evaluation's losses with the
wall-clock time at which it was printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.fast import (CachedGPT, autocast_bf16, bf16_inference_model, bf16_supported,
                        compile_model, fused_adamw, fused_cross_entropy, keep_freed_memory,
                        set_impl, train_model_fast)
from utils.generation import generate
from utils.model import GPT2_SMALL_124M, GPT_TINY, GPTModel

__all__ = ["run_benchmark", "format_results", "format_profile", "plot_results", "flops_per_token",
           "data_sheet_bf16_tflops", "PEAK_BF16_TFLOPS", "run_chapter5_comparison",
           "format_chapter5", "plot_chapter5", "main"]

MODELS = {"gpt2-small": GPT2_SMALL_124M, "tiny": GPT_TINY}  # GPT-2 keeps chapter 5's dropout 0.1
PROMPT = [15496, 11, 314, 716]  # "Hello, I am" in GPT-2 BPE: a short prompt
QUICK = {"model": "tiny", "batch_size": 2, "context": 64, "repeats": 3, "new_tokens": 50,
         "matmul_size": 512}
LEGEND = ("fast modules = SDPA attention + F.layer_norm + F.gelu (set_impl 'fast'); AdamW = "
          "torch.optim.AdamW as chapter 5 builds it; CE = cross-entropy (fused: "
          "fused_cross_entropy); bf16 autocast keeps float32 weights and casts them per forward "
          "pass; bf16 weights = bf16_inference_model (converted once, bfloat16 KV cache); "
          "freed memory kept = keep_freed_memory()")

# Dense bfloat16 tensor-core peaks from the vendors' data sheets, in TFLOPS (first match wins).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0, "T4": 65.0, "V100": 125.0}


@dataclasses.dataclass(frozen=True)
class _TrainPath:
    name: str
    impl: str  # teaching, sdpa or fast (set_impl)
    fused_adamw: bool = False
    fused_ce: bool = False
    bf16: bool = False  # forward pass under bfloat16 autocast
    keep_memory: bool = False  # keep_freed_memory() during the step
    compiled: bool = False  # transformer blocks compiled (compile_model)

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.bf16 else "float32"


@dataclasses.dataclass(frozen=True)
class _GenPath:
    name: str
    impl: str
    cache: bool
    precision: str = "float32"  # float32, bf16 autocast, bf16 weights


def _train_paths(bf16: bool, compile_: bool, keep_memory: bool) -> list[_TrainPath]:
    adamw = "fused AdamW"
    paths = [_TrainPath("teaching modules, AdamW, float32", "teaching"),
             _TrainPath("SDPA attention, AdamW, float32", "sdpa"),
             _TrainPath("fast modules, AdamW, float32", "fast"),
             _TrainPath(f"fast modules, {adamw}, float32", "fast", True),
             _TrainPath(f"fast modules, {adamw}, fused CE, float32", "fast", True, True)]
    if keep_memory:
        paths.append(_TrainPath(f"fast modules, {adamw}, fused CE, float32, freed memory kept",
                                "fast", True, True, keep_memory=True))
    if bf16:
        paths += [_TrainPath("teaching modules, AdamW, bf16 autocast", "teaching", bf16=True),
                  _TrainPath(f"fast modules, {adamw}, bf16 autocast", "fast", True, bf16=True),
                  _TrainPath(f"fast modules, {adamw}, fused CE, bf16 autocast", "fast", True,
                             True, bf16=True)]
        if keep_memory:
            paths.append(_TrainPath(f"fast modules, {adamw}, fused CE, bf16 autocast, freed "
                                    f"memory kept", "fast", True, True, True, keep_memory=True))
    if compile_:
        best = paths[-1]
        paths.append(dataclasses.replace(best, name="compiled " + best.name, compiled=True))
    return paths


def _gen_paths(bf16: bool) -> list[_GenPath]:
    paths = [_GenPath("no cache, teaching modules, float32", "teaching", cache=False),
             _GenPath("KV cache (SDPA attention), teaching LayerNorm/GELU, float32", "teaching",
                      cache=True),
             _GenPath("KV cache, fast modules, float32", "fast", cache=True)]
    if bf16:
        paths += [_GenPath("KV cache, fast modules, bf16 autocast", "fast", True, "bf16 autocast"),
                  _GenPath("KV cache, fast modules, bf16 weights", "fast", True, "bf16 weights")]
    return paths


def flops_per_token(cfg, context: int) -> float:
    """Training FLOPs per token, forward and backward: 6 N + 12 L H Q T (PaLM, appendix B),
    N = parameters outside the token and position embeddings."""
    n = sum(p.numel() for p in GPTModel(cfg).parameters()) - (cfg.vocab_size + cfg.context_length) * cfg.emb_dim
    head_dim = cfg.emb_dim // cfg.n_heads
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * head_dim * context


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_seconds(dtype: torch.dtype, size: int, device: torch.device, calls: int = 3) -> float:
    """Seconds per size x size x size matrix product (the best of `calls` back-to-back ones)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(calls):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


class _Trainer:
    """One model and its two optimizers (and a compiled copy), stepping any training path."""

    def __init__(self, cfg, batch_size: int, context: int, device, compiled_path=None,
                 manage_memory: bool = False):
        torch.manual_seed(123)
        self.device, self.manage_memory = device, manage_memory
        self.model = GPTModel(dataclasses.replace(cfg, context_length=context)).to(device)
        self.model.train()
        self.optimizers = {False: torch.optim.AdamW(self.model.parameters(), lr=4e-4,
                                                    weight_decay=0.1),
                           True: fused_adamw(self.model.parameters(), lr=4e-4, weight_decay=0.1)}
        self.x = torch.randint(0, cfg.vocab_size, (batch_size, context), device=device)
        self.y = torch.randint(0, cfg.vocab_size, (batch_size, context), device=device)
        self.compiled = None
        if compiled_path is not None:
            fast = set_impl(GPTModel(self.model.cfg), "fast").to(device).train()
            fast.load_state_dict(self.model.state_dict())
            with torch.autocast(device.type, torch.bfloat16, enabled=compiled_path.bf16):
                fast = compile_model(fast, self.x)  # builds the graph that will run
            self.compiled = (fast, fused_adamw(fast.parameters(), lr=4e-4, weight_decay=0.1))

    def step(self, path: _TrainPath) -> float:
        if path.compiled:
            model, optimizer = self.compiled
        else:
            model = set_impl(self.model, path.impl)
            optimizer = self.optimizers[path.fused_adamw]
        if self.manage_memory:  # the allocator as the row says
            keep_freed_memory(path.keep_memory)
        _sync(self.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=path.bf16):
            logits = model(self.x)  # (B, T, V)
        if path.fused_ce:
            loss = fused_cross_entropy(logits.flatten(0, 1), self.y.flatten())
        else:  # chapter 5's loss, on float32 logits as autocast_bf16 returns them
            loss = F.cross_entropy(logits.float().flatten(0, 1), self.y.flatten())
        loss.backward()
        optimizer.step()
        _sync(self.device)
        return time.perf_counter() - start


class _Generator:
    """One float32 model, and its bfloat16 copy, generating along any path."""

    def __init__(self, cfg, device, bf16: bool):
        torch.manual_seed(123)
        self.model = GPTModel(cfg).to(device).eval()
        self.device = device
        self.bf16_model = bf16_inference_model(set_impl(self.model, "fast")) if bf16 else None

    def run(self, path: _GenPath, new_tokens: int) -> tuple[float, torch.Tensor]:
        model = set_impl(self.model, path.impl)
        autocast_bf16(model, path.precision == "bf16 autocast")
        if path.precision == "bf16 weights":
            model = self.bf16_model
        runner = CachedGPT(model) if path.cache else model
        prompt = torch.tensor([PROMPT], device=self.device)
        _sync(self.device)
        start = time.perf_counter()
        out = generate(runner, prompt, new_tokens, model.cfg.context_length)
        _sync(self.device)
        seconds = time.perf_counter() - start
        autocast_bf16(self.model, False)
        return seconds, out


def _paired(names: list[str], run_one, repeats: int, progress: bool, label: str) -> dict:
    """A warm-up round, then `repeats` rounds over every name in rotating order."""
    for name in names:
        run_one(name)
    seconds = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds[name].append(run_one(name))
        if progress:
            print(f"  {label}: round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return seconds


def _spread(values: list[float]) -> dict:
    done = [v for v in values if v is not None]
    if not done:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(done), "min": min(done), "max": max(done)}


def _rows(names: list[str], seconds: dict, tokens_per_run: int) -> list[dict]:
    """One row per path: tokens/s (median, min, max over rounds), ratio of medians to row 1."""
    rows = []
    for name in names:
        rates = [None if s is None else tokens_per_run / s for s in seconds[name]]
        spread = _spread(rates)
        rows.append({"path": name, "tokens_per_s": spread["median"],
                     "tokens_per_s_min": spread["min"], "tokens_per_s_max": spread["max"],
                     "seconds": seconds[name]})
    base = next((r["tokens_per_s"] for r in rows if r["tokens_per_s"]), None)
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / base if row["tokens_per_s"] and base else None
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


def _cpu_peaks(kind: str, count: int, args: dict) -> list[float]:
    """Peak resident memory (MB) of a fresh process running only each path."""
    peaks = []
    for index in range(count):
        cmd = [sys.executable, "-m", "utils.cli.benchmark", "--peak-worker", f"{kind}:{index}",
               "--worker-args", json.dumps(args)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout.strip().splitlines()[-1]) / 1e6)
    return peaks


def _peak_worker(spec: str, args: dict) -> None:
    kind, index = spec.split(":")
    cfg, device = MODELS[args["model"]], torch.device("cpu")
    if kind == "train":
        path = _train_paths(args["bf16"], args["compile"], args["keep_memory"])[int(index)]
        trainer = _Trainer(cfg, args["batch_size"], args["context"], device,
                           path if path.compiled else None, args["keep_memory"])
        for _ in range(2):
            trainer.step(path)
    else:
        path = _gen_paths(args["bf16"])[int(index)]
        _Generator(cfg, device, path.precision == "bf16 weights").run(path, args["new_tokens"])
    print(_peak_rss_bytes())


def data_sheet_bf16_tflops(gpu_name: str) -> float | None:
    """The dense bfloat16 peak of a GPU named like torch.cuda.get_device_name() says."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu_name), None)


def _peak_tflops(device: torch.device, override: float | None) -> float | None:
    return override or data_sheet_bf16_tflops(torch.cuda.get_device_name(device))


def _cpu_info() -> dict:
    """The CPU's model name and the vector and matrix instructions that matter here."""
    info = {"cpu": platform.processor() or platform.machine(), "cpu_flags": []}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["cpu"] = value.strip()
            elif key.strip() == "flags":
                wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                          "amx_tile", "amx_bf16", "amx_int8")
                info["cpu_flags"] = [f for f in wanted if f in value.split()]
    return info


def _machine(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__,
            "python": platform.python_version(), "os": platform.system(),
            "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": bf16_supported(device), **_cpu_info()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _greedy_agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many generated tokens agree before the first difference."""
    differ = (a[0, len(PROMPT):] != b[0, len(PROMPT):]).nonzero()
    return int(differ[0]) if len(differ) else a.shape[1] - len(PROMPT)


# Operator groups of the profile (first match of a name prefix wins).
_GROUPS = [("matrix products (mm, addmm, bmm)", ("aten::mm", "aten::addmm", "aten::bmm",
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


def _profile_step(trainer: "_Trainer", path: _TrainPath) -> dict:
    """Where one training step of `path` spends its time, by operator group."""
    from torch.profiler import profile
    trainer.step(path)  # the allocator and caches as in a running loop
    faults = _minor_faults()
    with _quiet_stderr(), profile() as prof:
        trainer.step(path)
    faults = None if faults is None else _minor_faults() - faults
    events = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]
    groups = {name: 0.0 for name, _ in _GROUPS}
    for key, ms, _ in events:
        groups[next(n for n, prefixes in _GROUPS if key.startswith(prefixes))] += ms
    top = sorted(events, key=lambda e: -e[1])[:12]
    return {"path": path.name, "total_ms": sum(groups.values()), "page_faults": faults,
            "groups": groups, "top_ops": [{"op": k, "ms": ms, "calls": n} for k, ms, n in top]}


def run_benchmark(model: str = "gpt2-small", batch_size: int = 2, context: int = 256,
                  repeats: int = 5, new_tokens: int = 200, device="cpu", memory: bool = True,
                  compile: bool = False, bf16: str | bool = "auto", keep_memory: bool = True,
                  matmul_size: int = 2048, peak_tflops: float | None = None,
                  profile: bool = True, progress: bool = True) -> dict:
    """Time every training and generation path side by side; return a dict (see main)."""
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
    if keep_memory and device.type == "cpu" and not keep_freed_memory(False):
        keep_memory = False
        skipped.append("freed memory kept: this C library has no mallopt (not glibc)")
    keep_memory = keep_memory and device.type == "cpu"  # CUDA memory has its own cache
    train_paths = _train_paths(use_bf16, compile, keep_memory)
    gen_paths = _gen_paths(use_bf16)
    dtypes = {"float32": torch.float32, **({"bfloat16": torch.bfloat16} if use_bf16 else {})}

    compiled = next((p for p in train_paths if p.compiled), None)
    trainer = _Trainer(cfg, batch_size, context, device, compiled, keep_memory)
    names = [f"matmul {d}" for d in dtypes] + [p.name for p in train_paths]
    by_name = {p.name: p for p in train_paths}
    mem_peaks: dict[str, float] = {}

    def train_one(name):
        if name.startswith("matmul "):
            return _matmul_seconds(dtypes[name.split()[1]], matmul_size, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds = trainer.step(by_name[name])
        except torch.cuda.OutOfMemoryError:
            trainer.model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return None
        if device.type == "cuda":
            mem_peaks[name] = max(mem_peaks.get(name, 0), torch.cuda.max_memory_allocated(device) / 1e6)
        return seconds

    seconds = _paired(names, train_one, repeats, progress, "training")
    matmul_flops = 2 * matmul_size**3
    peaks = {}
    for d in dtypes:
        rates = [matmul_flops / s / 1e9 for s in seconds[f"matmul {d}"]]
        peaks[d] = {**_spread(rates), "rounds": rates}
    train_rows = _rows([p.name for p in train_paths], seconds, batch_size * context)
    profiled = []
    if profile and device.type == "cpu":  # the best path, and the same without the last changes
        best = [p for p in train_paths if not p.compiled][-1]
        plain = next(p for p in train_paths if p.bf16 == best.bf16 and p.fused_adamw
                     and not p.fused_ce and p.impl == "fast")
        profiled = [_profile_step(trainer, plain), _profile_step(trainer, best)]
    del trainer
    if keep_memory:
        keep_freed_memory(False)

    generator = _Generator(cfg, device, use_bf16)
    outputs = {}
    by_name = {p.name: p for p in gen_paths}

    def gen_one(name):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        secs, outputs[name] = generator.run(by_name[name], new_tokens)
        if device.type == "cuda":
            mem_peaks[name] = max(mem_peaks.get(name, 0), torch.cuda.max_memory_allocated(device) / 1e6)
        return secs

    gen_repeats = max(1, repeats // 2 + 1)
    gen_seconds = _paired([p.name for p in gen_paths], gen_one, gen_repeats, progress, "generation")
    gen_rows = _rows([p.name for p in gen_paths], gen_seconds, new_tokens)
    checks = {"greedy_identical_with_cache": torch.equal(outputs[gen_paths[0].name],
                                                         outputs[gen_paths[2].name])}
    if use_bf16:
        checks["bf16_weights_greedy_agreement"] = _greedy_agreement(
            outputs[gen_paths[2].name], outputs[gen_paths[4].name])

    if memory and device.type == "cpu":
        worker_args = {"model": model, "batch_size": batch_size, "context": context,
                       "new_tokens": new_tokens, "bf16": use_bf16, "compile": compile,
                       "keep_memory": keep_memory}
        mem_peaks.update(zip([p.name for p in train_paths],
                             _cpu_peaks("train", len(train_paths), worker_args)))
        mem_peaks.update(zip([p.name for p in gen_paths],
                             _cpu_peaks("gen", len(gen_paths), worker_args)))
    for row in train_rows + gen_rows:
        row["peak_mem_mb"] = mem_peaks.get(row["path"])

    per_token = flops_per_token(cfg, context)
    data_sheet = _peak_tflops(device, peak_tflops) if device.type == "cuda" else peak_tflops
    for row, path in zip(train_rows, train_paths):
        row["dtype"] = path.dtype
        row["gflops"] = row["tokens_per_s"] * per_token / 1e9 if row["tokens_per_s"] else None
        peak = peaks.get(path.dtype, {}).get("median")
        row["fraction_of_peak"] = row["gflops"] / peak if row["gflops"] and peak else None
        if data_sheet and path.bf16 and row["gflops"]:
            row["mfu"] = row["gflops"] / (data_sheet * 1e3)
    fast32, fast16 = gen_rows[2], gen_rows[4] if use_bf16 else None
    return {"format": 2, "machine": _machine(device),
            "setup": {"model": model, "batch_size": batch_size, "context": context,
                      "repeats": repeats, "generation_repeats": gen_repeats,
                      "new_tokens": new_tokens, "prompt_tokens": len(PROMPT),
                      "dropout": cfg.drop_rate, "flops_per_token": per_token,
                      "matmul_size": matmul_size, "data_sheet_bf16_tflops": data_sheet,
                      "keep_memory_rows": keep_memory,
                      "memory": ("cuda allocator peak" if device.type == "cuda" else
                                 "peak RSS of a process running one path" if memory else None),
                      "legend": LEGEND},
            "peak_gflops": peaks, "train": train_rows, "generate": gen_rows,
            "bf16_generation_vs_float32": (fast16["tokens_per_s"] / fast32["tokens_per_s"]
                                           if fast16 else None),
            "checks": checks, "profile": profiled, "skipped": skipped}


def _fmt_rate(row: dict) -> str:
    if row["tokens_per_s"] is None:
        return f"{'out of memory':>30}"
    return (f"{row['tokens_per_s']:>10,.1f} {row['tokens_per_s_min']:>9,.1f}-"
            f"{row['tokens_per_s_max']:<9,.1f}")


def format_results(results: dict) -> str:
    """The results as plain-text tables (machine and setup first)."""
    s, m = results["setup"], results["machine"]
    where = m.get("gpu") or f"{m['cpu']} [{' '.join(m['cpu_flags']) or 'no flags read'}]"
    lines = [f"machine: {m['device']}, {where}; {m['cpu_threads']} threads of {m['cpu_count']} "
             f"CPUs, ATen {m['cpu_capability']}; torch {m['torch']}, Python {m['python']}",
             f"model: {s['model']}; training batch {s['batch_size']} x {s['context']} tokens, "
             f"dropout {s['dropout']}, {s['flops_per_token'] / 1e6:,.0f} MFLOP per token; "
             f"generation: {s['new_tokens']} tokens after a {s['prompt_tokens']}-token prompt",
             f"each row: median of {s['repeats']} paired rounds ({s['generation_repeats']} for "
             f"generation), min-max over the rounds; ratios are quotients of the medians",
             f"legend: {s['legend']}", ""]
    if results.get("note"):
        lines[-1:-1] = [f"note: {results['note']}"]
    if results["peak_gflops"]:
        size = s["matmul_size"]
        lines.append(f"{f'matmul peak ({size} x {size} x {size})':<70} {'GFLOP/s':>10} {'min-max':>19}")
        for dtype, p in results["peak_gflops"].items():
            lines.append(f"{dtype:<70} {p['median']:>10,.1f} {p['min']:>9,.1f}-{p['max']:<9,.1f}")
    else:
        lines.append("matmul peak: not measured in this run")
    mfu = any("mfu" in r for r in results["train"])
    header = (f"{'tokens/s':>10} {'min-max':>19} {'ratio':>6} {'GFLOP/s':>8} {'of peak':>8}"
              f" {'peak mem':>9}" + ("   MFU" if mfu else ""))
    lines += ["", f"{'training':<70} {header}"]
    for r in results["train"]:
        line = f"{r['path']:<70} {_fmt_rate(r)}"
        if r["tokens_per_s"]:
            line += f" {r['ratio']:>5.2f}x {r['gflops']:>8,.1f}"
            line += f" {100 * r['fraction_of_peak']:>7.0f}%" if r["fraction_of_peak"] else f" {'-':>8}"
            line += f" {r['peak_mem_mb']:>6,.0f} MB" if r.get("peak_mem_mb") else f" {'-':>9}"
            line += f" {100 * r['mfu']:>5.1f}%" if "mfu" in r else ""
        lines.append(line)
    lines += ["", f"{'generation':<70} {'tokens/s':>10} {'min-max':>19} {'ratio':>6} {'peak mem':>9}"]
    for r in results["generate"]:
        mem = f"{r['peak_mem_mb']:>6,.0f} MB" if r.get("peak_mem_mb") else f"{'-':>9}"
        lines.append(f"{r['path']:<70} {_fmt_rate(r)} {r['ratio']:>5.2f}x {mem}")
    lines.append("")
    checks = results["checks"]
    lines.append(f"greedy tokens identical with and without the cache (float32): "
                 f"{checks['greedy_identical_with_cache']}")
    if results.get("bf16_generation_vs_float32"):
        fast32, fast16 = results["generate"][2], results["generate"][4]
        lines.append(f"bf16 weights vs float32, both fast modules + KV cache: "
                     f"{results['bf16_generation_vs_float32']:.2f}x ({fast16['tokens_per_s']:,.1f} "
                     f"vs {fast32['tokens_per_s']:,.1f} tokens/s); greedy tokens equal float32's "
                     f"for the first {checks['bf16_weights_greedy_agreement']} of {s['new_tokens']}")
    if results.get("profile"):
        lines += ["", format_profile(results["profile"])]
    lines.extend(f"skipped: {reason}" for reason in results["skipped"])
    return "\n".join(lines)


def format_profile(profiled: list[dict]) -> str:
    """The profiled steps side by side: seconds and share of the step per operator group."""
    names = [f"({chr(97 + i)})" for i in range(len(profiled))]
    lines = ["one training step, profiled (self time of PyTorch's operators, by group):"]
    lines += [f"  {n} {p['path']}" for n, p in zip(names, profiled)]
    lines.append(f"  {'':<52}" + "".join(f"{n:>16}" for n in names))
    for group in profiled[0]["groups"]:
        lines.append(f"  {group:<52}" + "".join(
            f"{p['groups'][group] / 1e3:>8.2f} s {100 * p['groups'][group] / p['total_ms']:>4.0f}%"
            for p in profiled))
    lines.append(f"  {'total':<52}" + "".join(f"{p['total_ms'] / 1e3:>8.2f} s      "
                                              for p in profiled))
    if all(p["page_faults"] is not None for p in profiled):
        lines.append(f"  {'minor page faults during the step':<52}"
                     + "".join(f"{p['page_faults']:>14,}  " for p in profiled))
    return "\n".join(lines)


def plot_results(results: dict, path=None):
    """Bar charts of each row's speed relative to the first row, with the rounds' min-max."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for ax, key, title in ((axes[0], "train", "training step"), (axes[1], "generate", "generation")):
        rows = [r for r in results[key] if r["tokens_per_s"]][::-1]
        base = results[key][0]["tokens_per_s"]
        ratios = [r["ratio"] for r in rows]
        low = [r["ratio"] - r["tokens_per_s_min"] / base for r in rows]
        high = [r["tokens_per_s_max"] / base - r["ratio"] for r in rows]
        colors = ["tab:orange" if "bf16" in r["path"] else "tab:blue" for r in rows]
        ax.barh(range(len(rows)), ratios, xerr=[low, high], color=colors, capsize=2)
        ax.set_yticks(range(len(rows)), [r["path"] for r in rows], fontsize=7)
        ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        for i, r in enumerate(ratios):
            ax.text(r, i + 0.3, f" {r:.2f}x", va="center", fontsize=7)
        ax.set_xlabel(f"speed relative to the first row (bars: median; lines: min-max)")
        ax.set_title(title)
    m = results["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_threads']} threads, ATen {m['cpu_capability']}"
    fig.suptitle(f"{results['setup']['model']} on {where} (orange: bfloat16)", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# --- chapter 5 retrained -------------------------------------------------------------------

_LOG_LINE = re.compile(r"Ep (\d+) \(Step (\d+)\): Train loss ([\d.]+), Val loss ([\d.]+), "
                       r"tokens seen ([\d,]+)")


class _TimedLines(io.TextIOBase):
    """A stdout that keeps every printed line with the seconds since `start`."""

    def __init__(self, start: float):
        self.start, self.lines, self.buffer = start, [], ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.lines.append((time.perf_counter() - self.start, line))
        return len(text)


def _chapter5_worker(kind: str, args: dict) -> None:
    """Chapter 5's training run ("chapter5": as notebook 05 runs it; "fast": train_model_fast
    with every speed-up that applies here); prints one JSON line."""
    from utils.core.download import fetch
    from utils.text import create_dataloader_v1, get_gpt2_tokenizer
    from utils.train import train_model_simple
    device = torch.device(args["device"])
    cfg = dataclasses.replace(MODELS[args["model"]], context_length=args["context"])
    tokenizer = get_gpt2_tokenizer()
    with open(fetch("the-verdict"), "r", encoding="utf-8") as f:
        text_data = f.read()
    split_idx = int(0.90 * len(text_data))
    torch.manual_seed(123)
    train_loader = create_dataloader_v1(
        text_data[:split_idx], batch_size=2, max_length=cfg.context_length,
        stride=cfg.context_length, drop_last=True, shuffle=True, num_workers=0)
    val_loader = create_dataloader_v1(
        text_data[split_idx:], batch_size=2, max_length=cfg.context_length,
        stride=cfg.context_length, drop_last=False, shuffle=False, num_workers=0)
    kept = keep_freed_memory() if kind == "fast" else False
    torch.manual_seed(123)
    model = GPTModel(cfg)
    model.to(device)
    if kind == "fast":
        set_impl(model, "fast")
        optimizer = fused_adamw(model.parameters(), lr=0.0004, weight_decay=0.1)
        train, extra = train_model_fast, {"bf16": args["bf16"]}
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
        train, extra = train_model_simple, {}
    start = time.perf_counter()
    out = _TimedLines(start)
    with contextlib.redirect_stdout(out):
        train(model, train_loader, val_loader, optimizer, device, num_epochs=args["epochs"],
              eval_freq=5, eval_iter=5, start_context="Every effort moves you",
              tokenizer=tokenizer, **extra)
    wall = time.perf_counter() - start
    evals, samples = [], []
    for seconds, line in out.lines:
        match = _LOG_LINE.fullmatch(line.strip())
        if match:
            epoch, step, train_loss, val_loss, seen = match.groups()
            evals.append({"seconds": seconds, "epoch": int(epoch), "step": int(step),
                          "train_loss": float(train_loss), "val_loss": float(val_loss),
                          "tokens_seen": int(seen.replace(",", ""))})
        else:
            samples.append(line)
    bf16 = kind == "fast" and (bf16_supported(device) if args["bf16"] == "auto" else args["bf16"])
    labels = {"chapter5": "chapter 5: teaching modules, AdamW, float32",
              "fast": "chapter 8: fast modules, fused AdamW, fused CE, "
                      + ("bf16 autocast" if bf16 else "float32")
                      + ", KV-cache samples" + (", freed memory kept" if kept else "")}
    print(json.dumps({"label": labels[kind], "kind": kind, "wall_seconds": wall, "bf16": bf16,
                      "freed_memory_kept": kept, "evals": evals, "samples": samples}))


def run_chapter5_comparison(model: str = "gpt2-small", context: int = 256, epochs: int = 10,
                            device="cpu", bf16: str | bool = "auto", progress: bool = True) -> dict:
    """Chapter 5's run and the fast retrain, each in a fresh process, one after the other."""
    args = {"model": model, "context": context, "epochs": epochs, "device": str(device),
            "bf16": bf16}
    runs = []
    for kind in ("chapter5", "fast"):
        if progress:
            print(f"  chapter 5 retrain: running {kind} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "utils.cli.benchmark", "--chapter5-worker", kind,
               "--worker-args", json.dumps(args)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"the {kind} run failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"format": 2, "machine": _machine(torch.device(device)),
            "setup": {"model": model, "context": context, "epochs": epochs, "batch_size": 2,
                      "eval_freq": 5, "eval_iter": 5, "data": "the-verdict, 90/10 split",
                      "order": "chapter 5 first, then the fast retrain, each in a fresh process"},
            "runs": runs, "time_ratio": runs[1]["wall_seconds"] / runs[0]["wall_seconds"]}


def format_chapter5(results: dict) -> str:
    """The two runs of chapter 5 as a table: wall time, final and best losses."""
    s, m = results["setup"], results["machine"]
    width = max(len(run["label"]) for run in results["runs"])
    lines = [f"chapter 5 retrained on {m.get('gpu') or m['cpu']} ({m['cpu_threads']} threads, "
             f"torch {m['torch']}): {s['model']}, context {s['context']}, {s['epochs']} epochs, "
             f"batch {s['batch_size']}",
             f"{'run':<{width}} {'wall time':>9} {'final train':>11} {'final val':>9} {'best val':>8}"]
    for run in results["runs"]:
        last = run["evals"][-1]
        best = min(e["val_loss"] for e in run["evals"])
        lines.append(f"{run['label']:<{width}} {run['wall_seconds'] / 60:>5.1f} min "
                     f"{last['train_loss']:>11.3f} {last['val_loss']:>9.3f} {best:>8.3f}")
    lines.append(f"fast retrain / chapter 5 wall time: {100 * results['time_ratio']:.0f}%")
    return "\n".join(lines)


def plot_chapter5(results: dict, path=None):
    """Training and validation loss of both runs against wall-clock minutes."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for run, color in zip(results["runs"], ("tab:blue", "tab:orange")):
        minutes = [e["seconds"] / 60 for e in run["evals"]]
        name = "chapter 5" if run["kind"] == "chapter5" else "fast retrain"
        ax.plot(minutes, [e["train_loss"] for e in run["evals"]], marker="o", markersize=3,
                color=color, label=f"{name}: training loss")
        ax.plot(minutes, [e["val_loss"] for e in run["evals"]], marker="s", markersize=3,
                linestyle="-.", color=color, label=f"{name}: validation loss")
        ax.axvline(run["wall_seconds"] / 60, color=color, linewidth=0.8, linestyle=":")
    ax.set_xlabel("wall-clock time (minutes)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title(f"{results['setup']['model']}, {results['setup']['epochs']} epochs on "
                 f"{results['machine'].get('gpu') or results['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.cli.benchmark",
                                     description="Benchmark the fast paths side by side.")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny config: batch 2 x 64, 3 rounds, 50 tokens (seconds)")
    parser.add_argument("--model", choices=list(MODELS), help="default gpt2-small")
    parser.add_argument("--batch-size", type=int, help="default 2 (16 on CUDA)")
    parser.add_argument("--context", type=int, help="training tokens per sequence "
                        "(default 256; 1024 on CUDA)")
    parser.add_argument("--new-tokens", type=int, help="generated tokens (default 200)")
    parser.add_argument("--repeats", type=int, help="paired training rounds (default 5)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best found)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time compiled blocks (default: on for CUDA, off elsewhere)")
    parser.add_argument("--no-keep-memory", action="store_true",
                        help="leave out the rows that keep freed memory")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory runs")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled steps")
    parser.add_argument("--matmul-size", type=int, help="side of the peak matrix product "
                        "(default 2048; 8192 on CUDA)")
    parser.add_argument("--peak-tflops", type=float, help="device bf16 peak, for MFU")
    parser.add_argument("--chapter5", action="store_true",
                        help="retrain chapter 5 both ways instead (about 12 min on 2 CPU cores)")
    parser.add_argument("--epochs", type=int, default=None, help="--chapter5 epochs (default 10)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also save the chart here")
    parser.add_argument("--peak-worker", help=argparse.SUPPRESS)
    parser.add_argument("--chapter5-worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_worker:
        _peak_worker(args.peak_worker, json.loads(args.worker_args))
        return 0
    if args.chapter5_worker:
        _chapter5_worker(args.chapter5_worker, json.loads(args.worker_args))
        return 0
    if args.device is None:
        from utils.core.device import get_device
        args.device = str(get_device(verbose=False))
    cuda = args.device.startswith("cuda")
    bf16 = {"auto": "auto", "on": True, "off": False}[args.bf16]
    model = args.model or ("tiny" if args.quick else "gpt2-small")
    if args.chapter5:
        results = run_chapter5_comparison(model, args.context or (64 if args.quick else 256),
                                          args.epochs or (1 if args.quick else 10),
                                          args.device, bf16)
        text, plot = format_chapter5(results), plot_chapter5
    else:
        defaults = dict(QUICK) if args.quick else {
            "batch_size": 16 if cuda else 2, "context": 1024 if cuda else 256, "repeats": 5,
            "new_tokens": 200, "matmul_size": 8192 if cuda else 2048}
        pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]
        results = run_benchmark(
            model, pick("batch_size"), pick("context"), pick("repeats"), pick("new_tokens"),
            args.device, memory=not args.no_memory,
            compile=cuda if args.compile is None else args.compile, bf16=bf16,
            keep_memory=not args.no_keep_memory, matmul_size=pick("matmul_size"),
            peak_tflops=args.peak_tflops, profile=not args.no_profile)
        text, plot = format_results(results), plot_results
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"results written to {args.json}")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
