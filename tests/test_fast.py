"""Equivalence tests for utils/fast.py (notebook 08): same weights, same results. Nothing here
is timed; speed is measured by `python -m utils.benchmark`."""

import dataclasses
import warnings

import pytest
import torch

from utils.attention import MultiHeadAttention
from utils.benchmark import _flops_per_token, format_results, run_benchmark
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.fast import (CachedDecoder, FastGELU, FastLayerNorm, KVCache, SDPAttention,
                        _uncompile, compile_model, forward_with_cache, fused_adamw, set_impl)
from utils.generation import generate
from utils.model import GPT2_SMALL_124M, GPT_TINY, GPTConfig, GPTModel, generate_text_simple
from utils.train import _bf16_autocast, _bf16_native, calc_loss_batch

SMALL_VOCAB = dataclasses.replace(GPT_TINY, vocab_size=256)


def _model(cfg=GPT_TINY, impl="teaching", seed=0):
    torch.manual_seed(seed)
    return GPTModel(dataclasses.replace(cfg, impl=impl)).eval()


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_sdpa_attention_matches_teaching_attention(qkv_bias):
    torch.manual_seed(1)
    kwargs = dict(d_in=48, d_out=48, context_length=32, dropout=0.2, num_heads=4,
                  qkv_bias=qkv_bias)
    teaching, fast = MultiHeadAttention(**kwargs).eval(), SDPAttention(**kwargs).eval()
    fast.load_state_dict(teaching.state_dict())
    x = torch.randn(3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), teaching(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(fast(x[:, :7]), teaching(x[:, :7]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="context_length=32"):
        fast(torch.randn(1, 33, 48))


@pytest.mark.parametrize("impl", ["sdpa", "fast"])
def test_fast_model_matches_teaching_model(impl):
    teaching, fast = _model(), _model(impl=impl, seed=99)
    fast.load_state_dict(teaching.state_dict())  # same names, so any checkpoint loads
    idx = torch.randint(0, GPT_TINY.vocab_size, (2, GPT_TINY.context_length))
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), teaching(idx), atol=1e-5, rtol=0)
    assert type(fast.trf_blocks[0].att) is SDPAttention
    assert (type(fast.final_norm) is FastLayerNorm) == (impl == "fast")


def test_set_impl_switches_classes_and_keeps_parameters():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_impl(model, "fast")
    assert model.cfg.impl == "fast"
    assert type(model.trf_blocks[1].ff.layers[1]) is FastGELU
    set_impl(model, "teaching")
    assert type(model.trf_blocks[1].att) is MultiHeadAttention
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="impl must be one of"):
        set_impl(model, "turbo")


def test_config_impl_is_validated_and_shown_only_when_set():
    with pytest.raises(ValueError, match="impl must be"):
        GPTConfig(impl="flash")
    assert "impl" not in repr(GPT_TINY)
    assert "impl='fast'" in repr(dataclasses.replace(GPT_TINY, impl="fast"))


