"""The CPU-configuration runner (utils/tools/configs.py): each configuration's environment
has its effect on PyTorch in a fresh process (threads, vector kernels, oneDNN's instruction
set), starts from the machine's default, reaches the notebook kernels, and each prints one
line with its result."""

import os
import platform
import subprocess
import sys

import nbformat
import pytest

import utils.tools.configs as configs
from utils.core.paths import REPO_ROOT
from utils.tools.configs import CONFIGURATIONS, DEFAULT_RUN, run_configuration

CPU_VARIABLES = ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                 "MKL_ENABLE_INSTRUCTIONS")
PROBE = ("import os, torch; print(os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads(), "
         "torch.backends.cpu.get_cpu_capability(), torch.ops.mkldnn._is_mkldnn_bf16_supported())")


def environment_of(name: str, monkeypatch) -> dict:
    """The environment run_configuration gives pytest for configuration `name`."""
    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen.update(env)
        return subprocess.CompletedProcess(cmd, 0, stdout="==== 1 passed in 0.1s ====\n",
                                           stderr="")

    monkeypatch.setattr(configs.subprocess, "run", fake_run)
    assert run_configuration(name, []) == (True, "1 passed in 0.1s")
    return seen


def probe(env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROBE], text=True, stdout=subprocess.PIPE,
                            env=env)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="AVX2 and AVX-512 are x86 instruction sets")
def test_each_configuration_changes_what_pytorch_does(monkeypatch):
    machine = {k: v for k, v in os.environ.items() if k not in CPU_VARIABLES}
    for variable in CPU_VARIABLES:  # as on a machine where CI has set them already
        monkeypatch.setenv(variable, "3" if variable == "OMP_NUM_THREADS" else "avx2")
    assert len(DEFAULT_RUN) == 5 and set(DEFAULT_RUN) <= set(CONFIGURATIONS)
    running = {name: probe(environment_of(name, monkeypatch)) for name in CONFIGURATIONS}
    running["machine"] = probe(machine)
    seen = {}
    for name, process in running.items():
        omp, threads, capability, onednn_bf16 = process.communicate(timeout=120)[0].split()
        seen[name] = (omp, int(threads), capability, onednn_bf16 == "True")
    _, threads, best, native_bf16 = seen["machine"]
    assert seen["default"] == seen["machine"]  # nothing inherited from this process
    assert seen["1-thread"] == ("1", 1, best, native_bf16)
    omp, four, capability, bf16 = seen["4-threads"]
    # PyTorch takes no more threads from OMP_NUM_THREADS than the machine has cores
    assert (omp, capability, bf16) == ("4", best, native_bf16) and min(4, threads) <= four <= 4
    assert seen["no-vector"] == ("None", threads, "DEFAULT", native_bf16)
    assert seen["avx2"] == ("None", threads, "AVX2", False)  # no AVX-512 bfloat16 in oneDNN
    assert seen["avx2-1-thread"] == ("1", 1, "AVX2", False)


def test_a_configuration_starts_from_the_machines_default(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    env = environment_of("avx2", monkeypatch)
    assert "OMP_NUM_THREADS" not in env and env["ATEN_CPU_CAPABILITY"] == "avx2"
    env = environment_of("default", monkeypatch)
    assert not set(CPU_VARIABLES) & set(env)
    assert env["PATH"] == os.environ["PATH"]  # the rest is inherited


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
