"""Where the course keeps files on disk (hand-written; no notebook builds it).

Everything is relative to the repository root (the folder that holds `utils/`), so the same
code works in a clone, in an editable install, and in a standalone copy of a notebook that
carries its own `utils/` folder.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_ROOT", "checkpoint_dir", "shown_path", "ENV_CHECKPOINTS"]

REPO_ROOT = Path(__file__).resolve().parents[2]  # utils/core/paths.py -> the repository
ENV_CHECKPOINTS = "LLM_COURSE_CHECKPOINTS"  # overrides where checkpoints are written


def checkpoint_dir() -> Path:
    """`$LLM_COURSE_CHECKPOINTS`, else `checkpoints/` at the repository root (git-ignored)."""
    env = os.environ.get(ENV_CHECKPOINTS)
    return Path(env) if env else REPO_ROOT / "checkpoints"


def shown_path(path) -> str:
    """`path` as a learner should read it: relative to the course folder when inside it
    (`checkpoints/model.pt`), else only its name, never the layout of someone's disk."""
    path = Path(path).resolve()
    for root in (REPO_ROOT, Path.cwd().resolve()):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.name
