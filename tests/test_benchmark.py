"""The measuring commands (utils/cli/benchmark.py, retrain_chapter5.py, profile_step.py, and
the paths they time, speed_paths.py) and the timing module under them (utils/core/timing.py).
No speed is asserted: only that rounds are paired, rows are found by name and results come
from records, not from printed text. Everything runs in this process on tiny sizes, except
the one test of a fresh process."""

import dataclasses
import json
import os

import pytest
import torch

import utils.train
from utils.cli import benchmark, retrain_chapter5, speed_paths
from utils.cli.benchmark import data_sheet_bf16_tflops, run_benchmark
from utils.cli.profile_step import OPERATOR_GROUPS, format_profile, profile_step
from utils.cli.speed_paths import (GEN_PATHS, TRAIN_PATHS, flops_per_token, matmul_dtypes,
                                   resolve_settings, select_train_paths)
from utils.core.timing import (CPU_FLAGS, describe_machine, paired_rounds, peak_rss_bytes,
                               rate_table, run_in_fresh_process, spread, timed)
from utils.model import GPT2_SMALL_124M, GPT_TINY, GPTModel

# The tiny config with a smaller vocabulary (the prompt's IDs go up to 15,496): the output
# layer dominates the tiny model's step, so this makes every step about three times cheaper.
SMALL_VOCAB = dataclasses.replace(GPT_TINY, vocab_size=16_000)


@pytest.fixture
def small_tiny(monkeypatch):
    monkeypatch.setitem(speed_paths.MODELS, "tiny", SMALL_VOCAB)


