"""The stand-in for GPT-2: what it reads (never a held-out entry), how it is saved and loaded."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import utils.cli.stand_in as stand_in
from utils.checkpoint import checkpoint_info, save_checkpoint
from utils.classify import create_balanced_dataset, random_split
from utils.core.download import fetch
from utils.instruct import split_instruction_data
from utils.model import GPTConfig, GPTModel


def test_the_stand_in_reads_no_entry_that_chapters_6_7_and_7b_hold_out():
    documents = stand_in.stand_in_documents()
    messages, instructions = set(documents["messages"]), documents["instructions"]
    df = pd.read_csv(fetch("sms-spam-collection"), sep="\t", header=None, names=["Label", "Text"])
    _, validation_df, test_df = random_split(create_balanced_dataset(df), 0.7, 0.1)
    held_out_messages = set(validation_df["Text"]) | set(test_df["Text"])
    assert not messages & held_out_messages
    assert len(documents["messages"]) == sum(t not in held_out_messages for t in df["Text"])
    held_out = []
    for name in ("instruction-data", "instruction-data-with-preference"):
        with open(fetch(name), encoding="utf-8") as f:
            _, test, val = split_instruction_data(json.load(f))
        held_out += test + val
    for entry in held_out:  # neither the question nor its answer
        assert not any(text.startswith(entry["instruction"] + "\n" + entry["input"])
                       and entry["input"] for text in instructions)
        assert not any(text == f"{entry['instruction']}\n{entry['output']}" for text in instructions)
    assert len(instructions) > 900
    assert not any("### Instruction" in text for text in instructions)  # never the template


def _tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_COURSE_CHECKPOINTS", str(tmp_path))
    monkeypatch.setattr(stand_in, "STAND_IN_CONFIG", GPTConfig(
        vocab_size=50257, context_length=128, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.1))
    monkeypatch.setattr(stand_in, "STAND_IN_TRAINING", {**stand_in.STAND_IN_TRAINING,
                                                         "epochs": 1, "batch_size": 2,
                                                         "validation_share": 0.3})
    story = "Every effort moves you forward, one small step at a time. " * 60
    monkeypatch.setattr(stand_in, "stand_in_documents", lambda: {
        "story": [story], "messages": ["Free entry! Call now."] * 40,
        "instructions": ["Name a colour.\nBlue."] * 40})


def test_the_stand_in_is_pretrained_once_and_an_earlier_file_is_kept(monkeypatch, tmp_path, capsys):
    _tiny(monkeypatch, tmp_path)
    model = stand_in.load_stand_in(progress=False)  # missing: pretrained now
    assert "pretraining the stand-in once" in capsys.readouterr().out
    path = tmp_path / stand_in.STAND_IN_FILE
    info = checkpoint_info(path)["extra"]
    assert info["kind"] == "stand-in" and info["val_loss_after"] < info["val_loss_before"]
    assert not model.training and model.cfg.drop_rate == 0.0
    first = {k: v.clone() for k, v in model.state_dict().items()}
    again = stand_in.load_stand_in(progress=False)  # present: loaded, not trained again
    assert capsys.readouterr().out == ""
    assert all(torch.equal(first[k], v) for k, v in again.state_dict().items())
    assert stand_in.main(["--rebuild"]) == 0
    assert (tmp_path / "stand_in_gpt.previous.pt").is_file()  # the earlier one, kept
    assert "Validation loss" in capsys.readouterr().out


def test_a_file_that_is_not_the_stand_in_is_refused(monkeypatch, tmp_path):
    _tiny(monkeypatch, tmp_path)
    save_checkpoint(tmp_path / stand_in.STAND_IN_FILE, GPTModel(stand_in.STAND_IN_CONFIG))
    with pytest.raises(ValueError, match="is not the stand-in.*python -m utils.cli.stand_in"):
        stand_in.load_stand_in()
