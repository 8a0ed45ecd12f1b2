"""utils/classify.py: the spam data, the padded dataset, the training loop on a partly frozen
model, accuracy, classify_review."""

import dataclasses

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from utils.classify import (SpamDataset, calc_accuracy_loader, classify_review,
                            create_balanced_dataset, random_split, train_classifier_simple)
from utils.model import GPT_TINY, GPTModel
from utils.text import get_gpt2_tokenizer


class WordTokenizer:
    """A stand-in tokenizer: one ID per whitespace-separated word (its length)."""

    def encode(self, text, allowed_special=None, disallowed_special=None):
        return [len(w) for w in text.split()]


def write_csv(path, texts, labels):
    pd.DataFrame({"Label": labels, "Text": texts}).to_csv(path, index=None)
    return path


def test_dataset_pads_to_the_longest_and_truncates(tmp_path):
    csv = write_csv(tmp_path / "d.csv", ["a bb ccc", "dddd", "e ff ggg hhhh iiiii"], [0, 1, 0])
    ds = SpamDataset(csv, WordTokenizer(), pad_token_id=50256)
    assert ds.max_length == 5 and len(ds) == 3
    x, y = ds[1]
    assert x.tolist() == [4, 50256, 50256, 50256, 50256] and y.item() == 1
    assert x.dtype == torch.long and y.dtype == torch.long
    short = SpamDataset(csv, WordTokenizer(), max_length=2)
    assert [short[i][0].tolist() for i in range(3)] == [[1, 2], [4, 50256], [1, 2]]


def test_message_longer_than_the_context_is_truncated_not_an_error(tmp_path):
    csv = write_csv(tmp_path / "d.csv", [" ".join(["word"] * 100), "hi"], [1, 0])
    ds = SpamDataset(csv, WordTokenizer(), context_length=64)
    assert ds.max_length == 64 and ds[0][0].shape == (64,)
    torch.manual_seed(0)
    model = GPTModel(GPT_TINY).eval()  # context_length 64
    with torch.no_grad():
        assert model(ds[0][0].unsqueeze(0)).shape == (1, 64, GPT_TINY.vocab_size)


def test_training_updates_only_the_unfrozen_parameters_and_reports_each_epoch():
    torch.manual_seed(0)
    model = GPTModel(dataclasses.replace(GPT_TINY, n_layers=3))
    for p in model.parameters():  # frozen as notebook 06 does it: all, then a new head,
        p.requires_grad = False  # the last block and the final norm trainable
    model.out_head = torch.nn.Linear(model.cfg.emb_dim, 2)
    for part in (model.trf_blocks[-1], model.final_norm):
        for p in part.parameters():
            p.requires_grad = True
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = torch.randint(0, 100, (24, 6))
    loader = DataLoader(TensorDataset(inputs, inputs[:, -1] % 2), batch_size=4)  # 6 batches
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
    train_losses, val_losses, train_accs, val_accs, seen = train_classifier_simple(
        model, loader, loader, optimizer, "cpu", num_epochs=3, eval_freq=4, eval_iter=2,
        verbose=False)
    assert seen == 3 * 24  # examples, not tokens
    assert len(train_losses) == len(val_losses) == 5  # steps 0, 4, 8, 12 and 16 of 18
    assert len(train_accs) == len(val_accs) == 3  # one per epoch
    assert train_losses[-1] < train_losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, _ in model.named_parameters()
                       if n.startswith(("trf_blocks.2.", "final_norm.", "out_head."))}


class LastTokenParity(torch.nn.Module):
    """Predicts class = last token ID mod 2: an answer we can count by hand."""

    def forward(self, idx):
        logits = torch.zeros(idx.shape[0], idx.shape[1], 2)
        logits[:, -1, :] = torch.nn.functional.one_hot(idx[:, -1] % 2, 2).float()
        return logits


def test_accuracy_on_a_hand_made_model_with_a_known_answer():
    inputs = torch.tensor([[5, 2], [7, 3], [1, 4], [9, 8], [6, 6]])  # parity 0, 1, 0, 0, 0
    labels = torch.tensor([0, 1, 1, 1, 0])  # right, right, wrong, wrong, right
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=2)
    assert calc_accuracy_loader(loader, LastTokenParity(), "cpu") == pytest.approx(3 / 5)
    assert calc_accuracy_loader(loader, LastTokenParity(), "cpu", num_batches=1) == 1.0
    assert calc_accuracy_loader(loader, LastTokenParity(), "cpu", num_batches=2) == pytest.approx(0.5)


class ParityWithContext(LastTokenParity):
    """LastTokenParity with a config, where classify_review reads the context length."""

    def __init__(self, context_length=64):
        super().__init__()
        self.cfg = dataclasses.replace(GPT_TINY, context_length=context_length)


def test_classify_review_reads_the_last_token_after_padding_and_truncation():
    model, tok = ParityWithContext(), WordTokenizer()  # token ID = word length; class = parity
    assert classify_review("a bb ccc", model, tok, "cpu") == "spam"  # last ID 3: odd
    assert classify_review("a bb cccc", model, tok, "cpu") == "not spam"  # last ID 4: even
    # padded with 50256 (even) to the training length: the last token is padding
    assert classify_review("a bb ccc", model, tok, "cpu", max_length=5) == "not spam"
    # truncated to the context (64 tokens): the 64th word decides, not the 65th
    words = ["x"] * 63 + ["yyy", "zz"]  # IDs ... 1, 3, 2
    assert classify_review(" ".join(words), model, tok, "cpu", max_length=500) == "spam"
    with pytest.raises(ValueError, match="empty"):
        classify_review("   ", model, tok, "cpu")


def test_balancing_and_split_helpers():
    df = pd.DataFrame({"Label": ["ham"] * 30 + ["spam"] * 10, "Text": [str(i) for i in range(40)]})
    balanced = create_balanced_dataset(df)
    assert balanced["Label"].value_counts().to_dict() == {"ham": 10, "spam": 10}
    train, val, test = random_split(balanced, 0.7, 0.1)
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    assert set(train["Text"]) | set(val["Text"]) | set(test["Text"]) == set(balanced["Text"])
    with pytest.raises(ValueError, match="train_frac"):
        random_split(balanced, 0.9, 0.2)


def test_course_counts_for_the_spam_data(mirror_dir, tmp_path, monkeypatch):
    df = pd.read_csv(mirror_dir / "SMSSpamCollection.tsv", sep="\t", header=None,
                     names=["Label", "Text"])
    assert len(df) == 5572
    assert df["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}
    balanced = create_balanced_dataset(df)
    assert len(balanced) == 1494
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    parts = random_split(balanced, 0.7, 0.1)
    assert [len(p) for p in parts] == [1045, 149, 300]
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))  # the tokenizer files
    tok = get_gpt2_tokenizer()
    paths = [write_csv(tmp_path / f"{i}.csv", p["Text"], p["Label"]) for i, p in enumerate(parts)]
    train = SpamDataset(paths[0], tok)
    assert train.max_length == 120
    loaders = [DataLoader(train, batch_size=8, drop_last=True)] + [
        DataLoader(SpamDataset(p, tok, max_length=120), batch_size=8) for p in paths[1:]]
    assert [len(loader) for loader in loaders] == [130, 19, 38]
