"""The GPU check (utils/tools/gpu_check.py), on a machine without a GPU: its --dry-run on tiny
notebooks made here (a cell altered beyond the GPU tolerance, one within it only thanks to
the GPU allowance, one unchecked, one skipped, one that raises), its refusal without CUDA,
its argument checks, and the benchmark in its quickest CPU form. Everything it writes goes
to tmp_path, the notebooks' checkpoints included."""

import json
import os
import re
import sys

import nbformat
import pytest
import torch

from utils.core.paths import REPO_ROOT
from utils.tools.gpu_check import (GPU_ALLOWANCE, SANITIZE_FILE, compare_cell, format_report,
                                   gpu_tolerance, main, make_sanitizer, run_speed_benchmark)
from utils.tools.nbcompare import Tolerance

UNCHECKED = {"reason": "prints the clock, never the same twice"}


def stdout(text: str):
    return nbformat.v4.new_output("stream", name="stdout", text=text)


def code_cell(source: str, outputs=(), tags=(), settings=None, count: int | None = 1):
    cell = nbformat.v4.new_code_cell(source, execution_count=count)
    cell.outputs = list(outputs)
    if tags:
        cell.metadata["tags"] = list(tags)
    if settings:
        cell.metadata["nbcompare"] = settings
    return cell


def write_notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A tiny notebook")] + cells  # not numbered
    nbformat.write(nb, path)
    return path


def tiny_notebook(path, saved_loss: str = "2.500"):
    """Code cells 0-8, as nbval numbers them, with their saved outputs."""
    result = nbformat.v4.new_output("execute_result", data={"text/plain": "42"},
                                    execution_count=6)
    return write_notebook(path, [
        code_cell("x = 6 * 7\nprint(f'answer {x}')", [stdout("answer 42\n")]),
        code_cell("print(f'loss {1.2345:.4f}')", [stdout("loss 1.2400\n")]),  # GPU allowance
        code_cell("print(f'loss {2.5:.3f}')", [stdout(f"loss {saved_loss}\n")]),
        code_cell("import time\nprint(time.time())", [stdout("0\n")], ["nbval-ignore-output"],
                  UNCHECKED),
        code_cell("block = bytearray(b'\\x01') * (150 * 10**6)  # 150 MB, written\ndel block"),
        code_cell("6 * 7", [result]),
        code_cell("print(_, len(In))", [stdout("42 8\n")]),  # the probes leave both alone
        code_cell("import os\nprint(*(os.environ[k] for k in ('LLM_COURSE_DEVICE', "
                  "'LLM_COURSE_FALLBACK', 'LLM_COURSE_MAX_DOWNLOAD_MB')))",
                  [stdout("cpu 1 100\n")]),
        code_cell("raise RuntimeError('nbval never runs this cell')", tags=["nbval-skip"],
                  settings={"reason": "shows that skipped cells are not even run"})])


@pytest.fixture
def cpu_checkpoints(tmp_path, monkeypatch):
    """The checkpoints the check copies for the notebooks (one small file), and a kernel
    environment that the check must correct: another device, no stand-in setting."""
    folder = tmp_path / "cpu-checkpoints"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    monkeypatch.setenv("LLM_COURSE_CHECKPOINTS", str(folder))
    monkeypatch.setenv("LLM_COURSE_DEVICE", "mps")  # --dry-run must run on the CPU anyway
    monkeypatch.delenv("LLM_COURSE_FALLBACK", raising=False)  # the tests' setting applies
    monkeypatch.delenv("LLM_COURSE_MAX_DOWNLOAD_MB", raising=False)
    return folder


