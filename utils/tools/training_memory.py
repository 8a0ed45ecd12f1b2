"""How much GPU memory each chapter's training cell needs, estimated on the CPU, and how much
CPU memory loading the largest pretrained checkpoints takes (hand-written maintainer tool).

    python -m utils.tools.training_memory                        # every training cell
    python -m utils.tools.training_memory --only 07_instruction  # one of them
    python -m utils.tools.training_memory --loading              # and the checkpoint loaders
    python -m utils.tools.training_memory --json memory.json

**Training cells.** Learners train on Colab's T4 or Kaggle's P100 (16 GB); the machines that
build the course have no GPU. For each training cell the tool builds the cell's model with
OpenAI GPT-2's real sizes (random weights: memory does not depend on the values), trainable
parameters as the cell sets them, and the cell's batch at its longest (from the chapter's
data, through the chapter's own dataset and collate functions). In a fresh process it runs
ONE training step as the chapter's loop does (zero_grad, forward, loss, backward, gradient
clipping where the cell clips, `step()` of a fresh `torch.optim.AdamW`) under PyTorch's
profiler with `profile_memory=True`. In its chrome trace, `args["Total Allocated"]` of the
events named "[memory]" counts the bytes allocated since profiling started and not yet
freed, so its maximum is the step's peak above what was alive before (weights and buffers,
a frozen reference model, the batch), which the tool adds:

    estimate of torch.cuda.max_memory_allocated() = alive before the step
        + max(peak of forward and backward + AdamW's moments, peak of optimizer.step)

The first step allocates AdamW's two moments (8 bytes per trainable float32 parameter) inside
`optimizer.step()`; every later step starts with them, so they are added to the forward and
backward peak, and the estimate holds for every step, not only the first.

Two settings make the CPU allocate what CUDA allocates:

- AdamW runs with `foreach=True`, what PyTorch picks for CUDA tensors (for CPU tensors it picks
  a loop over the parameters). The foreach step computes sqrt(v) of all parameters at once,
  4 more bytes per trainable parameter for a moment: the step holds 20 bytes per trainable
  parameter (weight 4, gradient 4, moments 8, sqrt(v) 4), not 16.
- Dropout runs as on CUDA, through `torch.native_dropout`, which keeps a 1-byte mask for the
  backward pass; the CPU's own dropout keeps a float32 one. (The CPU kernel of native_dropout
  still draws a float32 mask for a moment, which CUDA's does not: only a peak that falls
  inside a dropout call would come out high.)

Limits: CUDA kernels may choose other workspaces than the CPU's (cuBLAS keeps a few MB per
stream; oneDNN's scratch buffers bypass PyTorch's allocator on the CPU and are not counted
either). CUDA's own context (driver, kernels, cuBLAS: a few hundred MB) comes on top of
`max_memory_allocated`, and the caching allocator reserves somewhat more than it allocates (`memory_reserved`: whole blocks, fragmentation). A notebook can hold more
than its training step: tensors of earlier cells still on the GPU. The evaluation between
steps runs without gradients (weights, gradients, moments and one layer's activations) and
stays below the step's peak.

**Loading** (`--loading`): the peak resident memory (VmHWM) of a fresh Python process that
loads GPT-2 355M as chapter 7 does (`load_pretrained_gpt2`) and the checkpoints that chapter 9
offers (`load_pretrained_llama`: Qwen3-0.6B, which it loads, and Llama 3.2 1B, the largest),
in float32 as the notebooks ask. The real files are not on these machines: the tool writes
files with the Hub's tensor names, shapes and dtypes (zeros) into a temporary folder, deleted
afterwards, and replaces `fetch` by a function that returns them, which skips only the
download and its checksum. Memory-mapped file pages count in the resident memory while the
file is open; no tokenizer.json is written, so the tokenizer's memory is not included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.data import DataLoader

from utils import llama, pretrained
from utils.classify import SpamDataset, calc_class_loss_batch, create_balanced_dataset, random_split
from utils.core.assets import get_asset
from utils.core.download import fetch
from utils.core.timing import describe_machine, peak_rss_bytes, run_in_fresh_process, save_results
from utils.dpo import PreferenceDataset, dpo_loss_batch, frozen_reference, preference_collate_fn
from utils.instruct import InstructionDataset, custom_collate_fn, split_instruction_data
from utils.llama import (LLAMA32_1B, QWEN3_0_6B, LlamaConfig, LlamaModel, config_from_hf,
                         load_pretrained_llama)
from utils.lora import replace_linear_with_lora
from utils.model import GPT2_MEDIUM_355M, GPT2_SMALL_124M, GPT_TINY, GPTConfig, GPTModel
from utils.pretrained import load_pretrained_gpt2
from utils.text import create_dataloader_v1, get_gpt2_tokenizer
from utils.train import calc_loss_batch

__all__ = ["GB", "TrainingStep", "cuda_like_dropout", "profile_peaks", "measure_step",
           "TRAINING_CELLS", "LOADERS", "measure_training_cell", "measure_loader", "main"]

GB = 1e9  # the course's unit: 1 GB = 10^9 bytes
FORWARD_BACKWARD, OPTIMIZER_STEP = "forward and backward", "optimizer step"


@dataclasses.dataclass
class TrainingStep:
    """What a training cell holds on the device and does at every step."""

    models: list[nn.Module]  # the trained model first, then any frozen one (DPO's reference)
    params: list[nn.Parameter]  # what the cell gives AdamW
    batch: tuple[torch.Tensor, ...]
    loss: Callable[[], torch.Tensor]  # the chapter's loss of the batch
    lr: float
    weight_decay: float = 0.01  # AdamW's default
    max_grad_norm: float | None = None  # appendix D clips the gradients


@contextlib.contextmanager
def cuda_like_dropout():
    """F.dropout as CUDA runs it: `native_dropout`, whose backward keeps a 1-byte mask (the
    CPU's own dropout multiplies by a float32 noise tensor and keeps that)."""
    original = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return original(input, p, training, inplace)

    F.dropout = dropout  # nn.Dropout calls F.dropout at every forward
    try:
        yield
    finally:
        F.dropout = original


@contextlib.contextmanager
def _quiet_stderr():
    """Send C-level stderr to os.devnull (the profiler prints its start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def profile_peaks(phases: dict[str, Callable[[], object]]) -> dict[str, int]:
    """Run the phases in order under the profiler; for each, the most bytes allocated since
    the profiler started and not yet freed, at any moment during that phase."""
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for name, run in phases.items():
            with record_function(name):
                run()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text(encoding="utf-8"))["traceEvents"]
    spans = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events
             if e.get("cat") == "user_annotation" and e.get("name") in phases}
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    # "Total Allocated" also counts blocks left by an earlier profiler run in this process
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"] if memory else 0
    peaks = dict.fromkeys(phases, 0)
    for event in memory:
        for name, (begin, end) in spans.items():
            if begin <= event["ts"] <= end:
                peaks[name] = max(peaks[name], event["args"]["Total Allocated"] - start)
    return peaks


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _alive_bytes(step: TrainingStep, optimizer: torch.optim.Optimizer) -> int:
    tensors = [t for m in step.models for t in (*m.parameters(), *m.buffers())]
    tensors += [p.grad for p in step.params if p.grad is not None] + list(step.batch)
    tensors += [v for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor)]
    return _bytes(tensors)


def measure_step(step: TrainingStep, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Peak memory of one training step (bytes), measured as the module docstring says;
    `optimizer`: one that has stepped before (default: a fresh AdamW, as the cells make)."""
    if optimizer is None:
        optimizer = torch.optim.AdamW(step.params, lr=step.lr, weight_decay=step.weight_decay,
                                      foreach=True)  # what AdamW picks for CUDA tensors
    alive = _alive_bytes(step, optimizer)

    def forward_backward():
        optimizer.zero_grad()
        step.loss().backward()

    def optimizer_step():
        if step.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(step.params, step.max_grad_norm, foreach=True)
        optimizer.step()

    start = time.perf_counter()
    with cuda_like_dropout():
        peaks = profile_peaks({FORWARD_BACKWARD: forward_backward, OPTIMIZER_STEP: optimizer_step})
    seconds = time.perf_counter() - start
    moments = _bytes([state[key] for state in optimizer.state.values()
                      for key in ("exp_avg", "exp_avg_sq")])
    trained = [p for p in step.params if p.requires_grad]
    weights = _bytes([t for m in step.models for t in (*m.parameters(), *m.buffers())])
    later_steps = {FORWARD_BACKWARD: alive + peaks[FORWARD_BACKWARD] + moments,
                   OPTIMIZER_STEP: alive + peaks[OPTIMIZER_STEP]}
    phase = max(later_steps, key=later_steps.get)
    return {"parameters": sum(p.numel() for p in step.models[0].parameters()),
            "trainable": sum(p.numel() for p in trained),
            "weights_bytes": weights, "alive_bytes": alive,
            "arithmetic_bytes": weights + 12 * sum(p.numel() for p in trained),
            "forward_backward_peak_bytes": peaks[FORWARD_BACKWARD],
            "optimizer_peak_bytes": peaks[OPTIMIZER_STEP], "moments_bytes": moments,
            "estimate_bytes": later_steps[phase], "peak_phase": phase,
            "batch": list(step.batch[0].shape), "step_seconds": round(seconds, 1)}


# ---------------------------------------------------------------- the chapters' batches
def _verdict_batch(max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training batch of chapter 5's loader (2 windows of `max_length` tokens)."""
    text = fetch("the-verdict", progress=False).read_text(encoding="utf-8")
    torch.manual_seed(123)
    loader = create_dataloader_v1(text[:int(0.90 * len(text))], batch_size=2,
                                  max_length=max_length, stride=max_length, shuffle=True)
    return next(iter(loader))


def _spam_batch(batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Chapter 6's training split: every message padded to the longest one's length."""
    df = pd.read_csv(fetch("sms-spam-collection", progress=False), sep="\t", header=None,
                     names=["Label", "Text"])
    balanced = create_balanced_dataset(df)
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    train_df, _, _ = random_split(balanced, 0.7, 0.1)
    with tempfile.TemporaryDirectory() as folder:
        train_df.to_csv(Path(folder) / "train.csv", index=None)
        dataset = SpamDataset(Path(folder) / "train.csv", get_gpt2_tokenizer())
    return next(iter(DataLoader(dataset, batch_size=batch_size)))


def _instruction_batch(batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Chapter 7's longest training examples, collated as its loader does."""
    data = json.loads(fetch("instruction-data", progress=False).read_text(encoding="utf-8"))
    dataset = InstructionDataset(split_instruction_data(data)[0], get_gpt2_tokenizer())
    longest = sorted(range(len(dataset)), key=lambda i: len(dataset[i]))[-batch_size:]
    return custom_collate_fn([dataset[i] for i in longest], allowed_max_length=1024)


def _preference_batch(batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Chapter 7b's longest training pairs: 2 x batch_size sequences (chosen, rejected)."""
    data = json.loads(fetch("instruction-data-with-preference", progress=False)
                      .read_text(encoding="utf-8"))
    dataset = PreferenceDataset(split_instruction_data(data)[0], get_gpt2_tokenizer())
    length = {i: max(len(dataset[i]["chosen"]), len(dataset[i]["rejected"]))
              for i in range(len(dataset))}
    longest = sorted(length, key=length.get)[-batch_size:]
    return preference_collate_fn([dataset[i] for i in longest], allowed_max_length=1024)


# ---------------------------------------------------------------- the training cells
def _gpt2_as_loaded(preset: GPTConfig) -> GPTModel:
    """The model `load_pretrained_gpt2` builds (context 1024, qkv biases, no dropout)."""
    torch.manual_seed(123)
    return GPTModel(dataclasses.replace(preset, context_length=1024, qkv_bias=True,
                                        drop_rate=0.0))


def _next_token_step(model: nn.Module, batch, lr: float, weight_decay: float = 0.1,
                     max_grad_norm: float | None = None) -> TrainingStep:
    """Chapter 5's loss (calc_loss_batch) on all parameters, as train_model_simple runs it."""
    inputs, targets = batch
    return TrainingStep([model.train()], list(model.parameters()), batch,
                        lambda: calc_loss_batch(inputs, targets, model, "cpu"), lr,
                        weight_decay, max_grad_norm)


def _toy_mlp_step() -> TrainingStep:
    # appendix A's NeuralNetwork(2, 2) (defined in the notebook) and its circle data
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(2, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(),
                          nn.Linear(20, 2))
    points = torch.rand(32, 2) * 2 - 1  # one batch of 32 points in [-1, 1]^2
    labels = (points.pow(2).sum(dim=1) < 0.7**2).long()
    return TrainingStep([model], list(model.parameters()), (points, labels),
                        lambda: F.cross_entropy(model(points), labels), lr=0.005)


def _chapter5_step(book_model: bool = True, max_grad_norm: float | None = None,
                   lr: float = 0.0004) -> TrainingStep:
    cfg = dataclasses.replace(GPT2_SMALL_124M, context_length=256)
    if not book_model:  # appendix D's default: 2 blocks of width 128
        cfg = dataclasses.replace(cfg, emb_dim=128, n_heads=4, n_layers=2)
    torch.manual_seed(123)
    return _next_token_step(GPTModel(cfg), _verdict_batch(256), lr, 0.1, max_grad_norm)


def _classifier_step(lora: bool) -> TrainingStep:
    """Chapter 6 (last block, final norm and a new 2-class head) or appendix E (LoRA on
    every linear layer, rank 16, alpha 16), on GPT-2 124M."""
    model = _gpt2_as_loaded(GPT2_SMALL_124M).requires_grad_(False)
    model.out_head = nn.Linear(model.cfg.emb_dim, 2)
    if lora:
        model.out_head.requires_grad_(False)
        replace_linear_with_lora(model, rank=16, alpha=16)
    else:
        for part in (model.trf_blocks[-1], model.final_norm):
            part.requires_grad_(True)
    inputs, labels = _spam_batch()
    params = [p for p in model.parameters() if p.requires_grad] if lora else \
        list(model.parameters())  # chapter 6 hands AdamW every parameter
    return TrainingStep([model.train()], params, (inputs, labels),
                        lambda: calc_class_loss_batch(inputs, labels, model, "cpu"),
                        lr=8e-4 if lora else 5e-5, weight_decay=0.1)


def _dpo_step() -> TrainingStep:
    policy = _gpt2_as_loaded(GPT2_MEDIUM_355M)  # chapter 7's model, as its checkpoint loads
    reference = frozen_reference(policy)
    inputs, targets = _preference_batch()
    return TrainingStep([policy.train(), reference], list(policy.parameters()),
                        (inputs, targets),
                        lambda: dpo_loss_batch(policy, reference, inputs, targets, 0.1)[0],
                        lr=5e-6, weight_decay=0.01)


# notebook 09's GPT_EXPERIMENT and LLAMA_EXPERIMENT (section 9.12), trained by train_architecture
GPT_EXPERIMENT = GPTConfig(vocab_size=50257, context_length=256, emb_dim=128, n_heads=4,
                           n_layers=4, drop_rate=0.0, qkv_bias=False)
LLAMA_EXPERIMENT = LlamaConfig(vocab_size=50257, context_length=256, emb_dim=128, n_heads=4,
                               n_kv_groups=2, n_layers=4, hidden_dim=408, head_dim=32,
                               rope_scaling=None, tie_embeddings=False)


def _architecture_step(make_model) -> TrainingStep:
    torch.manual_seed(123)
    return _next_token_step(make_model(), _verdict_batch(256), lr=0.0004)


@dataclasses.dataclass(frozen=True)
class TrainingCell:
    """A notebook's training cell, and how to build its step."""

    notebook: str
    cell: str  # which cell, in words
    model: str
    build: Callable[[], TrainingStep]


TRAINING_CELLS = {
    "appendix_A": TrainingCell(
        "appendix_A_pytorch", "train_classifier (A.5)", "NeuralNetwork(2, 2): 2-30-20-2 MLP",
        _toy_mlp_step),
    "05_pretraining": TrainingCell(
        "05_pretraining", "train_model_simple (5.2)", "GPT-2 124M, context 256, dropout 0.1",
        _chapter5_step),
    "appendix_D": TrainingCell(
        "appendix_D_training_extras", "train_model with book_model = True (D.4)",
        "GPT-2 124M, context 256, dropout 0.1; clipping",
        lambda: _chapter5_step(max_grad_norm=1.0, lr=0.001)),
    "appendix_D_small": TrainingCell(
        "appendix_D_training_extras", "train_model as saved, book_model = False (D.4)",
        "2 blocks of width 128, context 256; clipping",
        lambda: _chapter5_step(book_model=False, max_grad_norm=1.0, lr=0.001)),
    "06_classification": TrainingCell(
        "06_classification", "train_classifier_simple (6.7)",
        "GPT-2 124M; last block, final norm, 2-class head trained",
        lambda: _classifier_step(lora=False)),
    "appendix_E_lora": TrainingCell(
        "appendix_E_lora", "finetune(model, lr=lora_lr) (E.4)",
        "GPT-2 124M, 2-class head; LoRA rank 16 on every linear layer",
        lambda: _classifier_step(lora=True)),
    "07_instruction": TrainingCell(
        "07_instruction_finetuning", "train_model_simple (7.6)", "GPT-2 355M, all trained",
        lambda: _next_token_step(_gpt2_as_loaded(GPT2_MEDIUM_355M), _instruction_batch(),
                                 lr=5e-5)),
    "07b_dpo": TrainingCell(
        "07b_preference_tuning_dpo", "train_model_dpo_simple (7b.7)",
        "GPT-2 355M policy + frozen reference", _dpo_step),
    "08_tiny": TrainingCell(
        "08_going_faster", "retrain_tiny(fast=False) (8.7)", "GPT_TINY, context 64",
        lambda: _next_token_step(GPTModel(GPT_TINY), _verdict_batch(64), lr=2e-3)),
    "09_gpt2_style": TrainingCell(
        "09_gpt_to_llama", "train_architecture (9.12)", "GPT_EXPERIMENT: 4 x 128, 13.7M",
        lambda: _architecture_step(lambda: GPTModel(GPT_EXPERIMENT))),
    "09_llama_style": TrainingCell(
        "09_gpt_to_llama", "train_architecture (9.12)", "LLAMA_EXPERIMENT: 4 x 128, 13.7M",
        lambda: _architecture_step(lambda: LlamaModel(LLAMA_EXPERIMENT))),
}


def measure_training_cell(name: str) -> dict:
    """The record of one of TRAINING_CELLS: the cell, its model and `measure_step`'s numbers."""
    cell = TRAINING_CELLS[name]
    record = {"name": name, "notebook": cell.notebook, "cell": cell.cell, "model": cell.model}
    return record | measure_step(cell.build())


# ---------------------------------------------------------------- loading checkpoints
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def _write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]):
    """A safetensors file of zeros with these names, shapes and dtypes, written in chunks
    (never all in memory)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, dtype) in tensors.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    zeros = memoryview(bytes(1 << 24))
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for start in range(0, offset, len(zeros)):
            f.write(zeros[:min(len(zeros), offset - start)])


def _gpt2_hub_tensors(cfg: GPTConfig) -> dict:
    """openai-community/gpt2-* model.safetensors: float32, Conv1D weights stored (in, out),
    and each block's causal mask `attn.bias` (their size on the Hub says it is there)."""
    c, ctx = cfg.emb_dim, cfg.context_length
    shapes = {"wte.weight": (cfg.vocab_size, c), "wpe.weight": (ctx, c)}
    for i in range(cfg.n_layers):
        shapes |= {f"h.{i}.{name}": shape for name, shape in [
            ("ln_1.weight", (c,)), ("ln_1.bias", (c,)), ("attn.bias", (1, 1, ctx, ctx)),
            ("attn.c_attn.weight", (c, 3 * c)), ("attn.c_attn.bias", (3 * c,)),
            ("attn.c_proj.weight", (c, c)), ("attn.c_proj.bias", (c,)),
            ("ln_2.weight", (c,)), ("ln_2.bias", (c,)),
            ("mlp.c_fc.weight", (c, 4 * c)), ("mlp.c_fc.bias", (4 * c,)),
            ("mlp.c_proj.weight", (4 * c, c)), ("mlp.c_proj.bias", (c,))]}
    shapes |= {"ln_f.weight": (c,), "ln_f.bias": (c,)}
    return {name: (shape, torch.float32) for name, shape in shapes.items()}


def _llama_hub_tensors(cfg: LlamaConfig, lm_head: bool) -> dict:
    """A Hugging Face Llama 3 / Qwen3 model.safetensors: bfloat16, nn.Linear layout (out, in)."""
    c, q, kv, d = cfg.emb_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_groups * cfg.head_dim, \
        cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, c), "model.norm.weight": (c,)}
    if lm_head:  # Qwen3-0.6B stores a copy of its tied head; Llama 3.2 1B does not
        shapes["lm_head.weight"] = (cfg.vocab_size, c)
    for i in range(cfg.n_layers):
        layer = [("self_attn.q_proj", (q, c)), ("self_attn.k_proj", (kv, c)),
                 ("self_attn.v_proj", (kv, c)), ("self_attn.o_proj", (c, q)),
                 ("mlp.gate_proj", (cfg.hidden_dim, c)), ("mlp.up_proj", (cfg.hidden_dim, c)),
                 ("mlp.down_proj", (c, cfg.hidden_dim)), ("input_layernorm", (c,)),
                 ("post_attention_layernorm", (c,))]
        layer += [("self_attn.q_norm", (d,)), ("self_attn.k_norm", (d,))] if cfg.qk_norm else []
        shapes |= {f"model.layers.{i}.{name}.weight": shape for name, shape in layer}
    return {name: (shape, torch.bfloat16) for name, shape in shapes.items()}


