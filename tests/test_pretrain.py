"""The pretraining command: weight decay on the matrices only, exact resume, a one-line error
for every bad argument before any training starts, two processes under torchrun (DDP), and
Ctrl-C. Most runs call `main()` in this process, on the CPU with one thread, as the command's
subprocesses run; torchrun, Ctrl-C and one bad argument on a real command line need a fresh
process."""

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils.cli.pretrain as pretrain_cli
from utils.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint
from utils.cli.pretrain import build_optimizer, main
from utils.core.paths import REPO_ROOT
from utils.train import format_log_line

TINY_RUN = ["--config", "tiny", "--context-length", "32", "--batch-size", "4",
            "--lr", "2e-3", "--eval-freq", "10", "--eval-iter", "2", "--drop-rate", "0.1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m"]


def history(folder: Path) -> list[dict]:
    """The evaluations the run recorded in its checkpoint (chapter 5's records), all so far."""
    return checkpoint_info(folder / "latest.pt")["extra"]["history"]


def fingerprints(log):
    return dict(re.findall(r"rank (\d) weights ([0-9a-f]{16})", log))


@pytest.fixture(scope="module")
def verdict(mirror_dir):
    return str(mirror_dir / "the-verdict.txt")


# --- in this process --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrain(mirror_dir, tmp_path_factory):
    """Run the command in this process, as its subprocesses run: offline, on the CPU, with one
    thread; returns what it printed. This process's threads and random state are restored."""
    threads, rng_state = torch.get_num_threads(), torch.get_rng_state()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
        patch.setenv("LLM_COURSE_OFFLINE", "1")
        patch.setenv("LLM_COURSE_DATA", str(tmp_path_factory.mktemp("data")))
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # one process, not under torchrun
            patch.delenv(name, raising=False)
        patch.setattr(torch.cuda, "is_available", lambda: False)  # CUDA_VISIBLE_DEVICES=""
        patch.setenv("LLM_COURSE_DEVICE", "cpu")  # also on a Mac, whose Apple GPU it would use
        patch.setattr(pretrain_cli, "keep_freed_memory", lambda: True)  # pytest's malloc as is
        torch.set_num_threads(1)  # OMP_NUM_THREADS=1

        def run(*args: str) -> str:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert main([str(a) for a in args]) == 0
            return printed.getvalue()

        try:
            yield run
        finally:
            torch.set_num_threads(threads)
            torch.set_rng_state(rng_state)


@pytest.fixture(scope="module")
def one_epoch(pretrain, verdict, tmp_path_factory) -> Path:
    """The checkpoint folder of a one-epoch run; tests resume from a copy of it."""
    out = tmp_path_factory.mktemp("one_epoch")
    pretrain("--data", verdict, "--epochs", "1", "--out", out, *TINY_RUN)
    return out


@pytest.fixture(scope="module")
def two_epochs(pretrain, verdict, tmp_path_factory) -> tuple[str, Path]:
    """What an uninterrupted two-epoch run printed (with its weights' fingerprint), and its
    checkpoint folder."""
    out = tmp_path_factory.mktemp("two_epochs")
    printed = pretrain("--data", verdict, "--epochs", "2", "--out", out, "--check-sync",
                       *TINY_RUN)
    return printed, out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "run"))


def steps_done(folder: Path) -> int:
    return checkpoint_info(folder / "latest.pt")["extra"]["step"]


def assert_decays_matrices_only(model, optimizer, weight_decay):
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    in_groups = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in model.parameters())  # each exactly once
    decayed = set()
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            assert groups[id(p)]["weight_decay"] == weight_decay, name
            decayed.add(name)
        else:
            assert groups[id(p)]["weight_decay"] == 0.0, name
            assert name.endswith((".bias", ".scale", ".shift")), name  # biases, LayerNorms
    assert {"tok_emb.weight", "pos_emb.weight", "out_head.weight",
            "trf_blocks.0.att.W_query.weight", "trf_blocks.1.ff.layers.2.weight"} <= decayed