def table_row(markdown: str, notebook: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {notebook} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_a_cell_beyond_the_gpu_tolerance_fails_and_an_error_ends_only_its_notebook(
        tmp_path, cpu_checkpoints):
    broken = write_notebook(tmp_path / "broken.ipynb", [
        code_cell("print('fine')", [stdout("fine\n")]),
        code_cell("raise ValueError('broken on purpose')"),
        code_cell("print('never reached')", [stdout("never reached\n")])])
    tiny = tiny_notebook(tmp_path / "tiny.ipynb", saved_loss="3.100")  # the run prints 2.500
    out = tmp_path / "report"
    assert main(["--dry-run", "--no-benchmark", "--out", str(out), str(broken), str(tiny)]) == 1

    report = json.loads((out / "report.json").read_text())
    first, second = report["notebooks"]
    assert first["errors"] == [{"cell": 1, "error": "ValueError: broken on purpose"}]
    assert (first["compared"], first["matched"], first["passed"]) == (1, 1, False)
    assert (second["compared"], second["matched"], second["differing"]) == (7, 6, 1)
    assert second["errors"] == [] and [d["cell"] for d in second["differences"]] == [2]
    assert "saved 3.100, new 2.500" in "\n".join(second["differences"][0]["lines"])
    assert second["peak_bytes"] > 150e6 and second["top_cells"][0]["cell"] == 4
    assert second["per_cell_peaks"] == sys.platform.startswith("linux")
    if second["per_cell_peaks"]:  # the peak starts afresh after each cell
        assert 0 < second["top_cells"][1]["peak_bytes"] < 150e6
    assert report["passed"] is False and report["mode"] == "dry run on the CPU"
    assert (out / "checkpoints" / "tokenizer.json").read_text() == "{}"  # the copy they used

    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# GPU check: FAIL")
    row = table_row(markdown, "tiny.ipynb")
    assert row[3:] == ["7", "6", "1", "0", "FAIL"] and float(row[1]) > 0 and float(row[2]) > 0.1
    assert table_row(markdown, "broken.ipynb")[3:] == ["1", "1", "0", "1", "FAIL"]
    assert "Cell 1 raised ValueError: broken on purpose" in markdown
    assert "Cell 2:" in markdown and "saved 3.100, new 2.500" in markdown


def test_the_check_passes_when_every_cell_matches(tmp_path, cpu_checkpoints, capsys):
    tiny = tiny_notebook(tmp_path / "tiny.ipynb")
    out = tmp_path / "report"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "stale.pt").write_text("from an earlier check")
    assert main(["--dry-run", "--no-benchmark", "--out", str(out), str(tiny)]) == 0

    report = json.loads((out / "report.json").read_text())
    [result] = report["notebooks"]
    assert (result["compared"], result["matched"], result["differing"]) == (7, 7, 0)
    assert report["passed"] is True and result["peak_bytes"] > 150e6
    assert not (out / "checkpoints" / "stale.pt").exists()  # each check starts from the CPU's
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# GPU check: PASS")
    assert table_row(markdown, "tiny.ipynb")[3:] == ["7", "7", "0", "0", "PASS"]
    assert "Not run (--no-benchmark)" in markdown
    printed = capsys.readouterr().out
    assert "[1/1] tiny.ipynb: PASS" in printed and "PASS: report in" in printed


