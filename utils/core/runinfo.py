"""How a notebook runs on this machine: the stand-in for OpenAI's GPT-2, and the banner that
tells the learner (hand-written; no notebook builds it).

- `LLM_COURSE_FALLBACK=1`: wherever a notebook would load OpenAI's GPT-2 weights it uses a
  stand-in instead (`fallback_mode()`): from chapter 6 on, the small GPT that
  `utils.cli.stand_in` pretrains on the course's own text; in chapter 5, that chapter's
  model. Without it, the stand-in is used only where the weights are not on the machine and
  may not be downloaded (offline mode, or the download limit). The notebook makes that choice in a cell of its own
  (`stand_in_reason()`); the weight loaders only ever load what they are asked for.

The saved outputs of the notebooks come from a run with it set, so that they are the same
with or without internet access. `run_banner` prints, at the top of such a notebook, which
applies here and what a full run on GPT-2 gives.
"""

from __future__ import annotations

import os

from utils.core.device import ENV_DEVICE
from utils.core.download import ENV_MAX_DOWNLOAD_MB, fetch_refusal
from utils.core.env import env_flag

__all__ = ["ENV_FALLBACK", "SAVED_OUTPUT_SETTINGS", "use_saved_output_settings",
           "fallback_mode", "stand_in_reason", "run_banner"]

ENV_FALLBACK = "LLM_COURSE_FALLBACK"  # "1": a stand-in replaces GPT-2

# How the saved notebook outputs are produced and tested (the tests and the re-execution tool
# apply these): on the CPU, with the stand-in in place of GPT-2 (the same
# with or without internet), and never downloading a file over 100 MB (model weights are
# fetched only when a maintainer asks for them by setting the limit higher or empty).
SAVED_OUTPUT_SETTINGS = {ENV_DEVICE: "cpu", ENV_FALLBACK: "1", ENV_MAX_DOWNLOAD_MB: "100"}


def use_saved_output_settings() -> None:
    """Apply SAVED_OUTPUT_SETTINGS to this process (and the kernels it starts), except for
    variables already set."""
    for name, value in SAVED_OUTPUT_SETTINGS.items():
        os.environ.setdefault(name, value)


def fallback_mode() -> bool:
    """True when `$LLM_COURSE_FALLBACK` is 1/true/yes/on."""
    return env_flag(ENV_FALLBACK)


def stand_in_reason(asset_name: str) -> str | None:
    """Why a stand-in must replace the pretrained weights `asset_name` here, or None if the
    real weights will be used (on this machine, or downloadable): the learner asked for it
    (`$LLM_COURSE_FALLBACK=1`), or the file is not here and may not be downloaded."""
    if fallback_mode():
        return "the stand-in was asked for"  # (${ENV_FALLBACK}=1)
    return fetch_refusal(asset_name)


def run_banner(gpt2: tuple[str, str] | None = None, full: str | None = None) -> None:
    """Print how this notebook runs here and what a full run gives.

    gpt2: (model name, asset name) of the GPT-2 weights the notebook starts from;
    full: what a full run on GPT-2 gives, with its source.
    """
    lines = []
    if gpt2 is not None:
        name, asset = gpt2
        reason = stand_in_reason(asset)
        lines.append(f"Base model: a stand-in for OpenAI's {name} ({reason}): a GPT a tenth "
                     f"the size of GPT-2 small, pretrained here on the course's own text "
                     f"(python -m utils.cli.stand_in)." if reason else f"Base model: OpenAI's {name}.")
    if full is not None:
        lines.append(f"A full run: {full}")
    print("\n".join(lines))
