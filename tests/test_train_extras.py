"""utils/train_extras.py: the learning-rate schedule, clipping, and the improved loop."""

import dataclasses
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from utils.model import GPT_TINY, GPTModel
from utils.train_extras import find_highest_gradient, lr_at_step, train_model


def test_schedule_warms_up_linearly_then_decays_along_a_cosine():
    lrs = [lr_at_step(s, 100, 20, initial_lr=1e-4, peak_lr=1e-2, min_lr=1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[10] == pytest.approx(1e-4 + 10 * (1e-2 - 1e-4) / 20)  # halfway up
    assert lrs[20] == pytest.approx(1e-2)  # the peak right after warmup
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:21]))  # rising
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))  # falling
    assert lrs[60] == pytest.approx(1e-5 + (1e-2 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at_step(100, 100, 20, 1e-4, 1e-2, 1e-5) == pytest.approx(1e-5)  # ends at min_lr


def test_find_highest_gradient():
    model = torch.nn.Linear(3, 2)
    assert find_highest_gradient(model) is None
    model.weight.grad = torch.tensor([[0.1, -5.0, 0.3], [0.2, 0.0, 0.7]])
    model.bias.grad = torch.tensor([0.5, 0.6])
    assert find_highest_gradient(model).item() == pytest.approx(0.7)


def test_train_model_follows_the_schedule_clips_and_learns(monkeypatch):
    pattern = torch.arange(10).repeat(20)
    xs = torch.stack([pattern[i:i + 12] for i in range(0, 150, 3)])
    ys = torch.stack([pattern[i + 1:i + 13] for i in range(0, 150, 3)])
    torch.manual_seed(123)
    loader = DataLoader(TensorDataset(xs, ys), batch_size=8, shuffle=True)
    model = GPTModel(dataclasses.replace(GPT_TINY, vocab_size=97, context_length=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    clipped_at = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: clipped_at.append(max_norm) or real_clip(params, max_norm))
    norms = []
    train_losses, _, _, lrs = train_model(
        model, loader, loader, optimizer, "cpu", n_epochs=6, eval_freq=5, eval_iter=3,
        start_context="", tokenizer=None, warmup_steps=5, initial_lr=1e-4, min_lr=1e-5,
        verbose=False, grad_norms=norms)
    total = len(loader) * 6
    assert lrs == [lr_at_step(s, total, 5, 1e-4, 3e-3, 1e-5) for s in range(total)]
    # measured at every step (an infinite limit during the warmup), clipped at 1.0 after it
    assert clipped_at == [float("inf")] * 5 + [1.0] * (total - 5)
    assert len(norms) == total and all(n > 0 for n in norms) and max(norms) > 1.0
    assert train_losses[-1] < 0.5 < train_losses[0]
