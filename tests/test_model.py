"""utils/model.py: building blocks against PyTorch, parameter counts, causality, generation."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from utils.model import (GELU, GPT2_PRESETS, GPT2_SMALL_124M, GPT_TINY, GPTConfig, GPTModel,
                         LayerNorm, TransformerBlock, generate_text_simple)


def test_layernorm_matches_torch():
    torch.manual_seed(0)
    ours, ref = LayerNorm(16), torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.scale.copy_(torch.randn(16))
        ours.shift.copy_(torch.randn(16))
        ref.weight.copy_(ours.scale)
        ref.bias.copy_(ours.shift)
    x = torch.randn(4, 7, 16) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def test_gelu_matches_torch_tanh_approximation():
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(GELU()(x), F.gelu(x, approximate="tanh"), atol=1e-6, rtol=0)


def expected_params(cfg: GPTConfig) -> int:
    """GPT-2 parameter count from the architecture (no weight tying)."""
    c = cfg.emb_dim
    per_block = 12 * c * c + 10 * c + (3 * c if cfg.qkv_bias else 0)  # attn + MLP + 2 norms
    return 2 * cfg.vocab_size * c + cfg.context_length * c + cfg.n_layers * per_block + 2 * c


@pytest.mark.parametrize("name", list(GPT2_PRESETS))
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_parameter_counts_of_every_preset(name, qkv_bias):
    cfg = dataclasses.replace(GPT2_PRESETS[name], qkv_bias=qkv_bias)
    with torch.device("meta"):  # shapes only: GPT-2 XL would need 6 GB otherwise
        model = GPTModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected_params(cfg)


def test_gpt2_small_numbers_from_the_book():
    with torch.device("meta"):
        model = GPTModel(GPT2_SMALL_124M)
    total = sum(p.numel() for p in model.parameters())
    assert total == 163_009_536
    assert total - model.out_head.weight.numel() == 124_412_160  # tied to tok_emb, as in GPT-2
    assert round(total * 4 / 2**20, 2) == 621.83  # MB in float32


def test_config_accepts_the_book_dict_and_rejects_bad_values():
    book = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
            "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}
    assert GPTConfig.from_any(book) == GPT2_SMALL_124M
    assert GPT2_SMALL_124M["emb_dim"] == 768
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(emb_dim=100, n_heads=12)
    with pytest.raises(ValueError, match="Unknown GPT config key.*'embed_dim'"):
        GPTConfig.from_any({**book, "embed_dim": 768})
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        GPTConfig(n_layers=0)
    with pytest.raises(ValueError, match="drop_rate"):
        GPTConfig(drop_rate=1.5)


def tiny_model(seed=123, **changes):
    torch.manual_seed(seed)
    return GPTModel(dataclasses.replace(GPT_TINY, **changes)).eval()


def test_model_is_causal():
    model = tiny_model()
    torch.manual_seed(1)
    idx = torch.randint(0, GPT_TINY.vocab_size, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, GPT_TINY.vocab_size, (2, 8))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_transformer_block_keeps_the_shape():
    torch.manual_seed(0)
    x = torch.randn(2, 5, GPT_TINY.emb_dim)
    assert TransformerBlock(GPT_TINY)(x).shape == x.shape


def test_generation_is_deterministic_in_eval_mode():
    model = tiny_model(drop_rate=0.5)  # dropout is off in eval mode
    prompt = torch.tensor([[15496, 11, 314, 716]])
    a = generate_text_simple(model, prompt, max_new_tokens=8, context_size=64)
    b = generate_text_simple(model, prompt, max_new_tokens=8, context_size=64)
    assert a.shape == (1, 12) and torch.equal(a, b) and torch.equal(a[:, :4], prompt)


def test_generation_crops_the_context():
    model = tiny_model(context_length=8)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    prompt = torch.arange(1, 7).unsqueeze(0)  # 6 tokens
    out = generate_text_simple(model, prompt, max_new_tokens=5, context_size=8)
    assert [s.shape[1] for s in seen] == [6, 7, 8, 8, 8]
    assert torch.equal(seen[-1], out[:, -9:-1])  # the last 8 tokens before the final one


def test_bad_inputs_are_clear_errors():
    model = tiny_model()
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="no tokens"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="65 tokens.*context_length is 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="shape \\(batch, tokens\\)"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="at least one token"):
        generate_text_simple(model, torch.zeros(1, 0, dtype=torch.long), 3, context_size=64)