def test_checkpoint_loads_into_either_impl(tmp_path):
    fast = _model(impl="fast")
    save_checkpoint(tmp_path / "fast.pt", fast)
    teaching = load_checkpoint(tmp_path / "fast.pt", model=_model(seed=5))
    idx = torch.randint(0, GPT_TINY.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(teaching(idx), fast(idx), atol=1e-5, rtol=0)
    assert load_checkpoint(tmp_path / "fast.pt").cfg.impl == "fast"  # rebuilt as saved


@pytest.mark.parametrize("impl", ["teaching", "fast"])
def test_cached_greedy_generation_is_identical(impl):
    model = _model(impl=impl)
    prompt = torch.randint(0, GPT_TINY.vocab_size, (3, 5))  # a batch of three prompts
    plain = generate_text_simple(model, prompt, 40, context_size=64)
    cached = generate_text_simple(model, prompt, 40, context_size=64, use_cache=True)
    assert torch.equal(plain, cached)
    assert torch.equal(generate(model, prompt, 40, 64, eos_id=7),
                       generate(model, prompt, 40, 64, eos_id=7, use_cache=True))


def test_cached_logits_match_full_forward_at_every_step():
    model = _model()
    idx = torch.randint(0, GPT_TINY.vocab_size, (2, 6))
    decoder = CachedDecoder(model, context_size=64)
    with torch.no_grad():
        for _ in range(20):
            cached = decoder(idx)
            full = model(idx)[:, -1, :]
            torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
            idx = torch.cat([idx, cached.argmax(-1, keepdim=True)], dim=1)


def test_cache_beyond_context_restarts_from_the_last_half_window():
    model = _model()
    prompt = torch.randint(0, GPT_TINY.vocab_size, (2, 10))
    plain = generate_text_simple(model, prompt, 100, context_size=64)
    cached = generate_text_simple(model, prompt, 100, context_size=64, use_cache=True)
    assert cached.shape == plain.shape == (2, 110)
    assert torch.equal(plain[:, :64], cached[:, :64])  # identical while everything fits
    decoder = CachedDecoder(model, context_size=64)  # the documented rule after the limit
    decoder(cached[:, :64])
    with torch.no_grad():
        after_refill = decoder(cached[:, :65])
        torch.testing.assert_close(after_refill, model(cached[:, 65 - 32:65])[:, -1], atol=1e-5,
                                   rtol=0)


def test_forward_with_cache_refuses_to_overflow():
    model = _model()
    cache = KVCache(GPT_TINY.n_layers, capacity=8)
    with torch.no_grad():
        forward_with_cache(model, torch.zeros(1, 6, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="cannot take 3 more"):
            forward_with_cache(model, torch.zeros(1, 3, dtype=torch.long), cache)
    assert cache.length == 6 and cache.keys[0].shape == (1, GPT_TINY.n_heads, 8, 16)


def _short_run(bf16, steps=30):
    torch.manual_seed(123)
    model = GPTModel(SMALL_VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "emulated" warning on CPUs without bf16
            with _bf16_autocast("cpu", bf16):
                loss = calc_loss_batch(data[:, :-1], data[:, 1:], model, "cpu")
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_bf16_training_reduces_loss_like_float32():
    fp32, bf16 = _short_run(False), _short_run(True)
    assert fp32[0] == pytest.approx(bf16[0], rel=0.02)  # same start, up to bf16 rounding
    assert bf16[-1] < 0.6 * bf16[0]
    assert bf16[-1] == pytest.approx(fp32[-1], rel=0.15)


def test_bf16_switch_validates_and_warns_where_emulated():
    with pytest.raises(ValueError, match="bf16 must be"):
        _bf16_autocast("cpu", "yes")
    if not _bf16_native("cpu"):
        with pytest.warns(UserWarning, match="no native bfloat16"):
            _bf16_autocast("cpu", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" never warns: it skips emulated bf16
        _bf16_autocast("cpu", "auto")
    model = _model(SMALL_VOCAB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = generate(model, torch.zeros(2, 3, dtype=torch.long), 5, 64, bf16=True,
                       use_cache=True)
    assert out.shape == (2, 8)


def test_fused_adamw_gives_the_default_update():
    models = [_model(SMALL_VOCAB), _model(SMALL_VOCAB)]
    optimizers = [torch.optim.AdamW(models[0].parameters(), lr=1e-3, weight_decay=0.1),
                  fused_adamw(models[1].parameters(), lr=1e-3, weight_decay=0.1)]
    assert optimizers[1].defaults.get("fused")
    data = torch.randint(0, 256, (2, 17))
    for model, optimizer in zip(models, optimizers):
        for _ in range(3):
            optimizer.zero_grad()
            calc_loss_batch(data[:, :-1], data[:, 1:], model.train(), "cpu").backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("whole", [False, True])
def test_compile_model_falls_back_with_a_warning(monkeypatch, whole):
    def broken_compile(model, **kwargs):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    model = _model().train()
    with pytest.warns(UserWarning, match="torch.compile failed"):
        assert compile_model(model, torch.zeros(1, 4, dtype=torch.long), whole=whole) is model
    assert all(block._compiled_call_impl is None for block in model.trf_blocks)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, GPT_TINY.vocab_size)


def test_compile_model_compiles_each_block_in_place(monkeypatch):
    real_compile = torch.compile  # dynamo's eager backend: the same tracing, no C++ build
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager"))
    torch._dynamo.reset()
    model = _model().train()
    names = list(model.state_dict())
    x = torch.randint(0, GPT_TINY.vocab_size, (2, 8))
    assert compile_model(model, x) is model
    assert all(block._compiled_call_impl is not None for block in model.trf_blocks)
    assert list(model.state_dict()) == names  # checkpoints still load as they are
    assert all(p.grad is None for p in model.parameters())  # the check's gradients are gone
    model.eval()
    with torch.no_grad():
        compiled_logits = model(x)
        _uncompile(model.trf_blocks)
        torch.testing.assert_close(compiled_logits, model(x))  # against the plain blocks


def test_compile_model_by_blocks_needs_blocks():
    with pytest.raises(ValueError, match="whole=True"):
        compile_model(torch.nn.Linear(2, 2), torch.zeros(1, 2))


def test_flops_per_token_for_gpt2_small():
    # N = 163,009,536 parameters minus the token and position tables (51,281 x 768)
    n = 163_009_536 - 51_281 * 768
    assert _flops_per_token(GPT2_SMALL_124M, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_benchmark_runs_every_path_and_reports_ratios():
    results = run_benchmark("tiny", batch_size=1, context=16, repeats=1, new_tokens=8,
                            memory=False, progress=False)
    names = [row["path"] for row in results["train"]]
    assert names[0] == "teaching" and "fast path (+ fused AdamW)" in names
    assert results["train"][0]["ratio"] == 1.0
    assert all(row["tokens_per_s"] > 0 and row["ratio"] > 0
               for row in results["train"] + results["generate"])
    assert results["greedy_identical_with_cache"] is True
    assert "teaching + KV cache" in format_results(results)
    with pytest.raises(ValueError, match="context_length 64"):
        run_benchmark("tiny", context=65, memory=False, progress=False)
