"""The stand-in for OpenAI's GPT-2: a small GPT pretrained here on the course's own public text
(hand-written command; chapters 6, 7, 7b and appendix E load it where GPT-2 cannot be had).

    python -m utils.cli.stand_in              # pretrain it once (about 6 minutes on 2 CPU cores)
    python -m utils.cli.stand_in --rebuild    # pretrain it again; the old file is kept beside it

Chapters 6, 7, 7b and appendix E finetune OpenAI's GPT-2. Where its weights cannot be had
(offline, or with `LLM_COURSE_FALLBACK=1`, as for the saved outputs), they start from this
model instead. It is chapter 4's `GPTModel` in a small configuration (`STAND_IN_CONFIG`: 4
blocks of width 128, context 256; most of its 13.7 million parameters sit in the token
embedding and the output head), pretrained with chapter 5's objective (next-token
cross-entropy), appendix D's schedule (warmup, cosine decay, clipping) and chapter 8's fused
loss and optimizer, in float32 so that it comes out the same on every CPU up to rounding.

Its text (`stand_in_documents`): chapter 5's story, the text messages of chapter 6's data set
and the instructions with their answers from chapter 7's, as plain text (not in the prompt
format chapter 7 teaches), never an entry that chapter 6, 7 or 7b keeps for validation or
testing. So it has read the kind of text the next chapters finetune it on, but has never been
taught their tasks: classifying, following the instruction template, preferring an answer.

`load_stand_in()` pretrains it on first use and saves it as `checkpoints/stand_in_gpt.pt`
(the folder `LLM_COURSE_CHECKPOINTS` names, if set); later calls load that file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time

import pandas as pd
import torch
from tqdm import tqdm

from utils.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint
from utils.classify import create_balanced_dataset, random_split
from utils.core.download import fetch
from utils.core.paths import checkpoint_dir, shown_path
from utils.cli.pretrain import build_optimizer
from utils.fast import fast_loss_batch
from utils.instruct import split_instruction_data
from utils.model import GPTConfig, GPTModel
from utils.text import get_gpt2_tokenizer
from utils.train import calc_loss_loader
from utils.train_extras import lr_at_step

__all__ = ["STAND_IN_CONFIG", "STAND_IN_TRAINING", "STAND_IN_FILE", "stand_in_checkpoint",
           "stand_in_documents", "build_stand_in", "load_stand_in", "describe_stand_in", "main"]

STAND_IN_CONFIG = GPTConfig(vocab_size=50257, context_length=256, emb_dim=128, n_heads=4,
                            n_layers=4, drop_rate=0.1, qkv_bias=False)
# Pretraining: windows of 128 tokens, 4 per batch, AdamW with weight decay on the matrices,
# warmup over the first 10% of the steps to the peak rate, cosine decay to a tenth of it.
STAND_IN_TRAINING = {"epochs": 4, "window": 128, "batch_size": 4, "peak_lr": 2e-3,
                     "warmup": 0.1, "weight_decay": 0.1, "max_grad_norm": 1.0, "seed": 123,
                     "validation_share": 0.05}
STAND_IN_FILE = "stand_in_gpt.pt"
END_OF_TEXT = 50256


def stand_in_checkpoint():
    """Where the stand-in is saved: checkpoints/stand_in_gpt.pt."""
    return checkpoint_dir() / STAND_IN_FILE


def _sms_messages() -> list[str]:
    """Every text message except those chapter 6 keeps for validation and testing."""
    df = pd.read_csv(fetch("sms-spam-collection"), sep="\t", header=None,
                     names=["Label", "Text"])  # chapter 6 reads it so
    _, validation_df, test_df = random_split(create_balanced_dataset(df), 0.7, 0.1)
    held_out = set(validation_df["Text"]) | set(test_df["Text"])
    return [text for text in df["Text"] if text not in held_out]


def _instruction_texts() -> list[str]:
    """Chapter 7's training entries as plain text, without any entry whose instruction and
    input chapter 7 or 7b hold out for testing or validation."""
    with open(fetch("instruction-data"), encoding="utf-8") as f:
        train, test, val = split_instruction_data(json.load(f))
    with open(fetch("instruction-data-with-preference"), encoding="utf-8") as f:
        _, pref_test, pref_val = split_instruction_data(json.load(f))
    held_out = {(e["instruction"], e["input"]) for e in test + val + pref_test + pref_val}
    return ["\n".join(part for part in (e["instruction"], e["input"], e["output"]) if part)
            for e in train if (e["instruction"], e["input"]) not in held_out]


def stand_in_documents() -> dict[str, list[str]]:
    """The stand-in's text by source: the story, the messages, the instructions."""
    with open(fetch("the-verdict"), encoding="utf-8") as f:
        story = f.read()
    return {"story": [story], "messages": _sms_messages(), "instructions": _instruction_texts()}


def _token_windows(documents: list[str], window: int) -> torch.Tensor:
    """Each document's tokens followed by <|endoftext|>, all in one stream, cut into rows of
    window + 1 tokens (input and the target shifted by one); the tail is dropped."""
    tokenizer = get_gpt2_tokenizer()
    ids = []
    for text in documents:
        ids += tokenizer.encode(text, disallowed_special=()) + [END_OF_TEXT]
    rows = (len(ids) - 1) // window
    stream = torch.tensor(ids[:rows * window + 1])
    return torch.stack([stream[i * window:(i + 1) * window + 1] for i in range(rows)])


