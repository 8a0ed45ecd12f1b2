"""The training steps and generations that the measuring commands time, each under a stable
key (hand-written; not a command itself: `python -m utils.cli.benchmark` times these paths
side by side and `python -m utils.cli.profile_step` profiles two of them; notebook 08 builds
the fast code they run, in utils/fast.py).

    from utils.cli.speed_paths import PathTrainer, resolve_settings, select_train_paths
    settings, skipped = resolve_settings("tiny", 2, 64, 3, 50, "cpu", "auto", False, True, 512)
    paths = select_train_paths(settings)   # {"teaching_fp32": TrainPath(...), ...}
    seconds = PathTrainer(settings).step(paths["fast_fused_ce_fp32"])

A path is a record with a `key` (`fast_fused_ce_bf16`, `cache_fast_bf16_weights`) and the
`label` a printed row shows; results are looked up by key, never by position, so the order of
TRAIN_PATHS and GEN_PATHS is only the order of the printed rows. `PathTrainer` holds one model
and steps it along any training path (the modules swapped by `set_impl`, the optimizer
picked, autocast and the fused loss switched on); `PathGenerator` generates along any
generation path. `flops_per_token` counts a training step's FLOPs (PaLM, appendix B).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
import torch.nn.functional as F

from utils.core.timing import sync_device
from utils.fast import (CachedGPT, autocast_bf16, bf16_inference_model, bf16_supported,
                        compile_model, fp16_fast, fused_adamw, fused_cross_entropy,
                        keep_freed_memory, set_impl)
from utils.generation import generate
from utils.model import GPT2_SMALL_124M, GPT_TINY, GPTModel

__all__ = ["MODELS", "PROMPT", "TrainPath", "GenPath", "TRAIN_PATHS", "GEN_PATHS",
           "TRAIN_BASELINE", "GEN_BASELINE", "PathSettings", "resolve_settings",
           "best_train_key", "select_train_paths", "select_gen_paths", "flops_per_token",
           "matmul_seconds", "matmul_dtypes", "PathTrainer", "PathGenerator"]

MODELS = {"gpt2-small": GPT2_SMALL_124M, "tiny": GPT_TINY}  # GPT-2 keeps chapter 5's dropout 0.1
PROMPT = [15496, 11, 314, 716]  # "Hello, I am" in GPT-2 BPE: a short prompt


@dataclasses.dataclass(frozen=True)
class TrainPath:
    """One way to run a training step, under a stable key."""
    key: str
    label: str  # what the printed row says
    impl: str  # teaching, sdpa or fast (set_impl)
    fused_adamw: bool = False
    fused_ce: bool = False
    bf16: bool = False  # forward pass under bfloat16 autocast
    keep_memory: bool = False  # keep_freed_memory() during the step
    compiled: bool = False  # transformer blocks compiled (compile_model)
    fp16: bool = False  # forward pass under float16 autocast, the loss scaled (GradScaler)

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"


@dataclasses.dataclass(frozen=True)
class GenPath:
    """One way to generate, under a stable key."""
    key: str
    label: str
    impl: str
    cache: bool
    precision: str = "float32"  # float32, bf16 autocast, bf16 weights


_FAST = "fast modules, fused AdamW"
TRAIN_PATHS = (  # the bf16 rows run where bfloat16 is native, the fp16 rows where only float16
    # is fast (choose_precision's float16 GPUs: T4, V100, P100), the "kept" rows on a Linux CPU
    TrainPath("teaching_fp32", "teaching modules, AdamW, float32", "teaching"),
    TrainPath("sdpa_fp32", "SDPA attention, AdamW, float32", "sdpa"),
    TrainPath("fast_fp32", "fast modules, AdamW, float32", "fast"),
    TrainPath("fast_fused_adamw_fp32", f"{_FAST}, float32", "fast", True),
    TrainPath("fast_fused_ce_fp32", f"{_FAST}, fused CE, float32", "fast", True, True),
    TrainPath("fast_fused_ce_fp32_kept", f"{_FAST}, fused CE, float32, freed memory kept",
              "fast", True, True, keep_memory=True),
    TrainPath("teaching_bf16", "teaching modules, AdamW, bf16 autocast", "teaching", bf16=True),
    TrainPath("fast_fused_adamw_bf16", f"{_FAST}, bf16 autocast", "fast", True, bf16=True),
    TrainPath("fast_fused_ce_bf16", f"{_FAST}, fused CE, bf16 autocast", "fast", True, True,
              bf16=True),
    TrainPath("fast_fused_ce_bf16_kept", f"{_FAST}, fused CE, bf16 autocast, freed memory kept",
              "fast", True, True, bf16=True, keep_memory=True),
    TrainPath("teaching_fp16", "teaching modules, AdamW, fp16 autocast, loss scaling", "teaching",
              fp16=True),
    TrainPath("fast_fused_ce_fp16", f"{_FAST}, fused CE, fp16 autocast, loss scaling", "fast",
              True, True, fp16=True))
GEN_PATHS = (
    GenPath("no_cache", "no cache, teaching modules, float32", "teaching", cache=False),
    GenPath("cache_teaching", "KV cache (SDPA attention), teaching LayerNorm/GELU, float32",
            "teaching", cache=True),
    GenPath("cache_fast", "KV cache, fast modules, float32", "fast", cache=True),
    GenPath("cache_fast_bf16_autocast", "KV cache, fast modules, bf16 autocast", "fast", True,
            "bf16 autocast"),
    GenPath("cache_fast_bf16_weights", "KV cache, fast modules, bf16 weights", "fast", True,
            "bf16 weights"))
TRAIN_BASELINE, GEN_BASELINE = "teaching_fp32", "no_cache"  # ratio 1.00x


@dataclasses.dataclass(frozen=True)
class PathSettings:
    """One run's sizes and choices, with "auto" resolved for this machine."""
    model: str
    batch_size: int
    context: int
    repeats: int
    new_tokens: int
    device: str
    bf16: bool
    compile: bool
    keep_memory: bool
    matmul_size: int
    fp16: bool = False  # the float16 rows (with loss scaling) run

    @property
    def cfg(self):
        """The model's config (MODELS)."""
        return MODELS[self.model]

    @property
    def generation_repeats(self) -> int:
        """Generation rounds: about half the training rounds (a generation takes longer)."""
        return max(1, self.repeats // 2 + 1)


def resolve_settings(model: str, batch_size: int, context: int, repeats: int, new_tokens: int,
                     device, bf16: str | bool, compile: bool, keep_memory: bool,
                     matmul_size: int, fp16: str | bool = "auto") -> tuple[PathSettings, list[str]]:
    """Check the sizes, decide bfloat16 ("auto": where native), float16 ("auto": where it is
    fast and bfloat16 is not, as choose_precision decides) and keeping freed memory (on a glibc
    CPU) for this machine; returns the settings and what is left out, and why."""
    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r}; choose one of {list(MODELS)}")
    length = MODELS[model].context_length
    if context > length or len(PROMPT) + new_tokens > length:
        raise ValueError(f"{model} has context_length {length}: use --context <= {length} "
                         f"and --new-tokens <= {length - len(PROMPT)}")
    device = torch.device(device)
    use_bf16 = bf16_supported(device) if bf16 == "auto" else bool(bf16)
    why = (f" (CPU capability {torch.backends.cpu.get_cpu_capability()})"
           if device.type == "cpu" else "")
    skipped = [] if use_bf16 else [f"bf16: {device} has no native bfloat16{why}; it would be "
                                   f"emulated, so it is left out (--bf16 on forces it)"]
    use_fp16 = fp16_fast(device) if fp16 == "auto" else bool(fp16)
    if not use_fp16 and fp16 == "auto" and device.type == "cuda" and not use_bf16:
        skipped.append(f"fp16: {device} has no fast float16 either (--fp16 on forces it)")
    if keep_memory and device.type == "cpu" and not keep_freed_memory(False):
        keep_memory = False
        skipped.append("freed memory kept: this C library has no mallopt (not glibc)")
    keep_memory = keep_memory and device.type == "cpu"  # CUDA memory has its own cache
    return PathSettings(model, batch_size, context, repeats, new_tokens, str(device), use_bf16,
                        compile, keep_memory, matmul_size, use_fp16), skipped


