"""Pretraining from the command line, on one process or many (hand-written command).

Chapter 5's model, loss and evaluation (`utils.model`, `utils.train`) as a command that trains
`GPTModel` on a text file or a folder of `.txt` files, with chapter 8's fast paths (fused
kernels, fused AdamW, the fused cross-entropy, the number format `choose_precision` picks
(bfloat16 autocast where it is native, float16 with loss scaling on GPUs such as Colab's T4,
else float32; printed in one line), and on a Linux CPU the allocator told to keep freed
memory). It saves `OUT/latest.pt` after
every epoch (and every `--save-every` steps), and `--resume` continues from it exactly: the
weights, the optimizer, the data order and the random number generators are all restored, so
an interrupted and resumed run ends with the same weights as an uninterrupted one. Every
evaluation is printed as chapter 5's log line and kept as one of its `TrainingHistory`
records, which the checkpoint carries (`checkpoint_info(path)["extra"]["history"]`) and a
resumed run continues; read those rather than the printed lines. The optimizer decays the
weight matrices only (embeddings included), not biases and LayerNorm parameters.

One process trains where `utils.core.device.get_device` says: an NVIDIA GPU, else an Apple
GPU (MPS, with PyTorch 2.9 or later), else the CPU; `LLM_COURSE_DEVICE=cpu` chooses by hand.
Launched with `torchrun`, every process trains a replica on its own shard of the batches
(`DistributedSampler`) and `DistributedDataParallel` averages the gradients, so all replicas
stay identical; each process draws its own dropout masks. The backend is NCCL on CUDA GPUs
and Gloo on CPUs; without CUDA the processes train on the CPU, since no backend of
`torch.distributed` takes tensors on an Apple GPU.

    python -m utils.cli.pretrain --data data/the-verdict.txt --epochs 10
    python -m utils.cli.pretrain --data data/the-verdict.txt --epochs 20 --resume
    torchrun --standalone --nproc_per_node=2 -m utils.cli.pretrain --data corpus/ --config tiny

Every argument is checked before any work starts; a bad one ends the command with one line
that says what is wrong. Nothing saved is lost: a folder that already holds a run is refused
unless `--resume` continues it, a resume checks that the data, seed and settings are the
saved ones, and a run whose loss becomes NaN or infinite stops without saving, keeping the
last good checkpoint, and exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from utils.checkpoint import CheckpointError, checkpoint_info, load_checkpoint, save_checkpoint
from utils.core.device import get_device
from utils.core.paths import checkpoint_dir
from utils.fast import (choose_precision, fast_loss_batch, fused_adamw, keep_freed_memory,
                        set_impl)
from utils.model import GPT2_PRESETS, GPT_TINY, GPTModel
from utils.text import GPTDatasetV1, get_gpt2_tokenizer
from utils.train import TrainingHistory, evaluate_model

__all__ = ["main", "read_corpus", "build_optimizer", "CONFIGS"]

CONFIGS = {"tiny": GPT_TINY, **{name.split(" ")[0]: cfg for name, cfg in GPT2_PRESETS.items()}}
_MUST_MATCH_ON_RESUME = ["config", "context_length", "batch_size", "world_size", "drop_rate",
                         "seed", "data_sha256"]
# what a checkpoint of this command records about the training position, with its types
_POSITION = {"epoch": int, "step": int, "batch_in_epoch": int, "tokens_seen": int,
             "settings": dict, "history": list, "rng_states": list}


class UsageError(SystemExit):
    """A bad argument or input: the command stops with one line, before any work."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


class TrainingDiverged(Exception):
    """The loss or the weights stopped being finite numbers; nothing after that is saved."""


def read_corpus(path: Path) -> str:
    """One text from a file, or from every .txt file of a folder joined by <|endoftext|>."""
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UsageError(f"the folder {path} holds no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise UsageError(f"no file or folder at {path}")
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise UsageError(f"{file} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                             f"convert it first, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`") from exc
        except OSError as exc:
            raise UsageError(f"cannot read {file}: {exc.strerror}") from exc
    return " <|endoftext|> ".join(texts)


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m utils.cli.pretrain",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a .txt file or a folder of them")
    p.add_argument("--config", choices=sorted(CONFIGS), default="gpt2-small")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--drop-rate", type=float, default=None, help="dropout (default: the config's)")
    p.add_argument("--epochs", type=int, default=10, help="total epochs, counting resumed ones")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (and save) after this many optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=2, help="per process")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW's, on weight matrices and embeddings (not biases or LayerNorms)")
    p.add_argument("--eval-freq", type=int, default=5, help="steps between evaluations")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation")
    p.add_argument("--save-every", type=int, default=0,
                   help="also save every N steps (0: only after each epoch)")
    p.add_argument("--impl", choices=["teaching", "fast"], default="fast",
                   help="chapter 3-4 modules, or chapter 8's fused ones (same weights)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="number format: auto picks bfloat16 autocast where native, float16 "
                        "with loss scaling on GPUs with fast float16 only (T4, V100), else "
                        "float32")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--out", type=Path, default=None,
                   help="checkpoint folder (default: checkpoints/pretrain)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest.pt")
    p.add_argument("--check-sync", action="store_true",
                   help="print every process's weight fingerprint at the end")
    return p.parse_args(argv)


def _check_numbers(args) -> None:
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size,
                "--context-length": args.context_length, "--eval-freq": args.eval_freq,
                "--eval-iter": args.eval_iter}
    if args.max_steps is not None:
        positive["--max-steps"] = args.max_steps
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.save_every < 0:
        raise UsageError(f"--save-every must be 0 (off) or a number of steps, got {args.save_every}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be 0 or more, got {args.weight_decay}")
    if args.drop_rate is not None and not 0.0 <= args.drop_rate < 1.0:
        raise UsageError(f"--drop-rate must be in [0, 1), got {args.drop_rate}")
    longest = CONFIGS[args.config].context_length
    if args.context_length > longest and args.config == "tiny":
        raise UsageError(f"--context-length {args.context_length} is longer than the tiny "
                         f"config's {longest}")


def _check_out_folder(out: Path) -> None:
    """The checkpoint folder exists (or can be made) and takes a file, before any training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write checkpoints to {out} ({exc.strerror}); pick another "
                         f"folder with --out") from exc


def _settings(args, world: int, data_sha256: str) -> dict:
    return {"config": args.config, "context_length": args.context_length,
            "batch_size": args.batch_size, "world_size": world,
            "drop_rate": _model_config(args).drop_rate, "lr": args.lr,
            "weight_decay": args.weight_decay, "seed": args.seed, "data_sha256": data_sha256}


def _text_sha256(text: str) -> str:
    """Which training text a run used: a resume on another text would skip the wrong batches."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_new_run(latest: Path) -> None:
    """A run without --resume never replaces the checkpoint of an earlier one."""
    if not latest.exists():
        return
    try:
        extra = checkpoint_info(latest)["extra"]
        what = f"a run (epoch {extra.get('epoch', '?')}, step {extra.get('step', '?')})"
    except (CheckpointError, OSError):
        what = "a checkpoint"
    raise UsageError(f"{latest} already holds {what}; continue it with --resume, or start a "
                     f"new run in another folder with --out")


def _model_config(args):
    cfg = dataclasses.replace(CONFIGS[args.config], context_length=args.context_length)
    if args.drop_rate is not None:
        cfg = dataclasses.replace(cfg, drop_rate=args.drop_rate)
    return cfg


def _check_resume(latest: Path, args, world: int, data_sha256: str) -> dict:
    """The saved training state, after checking it can continue with these arguments."""
    if not latest.is_file():
        raise UsageError(f"--resume given but there is no checkpoint at {latest}")
    try:
        extra = checkpoint_info(latest)["extra"]
    except (CheckpointError, FileNotFoundError) as exc:
        raise UsageError(f"cannot resume: {exc}") from exc
    missing = [key for key, kind in _POSITION.items()
               if not isinstance(extra.get(key), kind) or isinstance(extra.get(key), bool)]
    if missing:
        raise UsageError(f"cannot resume {latest}: it holds no training position ("
                         f"{', '.join(missing)} missing), so this command did not write it "
                         f"(chapter 5's and 7's checkpoints are not resumable here); start "
                         f"afresh with another --out")
    saved = extra["settings"]
    wanted = _settings(args, world, data_sha256)
    clashes = ["another training text (--data)" if key == "data_sha256"
               else f"{key} (saved {saved[key]!r}, now {wanted[key]!r})"
               for key in _MUST_MATCH_ON_RESUME if key in saved and saved[key] != wanted[key]]
    if clashes:
        raise UsageError(f"cannot resume {latest} with different " + ", ".join(clashes) +
                         "; use the saved values, or start afresh with another --out")
    if extra["epoch"] >= args.epochs and not extra["batch_in_epoch"]:
        raise UsageError(f"{latest} has already trained {extra['epoch']} epoch(s); ask for "
                         f"more with --epochs (counting those)")
    if args.max_steps is not None and extra["step"] >= args.max_steps:
        raise UsageError(f"{latest} has already trained {extra['step']} step(s); ask for more "
                         f"with --max-steps (counting those)")
    return extra


def _choose_device(world: int, local_rank: int) -> torch.device:
    """One process: where get_device says (CUDA, else MPS, else the CPU, or
    $LLM_COURSE_DEVICE). Several: each process its own CUDA GPU, else the CPU (NCCL and Gloo
    reduce CUDA and CPU tensors; no backend takes MPS tensors)."""
    if world == 1:
        return get_device(verbose=False)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = _choose_device(world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return int(os.environ.get("RANK", "0")), world, device


def _loaders(text: str, args, rank: int, world: int):
    split = int(0.9 * len(text))  # the chapter-5 split: 90% of the characters train
    tokenizer = get_gpt2_tokenizer()
    ctx = args.context_length
    try:
        train_ds = GPTDatasetV1(text[:split], tokenizer, ctx, ctx)
        val_ds = GPTDatasetV1(text[split:], tokenizer, ctx, ctx)
    except ValueError as exc:
        raise UsageError(f"{exc} (use a longer text or a smaller --context-length)") from exc
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    train = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    val = DataLoader(val_ds, batch_size=args.batch_size, shuffle=False)
    if len(train) == 0:
        raise UsageError(f"{len(train_ds)} training windows are too few for {world} "
                         f"process(es) x batch size {args.batch_size}")
    return train, val, sampler


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Fused AdamW in two groups: matrices and embeddings decayed, biases and norms not."""
    params = [p for p in model.parameters() if p.requires_grad]
    # decay matrices only (GPT-2, nanoGPT): shrinking biases and LayerNorm scales/shifts only hurts
    decayed = [p for p in params if p.dim() >= 2]
    not_decayed = [p for p in params if p.dim() < 2]
    return fused_adamw([{"params": decayed, "weight_decay": weight_decay},
                        {"params": not_decayed, "weight_decay": 0.0}], lr=lr)


def _fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _rng_states(world: int, device: torch.device) -> list[dict]:
    """Every process's CPU random number generator state, and its GPU's (CUDA or MPS: dropout
    on a GPU draws from the GPU's), gathered on all ranks."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "mps" in state and device.type == "mps":  # saved on an Apple GPU, resumed on one
        torch.mps.set_rng_state(state["mps"])


class _Run:
    """The model, optimizer and position of one training run, and how to save them."""

    def __init__(self, args, rank: int, world: int, device: torch.device, latest: Path,
                 data_sha256: str):
        self.args, self.rank, self.world, self.device, self.latest = args, rank, world, device, latest
        self.data_sha256 = data_sha256
        torch.manual_seed(args.seed)  # the same initial weights in every process
        self.model = GPTModel(_model_config(args)).to(device)
        if args.impl == "fast":
            set_impl(self.model, "fast")
        self.precision = choose_precision(device, args.precision)
        self.scaler = self.precision.grad_scaler(device.type)  # float16 only; else a no-op
        self.optimizer = build_optimizer(self.model, args.lr, args.weight_decay)
        torch.manual_seed(args.seed + rank)  # each process draws its own dropout masks
        self.epoch, self.batch_in_epoch, self.step, self.tokens_seen = 0, 0, 0, 0
        self.rng_state = None  # restored once the data position is reached
        self.history = TrainingHistory()  # chapter 5's records and log line (rank 0 logs)

    def resume(self, extra: dict) -> None:
        try:
            load_checkpoint(self.latest, model=self.model, optimizer=self.optimizer,
                            device=self.device)
        except CheckpointError as exc:  # e.g. saved when every parameter was in one group
            raise UsageError(f"cannot resume: {exc} Start afresh with another --out.") from exc
        decayed, not_decayed = self.optimizer.param_groups
        for group in (decayed, not_decayed):  # honour --lr / --weight-decay if changed
            group["lr"] = self.args.lr
        decayed["weight_decay"] = self.args.weight_decay
        self.epoch, self.step = extra["epoch"], extra["step"]
        self.batch_in_epoch, self.tokens_seen = extra.get("batch_in_epoch", 0), extra["tokens_seen"]
        states = extra.get("rng_states", [])
        self.rng_state = states[self.rank] if len(states) == self.world else None
        self.history.records = list(extra.get("history", []))  # the run goes on
        if self.precision.loss_scaling and "grad_scaler" in extra:
            self.scaler.load_state_dict(extra["grad_scaler"])  # the loss scale reached

    def autocast(self):
        return self.precision.autocast(self.device.type)

    def save(self) -> None:
        states = _rng_states(self.world, self.device)  # collective: every rank takes part
        if self.rank == 0:
            save_checkpoint(self.latest, self.model, self.optimizer, epoch=self.epoch,
                            batch_in_epoch=self.batch_in_epoch, step=self.step,
                            tokens_seen=self.tokens_seen, rng_states=states,
                            settings=_settings(self.args, self.world, self.data_sha256),
                            history=self.history.records,
                            **({"grad_scaler": self.scaler.state_dict()}
                               if self.precision.loss_scaling else {}))
        if self.world > 1:
            dist.barrier()  # nobody races ahead of the checkpoint


def _everywhere(ok: bool, run: _Run) -> bool:
    """True if `ok` holds in every process (one tiny all-reduce under torchrun)."""
    if run.world == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=run.device)  # NCCL reduces GPU tensors
    dist.all_reduce(flag)
    return flag.item() == 0.0


def _check_loss(run: _Run, loss: torch.Tensor, epoch: int) -> None:
    """Stop before the optimizer step once any process's loss is NaN or infinite."""
    value = loss.item()
    if not _everywhere(math.isfinite(value), run):
        shown = value if not math.isfinite(value) else "not finite in another process"
        raise TrainingDiverged(f"the training loss became {shown} at step {run.step} "
                               f"(epoch {epoch + 1})")


def _check_weights(run: _Run, batch, epoch: int) -> None:
    """Before a save: finite weights that give a finite loss on the last batch."""
    healthy = all(bool(torch.isfinite(p).all()) for p in run.model.parameters())
    if healthy:
        run.model.eval()  # no dropout, so the random number generators are left as they are
        with torch.no_grad(), run.autocast():
            healthy = math.isfinite(fast_loss_batch(*batch, run.model, run.device).item())
        run.model.train()
    if not _everywhere(healthy, run):
        raise TrainingDiverged(f"the weights stopped giving a finite loss after step "
                               f"{run.step - 1} (epoch {epoch + 1})")


def _train(run: _Run, ddp, train_loader, val_loader, sampler) -> bool:
    """Train up to --epochs (or --max-steps); True if it stopped at --max-steps."""
    args = run.args
    for epoch in range(run.epoch, args.epochs):
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same in every process
        if run.rng_state is not None and run.batch_in_epoch == 0:
            _set_rng_state(run.rng_state, run.device)  # resuming at an epoch boundary
            run.rng_state = None
        batches = iter(train_loader)
        for _ in range(run.batch_in_epoch):  # resuming mid-epoch: skip what was trained
            next(batches)
        if run.rng_state is not None:
            _set_rng_state(run.rng_state, run.device)
            run.rng_state = None
        ddp.train()
        for batch in batches:
            input_batch, target_batch = batch
            run.optimizer.zero_grad()
            with run.autocast():  # float32 unless bfloat16 or float16 was chosen
                loss = fast_loss_batch(input_batch, target_batch, ddp, run.device)  # fused CE
            run.scaler.scale(loss).backward()  # DDP averages the gradients across processes
            _check_loss(run, loss, epoch)  # a diverged run stops here, before the update
            run.scaler.step(run.optimizer)  # float16: skipped if a scaled gradient overflowed
            run.scaler.update()
            run.tokens_seen += input_batch.numel() * run.world
            if run.step % args.eval_freq == 0 and run.rank == 0:
                with run.autocast():
                    train_loss, val_loss = evaluate_model(run.model, train_loader, val_loader,
                                                          run.device, args.eval_iter)
                run.history.log(epoch + 1, run.step, train_loss=train_loss, val_loss=val_loss,
                                tokens_seen=run.tokens_seen)
            run.step += 1
            run.batch_in_epoch += 1
            if args.max_steps is not None and run.step >= args.max_steps:
                _check_weights(run, batch, epoch)
                run.epoch = epoch
                run.save()
                return True
            if args.save_every and run.step % args.save_every == 0:
                _check_weights(run, batch, epoch)
                run.epoch = epoch
                run.save()
        _check_weights(run, batch, epoch)
        run.epoch, run.batch_in_epoch = epoch + 1, 0
        run.save()
    return False


def _last_saved(latest: Path) -> str:
    if not latest.is_file():
        return "none saved yet"
    saved = checkpoint_info(latest)["extra"]
    return f"{latest} (epoch {saved['epoch']}, step {saved['step']})"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _check_numbers(args)
    out = args.out or checkpoint_dir() / "pretrain"
    latest = out / "latest.pt"
    rank, world, device = _setup_distributed()
    if device.type == "cpu":
        keep_freed_memory()  # reuse freed memory rather than fault in fresh pages each step
    say = print if rank == 0 else (lambda *a, **k: None)
    text = read_corpus(args.data)
    data_sha256 = _text_sha256(text)
    if not args.resume:
        _check_new_run(latest)
    extra = _check_resume(latest, args, world, data_sha256) if args.resume else None
    if rank == 0:
        _check_out_folder(out)
    train_loader, val_loader, sampler = _loaders(text, args, rank, world)
    if extra is not None and extra["batch_in_epoch"] >= len(train_loader):
        raise UsageError(f"cannot resume {latest}: it stopped after batch "
                         f"{extra['batch_in_epoch']} of an epoch, but this data gives only "
                         f"{len(train_loader)} batches per epoch; use the saved run's --data")
    run = _Run(args, rank, world, device, latest, data_sha256)
    if extra is not None:
        run.resume(extra)
        say(f"resuming from {latest}: epoch {run.epoch}, step {run.step}")
    ddp = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda"
                                  else None) if world > 1 else run.model
    n_params = sum(p.numel() for p in run.model.parameters())
    say(f"{args.config}, context {args.context_length}: {n_params:,} parameters; {world} "
        f"process(es) on {device.type}; {args.impl} modules; {len(train_loader)} steps per epoch")
    say(f"precision: {run.precision}")
    start = time.time()
    try:
        stopped = _train(run, ddp, train_loader, val_loader, sampler)
    except KeyboardInterrupt:
        say(f"\ninterrupted at step {run.step}. Last checkpoint: {_last_saved(latest)}; "
            f"continue with --resume.", file=sys.stderr, flush=True)
        return 130
    except TrainingDiverged as exc:
        say(f"error: {exc}, so the run stopped without saving. Last good checkpoint: "
            f"{_last_saved(latest)}; resume it with a lower --lr.", file=sys.stderr, flush=True)
        if world > 1:
            dist.destroy_process_group()
        return 1
    if rank == 0:
        train_loss, val_loss = evaluate_model(run.model, train_loader, val_loader, device,
                                              args.eval_iter)
        why = f"stopped at --max-steps {args.max_steps}" if stopped else "done"
        say(f"{why}: Train loss {train_loss:.3f}, Val loss {val_loss:.3f}; "
            f"{time.time() - start:.1f} s; checkpoint {latest}")
    if args.check_sync:
        print(f"rank {rank} weights {_fingerprint(run.model)}", flush=True)
    if world > 1:
        dist.barrier()  # Gloo can abort at exit if a process leaves while another still talks
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without Python's teardown: after a distributed run, PyTorch's Gloo backend can
    # abort (SIGABRT) there at random, failing a run that has finished and saved.
    os._exit(code)