def _hf_config(cfg: LlamaConfig, model_type: str) -> dict:
    """The fields of a Hub config.json that `config_from_hf` reads, checked to give `cfg`."""
    hf = {"model_type": model_type, "vocab_size": cfg.vocab_size,
          "max_position_embeddings": cfg.context_length, "hidden_size": cfg.emb_dim,
          "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_groups,
          "num_hidden_layers": cfg.n_layers, "intermediate_size": cfg.hidden_dim,
          "head_dim": cfg.head_dim, "rope_theta": cfg.rope_base, "rms_norm_eps": cfg.norm_eps,
          "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
          "torch_dtype": "bfloat16"}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                              "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_context_length}
    if config_from_hf(hf) != cfg:
        raise RuntimeError(f"the config.json written for {model_type} does not give its preset")
    return hf


@dataclasses.dataclass(frozen=True)
class Loader:
    """A notebook's call that loads a pretrained checkpoint, and the files it reads."""

    notebook: str
    call: str  # as the notebook writes it
    load: Callable[[], nn.Module]  # the same call
    weights_asset: str  # the real file's name in the download registry (for its size)
    tensors: Callable[[], dict]
    config: Callable[[], dict] | None = None  # config.json, for the Llama checkpoints


LOADERS = {
    "load_gpt2_355M": Loader(
        "07_instruction_finetuning", 'load_pretrained_gpt2("gpt2-medium (355M)")',
        lambda: load_pretrained_gpt2("gpt2-medium (355M)", progress=False),
        "gpt2-medium-355M", lambda: _gpt2_hub_tensors(GPT2_MEDIUM_355M)),
    "load_qwen3_0.6B": Loader(
        "09_gpt_to_llama", 'load_pretrained_llama("Qwen/Qwen3-0.6B")',
        lambda: load_pretrained_llama("Qwen/Qwen3-0.6B", progress=False)[0],
        "qwen3-0.6b-weights", lambda: _llama_hub_tensors(QWEN3_0_6B, lm_head=True),
        lambda: _hf_config(QWEN3_0_6B, "qwen3")),
    "load_llama3.2_1B": Loader(
        "09_gpt_to_llama", 'load_pretrained_llama("meta-llama/Llama-3.2-1B")',
        lambda: load_pretrained_llama("meta-llama/Llama-3.2-1B", progress=False)[0],
        "llama-3.2-1b-weights", lambda: _llama_hub_tensors(LLAMA32_1B, lm_head=False),
        lambda: _hf_config(LLAMA32_1B, "llama")),
}


