"""oneDNN's bfloat16 matrix products for the CPU, behind one door (hand-written).

oneDNN (once called MKL-DNN) is the library of CPU kernels for deep learning that PyTorch
ships with. Two of its abilities matter for generating text in bfloat16 on a CPU, and
PyTorch offers neither through a public function: asking whether the CPU computes bfloat16
dot products in hardware (AVX512-BF16 or AMX), and multiplying by a weight that was
rearranged ("packed") once into the layout those instructions read, instead of on every
call. PyTorch's own compiler for CPUs (`torch.compile`'s inductor backend) uses both through
private operators, `torch.ops.mkldnn._...`. Private means no stability promise: a PyTorch
release may rename or drop them. So this module is the only place in the course that names
them, every call checks that they exist, and each function says what it returns when they
do not (False, None), so that callers fall back to the public `F.linear`.

Used by chapter 8's `bf16_supported` and `BF16Linear` (utils/fast.py).
"""

from __future__ import annotations

import torch

__all__ = ["cpu_has_native_bf16", "pack_bf16_weight", "packed_bf16_linear"]


def _mkldnn_op(name: str):
    """The operator `torch.ops.mkldnn.<name>`, or None where this PyTorch build lacks it."""
    try:
        return getattr(torch.ops.mkldnn, name)
    except (AttributeError, RuntimeError):  # a build without oneDNN, or a renamed operator
        return None


def cpu_has_native_bf16() -> bool:
    """True if this CPU multiplies bfloat16 numbers in hardware (AVX512-BF16 or AMX), as
    oneDNN detects it; False where it would only emulate them, or where PyTorch cannot say."""
    check = _mkldnn_op("_is_mkldnn_bf16_supported")
    if check is None:
        return False
    try:
        return bool(check())
    except RuntimeError:
        return False


def pack_bf16_weight(weight: torch.Tensor):
    """`weight` (out, in), bfloat16 on the CPU, packed once into oneDNN's layout for products
    with one row at a time (what generation does), or None where packing is unavailable."""
    reorder = _mkldnn_op("_reorder_linear_weight")
    if reorder is None or not cpu_has_native_bf16():
        return None
    try:
        return reorder(weight, 1)  # 1: the batch size to tune the layout for
    except RuntimeError:
        return None


def packed_bf16_linear(x: torch.Tensor, packed: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias for a weight packed by `pack_bf16_weight`; `x` bfloat16 on the CPU."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
