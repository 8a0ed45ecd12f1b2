"""Choosing where tensors live (hand-written; every notebook calls it in its first cells).

`get_device()` picks an NVIDIA GPU (CUDA) if there is one, else an Apple-silicon GPU (MPS),
else the CPU, and says which. Set `LLM_COURSE_DEVICE=cpu` (or `cuda`, `cuda:1`, `mps`) to
choose by hand, for example to reproduce the CPU numbers saved in the notebooks.

The Apple GPU is chosen automatically only with PyTorch 2.9 or later (`MPS_MIN_TORCH`):
PyTorch 2.8 computed `F.linear` and `scaled_dot_product_attention` wrongly on MPS for
non-contiguous tensors (pytorch/pytorch issues 162730 and 163597, fixed in 2.9), readers of
the book saw chapter 7's losses several times too high on MPS (rasbt/LLMs-from-scratch issue
791), and the book's code has since used MPS only from 2.9 on. With an older PyTorch the CPU
is used and the printed line says why; `LLM_COURSE_DEVICE=mps` still uses the Apple GPU.
"""

from __future__ import annotations

import os
import platform
import re

import torch

__all__ = ["get_device", "describe_device", "unavailable_reason", "ENV_DEVICE", "MPS_MIN_TORCH"]

ENV_DEVICE = "LLM_COURSE_DEVICE"
MPS_MIN_TORCH = (2, 9)  # the release that fixed those bugs, and the book's threshold


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _torch_release() -> tuple[int, int]:
    """(major, minor) of the installed PyTorch, e.g. (2, 8) for "2.8.0+cpu"."""
    major, minor = re.match(r"(\d+)\.(\d+)", str(torch.__version__)).groups()
    return int(major), int(minor)


def _mps_caveat() -> str | None:
    """Why this PyTorch should not compute on the Apple GPU (None: it may)."""
    if _torch_release() >= MPS_MIN_TORCH:
        return None
    return (f"PyTorch before {'.'.join(map(str, MPS_MIN_TORCH))} computes some layers wrongly "
            f"on it (training losses far from the CPU's)")


def unavailable_reason(device: torch.device) -> str | None:
    """Why `device` cannot be used on this machine (None: it can), for an error message."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU here"
    if device.type == "mps" and not _mps_available():
        return "MPS is not available here"
    return None


def describe_device(device: torch.device) -> str:
    """A one-line, human-readable description of `device`."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"CUDA GPU {index}: {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    if device.type == "mps":
        return "Apple GPU (MPS)" + (f": {_mps_name()}" if _mps_available() else "")
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _mps_name() -> str:
    """The Apple GPU's name and the macOS release, e.g. "Apple M3, macOS 14.5": MPS's
    abilities (bfloat16 from macOS 14) depend on both."""
    try:
        name = torch.backends.mps.get_name()
    except (AttributeError, RuntimeError):  # older PyTorch has no get_name
        name = platform.machine()
    return f"{name}, macOS {platform.mac_ver()[0] or 'unknown'}"


def get_device(verbose: bool = True) -> torch.device:
    """Return CUDA if available, else MPS (PyTorch 2.9 or later), else CPU, or
    `$LLM_COURSE_DEVICE`; print the choice (and why an Apple GPU was left out)."""
    wanted = os.environ.get(ENV_DEVICE, "").strip()
    note = ""
    if wanted:
        device = torch.device(wanted)
        reason = unavailable_reason(device)
        if reason:
            raise RuntimeError(f"{ENV_DEVICE}={wanted} but {reason}; unset {ENV_DEVICE} to "
                               f"choose automatically.")
        if device.type == "mps" and _mps_caveat():
            note = f" (as {ENV_DEVICE} asks; {_mps_caveat()}: update PyTorch)"
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif _mps_available() and not _mps_caveat():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
        if _mps_available():
            note = (f"; the Apple GPU (MPS) is left out: {_mps_caveat()}. Update PyTorch to "
                    f"use it, or set {ENV_DEVICE}=mps to use it anyway")
    if verbose:
        print(f"PyTorch {torch.__version__}; using {describe_device(device)}{note}")
    return device
