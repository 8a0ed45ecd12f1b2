"""Generation against the memory-bandwidth limit, side by side with Hugging Face `transformers`
(hand-written command; notebook 08 prints a saved run).

    python -m utils.cli.decode_benchmark            # GPT-2 124M and a Qwen3-0.6B-shaped model (~10 min on 2 CPU cores)
    python -m utils.cli.decode_benchmark --quick    # the tiny configs: seconds
    python -m utils.cli.decode_benchmark --json benchmarks/my-machine-decode.json

Generating one token reads every weight of the model once, so its speed limit is the memory
bandwidth divided by the bytes of weights read per token. The command measures that bandwidth
(the fastest of several sums and matrix-vector products over 1 GiB of float32), then times
greedy generation of `--new-tokens` tokens after a `--prompt`-token prompt, with the
key-value cache, in paired rounds (every round runs every path once, in rotating order;
the median and the range are printed), along these paths:

- the course: float32; bfloat16 weights (`bf16_inference_model`); int8 weights, one scale per
  output row (`int8_inference_model`);
- `transformers` on the same weights (`GPT2LMHeadModel`, `Qwen3ForCausalLM`; `generate()`
  with its own cache, greedy), in float32 and in bfloat16: what a learner would use instead.

Per path it reports tokens/s, the bytes of weights read per token (every linear layer and the
output head; embeddings are read one row per token), the bandwidth that implies and its
fraction of the measured bandwidth, and ratios to `transformers` in the same number format.
The weights are random in the real shapes (speed does not depend on their values); the course
and `transformers` are checked to generate the same greedy tokens in float32.

Quality, on a trained model: chapter 5's checkpoint (`checkpoints/05_...`, skipped if absent)
in float32, bfloat16 and int8 weights: perplexity on the held-out 10% of *The Verdict* and the
share of positions whose greedy next token equals float32's (teacher-forced). And where the
time goes: 20 generation steps of each model on each of the course's paths, profiled by
operator, split into the weight products (with the bandwidth they read at) and the rest.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from utils.core.timing import (describe_machine, paired_rounds, rate_table, save_results,
                               spread)
from utils.fast import (CachedGPT, Int8Linear, bf16_inference_model,
                        int8_inference_model, set_impl)
from utils.llama import QWEN3_0_6B, QWEN3_TINY, CachedLlama, LlamaModel, load_hf_weights_into_llama
from utils.model import GPT2_SMALL_124M, GPT_TINY, GPTModel, generate_text_simple

__all__ = ["measure_bandwidth", "weight_bytes_per_token", "gpt_to_hf", "run_decode_benchmark",
           "format_decode", "main"]

MODELS = {"gpt2-small": ("gpt", GPT2_SMALL_124M), "qwen3-0.6b": ("llama", QWEN3_0_6B),
          "tiny-gpt": ("gpt", GPT_TINY), "tiny-qwen3": ("llama", QWEN3_TINY)}
FULL, QUICK = ["gpt2-small", "qwen3-0.6b"], ["tiny-gpt", "tiny-qwen3"]
OURS = {"fp32": "course, float32", "bf16": "course, bf16 weights", "int8": "course, int8 weights"}
THEIRS = {"hf_fp32": "transformers, float32", "hf_bf16": "transformers, bfloat16"}


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second that this machine reads: the fastest of `repeats` rounds of two reads
    of `gib` GiB of float32, a sum and a matrix-vector product (the operation of generation;
    on some machines a sum alone reads below what the memory delivers)."""
    columns = 4096
    data = torch.ones(max(1, int(gib * 2**30) // (4 * columns)) * columns)
    matrix, vector = data.view(-1, columns), torch.ones(columns)
    reads = (data.sum, lambda: matrix @ vector)
    for read in reads:
        read()  # pages touched once before timing
    best = math.inf
    for _ in range(repeats):
        for read in reads:
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of the weights one generated token reads: every linear layer (the output head
    included, also when it shares the embedding's matrix), with biases and int8 scales."""
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, Int8Linear)):
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


@torch.no_grad()
def gpt_to_hf(model: GPTModel):
    """A `transformers` GPT2LMHeadModel holding `model`'s weights (its Conv1D layers store the
    transposed matrices; the output head is kept separate, as ours is)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    t = hf.transformer
    t.wte.weight.copy_(model.tok_emb.weight)
    t.wpe.weight.copy_(model.pos_emb.weight)
    for ours, theirs in zip(model.trf_blocks, t.h):
        att = ours.att
        theirs.attn.c_attn.weight.copy_(torch.cat(
            [att.W_query.weight, att.W_key.weight, att.W_value.weight]).T)
        biases = [getattr(att, n).bias for n in ("W_query", "W_key", "W_value")]
        theirs.attn.c_attn.bias.copy_(torch.cat(biases) if biases[0] is not None else 0.0)
        theirs.attn.c_proj.weight.copy_(att.out_proj.weight.T)
        theirs.attn.c_proj.bias.copy_(att.out_proj.bias)
        theirs.ln_1.weight.copy_(ours.norm1.scale)
        theirs.ln_1.bias.copy_(ours.norm1.shift)
        theirs.ln_2.weight.copy_(ours.norm2.scale)
        theirs.ln_2.bias.copy_(ours.norm2.shift)
        theirs.mlp.c_fc.weight.copy_(ours.ff.layers[0].weight.T)
        theirs.mlp.c_fc.bias.copy_(ours.ff.layers[0].bias)
        theirs.mlp.c_proj.weight.copy_(ours.ff.layers[2].weight.T)
        theirs.mlp.c_proj.bias.copy_(ours.ff.layers[2].bias)
    t.ln_f.weight.copy_(model.final_norm.scale)
    t.ln_f.bias.copy_(model.final_norm.shift)
    hf.lm_head.weight.copy_(model.out_head.weight)
    return hf


def _qwen3_pair(cfg):
    """A random `transformers` Qwen3ForCausalLM of `cfg`'s shape and our LlamaModel with its
    weights (chapter 9's loader)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_groups, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.context_length, rope_theta=cfg.rope_base,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings)).eval()
    ours = load_hf_weights_into_llama(LlamaModel(cfg), hf.state_dict()).eval()
    return ours, hf


def _models(name: str):
    """Our float32 model and the `transformers` one with the same weights, and how to cache."""
    kind, cfg = MODELS[name]
    torch.manual_seed(123)
    if kind == "gpt":
        ours = set_impl(GPTModel(cfg).eval(), "fast")
        return ours, gpt_to_hf(ours), CachedGPT
    ours, hf = _qwen3_pair(cfg)
    return ours, hf, CachedLlama


def _quietly(convert, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "emulated" warning where bfloat16 is not native
        return convert(model)


def _course_paths(ours) -> dict:
    """The course's three generation paths of one float32 model, keyed as OURS."""
    return {"fp32": ours, "bf16": _quietly(bf16_inference_model, ours),
            "int8": int8_inference_model(ours)}


def _time_model(name: str, prompt_len: int, new_tokens: int, rounds: int, progress: bool) -> dict:
    ours, hf, cached = _models(name)
    ours_paths = _course_paths(ours)
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    theirs = {"hf_fp32": hf, "hf_bf16": hf_bf16}
    torch.manual_seed(0)
    prompt = torch.randint(0, ours.cfg.vocab_size, (1, prompt_len))
    context = ours.cfg.context_length
    outputs = {}

    def ours_run(key):
        def run():
            start = time.perf_counter()
            with torch.no_grad():
                outputs[key] = generate_text_simple(cached(ours_paths[key]), prompt, new_tokens,
                                                    context)
            return time.perf_counter() - start
        return run

    def hf_run(key):
        def run():
            start = time.perf_counter()
            with torch.no_grad():
                outputs[key] = theirs[key].generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            return time.perf_counter() - start
        return run

    contenders = {**{k: ours_run(k) for k in OURS}, **{k: hf_run(k) for k in THEIRS}}
    seconds = paired_rounds(contenders, rounds, label=name if progress else None)
    rates = rate_table(seconds, new_tokens, "hf_fp32", "tokens_per_s")
    weight_bytes = {"fp32": weight_bytes_per_token(ours_paths["fp32"]),
                    "bf16": weight_bytes_per_token(ours_paths["bf16"]),
                    "int8": weight_bytes_per_token(ours_paths["int8"])}
    weight_bytes.update(hf_fp32=weight_bytes["fp32"], hf_bf16=weight_bytes["bf16"])
    rows = {}
    for key, label in {**OURS, **THEIRS}.items():
        median = rates[key]["tokens_per_s"]["median"]
        rows[key] = {"label": label, **rates[key], "weight_bytes_per_token": weight_bytes[key],
                     "gb_per_s": median * weight_bytes[key] / 1e9}
    for ours_key, hf_key in (("fp32", "hf_fp32"), ("bf16", "hf_bf16")):
        rows[ours_key]["vs_transformers"] = (rows[ours_key]["tokens_per_s"]["median"]
                                             / rows[hf_key]["tokens_per_s"]["median"])
    rows["int8"]["vs_transformers"] = (rows["int8"]["tokens_per_s"]["median"]
                                       / rows["hf_bf16"]["tokens_per_s"]["median"])
    generated = {k: v[0, prompt_len:].tolist() for k, v in outputs.items()}
    return {"model": name, "rows": rows,
            "greedy_same_as_transformers_fp32": generated["fp32"] == generated["hf_fp32"],
            "greedy_agreement_with_fp32": {k: _agreement(generated["fp32"], generated[k])
                                           for k in ("bf16", "int8", "hf_bf16")}}


def _agreement(a: list[int], b: list[int]) -> int:
    """How many generated tokens agree before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def _quality(context: int = 256) -> dict | None:
    """Perplexity on the held-out 10% of The Verdict and teacher-forced greedy agreement with
    float32, for chapter 5's trained model in each number format; None if it is missing."""
    from utils.core.download import AssetUnavailableError, fetch
    from utils.pretrained import load_chapter5_model
    from utils.text import get_gpt2_tokenizer

    try:
        model = load_chapter5_model()
    except AssetUnavailableError:
        return None
    text = Path(fetch("the-verdict")).read_text(encoding="utf-8")
    ids = torch.tensor(get_gpt2_tokenizer().encode(text[int(0.9 * len(text)):]))
    windows = [ids[i:i + context + 1] for i in range(0, len(ids) - 1, context)]
    models = {"fp32": model, "bf16": _quietly(bf16_inference_model, model),
              "int8": int8_inference_model(model)}
    losses, picks = {k: [] for k in models}, {k: [] for k in models}
    for window in windows:
        x, y = window[None, :-1], window[None, 1:]
        for key, m in models.items():
            logits = m(x).float()[0]
            losses[key].append(torch.nn.functional.cross_entropy(logits, y[0], reduction="sum"))
            picks[key].append(logits.argmax(-1))
    tokens = sum(len(w) - 1 for w in windows)
    result = {"held_out_tokens": tokens}
    for key in models:
        chosen = torch.cat(picks[key])
        result[key] = {"perplexity": math.exp(float(sum(losses[key])) / tokens),
                       "greedy_agreement": float((chosen == torch.cat(picks["fp32"])).float().mean())}
    return result


# The operators that multiply by a weight matrix: PyTorch's float32 products, oneDNN's packed
# bfloat16 one (utils/core/onednn.py) and the int8 kernel (utils/core/int8.py).
PRODUCT_OPS = {"aten::addmm", "aten::mm", "mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm"}


@torch.no_grad()
def _profile(name: str, prompt_len: int, new_tokens: int, bandwidth: float) -> dict:
    """Where one generation step of `name` spends its time on each of the course's paths:
    the prompt is run first, outside the profiler; then `new_tokens` greedy steps are profiled
    by operator, split into the weight products (with the bandwidth they read at) and the rest."""
    from torch.profiler import ProfilerActivity, profile

    ours, _, cached = _models(name)
    torch.manual_seed(0)
    prompt = torch.randint(0, ours.cfg.vocab_size, (1, prompt_len))
    paths = _course_paths(ours)
    result = {}
    for key, model in paths.items():
        def steps(runner, idx):  # one position per step, as generate_text_simple does
            for _ in range(new_tokens):
                idx = torch.cat([idx, runner(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)

        runner = cached(model)
        first = torch.cat([prompt, runner(prompt)[:, -1].argmax(-1, keepdim=True)], dim=1)
        start = time.perf_counter()
        steps(runner, first)  # the wall time, unprofiled
        wall_ms = (time.perf_counter() - start) * 1e3 / new_tokens
        runner(prompt)  # the cache back to the prompt alone
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps(runner, first)
        events = [e for e in prof.key_averages() if "::" in e.key]
        per_token = {e.key: e.self_cpu_time_total / 1e3 / new_tokens for e in events}  # ms
        products = sum(ms for op, ms in per_token.items() if op in PRODUCT_OPS)
        others = sorted(((op, ms) for op, ms in per_token.items() if op not in PRODUCT_OPS),
                        key=lambda item: item[1], reverse=True)
        bytes_read = weight_bytes_per_token(model)
        result[key] = {"steps": new_tokens, "wall_ms_per_token": wall_ms,
                       "ms_per_token": sum(per_token.values()), "products_ms": products,
                       "products_gb_per_s": bytes_read / (products / 1e3) / 1e9,
                       "products_of_limit": bytes_read / (products / 1e3) / bandwidth,
                       "other_ms": sum(ms for _, ms in others),
                       "top_other": [{"op": op, "ms": ms} for op, ms in others[:4]]}
    return result


def run_decode_benchmark(models=None, prompt_len: int = 32, new_tokens: int = 100,
                         rounds: int = 3, quality: bool = True, profile: bool = True,
                         progress: bool = True) -> dict:
    """Time every path on every model and measure the bandwidth; returns the results."""
    models = models or FULL
    bandwidth = measure_bandwidth()
    results = {"format": 1, "machine": describe_machine("cpu"),
               "setup": {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
                         "greedy": True, "kv_cache": True},
               "bandwidth_gb_per_s": bandwidth / 1e9, "models": {}}
    for name in models:
        timed = _time_model(name, prompt_len, new_tokens, rounds, progress)
        for row in timed["rows"].values():
            row["fraction_of_limit"] = row["gb_per_s"] / (bandwidth / 1e9)
        results["models"][name] = timed
    results["quality"] = _quality() if quality else None
    results["profile"] = ({name: _profile(name, prompt_len, min(new_tokens, 20), bandwidth)
                           for name in models} if profile else None)
    return results


def format_decode(results: dict) -> str:
    """The saved or fresh results as the printed tables."""
    m, s = results["machine"], results["setup"]
    lines = [f"greedy generation, {s['new_tokens']} new tokens after {s['prompt_tokens']}, KV "
             f"cache, {s['rounds']} paired rounds, on {m.get('cpu', '?')} ({m['cpu_threads']} "
             f"threads, torch {m['torch']}); memory read at "
             f"{results['bandwidth_gb_per_s']:.1f} GB/s (fastest read of 1 GiB)"]
    for name, timed in results["models"].items():
        lines.append("")
        lines.append(f"{name:<27} {'tokens/s (min-max)':>22} {'MB/token':>9} {'GB/s':>6} "
                     f"{'of limit':>8} {'vs transformers':>15}")
        for row in timed["rows"].values():
            rate = row["tokens_per_s"]
            ratio = f"{row['vs_transformers']:.2f}x" if "vs_transformers" in row else ""
            speed = f"{rate['median']:.1f} ({rate['min']:.1f}-{rate['max']:.1f})"
            lines.append(f"{row['label']:<27} {speed:>22} {row['weight_bytes_per_token'] / 1e6:>9.0f}"
                         f" {row['gb_per_s']:>6.1f} {100 * row['fraction_of_limit']:>7.0f}% "
                         f"{ratio:>15}")
        agree = timed["greedy_agreement_with_fp32"]
        lines.append(f"greedy tokens: course = transformers in float32: "
                     f"{timed['greedy_same_as_transformers_fp32']}; first tokens equal to "
                     f"float32's: bf16 weights {agree['bf16']}, int8 weights {agree['int8']}, "
                     f"transformers bf16 {agree['hf_bf16']} (random weights: near-ties)")
    q = results.get("quality")
    if q:
        lines.append("")
        lines.append(f"chapter 5's model, held-out 10% of The Verdict ({q['held_out_tokens']} "
                     f"tokens): perplexity / greedy next token as float32's")
        for key, label in (("fp32", "float32"), ("bf16", "bf16 weights"), ("int8", "int8 weights")):
            lines.append(f"  {label:<13} {q[key]['perplexity']:8.2f}   "
                         f"{100 * q[key]['greedy_agreement']:5.1f}%")
    p = results.get("profile")
    if p:
        lines.append("")
        steps = next(iter(next(iter(p.values())).values()))["steps"]
        lines.append(f"profile of {steps} generation steps, ms per token: the wall time, the "
                     "operators' own time, of which the weight products (and the bandwidth they "
                     "read at) and the other operators")
        lines.append(f"{'model, path':<21} {'wall':>6} {'ops':>6} {'products':>9} {'GB/s':>6} "
                     f"{'of limit':>8} {'other':>7}  largest others")
        for name, paths in p.items():
            for key, prof in paths.items():
                largest = ", ".join(f"{o['op'].split('::')[-1][:20]} {o['ms']:.2f}"
                                    for o in prof["top_other"][:3])
                lines.append(f"{name + ', ' + key:<21} {prof['wall_ms_per_token']:>6.1f} "
                             f"{prof['ms_per_token']:>6.1f} "
                             f"{prof['products_ms']:>9.1f} {prof['products_gb_per_s']:>6.1f} "
                             f"{100 * prof['products_of_limit']:>7.0f}% {prof['other_ms']:>7.1f}"
                             f"  {largest}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.cli.decode_benchmark",
                                     description="Greedy generation against the memory-"
                                                 "bandwidth limit, beside transformers.")
    parser.add_argument("--quick", action="store_true", help="the tiny configs, 20 tokens")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: "
                        "gpt2-small qwen3-0.6b (tiny-gpt tiny-qwen3 with --quick)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--new-tokens", type=int, help="default 100 (20 with --quick)")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds (default 3)")
    parser.add_argument("--no-quality", action="store_true", help="skip chapter 5's model")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    new_tokens = args.new_tokens or (20 if args.quick else 100)
    models = args.models or (QUICK if args.quick else FULL)
    if args.prompt < 1 or new_tokens < 1 or args.rounds < 1:
        parser.error("--prompt, --new-tokens and --rounds must be at least 1")
    for name in models:
        length = MODELS[name][1].context_length
        if args.prompt + new_tokens > length:
            parser.error(f"{name} has context_length {length}: pass --prompt plus --new-tokens "
                         f"<= {length}")
    results = run_decode_benchmark(models, args.prompt, new_tokens, args.rounds,
                                   not args.no_quality, not args.no_profile)
    print(format_decode(results))
    if args.json:
        save_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