def test_without_cuda_the_check_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report"
    assert main(["--out", str(out), str(tiny_notebook(tmp_path / "tiny.ipynb"))]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("error: ") and "CUDA" in captured.err
    assert "--dry-run" in captured.err
    assert not out.exists()  # refused before any work


@pytest.mark.parametrize("args, problem", [
    (["--timeout", "0"], "--timeout must be at least 1"),
    (["--rel", "-0.1"], "--rel must be a number of 0 or more"),
    (["--abs", "nan"], "--abs must be a number of 0 or more"),
    (["missing.ipynb"], "missing.ipynb is not a notebook file"),
    (["--mirror", "no-such-folder"], "--mirror no-such-folder is not a folder")])
def test_arguments_are_checked_before_any_work(tmp_path, capsys, args, problem):
    out = tmp_path / "report"
    argv = ["--dry-run", "--out", str(out), *args]
    if not any(a.endswith(".ipynb") for a in args):
        argv.append(str(tiny_notebook(tmp_path / "tiny.ipynb")))
    assert main(argv) == 2
    assert problem in capsys.readouterr().err and not out.exists()


def test_the_gpu_tolerance_is_the_wider_of_the_cells_and_the_allowance():
    assert gpu_tolerance(Tolerance(rel=0.1), GPU_ALLOWANCE) == Tolerance(rel=0.1, abs=0.02)
    assert gpu_tolerance(Tolerance(whole=2), GPU_ALLOWANCE).whole == 2
    saved = code_cell("...", [stdout("loss 1.2400 after 16 steps\n")])
    near = [stdout("loss 1.2345 after 16 steps\n")]
    assert compare_cell(saved, near, Tolerance()) != []  # beyond the CPU tolerance
    assert compare_cell(saved, near, GPU_ALLOWANCE) == []
    assert compare_cell(saved, [stdout("loss 1.5000 after 16 steps\n")], GPU_ALLOWANCE) != []
    assert compare_cell(saved, [stdout("loss 1.2400 after 17 steps\n")], GPU_ALLOWANCE) != []
    counted = code_cell("...", saved.outputs, settings={"whole": 1, "reason": "a count that "
                                                        "training can flip by one"})
    assert compare_cell(counted, [stdout("loss 1.2400 after 17 steps\n")]) == []
    assert compare_cell(code_cell("...", [stdout("0\n")], ["nbval-ignore-output"], UNCHECKED),
                        [stdout("9\n")]) is None
    assert compare_cell(code_cell("...", count=None), [stdout("9\n")]) is None  # never run


def test_outputs_are_sanitized_as_the_tests_sanitize_them():
    addopts = (REPO_ROOT / "pyproject.toml").read_text()
    assert REPO_ROOT / re.search(r"--nbval-sanitize-with (\S+)", addopts).group(1) == SANITIZE_FILE
    saved = code_cell("...", [stdout("trained in 3.2 s at 0x7f00aa11bb22\n")])
    new = [stdout("trained in 0.4 s at 0x5500cc33dd44\n")]
    assert compare_cell(saved, new, sanitize=make_sanitizer()) == []
    assert compare_cell(saved, new) != []


def test_no_notebook_reads_or_resets_peak_memory_itself():
    """The probe after each cell resets the peak: a notebook measuring its own would change."""
    measuring = re.compile(r"max_memory_allocated|reset_peak_memory_stats|ru_maxrss|VmHWM|"
                           r"clear_refs|peak_rss_bytes|cuda_peak_bytes|reset_cuda_peak")
    for path in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells
                         if c.cell_type == "code")
        assert measuring.findall(code) == [], path.name


def test_the_benchmark_runs_and_its_rows_reach_the_report(tmp_path):
    env = {**os.environ, "LLM_COURSE_DEVICE": "cpu"}
    bench = run_speed_benchmark(tmp_path, env, dry_run=True)
    assert "error" not in bench and (tmp_path / "benchmark.json").is_file()
    train = {row["key"]: row for row in bench["train"]}
    generate = {row["key"]: row for row in bench["generate"]}
    assert train["teaching_fp32"]["tokens_per_s"] > 0 and "fast_fused_ce_fp32" in train
    assert generate["no_cache"]["tokens_per_s"] > 0 and "cache_fast" in generate
    assert not any(row["compiled"] for row in bench["train"])  # no compiling on the CPU
    report = {"passed": True, "device": "CPU", "mode": "dry run on the CPU", "torch": "2",
              "cuda": None, "allowance": {"rel": 0.05, "abs": 0.02, "whole": 0},
              "memory": "peak", "checkpoints": "checkpoints", "notebooks": [],
              "benchmark": bench}
    markdown = format_report(report)
    row = table_row(markdown, train["teaching_fp32"]["label"])
    assert row[1] == "no" and float(row[2].replace(",", "")) > 0 and row[3] == "-"  # no MFU
    assert table_row(markdown, generate["no_cache"]["label"])[1] == "no"
