"""Choosing where tensors live (hand-written; every notebook calls it in its first cells).

`get_device()` picks an NVIDIA GPU (CUDA) if there is one, else an Apple-silicon GPU (MPS),
else the CPU, and says which. Set `LLM_COURSE_DEVICE=cpu` (or `cuda`, `cuda:1`, `mps`) to
choose by hand, for example to reproduce the CPU numbers saved in the notebooks.
"""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["get_device", "describe_device", "unavailable_reason", "ENV_DEVICE"]

ENV_DEVICE = "LLM_COURSE_DEVICE"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


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
        return "Apple GPU (MPS)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def get_device(verbose: bool = True) -> torch.device:
    """Return CUDA if available, else MPS, else CPU (or `$LLM_COURSE_DEVICE`); print the choice."""
    wanted = os.environ.get(ENV_DEVICE, "").strip()
    if wanted:
        device = torch.device(wanted)
        reason = unavailable_reason(device)
        if reason:
            raise RuntimeError(f"{ENV_DEVICE}={wanted} but {reason}; unset {ENV_DEVICE} to "
                               f"choose automatically.")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif _mps_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if verbose:
        print(f"PyTorch {torch.__version__}; using {describe_device(device)}")
    return device
