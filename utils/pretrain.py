"""Pretraining from the command line, on one process or many (hand-written entry point).

The chapter-5 training loop (`utils.train`) as a command that trains `GPTModel` on a text
file or a folder of `.txt` files, saves a checkpoint after every epoch, and resumes from it.
Launched with `torchrun`, every process trains a replica on its own shard of the batches
(`DistributedSampler`) and `DistributedDataParallel` averages the gradients, so all replicas
stay identical; the backend is NCCL on CUDA GPUs and Gloo on CPUs.

    python -m utils.pretrain --data data/the-verdict.txt --epochs 10
    torchrun --standalone --nproc_per_node=2 -m utils.pretrain --data corpus/ --config tiny
    python -m utils.pretrain --data data/the-verdict.txt --resume   # continue the last run
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from utils.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint
from utils.model import GPT2_PRESETS, GPT_TINY, GPTModel
from utils.paths import checkpoint_dir
from utils.text import GPTDatasetV1, get_gpt2_tokenizer
from utils.train import calc_loss_batch, evaluate_model

__all__ = ["main", "read_corpus", "CONFIGS"]

CONFIGS = {"tiny": GPT_TINY, **{name.split(" ")[0]: cfg for name, cfg in GPT2_PRESETS.items()}}


def read_corpus(path: Path) -> str:
    """One text from a file, or from every .txt file of a folder joined by <|endoftext|>."""
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise SystemExit(f"error: the folder {path} holds no .txt files")
        return " <|endoftext|> ".join(f.read_text(encoding="utf-8") for f in files)
    if not path.is_file():
        raise SystemExit(f"error: no file or folder at {path}")
    return path.read_text(encoding="utf-8")


def _setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
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
        raise SystemExit(f"error: {exc} (use a longer text or --context-length)") from exc
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    train = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    val = DataLoader(val_ds, batch_size=args.batch_size, shuffle=False)
    if len(train) == 0:
        raise SystemExit(f"error: {len(train_ds)} training windows are too few for "
                         f"{world} process(es) x batch size {args.batch_size}")
    return train, val, sampler


def _fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a .txt file or a folder of them")
    p.add_argument("--config", choices=sorted(CONFIGS), default="gpt2-small")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2, help="per process")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-freq", type=int, default=5, help="steps between evaluations")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--out", type=Path, default=None, help="checkpoint folder "
                   "(default: checkpoints/pretrain)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest.pt")
    p.add_argument("--check-sync", action="store_true",
                   help="print every process's weight fingerprint at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rank, world, device = _setup_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    out = args.out or checkpoint_dir() / "pretrain"
    latest = out / "latest.pt"
    cfg = dataclasses.replace(CONFIGS[args.config], context_length=args.context_length)

    torch.manual_seed(args.seed)  # same initial weights in every process
    model = GPTModel(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start_epoch, step, tokens_seen = 0, 0, 0
    if args.resume:
        if not latest.is_file():
            raise SystemExit(f"error: --resume given but there is no checkpoint at {latest}")
        load_checkpoint(latest, model=model, optimizer=optimizer, device=device)
        extra = checkpoint_info(latest)["extra"]
        start_epoch, step, tokens_seen = extra["epoch"], extra["step"], extra["tokens_seen"]
        say(f"resuming from {latest}: epoch {start_epoch}, step {step}")
    train_loader, val_loader, sampler = _loaders(read_corpus(args.data), args, rank, world)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                  else None) if world > 1 else model
    say(f"{args.config}, context {cfg.context_length}: {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; {world} process(es) on {device.type}; {len(train_loader)} steps per epoch")

    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same in every process
        ddp.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, ddp, device)
            loss.backward()  # DDP averages the gradients across processes here
            optimizer.step()
            tokens_seen += input_batch.numel() * world
            if step % args.eval_freq == 0 and rank == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device,
                                                      args.eval_iter)
                say(f"Ep {epoch + 1} (Step {step:06d}): Train loss {train_loss:.3f}, "
                    f"Val loss {val_loss:.3f}, tokens seen {tokens_seen:,}", flush=True)
            step += 1
        if rank == 0:
            save_checkpoint(latest, model, optimizer, epoch=epoch + 1, step=step,
                            tokens_seen=tokens_seen)
        if world > 1:
            dist.barrier()  # nobody races ahead of the checkpoint
    if rank == 0:
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device,
                                              args.eval_iter)
        say(f"final: Train loss {train_loss:.3f}, Val loss {val_loss:.3f}; "
            f"{time.time() - start:.1f} s; checkpoint {latest}")
    if args.check_sync:
        print(f"rank {rank} weights {_fingerprint(model)}", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
