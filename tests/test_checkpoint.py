"""utils/checkpoint.py: round trips, atomic saves, and clear errors for bad files."""

import dataclasses
import os
import signal
import sys
import time

import pytest
import torch

from utils.checkpoint import (CheckpointError, checkpoint_info, load_checkpoint,
                              save_checkpoint)
from utils.model import GPT_TINY, GPTModel

CFG = dataclasses.replace(GPT_TINY, vocab_size=101, context_length=16, drop_rate=0.1)
PROBE = torch.tensor([[1, 5, 9, 42]])


def trained_pair():
    torch.manual_seed(123)
    model = GPTModel(CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(PROBE).sum()
    loss.backward()
    optimizer.step()
    return model.eval(), optimizer


def test_round_trip_restores_outputs_optimizer_and_extra(tmp_path):
    model, optimizer = trained_pair()
    path = save_checkpoint(tmp_path / "run" / "ckpt.pt", model, optimizer, epoch=3, step=17)
    restored = load_checkpoint(path).eval()  # the model is rebuilt from the stored config
    with torch.no_grad():
        assert torch.equal(restored(PROBE), model(PROBE))
    opt2 = torch.optim.AdamW(restored.parameters(), lr=5.0)
    load_checkpoint(path, model=restored, optimizer=opt2)
    assert opt2.param_groups[0]["lr"] == 1e-3
    state1, state2 = optimizer.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(state1[k]["exp_avg"], state2[k]["exp_avg"]) for k in state1)
    info = checkpoint_info(path)
    assert info["config"] == CFG and info["extra"] == {"epoch": 3, "step": 17}
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary file left


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, _ = trained_pair()
    path = save_checkpoint(tmp_path / "ckpt.pt", model)
    good = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. the learner stops the kernel mid-save

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT to itself, a POSIX signal")
def test_ctrl_c_during_a_save_arrives_once_the_file_is_complete(tmp_path, monkeypatch):
    model, optimizer = trained_pair()
    real_save = torch.save

    def save_while_ctrl_c(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the learner presses Ctrl-C as the save starts
        time.sleep(0.05)  # give Python the chance to run its handler in here
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_while_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path / "ckpt.pt", model, optimizer, step=5)
        assert signal.signal(signal.SIGINT, previous) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert checkpoint_info(tmp_path / "ckpt.pt")["extra"]["step"] == 5  # whole, and renamed
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_damaged_and_foreign_files_are_clear_errors(tmp_path):
    model, _ = trained_pair()
    path = save_checkpoint(tmp_path / "ckpt.pt", model)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or not a PyTorch checkpoint"):
        load_checkpoint(truncated)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a course checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_mismatched_config_names_the_difference(tmp_path):
    model, _ = trained_pair()
    path = save_checkpoint(tmp_path / "ckpt.pt", model)
    other = GPTModel(dataclasses.replace(CFG, n_layers=3))
    with pytest.raises(CheckpointError, match="n_layers: checkpoint 2, model 3"):
        load_checkpoint(path, model=other)


def test_a_different_dropout_rate_is_not_a_mismatch(tmp_path):
    model, _ = trained_pair()
    path = save_checkpoint(tmp_path / "ckpt.pt", model)
    no_dropout = GPTModel(dataclasses.replace(CFG, drop_rate=0.0))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path, model=no_dropout).eval()(PROBE), model(PROBE))


def test_missing_optimizer_state_is_a_clear_error(tmp_path):
    model, optimizer = trained_pair()
    path = save_checkpoint(tmp_path / "ckpt.pt", model)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, model=model, optimizer=optimizer)