def test_weight_decay_reaches_the_matrices_only_also_when_resume_changes_it(
        pretrain, verdict, one_epoch, tmp_path, monkeypatch):
    built = []

    def remember(model, lr, weight_decay):
        built.append((model, build_optimizer(model, lr, weight_decay)))
        return built[-1][1]

    monkeypatch.setattr(pretrain_cli, "build_optimizer", remember)
    pretrain("--data", verdict, "--out", tmp_path / "fresh", *TINY_RUN, "--max-steps", "1",
             "--weight-decay", "0.2")
    assert_decays_matrices_only(*built[-1], weight_decay=0.2)
    out = copy_of(one_epoch, tmp_path)  # saved with the default --weight-decay 0.1
    pretrain("--data", verdict, "--out", out, *TINY_RUN, "--epochs", "2", "--resume",
             "--max-steps", steps_done(out) + 1, "--weight-decay", "0.3", "--lr", "1e-4")
    model, optimizer = built[-1]
    assert_decays_matrices_only(model, optimizer, weight_decay=0.3)
    saved = torch.load(out / "latest.pt", weights_only=True)
    assert [g["weight_decay"] for g in saved["optimizer"]["param_groups"]] == [0.3, 0.0]
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == [1e-4, 1e-4]
    assert saved["extra"]["settings"]["lr"] == 1e-4
    assert saved["extra"]["settings"]["weight_decay"] == 0.3


@pytest.mark.parametrize("stop", ["epoch boundary", "middle of an epoch"])
def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(pretrain, verdict, one_epoch,
                                                                   two_epochs, tmp_path, stop):
    out = copy_of(one_epoch, tmp_path)  # stopped after epoch 1
    run = ["--data", verdict, "--out", out, *TINY_RUN, "--epochs", "2", "--check-sync"]
    if stop == "middle of an epoch":  # resumed, and stopped again 10 batches into epoch 2
        pretrain(*run, "--resume", "--max-steps", steps_done(out) + 10)
        extra = checkpoint_info(out / "latest.pt")["extra"]
        assert (extra["epoch"], extra["batch_in_epoch"]) == (1, 10)
    resumed = pretrain(*run, "--resume")
    assert "resuming from" in resumed
    whole_log, whole = two_epochs
    assert fingerprints(resumed)["0"] == fingerprints(whole_log)["0"]  # bit for bit
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert strip(history(out)) == strip(history(whole))  # every evaluation, resumed or not
    logged = [line for line in resumed.splitlines() if line.startswith("Ep ")]
    assert logged == [format_log_line(r) for r in history(out)][-len(logged):]


