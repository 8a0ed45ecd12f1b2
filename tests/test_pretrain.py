"""The pretraining command: single process, exact resume, two processes under torchrun (DDP),
and a one-line error for every bad argument before any training starts."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from utils.checkpoint import checkpoint_info

TINY_RUN = ["--config", "tiny", "--context-length", "32", "--batch-size", "4",
            "--lr", "2e-3", "--eval-freq", "10", "--eval-iter", "2", "--drop-rate", "0.1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m"]


def run(args, tmp_path, mirror_dir, launcher=(sys.executable, "-m"), ok=True):
    env = {**os.environ, "LLM_COURSE_MIRROR": str(mirror_dir), "LLM_COURSE_OFFLINE": "1",
           "LLM_COURSE_DATA": str(tmp_path / "data"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "utils.cli.pretrain", *args], capture_output=True, text=True,
                            env=env, timeout=300, cwd=Path(__file__).parent.parent)
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result if not ok else result.stdout


def losses(log):
    return [float(x) for x in re.findall(r"Train loss (\d+\.\d+)", log)]


def fingerprints(log):
    return dict(re.findall(r"rank (\d) weights ([0-9a-f]{16})", log))


@pytest.fixture
def verdict(mirror_dir):
    return str(mirror_dir / "the-verdict.txt")


def test_two_processes_stay_in_sync_and_learn(tmp_path, mirror_dir, verdict):
    log = run(["--data", verdict, "--epochs", "3", "--out", str(tmp_path / "ddp"),
               "--check-sync", *TINY_RUN], tmp_path, mirror_dir, launcher=TORCHRUN)
    assert "2 process(es) on cpu" in log
    prints = fingerprints(log)
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"]
    first, last = losses(log)[0], losses(log)[-1]
    assert last < first - 1.0, log
    assert (tmp_path / "ddp" / "latest.pt").is_file()
    states = checkpoint_info(tmp_path / "ddp" / "latest.pt")["extra"]["rng_states"]
    assert len(states) == 2  # each rank draws its own dropout masks, so their states differ
    assert not (states[0]["cpu"] == states[1]["cpu"]).all()


@pytest.mark.parametrize("stop", [["--epochs", "1"], ["--max-steps", "25"]],
                         ids=["at an epoch boundary", "in the middle of an epoch"])
def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, mirror_dir, verdict,
                                                                   stop):
    whole = run(["--data", verdict, "--epochs", "2", "--out", str(tmp_path / "whole"),
                 "--check-sync", *TINY_RUN], tmp_path, mirror_dir)
    part = ["--data", verdict, "--out", str(tmp_path / "part"), *TINY_RUN]
    run([*part, "--epochs", "2", *stop] if stop[0] == "--max-steps" else [*part, *stop],
        tmp_path, mirror_dir)
    resumed = run([*part, "--epochs", "2", "--resume", "--check-sync"], tmp_path, mirror_dir)
    assert "resuming from" in resumed
    assert fingerprints(resumed)["0"] == fingerprints(whole)["0"]  # bit for bit
    assert losses(resumed)[-1] == losses(whole)[-1]


def test_ddp_resume_ends_with_the_same_weights(tmp_path, mirror_dir, verdict):
    whole = run(["--data", verdict, "--epochs", "2", "--out", str(tmp_path / "whole"),
                 "--check-sync", *TINY_RUN], tmp_path, mirror_dir, launcher=TORCHRUN)
    part = ["--data", verdict, "--out", str(tmp_path / "part"), "--check-sync", *TINY_RUN]
    run([*part, "--epochs", "1"], tmp_path, mirror_dir, launcher=TORCHRUN)
    resumed = run([*part, "--epochs", "2", "--resume"], tmp_path, mirror_dir, launcher=TORCHRUN)
    assert fingerprints(resumed) == fingerprints(whole)


def test_resume_honours_a_new_learning_rate(tmp_path, mirror_dir, verdict):
    out = ["--data", verdict, "--out", str(tmp_path / "run"), *TINY_RUN]
    run([*out, "--epochs", "1"], tmp_path, mirror_dir)
    run([*out, "--epochs", "2", "--resume", "--lr", "1e-4"], tmp_path, mirror_dir)
    settings = checkpoint_info(tmp_path / "run" / "latest.pt")["extra"]["settings"]
    assert settings["lr"] == 1e-4


BAD_ARGUMENTS = {
    "--eval-freq 0": (["--eval-freq", "0"], "--eval-freq must be at least 1"),
    "--batch-size 0": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "--epochs 0": (["--epochs", "0"], "--epochs must be at least 1"),
    "--lr -1": (["--lr", "-1"], "--lr must be a positive number"),
    "--lr nan": (["--lr", "nan"], "--lr must be a positive number"),
    "--save-every -2": (["--save-every", "-2"], "--save-every must be 0"),
    "--drop-rate 1.5": (["--drop-rate", "1.5"], "--drop-rate must be in"),
    "unwritable --out": (["--out", "/proc/no-such-folder"], "cannot write checkpoints to"),
    "--resume without a checkpoint": (["--resume"], "no checkpoint at"),
    "missing --data": (["--data", "/no/such/file.txt"], "no file or folder at"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_are_one_line_errors_before_any_work(case, tmp_path, mirror_dir, verdict):
    extra, message = BAD_ARGUMENTS[case]
    args = ["--data", verdict, "--out", str(tmp_path / "out"), *TINY_RUN, *extra]
    result = run(args, tmp_path, mirror_dir, ok=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert "Ep 1" not in result.stdout  # no training happened


def test_latin1_corpus_and_short_text_name_the_problem(tmp_path, mirror_dir):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Caf\xe9 au lait. ".encode("latin-1") * 50)
    result = run(["--data", str(latin), *TINY_RUN], tmp_path, mirror_dir, ok=False)
    assert result.returncode != 0 and "latin1.txt is not UTF-8 text" in result.stderr
    short = tmp_path / "short.txt"
    short.write_text("Far too short to train on.")
    result = run(["--data", str(short), *TINY_RUN], tmp_path, mirror_dir, ok=False)
    assert result.returncode != 0 and "one input/target window needs" in result.stderr


def test_resume_with_a_different_batch_size_is_refused(tmp_path, mirror_dir, verdict):
    out = ["--data", verdict, "--out", str(tmp_path / "run"), *TINY_RUN]
    run([*out, "--epochs", "1"], tmp_path, mirror_dir)
    result = run([*out, "--epochs", "2", "--resume", "--batch-size", "2"], tmp_path, mirror_dir,
                 ok=False)
    assert result.returncode != 0 and "batch_size (saved 4, now 2)" in result.stderr
    done = run([*out, "--epochs", "1", "--resume"], tmp_path, mirror_dir, ok=False)
    assert "has already trained 1 epoch(s)" in done.stderr