def best_train_key(s: PathSettings) -> str:
    """The fastest uncompiled training path that runs here."""
    if s.fp16 and not s.bf16:
        return "fast_fused_ce_fp16"
    return f"fast_fused_ce_{'bf16' if s.bf16 else 'fp32'}" + ("_kept" if s.keep_memory else "")


def select_train_paths(s: PathSettings) -> dict[str, TrainPath]:
    """The training paths that run here, by key, in TRAIN_PATHS's order (and a compiled copy
    of the fastest one if asked)."""
    paths = {p.key: p for p in TRAIN_PATHS
             if (s.bf16 or not p.bf16) and (s.fp16 or not p.fp16)
             and (s.keep_memory or not p.keep_memory)}
    if s.compile:
        best = paths[best_train_key(s)]
        paths["compiled_" + best.key] = dataclasses.replace(
            best, key="compiled_" + best.key, label="compiled " + best.label, compiled=True)
    return paths


def select_gen_paths(s: PathSettings) -> dict[str, GenPath]:
    """The generation paths that run here, by key (bfloat16 ones where bfloat16 is on)."""
    return {p.key: p for p in GEN_PATHS if s.bf16 or p.precision == "float32"}


def flops_per_token(cfg, context: int) -> float:
    """Training FLOPs per token, forward and backward: 6 N + 12 L H Q T (PaLM, appendix B),
    N = parameters outside the token and position embeddings."""
    with torch.device("meta"):  # counts parameters without allocating them
        n = sum(p.numel() for p in GPTModel(cfg).parameters())
    n -= (cfg.vocab_size + cfg.context_length) * cfg.emb_dim
    head_dim = cfg.emb_dim // cfg.n_heads
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * head_dim * context


