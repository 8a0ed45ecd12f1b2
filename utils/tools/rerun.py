"""Re-executing notebooks and saving their outputs (hand-written maintainer tool).

nbval compares every cell's output with the output saved in the notebook, so the saved
outputs must be exactly what the test run produces. This command runs notebooks the way
`pytest` does (this environment's own kernel, the notebook's folder as working directory,
and `utils.core.runinfo.SAVED_OUTPUT_SETTINGS`: CPU unless `$LLM_COURSE_DEVICE` says
otherwise, the stand-in in place of GPT-2 unless `$LLM_COURSE_FALLBACK=0`, no download over 100 MB unless `$LLM_COURSE_MAX_DOWNLOAD_MB`
says otherwise) and writes the fresh outputs back:

    python -m utils.tools.rerun notebooks/02_text_data.ipynb [more.ipynb ...]
    python -m utils.tools.rerun --mirror ../shared/data notebooks/*.ipynb   # offline, as CI runs

`--mirror DIR` sets `$LLM_COURSE_MIRROR=DIR` and `$LLM_COURSE_OFFLINE=1` for the kernel.
Cells tagged "remove-output" (timings) are run but saved without output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbval.kernel import CURRENT_ENV_KERNEL_NAME, NbvalKernelspecManager

from utils.core.download import ENV_MIRROR, ENV_OFFLINE
from utils.core.runinfo import use_saved_output_settings

__all__ = ["rerun_notebook", "REMOVE_OUTPUT_TAG"]

# Cells with this tag (Jupyter's usual name for it) keep no saved output: what they print
# depends on the machine (timings), so only a learner's own run shows it. They also carry
# nbval's "nbval-ignore-output" tag, so the tests run them without comparing.
REMOVE_OUTPUT_TAG = "remove-output"


def rerun_notebook(path: str | Path, timeout: int = 3600) -> float:
    """Execute the notebook at `path` top to bottom and save it with its new outputs.

    Returns the wall time in seconds. On an error the file is left untouched.
    """
    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=CURRENT_ENV_KERNEL_NAME,
                       kernel_spec_manager=NbvalKernelspecManager())
    client = NotebookClient(nb, km=km, timeout=timeout, record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    for cell in nb.cells:  # e.g. live timings: shown when a learner runs them, never saved
        if cell.cell_type == "code" and REMOVE_OUTPUT_TAG in cell.metadata.get("tags", []):
            cell.outputs = []
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Re-execute notebooks and save outputs.")
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--mirror", type=Path, help="offline mirror folder (turns offline on)")
    parser.add_argument("--timeout", type=int, default=3600,
                        help="seconds one cell may take (default 3600)")
    args = parser.parse_args(argv)
    use_saved_output_settings()  # exactly as pytest runs them (conftest.py)
    if args.mirror is not None:
        os.environ[ENV_MIRROR] = str(args.mirror.resolve())
        os.environ[ENV_OFFLINE] = "1"
    for nb in args.notebooks:
        print(f"running {nb} ...", flush=True)
        print(f"saved {nb} ({rerun_notebook(nb, args.timeout):.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
