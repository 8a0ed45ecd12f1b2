"""utils/tools/training_memory.py: the profiler-based peak of a training step, on allocations
whose sizes are known and on a tiny GPT, where weights, gradients and AdamW's state give a
lower bound by arithmetic."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from utils.model import GPT_TINY, GPTModel
from utils.tools.training_memory import (FORWARD_BACKWARD, OPTIMIZER_STEP, TrainingStep,
                                         cuda_like_dropout, measure_step, profile_peaks)
from utils.train import calc_loss_batch

MB = 1_000_000


def test_each_phase_peaks_at_the_bytes_it_holds_at_once():
    kept = []

    def first():  # holds 4 MB and, for a moment, 2 MB more
        kept.append(torch.empty(MB, dtype=torch.float32))
        torch.empty(MB // 2, dtype=torch.float32)

    def second():  # the 4 MB from before, plus 1 MB
        kept.append(torch.empty(MB, dtype=torch.uint8))

    assert profile_peaks({"first": first, "second": second}) == {"first": 6 * MB,
                                                                 "second": 5 * MB}


def test_dropout_runs_as_on_cuda_keeping_a_one_byte_mask():
    x = torch.ones(1000, requires_grad=True)
    with cuda_like_dropout():
        y = F.dropout(x, p=0.5, training=True)
    mask = y.grad_fn._saved_result1  # what the backward pass keeps
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert torch.equal(y, 2.0 * mask)  # kept elements scaled by 1 / (1 - p)
    assert F.dropout(x, p=0.5, training=True).grad_fn.name() == "MulBackward0"  # restored


TINY = dataclasses.replace(GPT_TINY, vocab_size=500)  # the blocks hold most parameters


def tiny_step() -> TrainingStep:
    torch.manual_seed(123)
    model = GPTModel(TINY)
    batch = torch.randint(0, TINY.vocab_size, (2, 33))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    return TrainingStep([model], list(model.parameters()), (inputs, targets),
                        lambda: calc_loss_batch(inputs, targets, model, "cpu"), lr=1e-3)


def test_a_tiny_gpt_step_holds_weights_gradients_and_adamw_state():
    record = measure_step(tiny_step())
    n = record["trainable"]
    # embeddings 500 x 64 + 64 x 64, 2 blocks of 49,792, final norm 128, head 500 x 64
    assert n == record["parameters"] == 167_808
    logits = 2 * 32 * TINY.vocab_size * 4  # (B, T, V) float32
    assert record["forward_backward_peak_bytes"] >= max(4 * n, logits)  # gradients, logits
    # the foreach step: gradient 4, moments 8 and sqrt(v) 4 bytes per parameter, nothing else
    assert record["optimizer_peak_bytes"] == pytest.approx(16 * n, rel=1e-3)
    assert record["estimate_bytes"] >= record["weights_bytes"] + 12 * n


def test_the_first_steps_estimate_is_the_peak_of_the_next_step():
    step = tiny_step()
    optimizer = torch.optim.AdamW(step.params, lr=step.lr, foreach=True)
    first = measure_step(step, optimizer)
    second = measure_step(step, optimizer)  # starts with the moments and the old gradients
    peak = second["alive_bytes"] + max(second["forward_backward_peak_bytes"],
                                       second["optimizer_peak_bytes"])
    assert peak == pytest.approx(first["estimate_bytes"], rel=1e-3)
    assert first["peak_phase"] in (FORWARD_BACKWARD, OPTIMIZER_STEP)