def test_one_process_trains_on_the_apple_gpu_and_several_on_the_cpu(monkeypatch):
    monkeypatch.delenv("LLM_COURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("utils.core.device._mps_available", lambda: True)  # a Mac, PyTorch 2.9+
    monkeypatch.setattr(torch, "__version__", "2.9.0")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert pretrain_cli._setup_distributed() == (0, 1, torch.device("mps"))
    started = []  # under torchrun: Gloo on the CPU, as no backend reduces MPS tensors
    monkeypatch.setattr(pretrain_cli.dist, "init_process_group", lambda **kw: started.append(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pretrain_cli._setup_distributed() == (1, 2, torch.device("cpu"))
    assert started == [{"backend": "gloo"}]


def test_a_resume_on_the_apple_gpu_restores_its_random_numbers(monkeypatch):
    saved, restored = torch.tensor([7, 1, 3], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda *a: saved)  # dropout draws on MPS
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, *a: restored.append(state))
    (state,) = pretrain_cli._rng_states(1, torch.device("mps"))
    assert torch.equal(state["mps"], saved) and torch.equal(state["cpu"], torch.get_rng_state())
    pretrain_cli._set_rng_state(state, torch.device("cpu"))  # resumed on the CPU: not needed
    assert restored == []
    pretrain_cli._set_rng_state(state, torch.device("mps"))
    assert len(restored) == 1 and torch.equal(restored[0], saved)


# --- bad arguments: one line, before any work -------------------------------------------------

BAD_ARGUMENTS = {
    "--eval-freq 0": (["--eval-freq", "0"], "--eval-freq must be at least 1"),
    "--batch-size 0": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "--epochs 0": (["--epochs", "0"], "--epochs must be at least 1"),
    "--max-steps 0": (["--max-steps", "0"], "--max-steps must be at least 1"),
    "--lr -1": (["--lr", "-1"], "--lr must be a positive number"),
    "--lr nan": (["--lr", "nan"], "--lr must be a positive number"),
    "--weight-decay -0.1": (["--weight-decay", "-0.1"], "--weight-decay must be 0 or more"),
    "--save-every -2": (["--save-every", "-2"], "--save-every must be 0"),
    "--drop-rate 1.5": (["--drop-rate", "1.5"], "--drop-rate must be in"),
    "--context-length 65": (["--context-length", "65"], "longer than the tiny config's 64"),
    "unwritable --out": (["--out", "/proc/no-such-folder"], "cannot write checkpoints to"),
    "--resume without a checkpoint": (["--resume"], "no checkpoint at"),
    "missing --data": (["--data", "/no/such/file.txt"], "no file or folder at"),
    "latin-1 --data": (["--data", "{latin1}"], "latin1.txt is not UTF-8 text (byte 3 is 0xe9)"),
    "too short --data": (["--data", "{short}"], "one input/target window needs"),
}


def refuse_to_work(monkeypatch):
    """Make building the model and optimizer (the start of any work) fail the test."""
    def work(*args, **kwargs):
        raise AssertionError("the command started work before finding the bad argument")

    monkeypatch.setattr(pretrain_cli, "_Run", work)


def usage_error(pretrain, *args) -> str:
    """The one line a refused command ends with (Python prints it to stderr, status 1)."""
    with pytest.raises(SystemExit) as stop:
        pretrain(*args)
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    return message


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_one_line_errors_before_any_work(case, pretrain, verdict, tmp_path,
                                                           monkeypatch, capsys):
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait. ".encode("latin-1") * 50)
    (tmp_path / "short.txt").write_text("Far too short to train on.")
    extra, expected = BAD_ARGUMENTS[case]
    extra = [a.format(latin1=tmp_path / "latin1.txt", short=tmp_path / "short.txt")
             for a in extra]
    refuse_to_work(monkeypatch)
    message = usage_error(pretrain, "--data", verdict, "--out", tmp_path / "out", *TINY_RUN,
                          *extra)
    assert expected in message, message
    assert not (tmp_path / "out" / "latest.pt").exists()  # no checkpoint written


@pytest.mark.parametrize("change, expected", [
    (["--epochs", "2", "--batch-size", "2"], "batch_size (saved 4, now 2)"),
    (["--epochs", "2", "--config", "gpt2-small"], "config (saved 'tiny', now 'gpt2-small')"),
    (["--epochs", "2", "--seed", "7"], "seed (saved 123, now 7)"),
    (["--epochs", "2", "--data", "{other}"], "another training text (--data)"),
    (["--epochs", "2", "--max-steps", "3"], "has already trained 36 step(s)"),
    (["--epochs", "1"], "has already trained 1 epoch(s)")])
def test_a_resume_that_cannot_continue_is_refused_before_any_work(change, expected, pretrain,
                                                                  verdict, one_epoch, tmp_path,
                                                                  monkeypatch):
    out = copy_of(one_epoch, tmp_path)
    saved = (out / "latest.pt").read_bytes()
    other = tmp_path / "other.txt"  # the same length, another text
    other.write_text(Path(verdict).read_text(encoding="utf-8")[::-1], encoding="utf-8")
    refuse_to_work(monkeypatch)
    message = usage_error(pretrain, "--data", verdict, "--out", out, *TINY_RUN, "--resume",
                          *[a.format(other=other) for a in change])
    assert expected in message, message
    assert (out / "latest.pt").read_bytes() == saved  # the checkpoint left as it was


def test_a_checkpoint_whose_optimizer_does_not_fit_is_refused_in_one_line(pretrain, verdict,
                                                                          one_epoch, tmp_path):
    out = copy_of(one_epoch, tmp_path)
    info = checkpoint_info(out / "latest.pt")
    model = load_checkpoint(out / "latest.pt")
    one_group = torch.optim.AdamW(model.parameters())  # as saved before the decay groups
    save_checkpoint(out / "latest.pt", model, one_group, **info["extra"])
    message = usage_error(pretrain, "--data", verdict, "--out", out, *TINY_RUN, "--resume",
                          "--epochs", "2")
    assert "cannot resume" in message and "optimizer state does not fit" in message
    assert "start afresh with another --out" in message.lower()


def test_a_new_run_never_replaces_an_earlier_one(pretrain, verdict, one_epoch, tmp_path,
                                                 monkeypatch):
    out = copy_of(one_epoch, tmp_path)
    saved = (out / "latest.pt").read_bytes()
    refuse_to_work(monkeypatch)
    message = usage_error(pretrain, "--data", verdict, "--out", out, *TINY_RUN)  # no --resume
    assert "already holds a run (epoch 1, step 36)" in message
    assert "continue it with --resume, or start a new run in another folder with --out" in message
    assert (out / "latest.pt").read_bytes() == saved


@pytest.mark.parametrize("where", ["resumed run", "new run"])
def test_a_diverging_run_stops_keeps_the_last_good_checkpoint_and_fails(
        where, pretrain, verdict, one_epoch, tmp_path, capsys):
    out = copy_of(one_epoch, tmp_path) if where == "resumed run" else tmp_path / "new"
    saved = (out / "latest.pt").read_bytes() if where == "resumed run" else None
    resume = ["--resume"] if where == "resumed run" else []
    status = main([str(a) for a in ["--data", verdict, "--out", out, *TINY_RUN, "--epochs", "3",
                                    *resume, "--lr", "1e30"]])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("error: the ") and err.count("\n") == 1, err
    assert "so the run stopped without saving" in err and "with a lower --lr" in err
    if saved is None:
        assert "Last good checkpoint: none saved yet" in err and not out.joinpath("latest.pt").exists()
    else:
        assert f"Last good checkpoint: {out / 'latest.pt'} (epoch 1, step 36)" in err
        assert (out / "latest.pt").read_bytes() == saved  # the good checkpoint, untouched


def test_a_checkpoint_without_a_training_position_is_refused_in_one_line(
        pretrain, verdict, one_epoch, tmp_path, monkeypatch):
    out = copy_of(one_epoch, tmp_path)
    save_checkpoint(out / "latest.pt", load_checkpoint(out / "latest.pt"))  # as chapter 5 saves
    refuse_to_work(monkeypatch)
    message = usage_error(pretrain, "--data", verdict, "--out", out, *TINY_RUN, "--resume",
                          "--epochs", "2")
    assert "holds no training position (epoch, step, batch_in_epoch" in message
    assert "start afresh with another --out" in message


def test_a_mid_epoch_position_beyond_the_data_is_refused_in_one_line(
        pretrain, verdict, one_epoch, tmp_path, monkeypatch):
    out = copy_of(one_epoch, tmp_path)
    info = checkpoint_info(out / "latest.pt")
    extra = {**info["extra"], "batch_in_epoch": 10}  # stopped 10 batches into epoch 2 ...
    extra["settings"] = {k: v for k, v in extra["settings"].items() if k != "data_sha256"}
    model = load_checkpoint(out / "latest.pt")  # ... by a version that kept no data digest
    save_checkpoint(out / "latest.pt", model, build_optimizer(model, 2e-3, 0.1), **extra)
    short = tmp_path / "short.txt"  # a fifth of the story: 7 batches per epoch
    short.write_text(Path(verdict).read_text(encoding="utf-8")[:4000], encoding="utf-8")
    refuse_to_work(monkeypatch)
    message = usage_error(pretrain, "--data", short, "--out", out, *TINY_RUN, "--resume",
                          "--epochs", "2")
    assert "stopped after batch 10 of an epoch, but this data gives only" in message


# --- fresh processes --------------------------------------------------------------------------

def command_line(args, tmp_path, mirror_dir, launcher=(sys.executable, "-m"), **popen):
    """`python -m utils.cli.pretrain ARGS` (or under torchrun), offline, CPU, one thread."""
    env = {**os.environ, "LLM_COURSE_MIRROR": str(mirror_dir), "LLM_COURSE_OFFLINE": "1",
           "LLM_COURSE_DATA": str(tmp_path / "data"), "CUDA_VISIBLE_DEVICES": "",
           "LLM_COURSE_DEVICE": "cpu",  # one process would use a Mac's Apple GPU
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [*launcher, "utils.cli.pretrain", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, text=True, **popen)
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, text=True, capture_output=True,
                          timeout=300)


def test_a_bad_argument_on_the_command_line_prints_one_line(tmp_path, mirror_dir, verdict):
    result = command_line(["--data", verdict, "--out", tmp_path / "out", *TINY_RUN,
                           "--lr", "0"], tmp_path, mirror_dir)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "error: --lr must be a positive number, got 0.0\n"


def test_two_processes_stay_in_sync_learn_and_resume_exactly(tmp_path, mirror_dir, verdict):
    def torchrun(*args):
        result = command_line(["--data", verdict, "--check-sync", *TINY_RUN, *args], tmp_path,
                              mirror_dir, launcher=TORCHRUN)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    whole = torchrun("--epochs", "2", "--out", tmp_path / "whole")
    assert "2 process(es) on cpu" in whole
    prints = fingerprints(whole)
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"]  # replicas stay identical
    evaluations = history(tmp_path / "whole")
    assert evaluations[-1]["train_loss"] < evaluations[0]["train_loss"] - 1.0, whole  # learns
    states = checkpoint_info(tmp_path / "whole" / "latest.pt")["extra"]["rng_states"]
    assert len(states) == 2  # each rank draws its own dropout masks, so their states differ
    assert not (states[0]["cpu"] == states[1]["cpu"]).all()
    torchrun("--epochs", "2", "--max-steps", "20", "--out", tmp_path / "part")  # mid-epoch 2
    resumed = torchrun("--epochs", "2", "--resume", "--out", tmp_path / "part")
    assert fingerprints(resumed) == prints  # bit for bit, on both ranks


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, a POSIX signal")
def test_ctrl_c_says_where_the_last_checkpoint_is(tmp_path, mirror_dir, verdict):
    proc = command_line(
        ["--data", verdict, "--config", "tiny", "--context-length", "32", "--batch-size", "4",
         "--epochs", "500", "--save-every", "5", "--eval-freq", "5", "--out", tmp_path / "run"],
        tmp_path, mirror_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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


def test_float16_scales_the_loss_and_a_resume_keeps_the_scale(pretrain, verdict, tmp_path):
    """--precision fp16 (what `auto` picks on a T4) runs here too, emulated on the CPU."""
    out = tmp_path / "fp16"
    run = ["--data", verdict, "--out", out, *TINY_RUN, "--epochs", "2", "--precision", "fp16"]
    printed = pretrain(*run, "--max-steps", "12")
    assert "precision: float16 autocast with loss scaling (as asked" in printed
    first = checkpoint_info(out / "latest.pt")["extra"]["grad_scaler"]
    pretrain(*run, "--resume", "--max-steps", "24")
    second = checkpoint_info(out / "latest.pt")["extra"]["grad_scaler"]
    assert 0 < second["scale"] <= first["scale"] <= 2.0 ** 16
    if second["scale"] == first["scale"]:  # no overflow since: 12 more clean steps counted on
        assert second["_growth_tracker"] == first["_growth_tracker"] + 12
    records = history(out)
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns
