"""The CPU-configuration runner (utils/tools/configs.py): each configuration's environment
reaches the notebook kernels, and each prints one line with its result."""

import subprocess
import sys

import nbformat

from utils.core.paths import REPO_ROOT
from utils.tools.configs import CONFIGURATIONS, DEFAULT_RUN


def test_the_five_configurations_of_the_issue():
    assert DEFAULT_RUN == ["default", "1-thread", "4-threads", "avx2", "no-vector"]
    assert CONFIGURATIONS["avx2"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                      "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert CONFIGURATIONS["no-vector"] == {"ATEN_CPU_CAPABILITY": "default"}


def test_each_configuration_reaches_the_kernel_and_reports_one_line(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("import os, torch\n"
                                     "print(os.environ.get('OMP_NUM_THREADS'), "
                                     "torch.get_num_threads())")
    cell.execution_count = 1
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1 1\n")]
    nb.cells = [cell]
    path = tmp_path / "threads.ipynb"
    nbformat.write(nb, path)
    result = subprocess.run([sys.executable, "-m", "utils.tools.configs", "--only", "1-thread",
                             "--only", "4-threads", str(path)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert lines[0].startswith("1-thread") and " PASS " in lines[0] and "1 passed" in lines[0]
    assert lines[1].startswith("4-threads") and " FAIL " in lines[1]  # it prints "4 4"
    assert result.returncode == 1
