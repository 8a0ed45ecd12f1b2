"""Where the course keeps files on disk (hand-written; no notebook builds it).

Everything is relative to the repository root (the folder that holds `utils/`), so the same
code works in a clone, in an editable install, and in a standalone copy of a notebook that
carries its own `utils/` folder.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_ROOT", "checkpoint_dir", "quick_mode", "ENV_CHECKPOINTS", "ENV_QUICK"]

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_CHECKPOINTS = "LLM_COURSE_CHECKPOINTS"  # overrides where checkpoints are written
ENV_QUICK = "LLM_COURSE_QUICK"  # "1": training-heavy cells run at reduced size (tests set it)


def checkpoint_dir() -> Path:
    """`$LLM_COURSE_CHECKPOINTS`, else `checkpoints/` at the repository root (git-ignored)."""
    env = os.environ.get(ENV_CHECKPOINTS)
    return Path(env) if env else REPO_ROOT / "checkpoints"


def quick_mode() -> bool:
    """True when `$LLM_COURSE_QUICK` is 1/true/yes/on: notebooks shrink their long runs."""
    return os.environ.get(ENV_QUICK, "").strip().lower() in {"1", "true", "yes", "on"}
