"""utils/train.py: the loss helpers against a hand computation, the training history and its
log line, and training runs."""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from utils.model import GPT_TINY, GPTModel
from utils.train import (TrainingHistory, calc_loss_batch, calc_loss_loader, evaluate_model,
                         format_log_line, text_to_token_ids, token_ids_to_text,
                         train_model_simple)

CFG = dataclasses.replace(GPT_TINY, vocab_size=97, context_length=16)


def make_model(seed=123):
    torch.manual_seed(seed)
    return GPTModel(CFG)


def test_calc_loss_batch_is_cross_entropy_by_hand():
    model = make_model().eval()
    torch.manual_seed(0)
    x, y = torch.randint(0, 97, (3, 8)), torch.randint(0, 97, (3, 8))
    with torch.no_grad():
        logits = model(x)
        log_probs = torch.log_softmax(logits, dim=-1)
        by_hand = -log_probs.gather(-1, y.unsqueeze(-1)).mean()
        ours = calc_loss_batch(x, y, model, "cpu")
    torch.testing.assert_close(ours, by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, F.cross_entropy(logits.reshape(-1, 97), y.reshape(-1)))


def test_calc_loss_loader_averages_the_first_batches_and_handles_empty():
    model = make_model().eval()
    torch.manual_seed(0)
    xs, ys = torch.randint(0, 97, (6, 8)), torch.randint(0, 97, (6, 8))
    loader = DataLoader(TensorDataset(xs, ys), batch_size=2)
    with torch.no_grad():
        per_batch = [calc_loss_batch(xs[i:i + 2], ys[i:i + 2], model, "cpu").item()
                     for i in (0, 2, 4)]
        assert math.isclose(calc_loss_loader(loader, model, "cpu"), sum(per_batch) / 3,
                            rel_tol=1e-6)
        assert math.isclose(calc_loss_loader(loader, model, "cpu", num_batches=2),
                            sum(per_batch[:2]) / 2, rel_tol=1e-6)
        assert math.isclose(calc_loss_loader(loader, model, "cpu", num_batches=99),
                            sum(per_batch) / 3, rel_tol=1e-6)
    empty = DataLoader(TensorDataset(xs[:0], ys[:0]), batch_size=2)
    assert math.isnan(calc_loss_loader(empty, model, "cpu"))


def test_text_token_round_trip():
    class Chars:  # a stand-in tokenizer: one ID per character
        def encode(self, text, allowed_special=None, disallowed_special=None):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(map(chr, ids))

    ids = text_to_token_ids("hello", Chars())
    assert ids.shape == (1, 5) and token_ids_to_text(ids, Chars()) == "hello"


def test_a_tiny_model_learns_a_repeating_sequence():
    pattern = torch.arange(10).repeat(20)  # 0 1 2 ... 9 0 1 2 ...: perfectly predictable
    xs = torch.stack([pattern[i:i + 12] for i in range(0, 150, 3)])
    ys = torch.stack([pattern[i + 1:i + 13] for i in range(0, 150, 3)])
    torch.manual_seed(123)
    loader = DataLoader(TensorDataset(xs, ys), batch_size=8, shuffle=True)
    model = make_model()
    before, _ = evaluate_model(model, loader, loader, "cpu", eval_iter=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    train_losses, val_losses, seen = train_model_simple(
        model, loader, loader, optimizer, "cpu", num_epochs=4, eval_freq=5, eval_iter=3,
        start_context="", tokenizer=None, verbose=False)
    assert before > 4.0  # about ln(97) = 4.57 at the start
    assert train_losses[-1] < 0.5 < before  # learned the pattern
    assert seen == sorted(seen) and seen[-1] <= 4 * len(xs) * 12
    assert len(train_losses) == len(val_losses) == len(seen)


def test_the_history_records_each_evaluation_and_prints_chapter_5s_line(capsys):
    history = TrainingHistory()
    first = history.log(1, 0, train_loss=9.78123, val_loss=9.9334, tokens_seen=512)
    history.log(1, 5, train_loss=8.1109, val_loss=8.3391, tokens_seen=3072)
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["Ep 1 (Step 000000): Train loss 9.781, Val loss 9.933, tokens seen 512",
                       "Ep 1 (Step 000005): Train loss 8.111, Val loss 8.339, tokens seen 3,072"]
    assert first == history.records[0] and first["val_loss"] == 9.9334  # unrounded
    assert 0 <= first["seconds"] <= history.records[1]["seconds"]
    assert history["step"] == [0, 5]
    train_losses, val_losses, tokens_seen = history  # as the book's loop returns them
    assert (train_losses, val_losses, tokens_seen) == ([9.78123, 8.1109], [9.9334, 8.3391],
                                                       [512, 3072])
    quiet = TrainingHistory({"lr": "lr {:.2e}"}, verbose=False, unpack=("lr",))
    quiet.log(2, 7, lr=4e-4)
    assert capsys.readouterr().out == ""
    assert format_log_line(quiet.records[0], quiet.log_formats) == "Ep 2 (Step 000007): lr 4.00e-04"


def test_train_model_simple_returns_the_records_it_printed(capsys):
    pattern = torch.arange(10).repeat(8)
    xs = torch.stack([pattern[i:i + 12] for i in range(0, 60, 6)])
    ys = torch.stack([pattern[i + 1:i + 13] for i in range(0, 60, 6)])
    loader = DataLoader(TensorDataset(xs, ys), batch_size=5)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = train_model_simple(model, loader, loader, optimizer, "cpu", num_epochs=2,
                                 eval_freq=1, eval_iter=1, start_context="\u0101",
                                 tokenizer=LetterTokenizer())
    lines = capsys.readouterr().out.split("\n")[:-1]
    logged = [line for line in lines if line.startswith("Ep ")]
    assert logged == [format_log_line(r) for r in history.records]
    assert [(r["epoch"], r["step"]) for r in history.records] == [(1, 0), (1, 1), (2, 2), (2, 3)]
    assert history["tokens_seen"] == [60, 120, 180, 240]
    seconds = history["seconds"]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert len(history.samples) == 2 and history.samples == [line for line in lines
                                                             if not line.startswith("Ep ")]


class LetterTokenizer:
    """Token IDs 0-96 as letters (from U+0100 on): enough of a tokenizer for the samples."""

    def encode(self, text, allowed_special=None):
        return [ord(c) - 0x100 for c in text]

    def decode(self, ids):
        return "".join(chr(0x100 + i) for i in ids)