def _loaders(by_source: dict[str, list[str]], settings: dict):
    """Shuffled documents (seeded), the last `validation_share` of them for validation."""
    documents = [doc for docs in by_source.values() for doc in docs]
    random.Random(settings["seed"]).shuffle(documents)
    n_val = max(1, int(len(documents) * settings["validation_share"]))
    loaders = []
    for part, shuffle in ((documents[:-n_val], True), (documents[-n_val:], False)):
        rows = _token_windows(part, settings["window"])
        dataset = torch.utils.data.TensorDataset(rows[:, :-1], rows[:, 1:])
        loaders.append(torch.utils.data.DataLoader(
            dataset, batch_size=settings["batch_size"], shuffle=shuffle, drop_last=shuffle))
    return loaders


def _pretrain(model, train_loader, val_loader, settings: dict, progress: bool) -> dict:
    """The pretraining loop; returns the losses before and after and the seconds taken."""
    optimizer = build_optimizer(model, settings["peak_lr"], settings["weight_decay"])
    total = len(train_loader) * settings["epochs"]
    warmup = int(settings["warmup"] * total)
    peak = settings["peak_lr"]
    with torch.no_grad():
        before = calc_loss_loader(val_loader, model.eval(), "cpu")
    start, step = time.time(), 0
    bar = tqdm(total=total, desc="pretraining the stand-in", unit="step", disable=not progress)
    for _ in range(settings["epochs"]):
        model.train()
        for inputs, targets in train_loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at_step(step, total, warmup, peak / 10, peak, peak / 10)
            optimizer.zero_grad()
            loss = fast_loss_batch(inputs, targets, model, "cpu")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"])
            optimizer.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.2f}")
    bar.close()
    with torch.no_grad():
        after = calc_loss_loader(val_loader, model.eval(), "cpu")
    return {"val_loss_before": before, "val_loss_after": after, "steps": total,
            "seconds": round(time.time() - start, 1)}


def build_stand_in(path=None, progress: bool = True):
    """Pretrain the stand-in on the CPU and save it to `path` (default: stand_in_checkpoint());
    an existing file there is first renamed to `<name>.previous.pt`. Returns the path."""
    path = stand_in_checkpoint() if path is None else path
    settings = dict(STAND_IN_TRAINING)
    by_source = stand_in_documents()
    torch.manual_seed(settings["seed"])
    train_loader, val_loader = _loaders(by_source, settings)
    torch.manual_seed(settings["seed"])
    model = GPTModel(STAND_IN_CONFIG)
    result = _pretrain(model, train_loader, val_loader, settings, progress)
    if path.exists():
        path.replace(path.with_name(path.stem + ".previous.pt"))
    counts = {name: len(docs) for name, docs in by_source.items()}
    return save_checkpoint(path, model, kind="stand-in", documents=counts,
                           training_tokens=len(train_loader.dataset) * settings["window"],
                           settings=settings, **result)


def load_stand_in(progress: bool = True) -> GPTModel:
    """The stand-in in eval mode without dropout (as GPT-2 is loaded); pretrained and saved
    first if its file is missing."""
    path = stand_in_checkpoint()
    if not path.is_file():
        print(f"{shown_path(path)} is missing: pretraining the stand-in once (a few minutes "
              f"on a CPU).", flush=True)
        build_stand_in(path, progress=progress)
    stored = checkpoint_info(path)
    if stored["extra"].get("kind") != "stand-in":
        raise ValueError(f"{shown_path(path)} is not the stand-in; move it away and run "
                         f"`python -m utils.cli.stand_in` to pretrain the stand-in.")
    model = GPTModel(dataclasses.replace(stored["config"], drop_rate=0.0))  # no dropout, as GPT-2
    return load_checkpoint(path, model=model).eval()


def describe_stand_in() -> str:
    """What the saved stand-in is, in one paragraph: its size, its text, its losses."""
    info = checkpoint_info(stand_in_checkpoint())
    cfg, extra = info["config"], info["extra"]
    docs = extra["documents"]
    return (f"The stand-in: chapter 4's GPTModel with {cfg.n_layers} blocks of width "
            f"{cfg.emb_dim} (context {cfg.context_length}), pretrained for "
            f"{extra['settings']['epochs']} epochs on {extra['training_tokens']:,} tokens: "
            f"the story, {docs['messages']:,} text messages and {docs['instructions']:,} "
            f"instructions with their answers (none held out by chapters 6, 7 or 7b). "
            f"Validation loss {extra['val_loss_before']:.1f} before pretraining, "
            f"{extra['val_loss_after']:.1f} after (ln 50257 = 10.8 is a uniform guess).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.cli.stand_in",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true",
                        help="pretrain again; the existing file is kept as .previous.pt")
    args = parser.parse_args(argv)
    path = stand_in_checkpoint()
    if path.is_file() and not args.rebuild:
        print(f"{shown_path(path)} exists (use --rebuild to pretrain it again).")
    else:
        build_stand_in(path)
        print(f"saved {shown_path(path)}")
    print(describe_stand_in())
    return 0


if __name__ == "__main__":
    sys.exit(main())
