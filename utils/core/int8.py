"""PyTorch's matrix product with 8-bit weights, behind one door (hand-written).

Weight-only 8-bit quantization stores each weight matrix as int8 numbers with one float scale
per output row, and multiplies by it without first writing a dequantized copy: the product
reads one byte per weight instead of two (bfloat16) or four (float32), which is what sets the
speed of generating one token at a time. PyTorch has such a kernel, `torch._weight_int8pack_mm`
(CPU, CUDA and MPS; the one its compiler and torchao use), but only under a private name: a
release may rename or drop it. So this module is the only place in the course that names it,
checks that it exists and works, and falls back to the plain dequantize-then-multiply product,
the same numbers, slower.

Used by chapter 8's `Int8Linear` (utils/fast.py).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["int8_kernel_available", "int8_weight_matmul"]


@functools.lru_cache(maxsize=None)
def int8_kernel_available(device_type: str = "cpu") -> bool:
    """True if `torch._weight_int8pack_mm` exists and multiplies correctly on this device."""
    kernel = getattr(torch, "_weight_int8pack_mm", None)
    if kernel is None:
        return False
    try:
        x = torch.ones(1, 32, dtype=torch.bfloat16, device=device_type)
        w = torch.full((16, 32), 2, dtype=torch.int8, device=device_type)
        scales = torch.full((16,), 0.5, dtype=torch.bfloat16, device=device_type)
        return bool((kernel(x, w, scales).float() == 32.0).all())  # 32 x 2 x 0.5
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def int8_weight_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scales[:, None]).T for x (M, K) bfloat16, weight (N, K) int8 and scales
    (N,) bfloat16: PyTorch's int8 kernel where it works, else the dequantized product."""
    if int8_kernel_available(x.device.type):
        return torch._weight_int8pack_mm(x, weight, scales)
    return x @ (weight.to(x.dtype) * scales[:, None]).T
