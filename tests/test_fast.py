"""Equivalence tests for utils/fast.py (notebook 08): same weights, same results. Nothing here
is timed; speed is measured by `python -m utils.cli.benchmark`."""

import contextlib
import copy
import dataclasses
import io
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from utils.attention import MultiHeadAttention
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.fast import (BF16Linear, CachedGPT, CachedModel, FastGELU, FastLayerNorm, Int8Linear,
                        KVCache, Precision, SDPAttention, autocast_bf16, bf16_inference_model,
                        bf16_supported, choose_precision, compile_model, fast_loss_batch,
                        forward_with_cache, fused_adamw, fused_cross_entropy,
                        int8_inference_model, set_impl, train_model_fast)
from utils.generation import generate
from utils.model import GPT_TINY, GPTModel, generate_text_simple
from utils.train import calc_loss_batch, generate_and_print_sample, train_model_simple

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


def test_cached_model_returns_the_last_positions_logits_unless_asked_for_all():
    model = _model()
    idx = torch.randint(0, GPT_TINY.vocab_size, (2, 6))
    with torch.no_grad():
        full = model(idx)
        last = CachedGPT(model)(idx)
        assert last.shape == (2, 1, GPT_TINY.vocab_size)
        torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
        cache = KVCache(GPT_TINY.n_layers, GPT_TINY.context_length)
        head_rows = []
        hook = model.out_head.register_forward_hook(
            lambda mod, args, out: head_rows.append(args[0].shape[1]))
        try:
            forward_with_cache(model, idx, cache, last_only=True)
        finally:
            hook.remove()
        assert head_rows == [1] and cache.length == 6  # every position cached, one scored