@pytest.fixture
def one_thread():
    """One thread, as the benchmark tests always ran (tiny products gain nothing from more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- utils.core.timing -----------------------------------------------------------------------

def test_paired_rounds_warm_up_once_then_rotate_the_order():
    calls = []

    def contender(key):
        def run():
            calls.append(key)
            return float(len(calls))  # "seconds": the call's position, to see which counted
        return run

    seconds = paired_rounds({key: contender(key) for key in "abc"}, rounds=4)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab" + "abc"  # warm-up, then rotated
    assert seconds == {"a": [4.0, 9.0, 11.0, 13.0], "b": [5.0, 7.0, 12.0, 14.0],
                       "c": [6.0, 8.0, 10.0, 15.0]}  # calls 1-3 (the warm-up) not counted


def test_timed_returns_the_wall_seconds_of_a_call():
    calls = []
    seconds = timed(lambda: calls.append(1))()
    assert calls == [1] and 0 <= seconds < 1


def test_spread_skips_missing_values():
    assert spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert spread([1.0, 4.0]) == {"median": 2.5, "min": 1.0, "max": 4.0}
    assert spread([None]) == {"median": None, "min": None, "max": None}


def test_rate_table_gives_rates_and_ratios_of_medians_by_key():
    rows = rate_table({"base": [2.0, 1.0, 4.0], "x": [1.0, 0.5, None]}, work=8.0,
                      baseline="base", unit="items_per_s")
    assert rows["base"]["items_per_s"] == {"median": 4.0, "min": 2.0, "max": 8.0}
    assert rows["base"]["median_s"] == 2.0 and rows["base"]["ratio"] == 1.0
    assert rows["x"]["items_per_s"] == {"median": 12.0, "min": 8.0, "max": 16.0}
    assert rows["x"]["ratio"] == 3.0 and rows["x"]["seconds"] == [1.0, 0.5, None]


def test_describe_machine_on_the_cpu():
    m = describe_machine("cpu")
    assert m["device"] == "cpu" and m["torch"] == torch.__version__
    assert m["cpu_threads"] == torch.get_num_threads() and m["cpu_count"] >= 1
    assert m["cpu"] and set(m["cpu_flags"]) <= set(CPU_FLAGS)
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "gpu" not in m


def _allocate(megabytes: int) -> tuple[int, int]:
    """In the fresh process: its id and its peak before allocating `megabytes`."""
    before = peak_rss_bytes()
    block = bytearray(b"\x01") * (megabytes * 10**6)  # written, so resident
    del block
    return os.getpid(), before


def test_a_fresh_process_reports_its_own_peak():
    (pid, before), peak = run_in_fresh_process(_allocate, 200)
    assert pid != os.getpid()  # another process, whose result came back
    # 200 MB more than before it allocated them, less what it had freed since its earlier peak
    # (a few hundred KB of the imports' temporary memory, reused for the new block)
    assert peak - before > 199e6
    assert before < 2e9  # its own peak (Python and torch), not inherited from this process


# --- the speed benchmark -----------------------------------------------------------------------

def test_flops_per_token_for_gpt2_small():
    # N = 163,009,536 parameters minus the token and position tables (51,281 x 768)
    n = 163_009_536 - 51_281 * 768
    assert flops_per_token(GPT2_SMALL_124M, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_data_sheet_peaks_match_the_right_gpu():
    assert data_sheet_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert data_sheet_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert data_sheet_bf16_tflops("NVIDIA A100-SXM4-40GB") == 312.0  # not the A10's 125
    assert data_sheet_bf16_tflops("NVIDIA L40S") == 362.0  # not the L4's 121
    assert data_sheet_bf16_tflops("NVIDIA L4") == 121.0
    assert data_sheet_bf16_tflops("Tesla T4") == 65.0
    assert data_sheet_bf16_tflops("Some Future GPU") is None


def test_benchmark_checks_its_arguments():
    with pytest.raises(ValueError, match="context_length 64"):
        run_benchmark("tiny", context=65, memory=False, progress=False)
    with pytest.raises(ValueError, match="Unknown model"):
        run_benchmark("gpt5", memory=False, progress=False)


@pytest.fixture
def no_work(monkeypatch):
    """The benchmark's run, made to fail the test if it is ever started."""
    def started(**kwargs):
        raise AssertionError(f"the benchmark started its run with {kwargs}")
    monkeypatch.setattr(benchmark, "run_benchmark", started)


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "--repeats must be at least 1"),  # ran 40 s, then crashed
    (["--batch-size", "0"], "--batch-size must be at least 1"),  # a table of zeros, status 0
    (["--matmul-size", "0"], "--matmul-size must be at least 1"),  # the same
    (["--context", "0"], "--context must be at least 1"),
    (["--new-tokens", "-1"], "--new-tokens must be at least 1"),
    (["--context", "65"], "pass --context 64 or less"),
    (["--new-tokens", "61"], "pass --new-tokens 60 or less"),
    (["--peak-tflops", "0"], "--peak-tflops must be a positive number"),
    (["--device", "foo"], "--device foo is not a device name; pass cpu"),
    (["--device", "cuda"], "PyTorch sees no CUDA GPU here; pass --device cpu"),
    (["--device", "cuda:1"], "PyTorch sees no CUDA GPU here; pass --device cpu"),
    (["--plot", "chart.docx"], "matplotlib cannot write .docx files")],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_arguments_are_one_line_errors_before_any_work(args, message, no_work, monkeypatch,
                                                          tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    monkeypatch.chdir(tmp_path)
    assert benchmark.main(["--quick", *args]) == 2
    assert message in _one_line_error(capsys)


def test_an_unwritable_json_path_is_refused_before_the_run(no_work, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    assert benchmark.main(["--quick", "--device", "cpu",
                           "--json", str(tmp_path / "a-file" / "results.json")]) == 2
    assert f"cannot write --json {tmp_path / 'a-file' / 'results.json'}" in _one_line_error(capsys)
    assert benchmark.main(["--quick", "--device", "cpu", "--json", str(tmp_path)]) == 2
    assert "is a folder; pass a file name" in _one_line_error(capsys)


def test_an_existing_json_file_is_kept_until_the_results_are_ready(no_work, tmp_path):
    earlier = tmp_path / "new-folder" / "results.json"
    earlier.parent.mkdir()
    earlier.write_text('{"earlier": "results"}')
    with pytest.raises(AssertionError, match="started its run"):  # checked, then the run fails
        benchmark.main(["--quick", "--device", "cpu", "--json", str(earlier)])
    assert earlier.read_text() == '{"earlier": "results"}'
    assert [p.name for p in earlier.parent.iterdir()] == ["results.json"]  # no probe left


@pytest.mark.parametrize("capability, rows", [((7, 5), "fp16"), ((8, 0), "bf16"), ((6, 1), "fp32")])
def test_the_16_bit_rows_follow_the_gpu(monkeypatch, capability, rows):
    """A T4 runs the float16 rows (loss scaled) and compiles the best of them, an A100 the
    bfloat16 ones, a GTX 1080 neither (the device queries are faked)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    s, skipped = resolve_settings("tiny", 2, 8, 1, 4, "cuda", "auto", True, False, 64)
    keys = set(select_train_paths(s))
    assert any(k.endswith("_fp16") for k in keys) is (rows == "fp16")
    assert any(k.endswith("_bf16") for k in keys) is (rows == "bf16")
    assert f"compiled_fast_fused_ce_{rows}" in keys
    assert ("float16" in matmul_dtypes(s)) is (rows == "fp16")
    assert any(line.startswith("fp16:") for line in skipped) is (rows == "fp32")


def test_every_path_has_its_own_key():
    keys = [p.key for p in TRAIN_PATHS + GEN_PATHS]
    assert len(set(keys)) == len(keys)
    assert "fast_fused_ce_bf16" in keys and "cache_fast_bf16_weights" in keys


def test_quick_run_finds_every_row_by_name_in_any_order(small_tiny, one_thread, monkeypatch,
                                                         tmp_path, capsys):
    # the path tables reversed: rows come out in the new order, and still under their names
    monkeypatch.setattr(speed_paths, "TRAIN_PATHS", TRAIN_PATHS[::-1])
    monkeypatch.setattr(speed_paths, "GEN_PATHS", GEN_PATHS[::-1])
    out = tmp_path / "results.json"
    benchmark.main(["--quick", "--repeats", "1", "--no-memory", "--context", "16",
                    "--new-tokens", "8", "--matmul-size", "128", "--bf16", "on", "--fp16", "on",
                    "--peak-tflops", "1.0", "--device", "cpu", "--json", str(out)])
    printed, r = capsys.readouterr().out, json.loads(out.read_text())
    m, s = r["machine"], r["setup"]
    assert m["cpu"] in printed and f"torch {m['torch']}" in printed
    assert (s["model"], s["repeats"], s["context"]) == ("tiny", 1, 16)
    assert s["flops_per_token"] == flops_per_token(SMALL_VOCAB, 16)
    assert set(r["peak_gflops"]) == {"float32", "bfloat16", "float16"}
    kept = s["keep_memory_rows"]
    assert list(r["train"]) == [p.key for p in TRAIN_PATHS[::-1] if kept or not p.keep_memory]
    assert list(r["generate"]) == [p.key for p in GEN_PATHS[::-1]]
    labels = {p.key: p.label for p in TRAIN_PATHS + GEN_PATHS}
    for rows in (r["train"], r["generate"]):
        for key, row in rows.items():
            rate = row["tokens_per_s"]
            assert row["label"] == labels[key] and len(row["seconds"]) == 1  # one counted round
            assert rate["min"] <= rate["median"] <= rate["max"]
            assert f"{row['label']:<70} {rate['median']:>10,.1f}" in printed
    # ratios against the named baselines, wherever they stand
    assert r["train"]["teaching_fp32"]["ratio"] == 1.0 == r["generate"]["no_cache"]["ratio"]
    for row in r["train"].values():
        assert row["gflops"] == pytest.approx(row["tokens_per_s"]["median"] * s["flops_per_token"] / 1e9)
        assert row["fraction_of_peak"] == pytest.approx(
            row["gflops"] / r["peak_gflops"][row["dtype"]]["median"])
        assert ("mfu" in row) == (row["dtype"] in ("bfloat16", "float16"))  # --peak-tflops 1.0
    assert r["train"]["fast_fused_ce_fp16"]["dtype"] == "float16"  # loss-scaled rows ran too
    fast32, fast16 = r["generate"]["cache_fast"], r["generate"]["cache_fast_bf16_weights"]
    assert r["bf16_generation_vs_float32"] == pytest.approx(
        fast16["tokens_per_s"]["median"] / fast32["tokens_per_s"]["median"])
    assert f"({fast16['tokens_per_s']['median']:,.1f} vs {fast32['tokens_per_s']['median']:,.1f}" in printed
    assert r["checks"]["greedy_identical_with_cache"] is True  # no cache vs cache, float32
    assert list(r["profile"])[0] == "fast_fused_adamw_bf16"
    for key, profiled in r["profile"].items():  # groups add up to the step's total
        assert sum(profiled["groups"].values()) == pytest.approx(profiled["total_ms"])
        assert profiled["label"] == r["train"][key]["label"] and profiled["label"] in printed


def test_the_fresh_process_memory_run_steps_one_path(small_tiny, one_thread):
    s, _ = resolve_settings("tiny", 2, 8, 1, 4, "cpu", False, False, False, 64)
    for path in (TRAIN_PATHS[0], GEN_PATHS[0]):  # what run_in_fresh_process runs per path
        assert benchmark._run_one_path(s, path) is None


# --- on an Apple GPU (MPS), its queries faked: the tensors stay on the CPU here ------------------

@pytest.fixture
def mps_trainer(small_tiny, one_thread, monkeypatch):
    """A tiny PathTrainer that believes it runs on an Apple GPU, on a PyTorch without MPS
    autocast (2.4 refuses torch.autocast("mps", ...) even disabled); `.syncs` counts the
    waits for the GPU."""
    real_autocast = torch.autocast

    def autocast(device_type, *args, **kwargs):
        if device_type == "mps":
            raise RuntimeError("User specified an unsupported autocast device_type 'mps'")
        return real_autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)
    s, _ = resolve_settings("tiny", 1, 8, 1, 4, "cpu", False, False, False, 64)
    trainer = speed_paths.PathTrainer(s)
    trainer.device = torch.device("mps")
    trainer.syncs = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: trainer.syncs.append("mps"))
    return trainer


def test_a_timed_step_on_mps_waits_for_the_gpu_and_opens_no_autocast_in_float32(mps_trainer):
    path = next(p for p in TRAIN_PATHS if p.key == "fast_fused_ce_fp32")  # float32: no autocast
    seconds = mps_trainer.step(path)
    assert seconds > 0 and mps_trainer.syncs == ["mps", "mps"]  # before and after the step


def test_running_out_of_mps_memory_is_a_missing_row_and_other_errors_are_raised(mps_trainer,
                                                                               monkeypatch):
    def fails_with(message):
        def step(*args):
            raise RuntimeError(message)
        return step

    emptied = []
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(mps_trainer, "_step", fails_with(  # as MPS words it
        "MPS backend out of memory (MPS allocated: 17.9 GB, other allocations: 0.2 GB, max "
        "allowed: 18.1 GB). Tried to allocate 1.2 GB on private pool."))
    assert mps_trainer.step(TRAIN_PATHS[0]) is None and emptied == [True]
    monkeypatch.setattr(mps_trainer, "_step", fails_with("mat1 and mat2 shapes cannot be "
                                                         "multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        mps_trainer.step(TRAIN_PATHS[0])


def test_on_mps_the_machine_names_the_apple_gpu_and_no_memory_peak_is_claimed(monkeypatch):
    monkeypatch.setattr("utils.core.device._mps_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "get_name", lambda: "Apple M2 Pro")
    monkeypatch.setattr("utils.core.device.platform.mac_ver", lambda: ("15.1", ("", "", ""), ""))
    assert describe_machine("mps")["gpu"] == "Apple GPU (MPS): Apple M2 Pro, macOS 15.1"
    s = speed_paths.PathSettings("tiny", 1, 8, 1, 4, "mps", False, False, False, 64)
    assert benchmark._setup(s, True, None)["memory"] is None  # MPS keeps no peak counter
    on_cpu = dataclasses.replace(s, device="cpu")
    assert benchmark._setup(on_cpu, True, None)["memory"] == ("peak RSS of a process running "
                                                              "one path")
    assert "no peak counter" in benchmark.MPS_MEMORY


def test_left_out_bfloat16_on_mps_is_not_blamed_on_the_cpu(monkeypatch):
    monkeypatch.setattr(speed_paths, "bf16_supported", lambda device: False)
    _, skipped = resolve_settings("tiny", 1, 8, 1, 4, "mps", "auto", False, True, 64)
    assert skipped[0].startswith("bf16: mps has no native bfloat16; it would be emulated")


def test_profile_step_sorts_operators_into_groups():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    profiled = profile_step(lambda: torch.mm(a, b).sum(), "a matrix product")
    assert list(profiled["groups"]) == [name for name, _ in OPERATOR_GROUPS]
    assert profiled["groups"]["matrix products (mm, addmm, bmm)"] > 0
    assert sum(profiled["groups"].values()) == pytest.approx(profiled["total_ms"])
    text = format_profile({"mm": profiled})
    assert "(a) a matrix product" in text and "matrix products (mm, addmm, bmm)" in text


# --- chapter 5 retrained -------------------------------------------------------------------------

@pytest.fixture
def short_story(tmp_path, mirror_dir):
    """The story's first 2,200 characters as a file: 7 steps, 2 evaluations per epoch."""
    path = tmp_path / "short-story.txt"
    path.write_text(retrain_chapter5._read_text(None)[:2200], encoding="utf-8")
    return str(path)


def test_retrain_compares_the_records_not_the_printed_log(short_story, one_thread, monkeypatch,
                                                        tmp_path, capsys):
    histories = []
    loop = retrain_chapter5.train_model_simple

    def kept_loop(*args, **kwargs):  # chapter 5's loop, its history kept for the check
        histories.append(loop(*args, **kwargs))
        return histories[-1]

    monkeypatch.setattr(retrain_chapter5, "train_model_simple", kept_loop)
    monkeypatch.setattr(utils.train, "format_log_line", lambda record, formats: "a new format")
    # each run in this process (run_in_fresh_process has its own test above), for speed
    monkeypatch.setattr(retrain_chapter5, "run_in_fresh_process",
                        lambda fn, *args: (fn(*args), peak_rss_bytes()))
    out = tmp_path / "chapter5.json"
    retrain_chapter5.main(["--quick", "--context", "32", "--precision", "fp32", "--device", "cpu",
                           "--data", short_story, "--json", str(out)])
    r, printed = json.loads(out.read_text()), capsys.readouterr().out
    assert "Train loss" not in printed and "a new format" in printed  # the log line changed ...
    teaching, fast = r["runs"]["chapter5"], r["runs"]["fast"]
    assert list(r["runs"]) == ["chapter5", "fast"] and len(teaching["evals"]) >= 2
    assert teaching["evals"] == histories[0].records  # ... the records did not
    assert teaching["samples"] == histories[0].samples != []
    assert teaching["label"].startswith("chapter 5: teaching modules")
    assert len(fast["evals"]) == len(teaching["evals"])
    for a, b in zip(teaching["evals"], fast["evals"]):  # the same run in float32, faster code
        assert (a["epoch"], a["step"], a["tokens_seen"]) == (b["epoch"], b["step"], b["tokens_seen"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=2e-3)
        assert a["seconds"] <= teaching["wall_seconds"] and b["seconds"] <= fast["wall_seconds"]
    assert r["time_ratio"] == pytest.approx(fast["wall_seconds"] / teaching["wall_seconds"])
    last, best = teaching["evals"][-1], min(e["val_loss"] for e in teaching["evals"])
    assert f"{last['train_loss']:>11.3f} {last['val_loss']:>9.3f} {best:>8.3f}" in printed
    assert "fast retrain / chapter 5 wall time" in printed


def test_the_decode_benchmark_times_every_path_beside_transformers(one_thread, tmp_path, capsys):
    from utils.cli import decode_benchmark
    out = tmp_path / "decode.json"
    assert decode_benchmark.main(["--quick", "--models", "tiny-gpt", "tiny-qwen3", "--rounds", "1",
                                  "--new-tokens", "6", "--no-quality", "--json", str(out)]) == 0
    r, printed = json.loads(out.read_text()), capsys.readouterr().out
    assert r["bandwidth_gb_per_s"] > 0 and list(r["models"]) == ["tiny-gpt", "tiny-qwen3"]
    for timed in r["models"].values():
        rows = timed["rows"]
        assert list(rows) == ["fp32", "bf16", "int8", "hf_fp32", "hf_bf16"]
        assert timed["greedy_same_as_transformers_fp32"] is True  # the same weights, the same tokens
        fp32, bf16, int8 = (rows[k]["weight_bytes_per_token"] for k in ("fp32", "bf16", "int8"))
        assert bf16 == pytest.approx(fp32 / 2, rel=0.01) and int8 < 0.3 * fp32  # + scales
        for key, row in rows.items():
            rate = row["tokens_per_s"]["median"]
            assert row["gb_per_s"] == pytest.approx(rate * row["weight_bytes_per_token"] / 1e9)
            assert row["fraction_of_limit"] == pytest.approx(row["gb_per_s"] / r["bandwidth_gb_per_s"])
            assert row["label"] in printed
        assert rows["fp32"]["vs_transformers"] == pytest.approx(
            rows["fp32"]["tokens_per_s"]["median"] / rows["hf_fp32"]["tokens_per_s"]["median"])
    assert list(r["profile"]) == ["tiny-gpt", "tiny-qwen3"]
    for paths in r["profile"].values():
        assert list(paths) == ["fp32", "bf16", "int8"]
        for prof in paths.values():  # the products and the rest add up to the operators' time
            assert prof["steps"] == 6 and prof["wall_ms_per_token"] > 0
            assert 0 < prof["products_ms"] < prof["ms_per_token"]
            assert prof["products_ms"] + prof["other_ms"] == pytest.approx(prof["ms_per_token"])
            assert all(o["op"] not in decode_benchmark.PRODUCT_OPS for o in prof["top_other"])
    assert "profile of 6 generation steps" in printed and "tiny-qwen3, int8" in printed


def test_gpt_to_hf_gives_transformers_the_same_logits():
    from utils.cli.decode_benchmark import gpt_to_hf
    torch.manual_seed(0)
    model = GPTModel(dataclasses.replace(GPT_TINY, qkv_bias=True)).eval()
    x = torch.randint(0, GPT_TINY.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gpt_to_hf(model)(x).logits, model(x), atol=1e-4, rtol=1e-4)
