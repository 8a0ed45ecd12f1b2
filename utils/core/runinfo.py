"""How a notebook runs on this machine: quick mode, the stand-in for OpenAI's GPT-2, and the
banner that tells the learner (hand-written; no notebook builds it).

Two environment variables change what the training-heavy notebooks do:

- `LLM_COURSE_QUICK=1`: the long training runs shrink to a few steps (`quick_mode()`);
- `LLM_COURSE_FALLBACK=1`: wherever a notebook would load OpenAI's GPT-2 weights it uses the
  small model pretrained in chapter 5 instead (`fallback_mode()`). Without it, the stand-in is
  used only offline (`LLM_COURSE_OFFLINE=1`) when the weights cannot be found.

The saved outputs of the notebooks come from a run with both set, so that they are the same
with or without internet access. `run_banner` prints, at the top of such a notebook, which
applies here and what a full run on GPT-2 gives.
"""

from __future__ import annotations

import os
from pathlib import Path

from utils.core.assets import get_asset
from utils.core.download import ENV_MIRROR, ENV_OFFLINE, default_data_dir, offline_mode
from utils.core.paths import ENV_QUICK, quick_mode

__all__ = ["ENV_FALLBACK", "fallback_mode", "gpt2_stand_in_reason", "run_banner"]

ENV_FALLBACK = "LLM_COURSE_FALLBACK"  # "1": chapter 5's model stands in for GPT-2


def fallback_mode() -> bool:
    """True when `$LLM_COURSE_FALLBACK` is 1/true/yes/on."""
    return os.environ.get(ENV_FALLBACK, "").strip().lower() in {"1", "true", "yes", "on"}


def gpt2_stand_in_reason(asset_name: str) -> str | None:
    """Why chapter 5's model will stand in for the GPT-2 weights `asset_name`, or None if the
    real weights will be used (cached, in the mirror, or downloadable)."""
    if fallback_mode():
        return f"${ENV_FALLBACK}=1 is set"
    if not offline_mode():
        return None
    filename = get_asset(asset_name).filename
    mirror = os.environ.get(ENV_MIRROR, "").strip()
    found = (default_data_dir() / filename).is_file() or bool(mirror) and (
        Path(mirror) / filename).is_file()
    return None if found else f"offline (${ENV_OFFLINE}=1) and the weights are not on this machine"


def run_banner(quick: str | None = None, gpt2: tuple[str, str] | None = None,
               full: str | None = None) -> None:
    """Print how this notebook runs here and what a full run gives.

    quick: what quick mode shrinks ("1 epoch of 20 batches instead of 5 epochs of 130");
    gpt2: (model name, asset name) of the GPT-2 weights the notebook starts from;
    full: what a full run on GPT-2 gives, with its source.
    """
    lines = []
    if quick is not None:
        lines.append(f"Quick mode ({ENV_QUICK}=1): {quick}." if quick_mode()
                     else "Full size: quick mode is off.")
    if gpt2 is not None:
        name, asset = gpt2
        reason = gpt2_stand_in_reason(asset)
        lines.append(f"Base model: the model pretrained in chapter 5 stands in for OpenAI's "
                     f"{name} ({reason}). It knows one short story, so expect weak results."
                     if reason else f"Base model: OpenAI's {name}.")
    if full is not None:
        lines.append(f"A full run: {full}")
    print("\n".join(lines))
