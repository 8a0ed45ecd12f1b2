"""Saving and loading GPT checkpoints safely (hand-written; notebooks/05_pretraining.ipynb,
section 5.4, shows what it adds to a plain `torch.save` and how to use it).

A course checkpoint is one `torch.save` file holding the model's state, optionally the
optimizer's, the model configuration, free-form metadata (epoch, step, ...), a sha256
digest of every tensor and one digest of everything in the file (keys, numbers, strings and
the tensors' digests). What can go wrong, and what this module does about it:

- a crash or power loss in the middle of a save: the file is written under a temporary name
  unique to the process, flushed to disk (`fsync`), then renamed over the old one, so the
  old checkpoint stays intact until the new one is complete;
- Ctrl-C (or a notebook's interrupt) in the middle of a save: the interrupt waits until the
  file is complete and renamed, then arrives as the usual `KeyboardInterrupt`;
- a file damaged later (a flipped byte, a truncated copy): the digests are checked on load,
  so a change anywhere in the file, in a tensor or in the metadata (an epoch, an optimizer
  setting, a key of the config), raises `CheckpointError` naming the file, as does every
  malformed file;
- loading into the wrong architecture: the stored config is compared first, and the error
  says which fields differ;
- code in a downloaded file: it is read with `torch.load(weights_only=True)`, which refuses
  anything but tensors and plain containers;
- a model wrapped by `torch.compile` or `DistributedDataParallel`: saved as the plain model,
  so the file loads anywhere; metadata that could not be loaded back is refused at save time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
import contextlib
import os
import signal
import threading
import uuid
from pathlib import Path

import torch

from utils.core.paths import checkpoint_dir
from utils.model import GPTConfig, GPTModel

__all__ = ["CHECKPOINT_FORMAT", "CHAPTER5_CHECKPOINT", "CheckpointError", "chapter5_checkpoint",
           "save_checkpoint", "checkpoint_info", "load_checkpoint"]

CHECKPOINT_FORMAT = "llm-course-checkpoint/3"  # /2 added the tensor digests, /3 the whole-file one
_READABLE_FORMATS = ("llm-course-checkpoint/1", "llm-course-checkpoint/2", CHECKPOINT_FORMAT)
CHAPTER5_CHECKPOINT = "05_pretrained_the_verdict.pt"  # chapters 6-7 fall back to it offline
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel


class CheckpointError(ValueError):
    """A checkpoint is damaged, not ours, or does not fit the model."""


def chapter5_checkpoint() -> Path:
    """Where notebook 05 saves the model it pretrains (`checkpoints/` by default)."""
    return checkpoint_dir() / CHAPTER5_CHECKPOINT


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside torch.compile's and DistributedDataParallel's wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod  # torch.compile(model)
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module  # DistributedDataParallel, DataParallel
        else:
            return model


def _plain(value, where: str):
    """`value` as types `torch.load(weights_only=True)` reads back; numpy values converted."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if type(value).__module__ == "numpy":
        if getattr(value, "ndim", 0) == 0:
            return value.item()  # numpy scalar -> Python number
        return torch.from_numpy(value.copy())
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"Cannot store {where} = {value!r} ({type(value).__name__}) in a "
                    f"checkpoint: it could not be loaded back safely. Use numbers, strings, "
                    f"lists, dicts or tensors.")


