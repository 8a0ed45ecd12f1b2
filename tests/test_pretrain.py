"""The pretraining command: single process, resume, and two processes under torchrun (DDP)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TINY_RUN = ["--config", "tiny", "--context-length", "32", "--batch-size", "4",
            "--lr", "2e-3", "--eval-freq", "10", "--eval-iter", "2"]


def run(args, tmp_path, mirror_dir, launcher=(sys.executable, "-m")):
    env = {**os.environ, "LLM_COURSE_MIRROR": str(mirror_dir), "LLM_COURSE_OFFLINE": "1",
           "LLM_COURSE_DATA": str(tmp_path / "data"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "utils.pretrain", *args], capture_output=True, text=True,
                            env=env, timeout=300, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def losses(log):
    return [float(x) for x in re.findall(r"Train loss (\d+\.\d+)", log)]


@pytest.fixture
def verdict(mirror_dir):
    return str(mirror_dir / "the-verdict.txt")


def test_two_processes_stay_in_sync_and_learn(tmp_path, mirror_dir, verdict):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m"]
    log = run(["--data", verdict, "--epochs", "3", "--out", str(tmp_path / "ddp"),
               "--check-sync", *TINY_RUN], tmp_path, mirror_dir, launcher=torchrun)
    assert "2 process(es) on cpu" in log
    prints = dict(re.findall(r"rank (\d) weights ([0-9a-f]{16})", log))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"]
    first, last = losses(log)[0], losses(log)[-1]
    assert last < first - 1.0, log
    assert (tmp_path / "ddp" / "latest.pt").is_file()


def test_resume_continues_from_the_saved_epoch(tmp_path, mirror_dir, verdict):
    out = ["--out", str(tmp_path / "run")]
    run(["--data", verdict, "--epochs", "1", *out, *TINY_RUN], tmp_path, mirror_dir)
    log = run(["--data", verdict, "--epochs", "2", "--resume", *out, *TINY_RUN], tmp_path,
              mirror_dir)
    assert "resuming from" in log and "epoch 1" in log
    assert re.search(r"Ep 2 \(Step", log) and not re.search(r"Ep 1 \(Step", log)


def test_bad_input_is_a_clear_error(tmp_path, mirror_dir):
    short = tmp_path / "short.txt"
    short.write_text("Far too short to train on.")
    env = {**os.environ, "LLM_COURSE_MIRROR": str(mirror_dir), "LLM_COURSE_OFFLINE": "1",
           "LLM_COURSE_DATA": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, "-m", "utils.pretrain", "--data", str(short),
                             *TINY_RUN], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "one input/target window needs" in result.stderr