def _current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _load_here(name: str, folder: str) -> dict:
    """In a fresh process: load `name`'s checkpoint as the notebook does, with a `fetch`
    that returns the files written into `folder` (no download, no checksum)."""
    files = {"config": "config.json", "tokenizer": "tokenizer.json"}  # else the weights

    def fetch_written(asset: str, progress: bool = True) -> Path:
        return Path(folder) / files.get(asset.rsplit("-", 1)[-1], "model.safetensors")

    pretrained.fetch = llama.fetch = fetch_written  # the name each loader calls
    before, start = peak_rss_bytes(), time.perf_counter()  # Python, torch, the course's modules
    model = LOADERS[name].load()
    return {"load_seconds": round(time.perf_counter() - start, 1),
            "model_bytes": _bytes([*model.parameters(), *model.buffers()]),
            "rss_before_bytes": before, "rss_after_bytes": _current_rss_bytes()}


def measure_loader(name: str) -> dict:
    """Peak resident memory of a fresh process loading `name` (see the module docstring)."""
    loader = LOADERS[name]
    with tempfile.TemporaryDirectory(prefix="training_memory_") as folder:
        weights = Path(folder) / "model.safetensors"
        _write_safetensors(weights, loader.tensors())
        if loader.config is not None:
            (Path(folder) / "config.json").write_text(json.dumps(loader.config()))
        record, peak = run_in_fresh_process(_load_here, name, folder)
        file_bytes = weights.stat().st_size
    return {"name": name, "notebook": loader.notebook, "call": loader.call,
            "file_bytes": file_bytes, "hub_file_bytes": get_asset(loader.weights_asset).size,
            **record, "peak_rss_bytes": peak}