def _tensors(tree, prefix: str = ""):
    """(name, tensor) for every tensor in nested dicts and lists, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key in sorted(tree, key=str):
            yield from _tensors(tree[key], f"{prefix}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, item in enumerate(tree):
            yield from _tensors(item, f"{prefix}/{i}")


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(memoryview(data))  # the tensor's bytes, without a copy
    return digest.hexdigest()


def _digests(payload: dict) -> dict[str, str]:
    return {name: _digest(t) for part in ("model", "optimizer", "extra")
            for name, t in _tensors(payload[part], part)}


def _canonical(tree, out: list) -> None:
    """Append an unambiguous text for `tree` to `out`: every type, key and value spelled out
    (floats exactly, as hex), each tensor by its digest, dict entries in a fixed order."""
    if tree is None or isinstance(tree, bool):
        out.append(f"{tree};")
    elif isinstance(tree, (int, float, str)):
        text = tree.hex() if isinstance(tree, float) else str(tree)
        out.append(f"{type(tree).__name__}{len(text)}:{text};")
    elif isinstance(tree, torch.Tensor):
        out.append(f"tensor:{_digest(tree)};")
    elif isinstance(tree, (list, tuple)):
        out.append(f"{type(tree).__name__}{len(tree)}[")
        for item in tree:
            _canonical(item, out)
        out.append("]")
    elif isinstance(tree, dict):
        out.append(f"dict{len(tree)}{{")
        for key in sorted(tree, key=lambda k: (type(k).__name__, str(k))):
            _canonical(key, out)
            _canonical(tree[key], out)
        out.append("}")
        if hasattr(tree, "_metadata"):  # a state_dict's module versions
            _canonical(tree._metadata, out)
    else:  # torch.load(weights_only=True) returns nothing else
        out.append(f"{type(tree).__name__}?")


def _file_digest(payload: dict) -> str:
    """One sha256 over everything in the checkpoint except this digest itself."""
    out: list[str] = []
    _canonical({k: v for k, v in payload.items() if k != "digest"}, out)
    return hashlib.sha256("".join(out).encode("utf-8", "surrogatepass")).hexdigest()


def save_checkpoint(path, model: GPTModel, optimizer=None, **extra) -> Path:
    """Save model (and optimizer) state with the model config and tensor digests; `extra`
    holds metadata such as the epoch. Written atomically: a crash never damages an existing
    checkpoint, and a half-written file never appears under `path`."""
    path = Path(path)
    model = _unwrap(model)
    if not isinstance(getattr(model, "cfg", None), GPTConfig):
        raise TypeError(f"save_checkpoint needs a GPTModel (with a .cfg GPTConfig), got "
                        f"{type(model).__name__}; for other modules use torch.save(state_dict).")
    payload = {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(model.cfg),
               "model": model.state_dict(),
               "optimizer": optimizer.state_dict() if optimizer is not None else None,
               "extra": _plain(extra, "extra")}
    payload["sha256"] = _digests(payload)
    payload["digest"] = _file_digest(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with _interrupt_after_saving():
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half
            _fsync_folder(path.parent)
        finally:
            tmp.unlink(missing_ok=True)  # only left over if the save failed
    return path


@contextlib.contextmanager
def _interrupt_after_saving():
    """Hold back Ctrl-C until the block is done, then raise it as KeyboardInterrupt.

    An interrupt that lands inside `torch.save` would otherwise surface as a RuntimeError from
    its zip writer, or be lost. Signal handlers belong to the main thread, so elsewhere (and
    where Ctrl-C is ignored or handled by someone else) this changes nothing."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}. Check the path; chapter 5's "
                                f"checkpoint is written by chapter 5's notebook (05_pretraining.ipynb).")
    try:  # mmap: tensors are read from disk only when used
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, not a torch file, unsafe pickle, ...
        raise CheckpointError(f"{path} is damaged or not a PyTorch checkpoint ({exc}). "
                              f"Save it again, or restore it from a backup.") from exc
    if not isinstance(payload, dict) or payload.get("format") not in _READABLE_FORMATS:
        raise CheckpointError(f"{path} is not a course checkpoint (no '{CHECKPOINT_FORMAT}' "
                              f"marker). For a plain state_dict use model.load_state_dict("
                              f"torch.load(path, weights_only=True)).")
    parts = {"config": dict, "model": dict, "extra": dict, "optimizer": (dict, type(None))}
    for key, kind in parts.items():
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path} is damaged: its '{key}' entry is missing or has "
                                  f"the wrong type. Save it again, or restore it from a backup.")
    has_digests = payload["format"] != "llm-course-checkpoint/1"  # /1 predates the digests
    if has_digests and not isinstance(payload.get("sha256"), dict):
        raise CheckpointError(f"{path} is damaged: its tensor digests are missing.")
    if payload["format"] == CHECKPOINT_FORMAT and not isinstance(payload.get("digest"), str):
        raise CheckpointError(f"{path} is damaged: its digest is missing.")
    if "sha256" in payload:
        _verify(path, payload)
    if "digest" in payload and payload["digest"] != _file_digest(payload):
        raise CheckpointError(f"{path} is damaged: its metadata (config, optimizer settings or "
                              f"extra values) does not match the digest saved with it. Save it "
                              f"again, or restore it from a backup.")
    return payload


def _verify(path: Path, payload: dict) -> None:
    try:
        stored, actual = payload["sha256"], _digests(payload)
    except Exception as exc:  # unreadable tensor data in a damaged file
        raise CheckpointError(f"{path} is damaged: its tensors cannot be read ({exc}).") from exc
    bad = sorted(name for name in set(stored) | set(actual) if stored.get(name) != actual.get(name))
    if bad:
        raise CheckpointError(f"{path} is damaged: the content of {len(bad)} tensor(s) does not "
                              f"match the digest saved with it (first: {bad[0]}). The file was "
                              f"changed after saving; save it again or restore it from a backup.")


def _config(path, payload: dict) -> GPTConfig:
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    try:  # fields that earlier course versions stored and this one no longer has are skipped
        return GPTConfig(**{k: v for k, v in payload["config"].items() if k in fields})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} holds an invalid model configuration ({exc}).") from exc


def checkpoint_info(path) -> dict:
    """The config and the extra values (epoch, step, ...) stored in a checkpoint."""
    payload = _read(path)
    return {"config": _config(path, payload), "extra": payload["extra"]}


def _strip_wrapper_prefix(state: dict) -> dict:
    for prefix in _WRAPPER_PREFIXES:  # files saved from a wrapped model by older versions
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_checkpoint(path, model: GPTModel | None = None, optimizer=None,
                    device="cpu") -> GPTModel:
    """Load a checkpoint into `model` (built from the stored config if None) and optionally
    `optimizer`; an architecture that differs from the stored one is a CheckpointError
    (the dropout rate may differ: it is a training setting)."""
    payload = _read(path)
    stored = _config(path, payload)
    if model is None:
        model = GPTModel(stored)
    target = _unwrap(model)
    diffs = [f"{f.name}: checkpoint {getattr(stored, f.name)!r}, model "
             f"{getattr(target.cfg, f.name)!r}" for f in dataclasses.fields(GPTConfig)
             if f.name != "drop_rate"  # a training setting, not part of the weights
             and getattr(stored, f.name) != getattr(target.cfg, f.name)]
    if diffs:
        raise CheckpointError(f"{path} was saved from a different model configuration ("
                              + "; ".join(diffs) + "). Build the model with "
                              "checkpoint_info(path)['config'], or pass model=None.")
    try:
        target.load_state_dict(_strip_wrapper_prefix(payload["model"]))
    except RuntimeError as exc:  # missing, unexpected or misshapen tensors
        raise CheckpointError(f"{path} does not fit this model: {str(exc)[:300]}") from exc
    model.to(device)
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise CheckpointError(f"{path} holds no optimizer state; it was saved without one.")
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: the saved optimizer state does not fit this "
                                  f"optimizer ({exc}).") from exc
    return model