def test_cached_logits_match_full_forward_at_every_step():
    model = _model()
    idx = torch.randint(0, GPT_TINY.vocab_size, (2, 6))
    cached_model = CachedGPT(model, all_logits=True)
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
        torch.testing.assert_close(cached_model(b), model(b)[:, -1:], atol=1e-5, rtol=0)
        longer_b = torch.cat([b, a[:, :3]], dim=1)  # a longer sequence that does not extend a
        torch.testing.assert_close(cached_model(longer_b)[:, -1], model(longer_b)[:, -1],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(cached_model(b[:1, :4]), model(b[:1, :4])[:, -1:], atol=1e-5, rtol=0)


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


def test_the_cache_moves_its_own_length_layer_by_layer():
    cache = KVCache(n_layers=2, capacity=5)
    k = torch.randn(1, 2, 3, 4)
    keys, values = cache.append(0, k, 2 * k)  # layer 0 has taken 3 positions, layer 1 none
    assert torch.equal(keys, k) and torch.equal(values, 2 * k)
    assert cache.filled == [3, 0] and cache.length == 0  # not every layer holds them yet
    cache.append(1, k, k)
    assert cache.length == 3
    one = torch.randn(1, 2, 1, 4)
    keys, _ = cache.append(0, one, one)
    assert torch.equal(keys, torch.cat([k, one], dim=2))  # all the layer holds, in order
    with pytest.raises(ValueError, match="holds 4 of 5 positions and cannot take 2 more"):
        cache.append(0, torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    assert cache.filled == [4, 3]  # a refused append changes nothing


def test_cached_model_reuses_the_cache_only_for_a_continuation():
    model = _model()
    cached = CachedGPT(model)
    assert isinstance(cached, CachedModel) and cached.cfg is model.cfg  # asked like the model
    prompt = torch.tensor([[1, 2, 3]])
    assert not cached.extends_cache(prompt)  # nothing cached yet
    cached(prompt)
    cache = cached.cache
    assert cache.length == 3
    assert cached.extends_cache(torch.tensor([[1, 2, 3, 4]]))
    assert not cached.extends_cache(torch.tensor([[1, 2, 9, 4]]))  # a different prefix
    assert not cached.extends_cache(prompt)  # nothing new
    assert not cached.extends_cache(torch.zeros(1, GPT_TINY.context_length + 1, dtype=torch.long))
    cached(torch.tensor([[1, 2, 3, 4]]))
    assert cached.cache is cache and cache.length == 4  # one more position, same cache
    cached(torch.tensor([[5, 6]]))
    assert cached.cache is not cache and cached.cache.length == 2  # a new prompt: afresh


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


# --- bfloat16 weights for generation ---------------------------------------------------------

BF16_REL_TOL = 2e-2  # bfloat16 keeps 8 significant bits (~0.4% per rounding); logits after a
# few layers of such products stay within 2% of float32 in relative (Frobenius) norm


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "emulated" warning on CPUs without bf16
        return fn(*args, **kwargs)


def test_fused_qkv_computes_what_the_three_layers_did():
    from utils.fast import fuse_qkv
    from utils.lora import replace_linear_with_lora
    for impl in ("teaching", "fast"):
        model = _model(impl=impl)
        idx = torch.randint(0, GPT_TINY.vocab_size, (2, 9))
        with torch.no_grad():
            expected = model(idx)
            fused = fuse_qkv(copy.deepcopy(model))
            att = fused.trf_blocks[0].att
            assert not hasattr(att, "W_query") and att.W_qkv.out_features == 3 * att.d_out
            torch.testing.assert_close(fused(idx), expected, atol=1e-5, rtol=0)
            cache = KVCache(GPT_TINY.n_layers, GPT_TINY.context_length)
            torch.testing.assert_close(forward_with_cache(fused, idx, cache), expected,
                                       atol=1e-5, rtol=0)
    torch.manual_seed(0)
    lora = _model()
    replace_linear_with_lora(lora, rank=2, alpha=4)
    assert not hasattr(fuse_qkv(lora).trf_blocks[0].att, "W_qkv")  # LoRA layers stay apart


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_inference_model_is_a_converted_copy():
    model = _model(impl="fast")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = _quiet(bf16_inference_model, autocast_bf16(model))
    assert "forward" not in fast.__dict__ and "forward" in model.__dict__  # a plain copy
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is BF16Linear and m.weight.dtype == torch.bfloat16
                           for m in linears)
    assert fast.tok_emb.weight.dtype == fast.final_norm.scale.dtype == torch.float32
    stacked = {k.replace("W_query", "W_qkv") for k in before if "W_key" not in k
               and "W_value" not in k}  # the checkpoint's names, three projections as one
    assert set(fast.state_dict()) == stacked
    att, original = fast.trf_blocks[0].att, model.trf_blocks[0].att
    assert torch.equal(att.W_qkv.weight, torch.cat([original.W_query.weight, original.W_key.weight,
                                                    original.W_value.weight]).bfloat16())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # untouched
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training


@pytest.mark.parametrize("capability, native", [((6, 0), False), ((7, 0), False), ((7, 5), False),
                                                ((8, 0), True), ((8, 9), True), ((9, 0), True)])
def test_bf16_on_cuda_only_from_compute_capability_8(monkeypatch, capability, native):
    """P100 (6.0), V100 (7.0) and T4 (7.5) emulate bfloat16: PyTorch's is_bf16_supported()
    says yes to them by default, bf16_supported must not (the device queries are faked)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert bf16_supported("cuda") is native
    assert bf16_supported("cuda:0") is native


def test_bf16_on_cpu_follows_onednn_and_on_mps_the_macos_version(monkeypatch):
    import utils.core.onednn as onednn
    for answer in (True, False):
        monkeypatch.setattr(onednn, "_mkldnn_op", lambda name, answer=answer: lambda: answer)
        assert onednn.cpu_has_native_bf16() is answer
        monkeypatch.setattr("utils.fast.cpu_has_native_bf16", lambda answer=answer: answer)
        assert bf16_supported("cpu") is answer
    for macos_14 in (True, False):  # before macOS 14 an Apple GPU refuses bfloat16 tensors
        monkeypatch.setattr("utils.fast._mps_has_bf16", lambda device, ok=macos_14: ok)
        assert bf16_supported("mps") is macos_14


def _fake_cuda(monkeypatch, capability, name="a GPU"):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("name, capability, chosen", [
    ("NVIDIA H100", (9, 0), "bf16"), ("NVIDIA A100", (8, 0), "bf16"), ("NVIDIA L4", (8, 9), "bf16"),
    ("Tesla T4", (7, 5), "fp16"), ("Tesla V100", (7, 0), "fp16"), ("Tesla P100", (6, 0), "fp16"),
    ("GeForce GTX 1080", (6, 1), "fp32"), ("Tesla K80", (3, 7), "fp32")])
def test_precision_on_cuda_follows_the_compute_capability(monkeypatch, name, capability, chosen):
    """Colab's T4 and Kaggle's P100 train in float16 with loss scaling, Ampere and later in
    bfloat16, Pascal gaming cards (slow float16) and older in float32 (queries faked)."""
    _fake_cuda(monkeypatch, capability, name)
    precision = choose_precision("cuda")
    assert precision.name == chosen and precision.loss_scaling is (chosen == "fp16")
    assert name in precision.reason and f"{capability[0]}.{capability[1]}" in precision.reason
    assert precision.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16,
                               "fp32": torch.float32}[chosen]
    assert precision.grad_scaler("cpu").is_enabled() is (chosen == "fp16")


def test_precision_on_amd_gpus_cpus_and_macs(monkeypatch):
    _fake_cuda(monkeypatch, (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: bfloat16 native, never float16 here
    assert choose_precision("cuda").name == "bf16"
    for native, chosen in ((True, "bf16"), (False, "fp32")):  # AVX512-BF16/AMX, or AVX2 only
        monkeypatch.setattr("utils.fast.cpu_has_native_bf16", lambda native=native: native)
        assert choose_precision("cpu").name == chosen
        monkeypatch.setattr("utils.fast._mps_has_bf16", lambda device, native=native: native)
        assert choose_precision("mps").name == chosen  # macOS 14 or later, or older


def test_precision_by_hand_says_when_it_is_emulated_and_prints_one_line(monkeypatch, capsys):
    _fake_cuda(monkeypatch, (7, 5), "Tesla T4")
    forced = choose_precision("cuda", "bf16", verbose=True)
    assert forced.name == "bf16" and "emulated on Tesla T4" in forced.reason
    assert capsys.readouterr().out == f"precision: bfloat16 autocast ({forced.reason})\n"
    assert "emulated" not in choose_precision("cuda", "fp16").reason
    assert choose_precision("cuda", "fp32").reason == "as asked"
    with pytest.raises(ValueError, match="pass 'auto', 'bf16', 'fp16' or 'fp32'"):
        choose_precision("cpu", "float16")
    with pytest.raises(ValueError, match="not one of"):
        Precision("half")


def test_onednn_helpers_fall_back_where_the_private_operators_are_missing(monkeypatch):
    import utils.core.onednn as onednn
    monkeypatch.setattr(onednn, "_mkldnn_op", lambda name: None)  # a build without them
    assert onednn.cpu_has_native_bf16() is False
    assert onednn.pack_bf16_weight(torch.zeros(4, 4, dtype=torch.bfloat16)) is None
    monkeypatch.setattr("utils.fast.pack_bf16_weight", onednn.pack_bf16_weight)
    monkeypatch.setattr("utils.fast.cpu_has_native_bf16", lambda: True)  # packing fails anyway
    torch.manual_seed(0)
    plain = torch.nn.Linear(8, 4)
    model = _quiet(bf16_inference_model, torch.nn.Sequential(plain))
    assert model[0].packed is None  # so BF16Linear uses F.linear
    x = torch.randn(2, 8)
    assert _relative(model[0](x), plain(x)) < 1e-2


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_linear_matches_float32_within_bf16_rounding(bias):
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 96, bias=bias)
    x = torch.randn(3, 5, 64)
    expected = plain(x)
    layer = torch.nn.Linear(64, 96, bias=bias)
    layer.load_state_dict(plain.state_dict())
    layer.__class__ = BF16Linear
    layer.to(torch.bfloat16)
    unpacked = layer(x)
    assert unpacked.dtype == torch.bfloat16 and unpacked.shape == (3, 5, 96)
    assert _relative(unpacked, expected) < 1e-2
    if bf16_supported("cpu"):  # the oneDNN-packed weight gives the same products
        model = _quiet(bf16_inference_model, torch.nn.Sequential(plain))
        packed = model[0]
        assert packed.packed is not None
        torch.testing.assert_close(packed(x), unpacked, rtol=1e-2, atol=1e-2)


def test_bf16_inference_logits_and_cache_follow_float32():
    model = _model(impl="fast")
    fast = _quiet(bf16_inference_model, model)
    idx = torch.randint(0, GPT_TINY.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(idx)
        assert _relative(fast(idx), expected) < BF16_REL_TOL
        cache = KVCache(GPT_TINY.n_layers, GPT_TINY.context_length)
        prefill = forward_with_cache(fast, idx[:, :8], cache)
        assert cache.keys[0].dtype == cache.values[-1].dtype == torch.bfloat16
        assert cache.keys[0].element_size() == 2  # half the float32 cache
        steps = [prefill[:, -1]] + [forward_with_cache(fast, idx[:, t:t + 1], cache)[:, -1]
                                    for t in range(8, 12)]
    assert _relative(prefill, expected[:, :8]) < BF16_REL_TOL
    for t, step in zip(range(7, 12), steps):  # each decoded position against float32
        assert _relative(step, expected[:, t]) < BF16_REL_TOL
    out = CachedGPT(fast, all_logits=True)(idx)
    assert out.dtype == torch.float32 and out.shape == (2, 12, GPT_TINY.vocab_size)


def _confident_model():
    """A small model trained to continue a fixed cycle of tokens: large logit margins."""
    torch.manual_seed(0)
    model = set_impl(GPTModel(SMALL_VOCAB), "fast")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cycle = torch.randperm(256)[:40]
    data = cycle.repeat(4)  # (160,)
    windows = torch.stack([data[i:i + 33] for i in range(0, 120, 3)])  # (40, 33)
    for _ in range(40):
        optimizer.zero_grad()
        calc_loss_batch(windows[:, :-1], windows[:, 1:], model, "cpu").backward()
        optimizer.step()
    return model.eval(), cycle


def test_bf16_greedy_generation_agrees_with_float32_where_the_margin_is_clear():
    model, cycle = _confident_model()
    fast = _quiet(bf16_inference_model, model)
    prompts = torch.stack([cycle[i:i + 4] for i in (0, 7, 19)])  # three prompts from the cycle
    fp32 = generate_text_simple(CachedGPT(model), prompts, 30, SMALL_VOCAB.context_length)
    bf16 = generate_text_simple(CachedGPT(fast), prompts, 30, SMALL_VOCAB.context_length)
    with torch.no_grad():  # teacher-forced along float32's choices
        logits32 = model(fp32)[:, 3:-1]
        logits16 = fast(fp32)[:, 3:-1].float()
    top2 = logits32.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    shift = (logits16 - logits32).abs().amax(dim=-1)
    clear = margin > 2 * shift  # bf16 rounding cannot reorder the top two here
    assert clear.float().mean() > 0.9  # the trained model is sure almost everywhere
    assert torch.equal(logits16.argmax(-1)[clear], logits32.argmax(-1)[clear])
    if clear.all():
        assert torch.equal(bf16, fp32)


# --- the fused cross-entropy ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,chunk_rows", [(50, 16), (7, 32), (64, 64)])
def test_fused_cross_entropy_equals_f_cross_entropy(dtype, rows, chunk_rows):
    torch.manual_seed(rows)
    logits = (4 * torch.randn(rows, 301)).to(dtype).requires_grad_()
    targets = torch.randint(0, 301, (rows,))
    targets[::6] = -100  # ignored positions, as chapter 7's masks write them
    reference_logits = logits.detach().clone().requires_grad_()
    reference = F.cross_entropy(reference_logits.float(), targets)
    (3 * reference).backward()
    loss = fused_cross_entropy(logits, targets, chunk_rows=chunk_rows)
    (3 * loss).backward()  # the backward pass scales the stored gradient
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    assert logits.grad.dtype == dtype
    tolerance = 1e-7 if dtype == torch.float32 else 1e-4  # 16 bits store the gradient rounded
    torch.testing.assert_close(logits.grad.float(), reference_logits.grad.float(),
                               rtol=1e-2, atol=tolerance)
    with torch.no_grad():  # without autograd: F.cross_entropy itself
        assert fused_cross_entropy(logits, targets).item() == pytest.approx(reference.item(),
                                                                           abs=1e-5)


def test_fused_cross_entropy_in_float16_keeps_small_gradients_for_loss_scaling():
    """Over many rows each gradient (softmax - one_hot) / rows falls to float16's smallest
    number (6e-8); a loss scale brings it back only if the division comes after the scaling."""
    torch.manual_seed(0)
    rows, vocab, scale = 2048, 16384, 2.0 ** 16
    logits = torch.randn(rows, vocab).half().requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    reference_logits = logits.detach().float().requires_grad_()
    (scale * F.cross_entropy(reference_logits, targets)).backward()
    (scale * fused_cross_entropy(logits, targets)).backward()
    assert logits.grad.dtype == torch.float16
    assert (logits.grad != 0).float().mean() > 0.99  # not rounded away
    torch.testing.assert_close(logits.grad.float(), reference_logits.grad, rtol=1e-2, atol=1e-4)


def test_fused_cross_entropy_with_every_target_ignored_is_zero_not_nan():
    logits = torch.randn(4, 10, requires_grad=True)
    loss = fused_cross_entropy(logits, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_fast_loss_batch_equals_chapter_5_loss():
    model = _model(SMALL_VOCAB, impl="fast").train()
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    expected = calc_loss_batch(x, y, model, "cpu")
    (grad_expected,) = torch.autograd.grad(expected, model.out_head.weight)
    loss = fast_loss_batch(x, y, model, "cpu")
    (grad,) = torch.autograd.grad(loss, model.out_head.weight)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-5, atol=1e-8)


# --- chapter 5's loop with every speed-up ------------------------------------------------------

def _verdict_like_loaders():
    torch.manual_seed(5)
    windows = torch.randint(0, 256, (12, 17))
    train = [(windows[i:i + 2, :-1], windows[i:i + 2, 1:]) for i in range(0, 10, 2)]
    return train, [(windows[10:, :-1], windows[10:, 1:])]


def _train(loop, bf16: bool, fast: bool, precision: str | None = None):
    train, val = _verdict_like_loaders()
    torch.manual_seed(123)
    model = GPTModel(dataclasses.replace(SMALL_VOCAB, drop_rate=0.0))
    if fast:
        set_impl(model, "fast")
    if bf16 and loop is train_model_simple:
        autocast_bf16(model)  # chapter 5's loop on float32 master weights under autocast
    optimizer = (fused_adamw if fast else torch.optim.AdamW)(model.parameters(), lr=1e-3,
                                                             weight_decay=0.1)
    tokenizer = _ByteTokenizer()
    printed = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore")
        extra = {"precision": precision or ("bf16" if bf16 else "fp32")} \
            if loop is train_model_fast else {}
        history = loop(model, train, val, optimizer, "cpu", 3, 2, 2, "ab", tokenizer,
                       verbose=True, **extra)
    return model, history, printed.getvalue()


class _ByteTokenizer:
    """Token IDs 0-255 as bytes: enough of a tokenizer for the samples the loops print."""

    def encode(self, text, allowed_special=None):
        return list(text.encode("latin-1"))

    def decode(self, ids):
        return bytes(ids).decode("latin-1")


def test_train_model_fast_in_float32_repeats_chapter_5s_run():
    _, (train_a, val_a, seen_a), log_a = _train(train_model_simple, False, False)
    model, (train_b, val_b, seen_b), log_b = _train(train_model_fast, False, True)
    assert seen_a == seen_b and len(train_a) == len(train_b) == 8
    assert max(abs(a - b) for a, b in zip(train_a + val_a, train_b + val_b)) < 1e-4
    pattern = r"Ep \d+ \(Step \d+\): Train loss [\d.]+, Val loss [\d.]+, tokens seen [\d,]+"
    assert len(re.findall(pattern, log_a)) == len(re.findall(pattern, log_b)) == 8
    assert log_b.startswith("precision: float32 (as asked)\n")  # the choice, in one line
    samples = [line for line in log_b.split("\n")[1:-1] if not line.startswith("Ep ")]
    assert len(samples) == 3 and all(line.startswith("ab") for line in samples)
    printed = io.StringIO()  # the last sample is chapter 5's, through the KV cache
    with contextlib.redirect_stdout(printed):
        generate_and_print_sample(model, _ByteTokenizer(), "cpu", "ab")
    assert printed.getvalue().split("\n")[:-1] == samples[-1:]
    assert "forward" not in model.__dict__  # the model is left as it was given


def test_train_model_fast_in_bf16_follows_autocast_on_float32_weights():
    _, (train_a, val_a, _), _ = _train(train_model_simple, True, True)
    _, (train_b, val_b, _), log = _train(train_model_fast, True, True)
    assert train_b[-1] < 0.9 * train_b[0]  # it learns
    for a, b in zip(train_a + val_a, train_b + val_b):  # the same trajectory, up to bf16
        assert b == pytest.approx(a, rel=2e-2)
    assert log.count("\n") == 1 + 8 + 3  # the precision, 8 evaluations, 3 samples


def test_train_model_fast_in_float16_with_loss_scaling_follows_float32():
    _, (train_a, val_a, _), _ = _train(train_model_fast, False, True)
    _, (train_b, val_b, _), log = _train(train_model_fast, False, True, precision="fp16")
    assert log.startswith("precision: float16 autocast with loss scaling (as asked")
    assert train_b[-1] < 0.9 * train_b[0]
    for a, b in zip(train_a + val_a, train_b + val_b):
        assert b == pytest.approx(a, rel=2e-2)


# --- keeping freed memory -----------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_keep_freed_memory_stops_page_faults_for_reused_blocks():
    script = """if True:
        import resource, torch
        from utils.fast import keep_freed_memory

        def faults():  # a step in miniature: 42, 63 and 84 MB allocated, filled, freed
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            tensors = [torch.ones(n * 2**18) for n in (40, 60, 80)]
            del tensors
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        if not keep_freed_memory(False):
            raise SystemExit("not glibc")
        fresh = [faults() for _ in range(4)]
        assert keep_freed_memory()
        kept = [faults() for _ in range(6)]
        print(fresh[-1], kept[-1])
    """
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    if "not glibc" in out.stderr:
        pytest.skip("not glibc")
    assert out.returncode == 0, out.stderr
    fresh, kept = map(int, out.stdout.split())
    assert fresh > 10_000 and kept < 500  # 189 MB is 46,000 pages of 4 KB (fewer if huge)


def test_float32_opens_no_autocast_region_at_all():
    """Some PyTorch releases refuse torch.autocast("mps", enabled=False): float32 must not ask."""
    assert isinstance(Precision("fp32").autocast("mps"), contextlib.nullcontext)
    with Precision("bf16").autocast("cpu"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


# --- 8-bit weights ----------------------------------------------------------------------------

def test_int8_weights_stay_within_half_a_step_of_their_row():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)
    layer = Int8Linear(linear)
    step = layer.scales.float()[:, None]
    assert layer.weight.dtype == torch.int8 and layer.weight.abs().max() <= 127
    assert ((layer.dequantized() - linear.weight).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(5, 64)
    reference = x.bfloat16().float() @ layer.dequantized().T + linear.bias
    assert _relative(layer(x).float(), reference) < 1e-2  # the kernel: bfloat16 products
    assert _relative(layer(x).float(), linear(x)) < 2e-2  # and the float32 layer


def test_the_int8_product_falls_back_to_dequantizing_where_the_kernel_is_missing(monkeypatch):
    import utils.core.int8 as int8
    x = torch.randn(3, 32).bfloat16()
    weight = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    scales = torch.rand(8).bfloat16()
    with_kernel = int8.int8_weight_matmul(x, weight, scales).float()
    int8.int8_kernel_available.cache_clear()
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    try:
        assert int8.int8_kernel_available("cpu") is False
        without = int8.int8_weight_matmul(x, weight, scales).float()
    finally:
        int8.int8_kernel_available.cache_clear()
    assert _relative(without, with_kernel) < 1e-2


def test_int8_greedy_generation_agrees_with_float32_where_the_margin_is_clear():
    """On a trained model: the same greedy tokens wherever the top two logits lie further
    apart than twice the most int8 moved any logit, and the logits within 2% of float32's."""
    model, cycle = _confident_model()
    quantized = int8_inference_model(model)
    assert isinstance(quantized.out_head, Int8Linear) and not isinstance(model.out_head, Int8Linear)
    prompts = torch.stack([cycle[i:i + 4] for i in (0, 7, 19)])
    fp32 = generate_text_simple(CachedGPT(model), prompts, 30, SMALL_VOCAB.context_length)
    int8 = generate_text_simple(CachedGPT(quantized), prompts, 30, SMALL_VOCAB.context_length)
    with torch.no_grad():
        logits32 = model(fp32)[:, 3:-1]
        logits8 = quantized(fp32)[:, 3:-1].float()
    assert _relative(logits8, logits32) < 0.02
    top2 = logits32.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * (logits8 - logits32).abs().amax(dim=-1)
    assert clear.float().mean() > 0.9
    assert torch.equal(logits8.argmax(-1)[clear], logits32.argmax(-1)[clear])
    if clear.all():
        assert torch.equal(int8, fp32)


def test_llama_models_generate_the_same_greedy_tokens_in_bf16_and_int8_weights():
    from utils.llama import QWEN3_TINY, CachedLlama, LlamaModel
    torch.manual_seed(0)
    cfg = dataclasses.replace(QWEN3_TINY, vocab_size=256)
    model = LlamaModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cycle = torch.randperm(256)[:40]
    data = cycle.repeat(4)
    windows = torch.stack([data[i:i + 33] for i in range(0, 120, 3)])
    for _ in range(40):  # a trained model: the cycle continues with large margins
        optimizer.zero_grad()
        calc_loss_batch(windows[:, :-1], windows[:, 1:], model, "cpu").backward()
        optimizer.step()
    model.eval()
    prompts = torch.stack([cycle[i:i + 4] for i in (0, 7, 19)])
    fp32 = generate_text_simple(CachedLlama(model), prompts, 30, cfg.context_length)
    for convert in (bf16_inference_model, int8_inference_model):
        fast = _quiet(convert, model)
        assert torch.equal(generate_text_simple(CachedLlama(fast), prompts, 30, cfg.context_length),
                           fp32), convert.__name__
        with torch.no_grad():
            assert _relative(fast(fp32).float(), model(fp32)) < 0.03
