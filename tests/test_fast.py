"""Equivalence tests for utils/fast.py (notebook 08): same weights, same results. Nothing here
is timed; speed is measured by `python -m utils.cli.benchmark`."""

import dataclasses
import warnings

import pytest
import torch

from utils.attention import MultiHeadAttention
from utils.cli.benchmark import _flops_per_token, format_results, run_benchmark
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.fast import (CachedGPT, FastGELU, FastLayerNorm, KVCache, SDPAttention,
                        autocast_bf16, bf16_supported, compile_model, forward_with_cache,
                        fused_adamw, set_impl)
from utils.generation import generate
from utils.model import GPT2_SMALL_124M, GPT_TINY, GPTModel, generate_text_simple
from utils.train import calc_loss_batch, train_model_simple

SMALL_VOCAB = dataclasses.replace(GPT_TINY, vocab_size=256)


def _model(cfg=GPT_TINY, impl="teaching", seed=0):
    torch.manual_seed(seed)
    return set_impl(GPTModel(cfg), impl).eval()


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
    assert set_impl(model, "fast") is model
    assert type(model.trf_blocks[1].ff.layers[1]) is FastGELU
    assert type(model.final_norm) is FastLayerNorm
    set_impl(model, "teaching")
    assert type(model.trf_blocks[1].att) is MultiHeadAttention
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="impl must be one of"):
        set_impl(model, "turbo")


def test_checkpoint_loads_into_either_impl(tmp_path):
    fast = _model(impl="fast")
    save_checkpoint(tmp_path / "fast.pt", fast)
    teaching = load_checkpoint(tmp_path / "fast.pt", model=_model(seed=5))
    idx = torch.randint(0, GPT_TINY.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(teaching(idx), fast(idx), atol=1e-5, rtol=0)
    again = load_checkpoint(tmp_path / "fast.pt", model=_model(impl="fast", seed=6))
    assert type(again.trf_blocks[0].att) is SDPAttention


@pytest.mark.parametrize("impl", ["teaching", "fast"])
def test_cached_greedy_generation_is_identical(impl):
    model = _model(impl=impl)
    prompt = torch.randint(0, GPT_TINY.vocab_size, (3, 5))  # a batch of three prompts
    plain = generate_text_simple(model, prompt, 40, context_size=64)
    cached = generate_text_simple(CachedGPT(model), prompt, 40, context_size=64)
    assert torch.equal(plain, cached)
    assert torch.equal(generate(model, prompt, 40, 64, eos_id=7),
                       generate(CachedGPT(model), prompt, 40, 64, eos_id=7))


def test_cached_sampling_is_identical():
    model = _model()
    prompt = torch.randint(0, GPT_TINY.vocab_size, (2, 5))
    runs = []
    for runner in (model, CachedGPT(model)):
        torch.manual_seed(7)
        runs.append(generate(runner, prompt, 30, 64, temperature=1.0, top_k=10))
    assert torch.equal(*runs)


def test_cached_logits_match_full_forward_at_every_step():
    model = _model()
    idx = torch.randint(0, GPT_TINY.vocab_size, (2, 6))
    cached_model = CachedGPT(model)
    with torch.no_grad():
        first = cached_model(idx)
        assert first.shape == (2, 6, GPT_TINY.vocab_size)  # the prompt: every position
        torch.testing.assert_close(first, model(idx), atol=1e-5, rtol=0)
        for _ in range(20):
            idx = torch.cat([idx, first[:, -1].argmax(-1, keepdim=True)], dim=1)
            first = cached_model(idx)
            assert first.shape == (2, 1, GPT_TINY.vocab_size)  # then one new position
            torch.testing.assert_close(first[:, -1], model(idx)[:, -1], atol=1e-5, rtol=0)


def test_cache_is_not_reused_for_a_different_prompt():
    # The old CachedDecoder fed only idx[:, seen:] to the model, so a second, different
    # prompt of the same length was answered from the first prompt's cache.
    model = _model()
    cached_model = CachedGPT(model)
    a = torch.randint(0, GPT_TINY.vocab_size, (1, 8))
    b = torch.randint(0, GPT_TINY.vocab_size, (1, 8))
    with torch.no_grad():
        cached_model(a)
        torch.testing.assert_close(cached_model(b), model(b), atol=1e-5, rtol=0)
        longer_b = torch.cat([b, a[:, :3]], dim=1)  # a longer sequence that does not extend a
        torch.testing.assert_close(cached_model(longer_b)[:, -1], model(longer_b)[:, -1],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(cached_model(b[:1, :4]), model(b[:1, :4]), atol=1e-5, rtol=0)


def test_past_the_context_the_cache_gives_the_same_tokens():
    # The old decoder restarted from the last half window; the cropped window the loops
    # pass in never extends the cache, so CachedGPT recomputes it like the plain model.
    model = _model()
    prompt = torch.randint(0, GPT_TINY.vocab_size, (2, 10))
    plain = generate_text_simple(model, prompt, 100, context_size=64)
    cached = generate_text_simple(CachedGPT(model), prompt, 100, context_size=64)
    assert cached.shape == plain.shape == (2, 110)
    assert torch.equal(plain, cached)


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
    model = autocast_bf16(GPTModel(SMALL_VOCAB), enabled=bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "emulated" warning on CPUs without bf16
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


def test_autocast_bf16_runs_matrix_products_in_bf16_and_returns_float32():
    model = _model(SMALL_VOCAB)
    seen = []
    model.out_head.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    idx = torch.zeros(2, 3, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert autocast_bf16(model)(idx).dtype == torch.float32
    assert seen == [torch.bfloat16]
    autocast_bf16(model, enabled=False)
    assert model(idx).dtype == torch.float32 and seen[-1] == torch.float32
    assert "forward" not in model.__dict__
    if not bf16_supported("cpu"):
        with pytest.warns(UserWarning, match="no native bfloat16"):
            autocast_bf16(model)(idx)


def test_autocast_bf16_works_with_chapter_5_training_and_the_cache():
    torch.manual_seed(0)
    model = autocast_bf16(GPTModel(SMALL_VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    windows = torch.randint(0, 256, (8, 17))
    loader = [(windows[i:i + 2, :-1], windows[i:i + 2, 1:]) for i in range(0, 8, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_losses, _, _ = train_model_simple(model, loader, loader, optimizer, "cpu", 2, 2, 2,
                                                "", None, verbose=False)
        out = generate(CachedGPT(model), torch.zeros(2, 3, dtype=torch.long), 5, 64)
    assert train_losses[-1] < train_losses[0]
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
    plain = _model(seed=1)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():  # against the same weights in plain blocks
        torch.testing.assert_close(model.eval()(x), plain(x))


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
