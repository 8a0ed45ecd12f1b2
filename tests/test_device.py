"""Device selection: CUDA, else MPS, else CPU, or the user's explicit choice; and the one-line
description each notebook prints (the CUDA and MPS queries faked, so every branch runs here)."""

import types

import pytest
import torch

from utils.core.device import describe_device, get_device


@pytest.fixture
def machine(monkeypatch):
    """Fake what PyTorch finds: `machine(cuda=..., mps=...)`."""
    monkeypatch.delenv("LLM_COURSE_DEVICE", raising=False)

    def have(cuda: bool, mps: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr("utils.core.device._mps_available", lambda: mps)

    return have


def test_automatic_choice_prefers_cuda_then_mps_then_cpu(machine, capsys):
    machine(cuda=True, mps=True)
    assert get_device(verbose=False) == torch.device("cuda")
    machine(cuda=False, mps=True)
    assert get_device(verbose=False) == torch.device("mps")
    machine(cuda=False, mps=False)
    assert get_device() == torch.device("cpu")
    assert capsys.readouterr().out == f"PyTorch {torch.__version__}; using " \
                                      f"{describe_device(torch.device('cpu'))}\n"


@pytest.mark.parametrize("wanted", ["cpu", "cuda:1", "mps"])
def test_explicit_choice_is_honoured_over_the_automatic_one(machine, monkeypatch, wanted):
    machine(cuda=True, mps=True)  # the automatic choice would be CUDA
    monkeypatch.setenv("LLM_COURSE_DEVICE", wanted)
    assert get_device(verbose=False) == torch.device(wanted)


@pytest.mark.parametrize("wanted, message", [("cuda", "no CUDA GPU"),
                                             ("mps", "MPS is not available")])
def test_unavailable_explicit_choice_is_a_clear_error(machine, monkeypatch, wanted, message):
    machine(cuda=False, mps=False)
    monkeypatch.setenv("LLM_COURSE_DEVICE", wanted)
    with pytest.raises(RuntimeError, match=f"{message}.*unset LLM_COURSE_DEVICE"):
        get_device()


def test_cpu_description_names_the_processor_and_counts_its_cores(monkeypatch):
    monkeypatch.setattr("utils.core.device.os.cpu_count", lambda: 6)
    monkeypatch.setattr("utils.core.device.platform.processor", lambda: "x86_64")
    assert describe_device(torch.device("cpu")) == "CPU (x86_64, 6 cores)"
    monkeypatch.setattr("utils.core.device.platform.processor", lambda: "")  # as on Linux
    monkeypatch.setattr("utils.core.device.platform.machine", lambda: "aarch64")
    assert describe_device(torch.device("cpu")) == "CPU (aarch64, 6 cores)"


def test_gpu_descriptions_name_the_gpu_and_its_memory(monkeypatch):
    gpus = {0: ("NVIDIA A100-SXM4-40GB", 40 * 2**30), 1: ("NVIDIA H200", 143_771_000_832)}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(
        name=gpus[i][0], total_memory=gpus[i][1]))
    assert describe_device(torch.device("cuda", 0)) == "CUDA GPU 0: NVIDIA A100-SXM4-40GB (40 GiB)"
    assert describe_device(torch.device("cuda")) == "CUDA GPU 1: NVIDIA H200 (134 GiB)"  # current
    assert describe_device(torch.device("mps")) == "Apple GPU (MPS)"


@pytest.mark.parametrize("version, chosen",
                         [("2.8.0", "cpu"), ("2.9.0", "mps"), ("2.13.1+cpu", "mps")])
def test_the_apple_gpu_is_chosen_from_pytorch_2_9_on(machine, monkeypatch, capsys, version, chosen):
    machine(cuda=False, mps=True)
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch.backends.mps, "get_name", lambda: "Apple M3")
    assert get_device() == torch.device(chosen)
    printed = capsys.readouterr().out
    if chosen == "cpu":  # says what was left out, why, and how to use it anyway
        assert "the Apple GPU (MPS) is left out: PyTorch before 2.9 computes" in printed
        assert "Update PyTorch" in printed and "LLM_COURSE_DEVICE=mps" in printed
    else:
        assert "left out" not in printed and "using Apple GPU (MPS): Apple M3" in printed


def test_an_explicit_mps_choice_is_honoured_on_an_old_pytorch_with_a_warning(machine, monkeypatch,
                                                                            capsys):
    machine(cuda=False, mps=True)
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    monkeypatch.setattr(torch.backends.mps, "get_name", lambda: "Apple M1")
    monkeypatch.setenv("LLM_COURSE_DEVICE", "mps")
    assert get_device() == torch.device("mps")
    assert "as LLM_COURSE_DEVICE asks; PyTorch before 2.9" in capsys.readouterr().out


def test_apple_gpu_description_names_the_chip_and_the_macos_release(monkeypatch):
    monkeypatch.setattr("utils.core.device._mps_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "get_name", lambda: "Apple M2 Pro")
    monkeypatch.setattr("utils.core.device.platform.mac_ver",
                        lambda: ("14.5", ("", "", ""), "arm64"))
    assert describe_device(torch.device("mps")) == "Apple GPU (MPS): Apple M2 Pro, macOS 14.5"
