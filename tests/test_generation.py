"""utils/generation.py: greedy equivalence, top-k, temperature, the end token, bad arguments."""

import dataclasses

import pytest
import torch

from utils.generation import generate
from utils.model import GPT_TINY, GPTModel, generate_text_simple


class FixedLogits(torch.nn.Module):
    """A fake model whose next-token logits are always the same vector."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float))

    def forward(self, idx):
        return self.logits.expand(idx.shape[0], idx.shape[1], -1)


class Countdown(torch.nn.Module):
    """Predicts token (last + 1); `eos` once the last token reaches `stop_at[row]`."""

    def __init__(self, vocab, eos, stop_at):
        super().__init__()
        self.vocab, self.eos, self.stop_at = vocab, eos, torch.tensor(stop_at)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        nxt = (idx[:, -1] + 1) % self.vocab
        nxt = torch.where(idx[:, -1] >= self.stop_at, torch.full_like(nxt, self.eos), nxt)
        logits = torch.full((idx.shape[0], idx.shape[1], self.vocab), -10.0)
        logits[:, -1, :] = torch.nn.functional.one_hot(nxt, self.vocab) * 20.0 - 10.0
        return logits


def test_temperature_zero_equals_greedy():
    torch.manual_seed(123)
    model = GPTModel(dataclasses.replace(GPT_TINY, context_length=8)).eval()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    expected = generate_text_simple(model, prompt, max_new_tokens=12, context_size=8)
    assert torch.equal(generate(model, prompt, 12, context_size=8, temperature=0.0), expected)


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.tensor([0.0, 5.0, 1.0, 4.9, 2.0, 4.8, 3.0, -1.0])
    model = FixedLogits(logits)
    torch.manual_seed(0)
    out = generate(model, torch.zeros(64, 1, dtype=torch.long), max_new_tokens=20,
                   context_size=4, temperature=5.0, top_k=3)
    assert set(out[:, 1:].unique().tolist()) == {1, 3, 5}  # all three, and nothing else


def test_sampling_follows_temperature():
    model = FixedLogits(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    torch.manual_seed(0)
    cold = generate(model, torch.zeros(200, 1, dtype=torch.long), 1, 4, temperature=0.05)
    hot = generate(model, torch.zeros(200, 1, dtype=torch.long), 1, 4, temperature=10.0)
    assert (cold[:, 1] == 0).all()
    assert (hot[:, 1] != 0).sum() > 100  # close to uniform: about 3/4 are not token 0


def test_eos_stops_generation_and_is_not_included():
    model = Countdown(vocab=20, eos=19, stop_at=[5])
    out = generate(model, torch.tensor([[1]]), max_new_tokens=10, context_size=8, eos_id=19)
    assert out.tolist() == [[1, 2, 3, 4, 5]]


def test_eos_in_a_batch_pads_finished_rows_until_all_are_done():
    model = Countdown(vocab=20, eos=19, stop_at=[3, 5])
    out = generate(model, torch.tensor([[1], [1]]), max_new_tokens=10, context_size=8, eos_id=19)
    assert out.tolist() == [[1, 2, 3, 19, 19], [1, 2, 3, 4, 5]]


def test_bad_arguments_are_clear_errors():
    model = FixedLogits(torch.zeros(4))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3, 4)
    idx = torch.zeros(1, 1, dtype=torch.long)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a number >= 0"):
            generate(model, idx, 3, 4, temperature=bad)
    with pytest.raises(ValueError, match="top_k must be a positive"):
        generate(model, idx, 3, 4, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number >= 0"):
        generate(model, idx, -2, 4)


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    model = FixedLogits(torch.tensor([0.0, 3.0, 1.0, 2.0]))
    torch.manual_seed(0)
    wide = generate(model, torch.zeros(1, 1, dtype=torch.long), 50, 4, temperature=1.0, top_k=1000)
    torch.manual_seed(0)
    plain = generate(model, torch.zeros(1, 1, dtype=torch.long), 50, 4, temperature=1.0)
    assert torch.equal(wide, plain) and set(wide[0, 1:].tolist()) > {1}
