"""utils/checkpoint.py: round trips, saves that a crash, a full disk or Ctrl-C cannot damage,
wrapped models saved plain, and a clear CheckpointError for every damaged or malformed file
(a flipped bit in a tensor or in any byte of the metadata, a truncated copy, missing or
misshapen entries)."""

import dataclasses
import multiprocessing
import os
import signal
import struct
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor

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


def _interrupted_mid_write(monkeypatch):
    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. the learner stops the kernel mid-save

    monkeypatch.setattr(torch, "save", crash)
    return KeyboardInterrupt


def _disk_full_at_fsync(monkeypatch):
    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # the whole file written, not yet on disk
    return OSError


@pytest.mark.parametrize("failure", [_interrupted_mid_write, _disk_full_at_fsync],
                         ids=["interrupted mid-write", "disk full at fsync"])
def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(
        tmp_path, monkeypatch, failure):
    model, optimizer = trained_pair()
    path = save_checkpoint(tmp_path / "ckpt.pt", model, optimizer, step=1)
    good = path.read_bytes()
    error = failure(monkeypatch)
    with pytest.raises(error):
        save_checkpoint(path, model, optimizer, step=2)
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


def test_a_bit_flip_in_tensor_data_is_a_checkpoint_error(tmp_path):
    model, optimizer = trained_pair()
    path = save_checkpoint(tmp_path / "ok.pt", model, optimizer)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:  # flip one bit inside a tensor's stored bytes
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 1000)
    header = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[header + 26:header + 30])
    start = header + 30 + name_len + extra_len  # after the local file header
    data[start + info.file_size // 2] ^= 0x10
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flipped.pt is damaged: the content of 1 tensor"):
        load_checkpoint(flipped)
    load_checkpoint(path)  # the original still loads


@pytest.mark.parametrize("cut", [0.0, 0.1, 0.5, 0.99])
def test_a_truncated_checkpoint_is_a_checkpoint_error(tmp_path, cut):
    model, optimizer = trained_pair()
    path = save_checkpoint(tmp_path / "ok.pt", model, optimizer)
    short = tmp_path / "short.pt"
    short.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    with pytest.raises(CheckpointError, match="short.pt is damaged or not a PyTorch checkpoint"):
        load_checkpoint(short)


def test_malformed_checkpoints_are_checkpoint_errors(tmp_path):
    model, optimizer = trained_pair()
    path = save_checkpoint(tmp_path / "ok.pt", model, optimizer)
    payload = torch.load(path, weights_only=True)
    older = {k: v for k, v in payload.items() if k != "sha256"}  # a format/1 file: no digests
    older["format"] = "llm-course-checkpoint/1"
    cases = {"no config": {**payload, "config": None},
             "bad config": {**older, "config": {**payload["config"], "n_heads": 5}},
             "digests removed": older | {"format": payload["format"]},
             "missing tensor": {**older, "model": {k: v for k, v in payload["model"].items()
                                                  if "out_head" not in k}},
             "wrong shape": {**older, "model": {**payload["model"],
                                                "out_head.weight": torch.zeros(3, 3)}}}
    for name, broken in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(broken, bad)
        with pytest.raises(CheckpointError, match=bad.name):
            load_checkpoint(bad)
    other = torch.optim.AdamW(list(GPTModel(CFG).parameters())[:3])  # a different optimizer
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        load_checkpoint(path, optimizer=other)


def test_save_unwraps_compiled_and_ddp_models_and_converts_numpy_metadata(tmp_path):
    import numpy as np
    model, _ = trained_pair()
    wrapped = torch.nn.parallel.DistributedDataParallel.__new__(
        torch.nn.parallel.DistributedDataParallel)  # a DDP shell needs no process group
    torch.nn.Module.__init__(wrapped)
    wrapped.module = model
    for outer in (torch.compile(model), wrapped):
        path = save_checkpoint(tmp_path / "w.pt", outer, step=np.int64(7), loss=np.float32(2.5))
        keys = list(torch.load(path, weights_only=True)["model"])
        assert keys == list(model.state_dict())  # no _orig_mod. or module. prefixes
        assert checkpoint_info(path)["extra"] == {"step": 7, "loss": 2.5}  # plain numbers
        loaded = load_checkpoint(path)
        assert torch.equal(loaded.out_head.weight, model.out_head.weight)
    with pytest.raises(TypeError, match="could not be loaded back"):
        save_checkpoint(tmp_path / "x.pt", model, callback=print)
    assert not (tmp_path / "x.pt").exists()


def test_foreign_and_missing_files_are_clear_errors(tmp_path):
    model, _ = trained_pair()
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


# --- every byte of the metadata -----------------------------------------------------------------

SMALL = dataclasses.replace(GPT_TINY, vocab_size=11, context_length=4, emb_dim=4, n_heads=1,
                            n_layers=1)
EXTRA = {"epoch": 3, "step": 1234, "tokens_seen": 9_876_543,
         "settings": {"config": "tiny", "seed": 123, "lr": 4e-4, "betas": (0.9, 0.95)},
         "history": [{"step": 0, "train_loss": 10.25, "val_loss": None}]}


def same(a, b) -> bool:
    """Equal values of the same types, tensors bit for bit (dtype and shape included)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(map(str, a)) == list(map(str, b)) and all(same(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def small_checkpoint(path):
    """A one-block model after one AdamW step on two of its tensors, with training metadata."""
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    optimizer = torch.optim.AdamW([model.final_norm.scale, model.out_head.weight], lr=1e-3)
    model(torch.tensor([[1, 2]])).sum().backward()
    optimizer.step()
    return save_checkpoint(path, model, optimizer, **EXTRA), model, optimizer


def flip_outcomes(path, offsets, saved_model, saved_optimizer) -> list[tuple[int, str]]:
    """For each offset: flip one bit there, load the file, and say 'refused' (CheckpointError),
    'harmless' (every loaded value equals the saved one) or what changed. The saved model and
    optimizer come as their state dicts."""
    data, flipped = path.read_bytes(), path.with_name(f"flipped-{offsets[0]}.pt")
    torch.set_num_threads(1)
    model = GPTModel(SMALL)
    optimizer = torch.optim.AdamW([model.final_norm.scale, model.out_head.weight])
    outcomes = []
    for offset in offsets:
        damaged = bytearray(data)
        damaged[offset] ^= 1 << (offset % 8)  # every bit position, across the bytes
        flipped.write_bytes(damaged)
        try:
            info = checkpoint_info(flipped)
            load_checkpoint(flipped, model=model, optimizer=optimizer)
        except CheckpointError:
            outcomes.append((offset, "refused"))
            continue
        checks = {"config": info["config"] == SMALL, "extra": same(info["extra"], EXTRA),
                  "model": same(model.state_dict(), saved_model),
                  "optimizer": same(optimizer.state_dict(), saved_optimizer)}
        changed = [name for name, ok in checks.items() if not ok]
        outcomes.append((offset, "changed " + ", ".join(changed) if changed else "harmless"))
    return outcomes


def test_every_flipped_byte_of_the_metadata_is_refused_or_harmless(tmp_path):
    path, model, optimizer = small_checkpoint(tmp_path / "small.pt")
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:  # the pickled metadata: everything but tensor bytes
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    header = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[header + 26:header + 30])
    start = header + 30 + name_len + extra_len  # after the local file header
    offsets = range(start, start + info.file_size)
    saved_model, saved_optimizer = model.state_dict(), optimizer.state_dict()
    if sys.platform == "linux" and (os.cpu_count() or 1) > 1:  # two processes, half each
        halves = [offsets[0::2], offsets[1::2]]
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = pool.map(flip_outcomes, [path] * 2, halves, [saved_model] * 2,
                             [saved_optimizer] * 2)
            outcomes = [outcome for part in parts for outcome in part]
    else:
        outcomes = flip_outcomes(path, offsets, saved_model, saved_optimizer)
    changed = [(offset - start, what) for offset, what in outcomes if what.startswith("changed")]
    assert not changed, f"{len(changed)} flips loaded with changed values, e.g. {changed[:5]}"
    refused = sum(what == "refused" for _, what in outcomes)
    assert len(outcomes) == info.file_size > 5000 and refused > 0.8 * len(outcomes)