# ---------------------------------------------------------------- the command
def _size(n: float) -> str:
    """Bytes in the course's decimal units."""
    if n >= 0.1 * GB:
        return f"{n / GB:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _training_table(records: list[dict]) -> str:
    rows = [("cell", "batch", "params", "trainable", "weights", "+12 B/trainable",
             "fwd+bwd peak", "optimizer peak", "estimate", "peak in")]
    for r in records:
        rows.append((r["name"], " x ".join(map(str, r["batch"])), f"{r['parameters']:,}",
                     f"{r['trainable']:,}", _size(r["weights_bytes"]),
                     _size(r["arithmetic_bytes"]), _size(r["forward_backward_peak_bytes"]),
                     _size(r["optimizer_peak_bytes"]), _size(r["estimate_bytes"]),
                     r["peak_phase"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) if i in (0, 1, 9) else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))) for row in rows)


def _loading_table(records: list[dict]) -> str:
    lines = [f"{'loader':18} {'file':>9} {'(Hub)':>9} {'model':>9} {'imports':>9} "
             f"{'peak RSS':>9} {'after':>9} {'seconds':>7}"]
    for r in records:
        lines.append(f"{r['name']:18} {_size(r['file_bytes']):>9} {_size(r['hub_file_bytes']):>9} "
                     f"{_size(r['model_bytes']):>9} {_size(r['rss_before_bytes']):>9} "
                     f"{_size(r['peak_rss_bytes']):>9} {_size(r['rss_after_bytes']):>9} "
                     f"{r['load_seconds']:>7}")
    return "\n".join(lines)


