"""Fault injection: what happens when things go wrong at the same time or on disk. Each test
states the exact outcome: the right error, no partial or wrong file left, nothing saved lost.
(The pretraining command's bad arguments are in test_pretrain.py.)"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.cli.chat import main as chat_main
from utils.core.assets import ASSETS, Asset
from utils.core.download import fetch
from utils.core.paths import REPO_ROOT
from utils.evaluation import OllamaError, calc_response_loss, query_model
from utils.instruct import InstructionDataset
from utils.model import GPT_TINY, GPTModel
from utils.text import get_gpt2_tokenizer

BODY = random.Random(0).randbytes(3 << 20)  # 3 MiB, the same in every (child) process
GOOD = hashlib.sha256(BODY).hexdigest()


def _fetch_many(url: str, data_dir: str, threads: int, queue) -> None:
    """In a child process: register the test asset, then fetch it from several threads."""
    ASSETS["race"] = Asset("race", "race/file.bin", url, len(BODY), GOOD)
    results = []

    def one():
        try:
            path = fetch("race", data_dir=data_dir, mirror="", offline=False, progress=False)
            results.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        except Exception as exc:  # reported to the parent, which fails the test
            results.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    queue.put(results)


def test_100_concurrent_fetches_download_once_and_all_get_the_verified_file(tmp_path, file_server):
    file_server.routes["/race"] = (200, BODY, "ok")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fetch_many, args=(file_server.url("/race"), str(tmp_path), 10, queue))
             for _ in range(10)]
    for p in procs:
        p.start()
    results = [r for _ in procs for r in queue.get(timeout=300)]
    for p in procs:
        p.join(timeout=60)
    assert len(results) == 100
    assert set(results) == {GOOD}, [r for r in results if r != GOOD][:3]
    assert [path for path, _ in file_server.requests] == ["/race"]  # downloaded once
    files = sorted(p.name for p in (tmp_path / "race").iterdir())
    assert files == [".file.bin.lock", ".file.bin.verified", "file.bin"]  # no temporary files


def test_a_cache_hit_is_not_rehashed_until_the_file_changes(tmp_path, file_server, monkeypatch):
    file_server.routes["/f"] = (200, BODY, "ok")
    monkeypatch.setitem(ASSETS, "stamped", Asset("stamped", "s.bin", file_server.url("/f"),
                                                 len(BODY), GOOD))
    path = fetch("stamped", data_dir=tmp_path, mirror="", offline=False, progress=False)
    hashed = []
    import utils.core.download as download
    real = download._sha256
    monkeypatch.setattr(download, "_sha256", lambda p: hashed.append(p) or real(p))
    assert fetch("stamped", data_dir=tmp_path, mirror="", offline=True) == path
    assert hashed == []  # the stamp vouched for it
    fetch("stamped", data_dir=tmp_path, mirror="", offline=True, verify=True)
    assert hashed == [path]  # asked to verify: hashed
    data = bytearray(path.read_bytes())
    data[100] ^= 1  # damaged on disk: same size, new modification time
    path.write_bytes(bytes(data))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    fetched = fetch("stamped", data_dir=tmp_path, mirror="", offline=False, progress=False)
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == GOOD  # fetched again
    assert (tmp_path / "s.bin.corrupt").is_file()  # the damaged copy kept for inspection


def small_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = GPTModel(GPT_TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    return save_checkpoint(path, model, optimizer, epoch=1)


def test_a_bit_flip_in_tensor_data_is_a_checkpoint_error(tmp_path):
    path = small_checkpoint(tmp_path / "ok.pt")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:  # flip one bit inside a tensor's stored bytes
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 1000)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # after the local file header
    data[start + info.file_size // 2] ^= 0x10
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flipped.pt is damaged: the content of 1 tensor"):
        load_checkpoint(flipped)
    load_checkpoint(path)  # the original still loads


@pytest.mark.parametrize("cut", [0.0, 0.1, 0.5, 0.99])
def test_a_truncated_checkpoint_is_a_checkpoint_error(tmp_path, cut):
    path = small_checkpoint(tmp_path / "ok.pt")
    short = tmp_path / "short.pt"
    short.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    with pytest.raises(CheckpointError, match="short.pt"):
        load_checkpoint(short)


def test_malformed_checkpoints_are_checkpoint_errors(tmp_path):
    path = small_checkpoint(tmp_path / "ok.pt")
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
    opt = torch.optim.AdamW(list(GPTModel(GPT_TINY).parameters())[:3])  # a different optimizer
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        load_checkpoint(path, optimizer=opt)


def test_save_unwraps_compiled_and_ddp_models_and_converts_numpy_metadata(tmp_path):
    import numpy as np
    torch.manual_seed(0)
    model = GPTModel(GPT_TINY).eval()
    wrapped = torch.nn.parallel.DistributedDataParallel.__new__(
        torch.nn.parallel.DistributedDataParallel)  # a DDP shell needs no process group
    torch.nn.Module.__init__(wrapped)
    wrapped.module = model
    for outer in (torch.compile(model), wrapped):
        path = save_checkpoint(tmp_path / "w.pt", outer, step=np.int64(7), loss=np.float32(2.5))
        keys = list(torch.load(path, weights_only=True)["model"])
        assert keys == list(model.state_dict())  # no _orig_mod. or module. prefixes
        loaded = load_checkpoint(path)
        assert torch.equal(loaded.out_head.weight, model.out_head.weight)
    with pytest.raises(TypeError, match="could not be loaded back"):
        save_checkpoint(tmp_path / "x.pt", model, callback=print)
    assert not (tmp_path / "x.pt").exists()


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path,
                                                                                    monkeypatch):
    path = small_checkpoint(tmp_path / "ckpt.pt")
    good = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        small_checkpoint(path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, a POSIX signal")
def test_ctrl_c_during_pretraining_says_where_the_last_checkpoint_is(tmp_path, mirror_dir):
    env = {**os.environ, "LLM_COURSE_MIRROR": str(mirror_dir), "LLM_COURSE_OFFLINE": "1",
           "LLM_COURSE_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "utils.cli.pretrain", "--data", str(mirror_dir / "the-verdict.txt"),
         "--config", "tiny", "--context-length", "32", "--batch-size", "4", "--epochs", "500",
         "--save-every", "5", "--eval-freq", "5", "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
        # as in a terminal: a test run started in the background inherits an ignored Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # wait until a checkpoint has been written
        if "(Step 000010)" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted at step" in err and "continue with --resume" in err
    assert str(tmp_path / "run" / "latest.pt") in err
    load_checkpoint(tmp_path / "run" / "latest.pt")  # what it points at is whole


def test_typed_special_tokens_are_text_everywhere(tmp_path, mirror_dir, monkeypatch):
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
    tokenizer = get_gpt2_tokenizer()
    entry = {"instruction": "Repeat <|endoftext|> twice.", "input": "", "output": "<|endoftext|>"}
    ids = InstructionDataset([entry], tokenizer)[0]
    assert 50256 not in ids and tokenizer.decode(ids).count("<|endoftext|>") == 2
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "tiny.pt", GPTModel(GPT_TINY))
    out = io.StringIO()
    code = chat_main(["--checkpoint", str(ckpt), "--max-new-tokens", "3"],
                     stdin=io.StringIO("What is <|endoftext|>?\n"), out=out)
    assert code == 0 and out.getvalue().rstrip().endswith("Bye.")


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--temperature", "nan"], "--temperature must be a number >= 0"),
    (["--temperature", "-1"], "--temperature must be a number >= 0"),
    (["--top-k", "0"], "--top-k must be at least 1")])
def test_chat_checks_its_arguments_before_loading_anything(args, message, capsys):
    assert chat_main(["--checkpoint", "/no/such/file.pt", *args], stdin=io.StringIO("")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "No checkpoint" not in err


def test_response_loss_with_no_response_inside_the_context_is_a_clear_error(mirror_dir, monkeypatch):
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
    torch.manual_seed(0)
    model = GPTModel(GPT_TINY).eval()  # context 64
    entry = {"instruction": "word " * 80, "input": "", "output": "Yes."}
    with pytest.raises(ValueError, match="No reference response fits in the model's context of 64"):
        calc_response_loss(model, [entry], get_gpt2_tokenizer(), "cpu")


def test_the_ollama_judge_says_what_to_do(file_server):
    file_server.routes["/api/chat"] = (404, b'{"error":"model not found"}', "ok")
    with pytest.raises(OllamaError, match="ollama pull llama3"):
        query_model("hi", url=file_server.url("/api/chat"))
    file_server.routes["/slow/api/chat"] = (200, b"", "hang")
    with pytest.raises(OllamaError, match="No reply from the Ollama server within 1 s"):
        query_model("hi", url=file_server.url("/slow/api/chat"), timeout=1)
