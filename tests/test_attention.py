"""utils/attention.py: causality, parity with PyTorch's fused attention, clear errors."""

import pytest
import torch
import torch.nn.functional as F

from utils.attention import CausalAttention, MultiHeadAttention


def reference_attention(mha: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The same projections, with PyTorch's scaled_dot_product_attention doing the rest."""
    b, t, _ = x.shape
    h, d = mha.num_heads, mha.head_dim

    def split(proj):
        return proj(x).view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)

    out = F.scaled_dot_product_attention(split(mha.W_query), split(mha.W_key),
                                         split(mha.W_value), is_causal=True)
    return mha.out_proj(out.transpose(1, 2).reshape(b, t, h * d))


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("num_heads", [1, 4])
def test_matches_scaled_dot_product_attention(qkv_bias, num_heads):
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_in=16, d_out=32, context_length=12, dropout=0.1,
                             num_heads=num_heads, qkv_bias=qkv_bias).eval()
    x = torch.randn(3, 10, 16)
    with torch.no_grad():
        torch.testing.assert_close(mha(x), reference_attention(mha, x), atol=1e-5, rtol=0)


def test_single_head_equals_causal_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 6, context_length=10, dropout=0.0, num_heads=1, qkv_bias=True)
    ca = CausalAttention(8, 6, context_length=10, dropout=0.0, qkv_bias=True)
    ca.load_state_dict({k: v for k, v in mha.state_dict().items() if not k.startswith("out_proj")})
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        torch.testing.assert_close(mha(x), mha.out_proj(ca(x)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("make", [
    lambda: MultiHeadAttention(8, 8, context_length=10, dropout=0.0, num_heads=2),
    lambda: CausalAttention(8, 8, context_length=10, dropout=0.0),
])
def test_outputs_up_to_t_ignore_later_tokens(make):
    torch.manual_seed(0)
    layer = make().eval()
    x = torch.randn(2, 10, 8)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 4, 8)  # positions 6.. differ
    with torch.no_grad():
        a, b = layer(x), layer(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])  # later positions do see the change


def test_book_values_for_two_heads():
    inputs = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                           [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])
    torch.manual_seed(123)
    mha = MultiHeadAttention(3, 2, context_length=6, dropout=0.0, num_heads=2)
    with torch.no_grad():
        out = mha(torch.stack((inputs, inputs)))
    expected_first = torch.tensor([[0.3190, 0.4858], [0.2943, 0.3897], [0.2856, 0.3593],
                                   [0.2693, 0.3873], [0.2639, 0.3928], [0.2575, 0.4028]])
    torch.testing.assert_close(out[0], expected_first, atol=1e-4, rtol=0)


def test_bad_configuration_and_input_are_clear_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadAttention(4, 10, context_length=8, dropout=0.0, num_heads=3)
    mha = MultiHeadAttention(4, 4, context_length=8, dropout=0.0, num_heads=2)
    with pytest.raises(ValueError, match="9 tokens.*context_length=8"):
        mha(torch.randn(1, 9, 4))