@contextlib.contextmanager
def _freed_memory_returned():
    """Start processes whose C library hands every freed block of 1 MiB or more back to the
    system, so that their resident memory stays near what they hold (glibc's default keeps
    blocks of up to 32 MiB for reuse: chapter 7b's step then peaked at 17.6 GB, not 11)."""
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def main(argv: list[str] | None = None) -> dict:
    """Measure the cases asked for, print their tables, and return (optionally save) them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=[*TRAINING_CELLS, *LOADERS], help="one case")
    parser.add_argument("--loading", action="store_true",
                        help="also the checkpoint loaders (temporary files of up to 2.5 GB)")
    parser.add_argument("--json", type=Path, help="write the records to this file")
    args = parser.parse_args(argv)
    names = [args.only] if args.only else [*TRAINING_CELLS, *(LOADERS if args.loading else [])]
    results = {"machine": describe_machine(), "training": [], "loading": []}
    for name in names:
        start = time.perf_counter()
        if name in TRAINING_CELLS:
            with _freed_memory_returned():
                record, peak = run_in_fresh_process(measure_training_cell, name)
            results["training"].append(record | {"process_peak_rss_bytes": peak})
        else:
            results["loading"].append(measure_loader(name))
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if results["training"]:
        print(_training_table(results["training"]))
    if results["loading"]:
        print(_loading_table(results["loading"]))
    if args.json:
        save_results(results, args.json)
    return results


if __name__ == "__main__":
    main()