def _autocast(device: torch.device, path: TrainPath):
    """The path's autocast region on `device` (bfloat16 or float16), else none at all: PyTorch
    2.4 refuses `torch.autocast("mps", ...)` even with enabled=False (it has no MPS autocast)."""
    if not (path.bf16 or path.fp16):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if path.bf16 else torch.float16)


def _out_of_memory(err: RuntimeError) -> bool:
    """True for running out of GPU memory: CUDA's OutOfMemoryError, or the RuntimeError
    "MPS backend out of memory (...)" that the MPS allocator raises."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)


def _release_cached_memory(device: torch.device) -> None:
    """Give the GPU allocator's cached blocks back, so the next path starts afresh."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def matmul_seconds(dtype: torch.dtype, size: int, device: torch.device, calls: int = 3) -> float:
    """Seconds per size x size x size matrix product (the best of `calls` back-to-back ones)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(calls):
        sync_device(device)
        start = time.perf_counter()
        a @ b
        sync_device(device)
        best = min(best, time.perf_counter() - start)
    return best


class PathTrainer:
    """One model and its two optimizers (and a compiled copy), stepping any training path."""

    def __init__(self, s: PathSettings, compiled_path: TrainPath | None = None):
        torch.manual_seed(123)
        self.device, self.manage_memory = torch.device(s.device), s.keep_memory
        cfg = dataclasses.replace(s.cfg, context_length=s.context)
        self.model = GPTModel(cfg).to(self.device).train()
        self.optimizers = {False: torch.optim.AdamW(self.model.parameters(), lr=4e-4,
                                                    weight_decay=0.1),
                           True: fused_adamw(self.model.parameters(), lr=4e-4, weight_decay=0.1)}
        shape = (s.batch_size, s.context)
        self.x = torch.randint(0, cfg.vocab_size, shape, device=self.device)
        self.y = torch.randint(0, cfg.vocab_size, shape, device=self.device)
        self.scaler = torch.amp.GradScaler(self.device.type)  # for the float16 rows only
        self.compiled = None if compiled_path is None else self._compile(compiled_path)

    def _compile(self, path: TrainPath):
        fast = set_impl(GPTModel(self.model.cfg), "fast").to(self.device).train()
        fast.load_state_dict(self.model.state_dict())
        with _autocast(self.device, path):
            fast = compile_model(fast, self.x)  # builds the graph that will run
        return fast, fused_adamw(fast.parameters(), lr=4e-4, weight_decay=0.1)

    def step(self, path: TrainPath) -> float | None:
        """Seconds for one training step of `path` (None: out of GPU memory, CUDA or MPS)."""
        if path.compiled:
            model, optimizer = self.compiled
        else:
            model, optimizer = set_impl(self.model, path.impl), self.optimizers[path.fused_adamw]
        if self.manage_memory:  # the allocator as the row says
            keep_freed_memory(path.keep_memory)
        try:
            sync_device(self.device)
            start = time.perf_counter()
            self._step(model, optimizer, path)
            sync_device(self.device)
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
            if not _out_of_memory(err):
                raise
            model.zero_grad(set_to_none=True)
            _release_cached_memory(self.device)
            return None
        return time.perf_counter() - start

    def _step(self, model, optimizer, path: TrainPath) -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, path):
            logits = model(self.x)  # (B, T, V)
        if path.fused_ce:
            loss = fused_cross_entropy(logits.flatten(0, 1), self.y.flatten())
        else:  # chapter 5's loss, on float32 logits as autocast_bf16 returns them
            loss = F.cross_entropy(logits.float().flatten(0, 1), self.y.flatten())
        if path.fp16:  # the loss scaled, the step skipped if a gradient overflowed
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()


class PathGenerator:
    """One float32 model, and its bfloat16 copy, generating along any path."""

    def __init__(self, s: PathSettings, bf16_weights: bool):
        torch.manual_seed(123)
        self.device = torch.device(s.device)
        self.model = GPTModel(s.cfg).to(self.device).eval()
        self.bf16_model = (bf16_inference_model(set_impl(self.model, "fast")) if bf16_weights
                           else None)

    def run(self, path: GenPath, new_tokens: int) -> tuple[float, torch.Tensor]:
        """Seconds for one greedy generation of `new_tokens` along `path`, and its tokens."""
        model = set_impl(self.model, path.impl)
        autocast_bf16(model, path.precision == "bf16 autocast")
        if path.precision == "bf16 weights":
            model = self.bf16_model
        runner = CachedGPT(model) if path.cache else model
        prompt = torch.tensor([PROMPT], device=self.device)
        sync_device(self.device)
        start = time.perf_counter()
        out = generate(runner, prompt, new_tokens, model.cfg.context_length)
        sync_device(self.device)
        seconds = time.perf_counter() - start
        autocast_bf16(self.model, False)
        return seconds, out


def matmul_dtypes(s: PathSettings) -> dict[str, torch.dtype]:
    """The number formats whose matrix-product peak is measured: float32, and bfloat16 and
    float16 where their rows run."""
    return {"float32": torch.float32, **({"bfloat16": torch.bfloat16} if s.bf16 else {}),
            **({"float16": torch.float16} if s.fp16 else {})}


