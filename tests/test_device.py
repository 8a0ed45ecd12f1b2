"""Device selection: CUDA, else MPS, else CPU, or the user's explicit choice."""

import pytest
import torch

from utils.core.device import describe_device, get_device


def test_automatic_choice_prefers_cuda_then_mps_then_cpu(monkeypatch, capsys):
    monkeypatch.delenv("LLM_COURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("utils.core.device._mps_available", lambda: False)
    assert get_device().type == "cpu"
    assert "using CPU" in capsys.readouterr().out
    monkeypatch.setattr("utils.core.device._mps_available", lambda: True)
    assert get_device(verbose=False).type == "mps"


def test_explicit_choice_is_honoured(monkeypatch):
    monkeypatch.setenv("LLM_COURSE_DEVICE", "cpu")
    assert get_device(verbose=False) == torch.device("cpu")


def test_unavailable_explicit_choice_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LLM_COURSE_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU.*unset LLM_COURSE_DEVICE"):
        get_device()


def test_cpu_description_mentions_cores():
    assert "cores" in describe_device(torch.device("cpu"))
