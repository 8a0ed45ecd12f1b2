"""Training and encoding speed of the from-scratch BPE tokenizer next to Hugging Face
`tokenizers` and tiktoken, measured side by side (hand-written command; notebook 02b builds
the tokenizer in utils/bpe.py).

    python -m utils.cli.bpe_benchmark                     # about a minute on 2 CPU cores
    python -m utils.cli.bpe_benchmark --json benchmarks/bpe/my-machine.json   # also save

The corpus is the course's four texts (the-verdict, the SMS collection, the instruction data
and the preference data) joined with newlines, about 1.09 MB, as notebook 02b builds it.

Training: our `train_bpe` against the BPE trainer of `tokenizers` (Rust) with the same
settings: GPT-2's split pattern (its ByteLevel pre-tokenizer without a prefix space), the 256
bytes as the initial alphabet, no special tokens, no minimum frequency, the same vocabulary
size; on the story to 500 tokens and on the corpus to each of --vocab-sizes. `tokenizers`
gets the corpus twice: as the one string our trainer gets (both then learn the same set of
merges, which is checked), and line by line, as its documentation feeds a corpus (its words
at line ends differ slightly, and it runs faster that way).

Encoding: the corpus with GPT-2's merges, by our `BPETokenizer` (with an empty word cache,
and with the cache left by earlier rounds), tiktoken (`encode_ordinary`) and `tokenizers` (a
BPE model read from the same two files); all four must give the same token IDs.

How it measures (`utils.core.timing.paired_rounds`): one warm-up round is not counted; then
every round runs each contender once, in an order rotated from round to round, so a slow
moment of the machine hits all of them alike. It prints the median of the rounds and, as
"speed", the row's median rate over ours (so our rows read 1.00x and 2.00x means twice as
fast as ours). Our code and tiktoken's encoder run on one thread; `tokenizers` may use
several (RAYON_NUM_THREADS).

The results: `results["train"]` holds one case per corpus and vocabulary size, each with its
rows by contender key (`ours`, `hf_one_string`, `hf_line_by_line`); `results["encode"]["rows"]`
by key (`ours_empty_cache`, `ours_warm_cache`, `tiktoken`, `tokenizers`). A row has its
printed `label`, the seconds of every round, `median_s`, `mb_per_s` (median, min, max) and
`ratio` (the "speed" column).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

from utils.bpe import BPETokenizer, bytes_to_unicode, load_gpt2_bpe, train_bpe
from utils.core.download import fetch
from utils.core.timing import describe_machine, paired_rounds, rate_table, save_results, timed
from utils.text import get_gpt2_tokenizer

__all__ = ["COURSE_TEXT_ASSETS", "course_corpus", "run_bpe_benchmark", "format_bpe_results"]

COURSE_TEXT_ASSETS = ["the-verdict", "sms-spam-collection", "instruction-data",
                      "instruction-data-with-preference"]
# The targets for our trainer: (case, vocabulary size, seconds).
TARGETS = [("the-verdict", 500, 1.0), ("course corpus", 5000, 30.0)]


def course_corpus() -> tuple[str, str]:
    """The story and the four course texts joined with newlines (fetched, offline if set)."""
    texts = [Path(fetch(name, progress=False)).read_text(encoding="utf-8")
             for name in COURSE_TEXT_ASSETS]
    return texts[0], "\n".join(texts)


LABELS = {"ours": "this implementation", "hf_one_string": "tokenizers, one string",
          "hf_line_by_line": "tokenizers, line by line",
          "ours_empty_cache": "this implementation, empty word cache",
          "ours_warm_cache": "this implementation, warm word cache",
          "tiktoken": "tiktoken", "tokenizers": "tokenizers"}  # the printed names of the rows


def _rounds(contenders: dict, rounds: int, label: str, progress: bool) -> dict:
    """Seconds of each contender (plain functions) over paired rounds, by key."""
    return paired_rounds({key: timed(fn) for key, fn in contenders.items()}, rounds,
                         label if progress else None)


def _rows(seconds: dict, baseline: str, nbytes: int) -> dict:
    """One row per contender, by key: its label, the seconds, MB/s and the ratio to ours."""
    rows = rate_table(seconds, nbytes / 1e6, baseline, "mb_per_s")
    return {key: {"label": LABELS[key], **row} for key, row in rows.items()}


def _hf_train(batches: list[str], vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(batches, trainer)
    return tokenizer


def _hf_merges(tokenizer) -> set[tuple[str, str]]:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return {tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges}


def _our_merges(merges: dict) -> set[tuple[str, str]]:
    """Our merges written the way `tokenizers` writes them (GPT-2's printable bytes)."""
    vocab, char = BPETokenizer(merges).vocab, bytes_to_unicode()
    spell = lambda i: "".join(char[b] for b in vocab[i])  # noqa: E731
    return {(spell(a), spell(b)) for a, b in merges}


def _train_case(case: str, text: str, vocab_size: int, rounds: int, progress: bool) -> dict:
    learned = {}

    def ours():
        learned["ours"] = train_bpe(text, vocab_size)

    def hf_one_string():
        learned["hf"] = _hf_train([text], vocab_size)

    contenders = {"ours": ours, "hf_one_string": hf_one_string,
                  "hf_line_by_line": lambda: _hf_train(text.splitlines(True), vocab_size)}
    seconds = _rounds(contenders, rounds, f"training {case} to {vocab_size}", progress)
    return {"case": case, "text_bytes": len(text.encode("utf-8")), "vocab_size": vocab_size,
            "merges": len(learned["ours"]),
            "same_merges": _our_merges(learned["ours"]) == _hf_merges(learned["hf"]),
            "rows": _rows(seconds, "ours", len(text.encode("utf-8")))}


def _encode_all(text: str, rounds: int, progress: bool) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers
    ours, tiktoken_gpt2 = load_gpt2_bpe(), get_gpt2_tokenizer()
    hf = Tokenizer(models.BPE.from_file(str(fetch("gpt2-encoder-json", progress=False)),
                                        str(fetch("gpt2-vocab-bpe", progress=False))))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ids = {}

    def keep(name, encode, before=None):  # a contender that stores the IDs it produced
        def run():
            if before:
                before()
            ids[name] = encode(text)
        return run

    contenders = {
        "ours_empty_cache": keep("ours", ours.encode, ours.cache.clear),
        "ours_warm_cache": keep("ours, warm", ours.encode),
        "tiktoken": keep("tiktoken", tiktoken_gpt2.encode_ordinary),
        "tokenizers": keep("tokenizers", lambda t: hf.encode(t).ids)}
    seconds = _rounds(contenders, rounds, "encoding", progress)
    return {"text_bytes": len(text.encode("utf-8")), "tokens": len(ids["tiktoken"]),
            "identical_ids": all(v == ids["tiktoken"] for v in ids.values()),
            "rows": _rows(seconds, "ours_empty_cache", len(text.encode("utf-8")))}


def _machine() -> dict:
    """The shared machine description, with the versions and thread settings that matter here."""
    return {**describe_machine("cpu"), "tiktoken": version("tiktoken"),
            "tokenizers": version("tokenizers"), "regex": version("regex"),
            "threads": {var: os.environ.get(var, "unset")
                        for var in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS")},
            "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def run_bpe_benchmark(story: str | None = None, corpus: str | None = None,
                      vocab_sizes=(500, 5000), story_vocab_size: int = 500, rounds: int = 5,
                      encode_rounds: int = 5, progress: bool = True) -> dict:
    """Time training (ours and `tokenizers`) and encoding (ours, tiktoken, `tokenizers`)
    side by side; `story` and `corpus` default to the course's texts. Returns a dict."""
    try:
        import tokenizers  # noqa: F401
    except ImportError as err:
        raise ImportError("the benchmark compares with Hugging Face tokenizers: "
                          "pip install tokenizers") from err
    machine = _machine()  # before the work, so the load average is the machine's own
    if story is None or corpus is None:
        default_story, default_corpus = course_corpus()
        story, corpus = story or default_story, corpus or default_corpus
    cases = [("the-verdict", story, story_vocab_size)]
    cases += [("course corpus", corpus, size) for size in vocab_sizes]
    train = [_train_case(case, text, size, rounds, progress) for case, text, size in cases]
    targets = []
    for case, size, limit in TARGETS:
        for result in train:
            if (result["case"], result["vocab_size"]) == (case, size):
                median = result["rows"]["ours"]["median_s"]
                targets.append({"case": case, "vocab_size": size, "limit_s": limit,
                                "median_s": median, "met": median < limit})
    return {"machine": machine,
            "setup": {"rounds": rounds, "encode_rounds": encode_rounds,
                      "story_bytes": len(story.encode("utf-8")),
                      "corpus_bytes": len(corpus.encode("utf-8"))},
            "train": train, "encode": _encode_all(corpus, encode_rounds, progress),
            "targets": targets}


def format_bpe_results(results: dict, details: bool = True) -> str:
    """The results as a plain-text table; `details=False` leaves out what only a maintainer
    needs (thread settings, the load average, the targets)."""
    m, s = results["machine"], results["setup"]
    threads = ", ".join(f"{k}={v}" for k, v in m["threads"].items())
    setting = f"; {threads}; load average {m['load_average']} at the start" if details else ""
    lines = [f"CPU: {m['cpu']} ({m['cpu_count']} cores{setting}); Python {m['python']}, "
             f"tiktoken {m['tiktoken']}, tokenizers {m['tokenizers']}",
             f"story {s['story_bytes']:,} bytes; corpus {s['corpus_bytes']:,} bytes; medians of "
             f"{s['rounds']} rounds (encoding {s['encode_rounds']}) after a warm-up round; "
             f"speed = our median / the row's median", "",
             f"{'training':<16}{'trainer':<28}{'vocab':>6}{'seconds':>10}{'speed':>9}"]
    for case in results["train"]:
        for i, row in enumerate(case["rows"].values()):
            label = case["case"] if i == 0 else ""  # the case's name on its first line
            lines.append(f"{label:<16}{row['label']:<28}{case['vocab_size']:>6,}"
                         f"{row['median_s']:>10.3f}{row['ratio']:>8.2f}x")
    lines.append("same set of merges as tokenizers given the same string (ties between equally "
                 "frequent pairs may be broken differently): " + ", ".join(
                     f"{c['case']} {c['vocab_size']:,}: {c['same_merges']}" for c in results["train"]))
    enc = results["encode"]
    lines += ["", f"{'encoding the corpus with GPT-2 merges':<44}{'MB/s':>9}{'speed':>9}"]
    for row in enc["rows"].values():
        lines.append(f"{row['label']:<44}{row['mb_per_s']['median']:>9.2f}{row['ratio']:>8.2f}x")
    lines.append(f"identical token IDs from all four: {enc['identical_ids']} "
                 f"({enc['tokens']:,} tokens)")
    targets = results["targets"] if details else []
    if targets:
        lines.append("")
    for t in targets:
        verdict = "met" if t["met"] else "MISSED"
        lines.append(f"target: {t['case']} to {t['vocab_size']:,} tokens in under "
                     f"{t['limit_s']:g} s: {verdict} ({t['median_s']:.3f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time the from-scratch BPE (utils.bpe) against Hugging Face tokenizers "
                    "(training) and tiktoken and tokenizers (encoding), side by side.")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[500, 5000],
                        help="vocabulary sizes to train on the corpus (default: 500 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="timed training rounds")
    parser.add_argument("--encode-rounds", type=int, default=5, help="timed encoding rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = run_bpe_benchmark(vocab_sizes=args.vocab_sizes, rounds=args.rounds,
                                encode_rounds=args.encode_rounds)
    print(format_bpe_results(results))
    if args.json:
        save_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
