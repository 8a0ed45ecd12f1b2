"""What notebook 02b exports into utils/bpe.py: a byte-level BPE tokenizer and its trainers,
checked against tiktoken's GPT-2 encoding on all of the course's data, and the benchmark."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from utils.bpe import (BPETokenizer, bytes_to_unicode, count_pairs, count_words,
                       get_openai_encoding, load_bpe, load_gpt2_bpe, merge_pair, save_bpe,
                       train_bpe, train_bpe_naive)
from utils.core.download import AssetUnavailableError
from utils.text import get_gpt2_tokenizer

COURSE_FILES = ["the-verdict.txt", "SMSSpamCollection.tsv", "instruction-data.json",
                "instruction-data-with-preference.json"]
COURSE_TEXT = ("Hello, do you like tea? <|endoftext|> In the sunlit terraces"
               " of someunknownPlace.")
COURSE_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812,
              2114, 286, 617, 34680, 27271, 13]
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """The offline mirror, used as the only source (an empty cache) for the whole module."""
    import os
    from pathlib import Path
    value = os.environ.get("LLM_COURSE_MIRROR")
    if not value or not Path(value).is_dir():
        pytest.skip("set LLM_COURSE_MIRROR to a folder of the course's data files")
    patch = pytest.MonkeyPatch()
    patch.setenv("LLM_COURSE_DATA", str(tmp_path_factory.mktemp("cache")))
    patch.setenv("LLM_COURSE_OFFLINE", "1")
    get_gpt2_tokenizer.cache_clear()
    yield Path(value)
    get_gpt2_tokenizer.cache_clear()
    patch.undo()


@pytest.fixture(scope="module")
def gpt2(mirror):
    return load_gpt2_bpe()  # through fetch, from the mirror into the empty cache


@pytest.fixture(scope="module")
def reference(mirror):
    return get_gpt2_tokenizer()  # tiktoken's "gpt2", built from the same files


@pytest.fixture(scope="module")
def course_texts(mirror):
    return {name: (mirror / name).read_text(encoding="utf-8") for name in COURSE_FILES}


# --- building blocks --------------------------------------------------------------------

def test_pairs_and_merge_on_the_toy_string():
    ids = list(b"aaabdaaabac")
    assert count_pairs(ids)[(97, 97)] == 4
    assert count_pairs(ids, {(97, 97): 1}, weight=2)[(97, 97)] == 9
    assert merge_pair(ids, (97, 97), 256) == [256, 97, 98, 100, 256, 97, 98, 97, 99]
    assert merge_pair([97, 97, 97, 97], (97, 97), 256) == [256, 256]  # left to right, no overlap
    assert merge_pair([1], (1, 2), 256) == [1] and merge_pair([], (1, 2), 256) == []


def test_split_pattern_keeps_every_character():
    text = "Hello world!! I'll pay $1,000   for 3 cafés.\n\nOK?  \t"
    words = count_words(text)
    assert sum(len(w) * n for w, n in words.items()) == len(text)
    assert words[" world"] == 1 and words["'ll"] == 1 and words["  "] == 1 and words[" for"] == 1


def test_bytes_to_unicode_is_gpt2s_table():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


# --- identical to tiktoken's GPT-2 -------------------------------------------------------

def test_loads_gpt2_through_fetch(gpt2, mirror):
    import os
    from pathlib import Path
    assert gpt2.n_vocab == 50257 and len(gpt2.merges) == 50000
    cache = Path(os.environ["LLM_COURSE_DATA"])
    assert (cache / "gpt2" / "encoder.json").is_file() and (cache / "gpt2" / "vocab.bpe").is_file()


def test_every_token_is_tiktokens(gpt2, reference):
    for i in range(50256):
        assert gpt2.vocab[i] == reference.decode_single_token_bytes(i), i
    assert gpt2.special_tokens == {EOT: 50256}


def test_chapter_2_sentence(gpt2):
    ids = gpt2.encode(COURSE_TEXT, allowed_special={EOT})
    assert ids == COURSE_IDS
    assert gpt2.decode(ids) == COURSE_TEXT


@pytest.mark.parametrize("name", COURSE_FILES)
def test_course_data_encodes_to_tiktokens_ids(gpt2, reference, course_texts, name):
    text = course_texts[name]
    ids = gpt2.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert gpt2.decode(ids) == text == reference.decode(ids)
    if name == "the-verdict.txt":
        assert len(ids) == 5145  # the number chapter 2 prints


def test_course_data_piece_by_piece(gpt2, reference, course_texts):
    """Each SMS message and each field of every instruction and preference entry on its own:
    the start and end of a text are where a word split could differ."""
    import json
    pieces = [line.split("\t", 1)[1] for line in course_texts["SMSSpamCollection.tsv"].splitlines()]
    for name in COURSE_FILES[2:]:
        for entry in json.loads(course_texts[name]):
            pieces += [v for v in entry.values() if isinstance(v, str)]
    assert len(pieces) > 5572 + 2 * 1100 * 3
    for piece in pieces:
        assert gpt2.encode(piece) == reference.encode_ordinary(piece), piece
        assert gpt2.encode(piece, allowed_special={EOT}) == \
            reference.encode(piece, allowed_special={EOT}), piece


def test_random_text_matches_tiktoken(gpt2, reference):
    pool = list("abcXYZ019 '\t\n\r.,!?-_\"") + [
        "'s", "'ll", "'re", "'ve", "'d", "'m", "'t", "é", "ß", "ñ", "中", "文", "🙂", "👍🏽", "\u0301",
        "\u00a0", "\u2028", "\u3000", "٣", "Ⅻ", "\x00", "\x85", "’", "  ", "\n\n", EOT, "<|endo"]
    rng = random.Random(123)
    for _ in range(3000):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))
        assert gpt2.encode(text) == reference.encode_ordinary(text), repr(text)
        assert gpt2.encode(text, allowed_special="all") == \
            reference.encode(text, allowed_special="all"), repr(text)
        assert gpt2.decode(gpt2.encode(text)) == text


def test_endoftext_never_crashes_and_matches_tiktoken(gpt2, reference):
    text = f"the end.{EOT}A new story{EOT}"
    assert gpt2.encode(text) == reference.encode_ordinary(text)  # by default: ordinary text
    assert gpt2.encode(text) == reference.encode(text, disallowed_special=())
    with pytest.raises(ValueError):
        reference.encode(text)  # tiktoken's default, which ours deliberately does not copy
    for allowed in [{EOT}, "all"]:
        ids = gpt2.encode(text, allowed_special=allowed)
        assert ids == reference.encode(text, allowed_special=allowed)
        assert ids.count(50256) == 2 and gpt2.decode(ids) == text
    assert gpt2.encode(text, allowed_special={"<|unknown|>"}) == gpt2.encode(text)  # ignored


def test_encode_takes_tiktokens_disallowed_special(gpt2, reference):
    text = f"the end.{EOT}A new story"
    assert gpt2.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())
    for tokenizer in (gpt2, reference):
        for disallowed in ["all", {EOT}]:
            with pytest.raises(ValueError, match="allowed_special"):
                tokenizer.encode(text, disallowed_special=disallowed)
        with pytest.raises(ValueError):  # a token named in both is still disallowed
            tokenizer.encode(text, allowed_special={EOT}, disallowed_special={EOT})
    # "all" means every special token that is not allowed
    assert gpt2.encode(text, allowed_special={EOT}, disallowed_special="all") == \
        reference.encode(text, allowed_special={EOT}, disallowed_special="all")
    assert gpt2.encode("no special token here", disallowed_special="all") == \
        reference.encode("no special token here")


def test_decoding_partial_characters_like_tiktoken(gpt2, reference):
    ids = gpt2.encode("🙂 café")
    for i in range(len(ids)):
        assert gpt2.decode(ids[:i]) == reference.decode(ids[:i])
    assert gpt2.decode([50256]) == EOT


def test_drops_into_chapter_2s_dataset(gpt2, course_texts):
    from utils.text import GPTDatasetV1
    dataset = GPTDatasetV1(course_texts["the-verdict.txt"], gpt2, max_length=4, stride=1)
    x, y = dataset[0]
    assert x.tolist() == [40, 367, 2885, 1464] and y.tolist() == [367, 2885, 1464, 1807]


# --- training ---------------------------------------------------------------------------

def random_texts(n: int, seed: int):
    """Small texts with few distinct letters: many ties, repeated letters, overlapping pairs."""
    rng = random.Random(seed)
    for _ in range(n):
        words = ["".join(rng.choice("aab b") for _ in range(rng.randint(1, 9)))
                 for _ in range(rng.randint(1, 30))]
        yield " ".join(words) + rng.choice(["", "\n", "!", " é"])


def test_incremental_and_naive_trainers_learn_identical_merges(course_texts):
    for text in list(random_texts(200, seed=1)) + [course_texts["the-verdict.txt"]]:
        for vocab_size in (256, 270, 400):
            fast, naive = train_bpe(text, vocab_size), train_bpe_naive(text, vocab_size)
            assert list(fast.items()) == list(naive.items()), (text[:40], vocab_size)


def test_training_is_greedy_and_stops_when_nothing_is_left():
    text = "low lower lowest newer wider " * 5
    merges = train_bpe(text, 300)
    assert list(train_bpe(text, 270).items()) == list(merges.items())[:14]  # a prefix
    assert sorted(merges.values()) == list(range(256, 256 + len(merges)))
    assert len(merges) < 44  # every word became one token before 44 merges
    assert all(len(BPETokenizer(merges).encode(w)) == 1 for w in count_words(text))
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe(text, 100)


def test_first_merges_on_the_story(course_texts):
    tok = BPETokenizer(train_bpe(course_texts["the-verdict.txt"], 300))
    assert [tok.decode([i]) for i in range(256, 265)] == \
        [" t", "he", " a", "in", " h", " s", " w", " o", " the"]


def test_trained_tokenizer_round_trips_unseen_text_and_compresses(course_texts):
    story = course_texts["the-verdict.txt"]
    small, large = (BPETokenizer(train_bpe(story, size)) for size in (300, 1000))
    unseen = "Zürich, 3 cafés 🙂 and\ttabs\r\n  <|endoftext|>"
    for tok in (small, large):
        assert tok.decode(tok.encode(unseen)) == unseen
        assert tok.decode(tok.encode(story)) == story
    assert len(large.encode(story)) < len(small.encode(story)) < len(story.encode("utf-8"))


def test_special_tokens_of_a_trained_tokenizer():
    merges = train_bpe("the end of the story " * 10, 270)
    tok = BPETokenizer(merges, special_tokens={EOT: 270})
    ids = tok.encode(f"the end{EOT}", allowed_special="all")
    assert ids[-1] == 270 and tok.decode(ids) == f"the end{EOT}" and tok.n_vocab == 271
    assert 270 not in tok.encode(f"the end{EOT}")
    with pytest.raises(ValueError, match="already ordinary tokens"):
        BPETokenizer(merges, special_tokens={EOT: 256})


def test_other_split_patterns():
    merges = train_bpe("ab ab ab", 258, pattern=r"(?s).+")  # the whole text is one word
    tok = BPETokenizer(merges, pattern=r"(?s).+")
    assert [tok.decode([i]) for i in merges.values()] == ["ab", " ab"]  # tie: smaller IDs


def test_split_pattern_cuts_text_where_tiktoken_does(reference, course_texts):
    import regex
    text = course_texts["the-verdict.txt"] + " I'll pay $1,000   for 3 cafés.\n\n OK?  \t"
    assert count_words(text) == Counter(regex.findall(reference._pat_str, text))  # tiktoken's


# --- the benchmark ----------------------------------------------------------------------

def test_benchmark_runs_one_round_on_a_tiny_corpus(mirror):
    pytest.importorskip("tokenizers")
    from utils.cli.bpe_benchmark import format_bpe_results, run_bpe_benchmark
    results = run_bpe_benchmark(story="the cat sat on the mat. " * 10,
                                corpus="a tiny corpus of a few words\nand a few lines\n" * 20,
                                vocab_sizes=(280,), story_vocab_size=270, rounds=1,
                                encode_rounds=1, progress=False)
    assert [(c["case"], c["vocab_size"]) for c in results["train"]] == \
        [("the-verdict", 270), ("course corpus", 280)]
    for case in results["train"]:  # rows by key, each with its printed label
        assert {k: r["label"] for k, r in case["rows"].items()} == {
            "ours": "this implementation", "hf_one_string": "tokenizers, one string",
            "hf_line_by_line": "tokenizers, line by line"}
        assert case["rows"]["ours"]["ratio"] == 1.0 and len(case["rows"]["ours"]["seconds"]) == 1
    assert results["encode"]["identical_ids"] is True
    assert {k: r["label"] for k, r in results["encode"]["rows"].items()} == {
        "ours_empty_cache": "this implementation, empty word cache",
        "ours_warm_cache": "this implementation, warm word cache",
        "tiktoken": "tiktoken", "tokenizers": "tokenizers"}
    assert results["targets"] == []  # the targets are for the-verdict at 500, the corpus at 5,000
    text = format_bpe_results(results)
    assert "tokenizers, line by line" in text and "identical token IDs from all four: True" in text
    assert "load average" in text
    short = format_bpe_results(results, details=False)  # what the notebook shows a learner
    assert "load average" not in short and "identical token IDs from all four: True" in short


# --- saving and loading ---------------------------------------------------------------------

def test_a_saved_tokenizer_loads_back_the_same(tmp_path, gpt2, course_texts):
    story = course_texts["the-verdict.txt"]
    trained = BPETokenizer(train_bpe(story, 300), special_tokens={EOT: 300})
    for tokenizer in (trained, gpt2):
        path = save_bpe(tokenizer, tmp_path / "sub" / "tok.json")  # the folder is made
        assert not (tmp_path / "sub" / "tok.json.part").exists()
        loaded = load_bpe(path)
        assert loaded.merges == tokenizer.merges and loaded.vocab == tokenizer.vocab
        assert loaded.special_tokens == tokenizer.special_tokens
        text = story[:3000] + EOT + "Zürich 🙂"
        ids = tokenizer.encode(text, allowed_special="all")
        assert loaded.encode(text, allowed_special="all") == ids
        assert loaded.decode(ids) == text


def test_loading_a_file_that_is_not_a_tokenizer_says_so(tmp_path):
    for content in ("{not json", '{"merges": []}', "[1, 2]"):
        path = tmp_path / "other.json"
        path.write_text(content)
        with pytest.raises(ValueError, match="is not a tokenizer"):
            load_bpe(path)


# --- GPT-4's and GPT-4o's encodings -------------------------------------------------------

def test_openai_encoding_names_are_checked():
    with pytest.raises(ValueError, match="cl100k_base"):
        get_openai_encoding("cl100k")


@pytest.mark.parametrize("name, filename", [("cl100k_base", "cl100k_base.tiktoken"),
                                            ("o200k_base", "o200k_base.tiktoken")])
def test_openai_encoding_offline_without_its_file_says_which(monkeypatch, tmp_path, no_network,
                                                             name, filename):
    """Offline, with neither a cached copy nor one in the mirror, the error names the file
    (tiktoken itself would try the network and fail with a connection error)."""
    monkeypatch.setenv("LLM_COURSE_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(tmp_path))
    monkeypatch.setenv("LLM_COURSE_OFFLINE", "1")
    with pytest.raises(AssetUnavailableError, match=filename):
        get_openai_encoding(name)


def test_openai_encoding_from_the_mirror_where_it_has_the_file(monkeypatch, tmp_path, mirror,
                                                               no_network):
    """Where a maintainer has put the two files into the mirror (they are not among the
    course's offline copies), tiktoken builds the encoding from them without the network."""
    if not (mirror / "openai" / "cl100k_base.tiktoken").is_file():
        pytest.skip("the mirror has no openai/cl100k_base.tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    encoding = get_openai_encoding("cl100k_base")
    assert encoding.n_vocab == 100277 and encoding.encode("hello world") == [15339, 1917]


# --- damaged files ----------------------------------------------------------------------------

def test_damaged_gpt2_files_are_refused_naming_the_file_and_line(tmp_path, gpt2, reference):
    """A cut-off vocab.bpe used to load and quietly give other tokens (11 instead of 7 here)."""
    from utils.core.download import fetch
    text = "Hello world, it's 2024!"
    assert gpt2.encode(text) == reference.encode(text) and len(reference.encode(text)) == 7
    encoder_json, lines = fetch("gpt2-encoder-json"), fetch("gpt2-vocab-bpe").read_text(
        encoding="utf-8").split("\n")
    damaged = {"cut.bpe": ("\n".join(lines[:1001]) + "\n", "line 1001: the file ends after 1,000"),
               "empty.bpe": ("", "line 1: expected the header"),
               "one_symbol.bpe": ("\n".join(lines[:5] + ["Ġ"] + lines[6:]), "line 6: expected two"),
               "unknown.bpe": ("\n".join(lines[:3] + ["Ġ qqqzz"]), "line 4: 'qqqzz' is not a token")}
    for name, (content, says) in damaged.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=f"{name}, {says}.*fetched again"):
            load_gpt2_bpe(encoder_json, tmp_path / name)
    (tmp_path / "cut.json").write_text(encoder_json.read_text(encoding="utf-8")[:5000])
    with pytest.raises(ValueError, match="cut.json, line 1: not valid JSON.*fetched again"):
        load_gpt2_bpe(tmp_path / "cut.json", fetch("gpt2-vocab-bpe"))


def test_damaged_saved_tokenizer_is_refused_saying_what_is_wrong(tmp_path):
    import json
    path = save_bpe(BPETokenizer(train_bpe("low lower lowest " * 3, 262)), tmp_path / "tok.json")
    good = json.loads(path.read_text())
    a, b, new_id = good["merges"][0]
    damaged = [("merges", [[a, b]], r"merges\[0\] is \[\d+, \d+\], not three IDs"),
               ("merges", [[a, b, 255]], r"merges\[0\] = .*not the bytes of tokens"),
               ("vocab", {k: v for k, v in good["vocab"].items() if k != str(new_id)},
                r"merges\[0\] = .*not in 'vocab'"),
               ("vocab", {k: v for k, v in good["vocab"].items() if k != "97"},
                "1 of the 256 single bytes have no token"),
               ("special_tokens", None, "'special_tokens' is missing")]
    for key, value, says in damaged:
        path.write_text(json.dumps({**good, key: value}))
        with pytest.raises(ValueError, match=f"tok.json is damaged: {says}.*save_bpe"):
            load_bpe(path)


# --- long words, surrogates, argument types ---------------------------------------------------

def test_long_words_encode_like_tiktoken_in_far_less_than_quadratic_time(gpt2, reference):
    """The merge loop used to rescan the whole word after each merge: 4,000 letters took
    seconds. A heap of pairs ranked by merge takes O(n log n), with tiktoken's tokens."""
    import time
    rng = random.Random(7)

    def seconds_for(n_letters: int) -> float:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n_letters))
        start = time.perf_counter()
        ids = gpt2.encode(word)  # a new word each time: never in the word cache
        seconds = time.perf_counter() - start
        assert ids == reference.encode_ordinary(word)
        return seconds

    assert seconds_for(8000) < 0.25  # the quadratic loop: several seconds
    short, long = min(map(seconds_for, [1000] * 3)), min(map(seconds_for, [8000] * 3))
    assert long < 25 * short  # 8 times the letters: about 10 times the time, not 64
    mixed = ("Zürich " + "x" * 3000 + " 🙂\n\n  2024 " + "ab" * 700 + "!!" + "é" * 900 + " "
             + "1234567890" * 50 + " the end.")
    assert gpt2.encode(mixed) == reference.encode_ordinary(mixed)


def test_apply_merges_gives_the_tokens_of_the_naive_loop():
    """Random words over a few IDs and random merges, including ranks that a trainer would
    never produce (a merge ranked before the merges of its own tokens)."""
    from utils.bpe import apply_merges, apply_merges_naive
    rng = random.Random(11)
    for _ in range(1500):
        ranks = rng.sample(range(4, 60), rng.randint(0, 12))
        merges = {(rng.randrange(4 + k), rng.randrange(4 + k)): rank for k, rank in enumerate(ranks)}
        ids = [rng.randrange(4) for _ in range(rng.randint(0, 16))]
        assert apply_merges(ids, merges) == apply_merges_naive(ids, merges), (ids, merges)


def test_lone_surrogates_become_the_replacement_character_like_tiktoken(gpt2, reference):
    for text in ["\ud800", "a\udfffb", "a\ud83d\ude42b", f"x\udfff{EOT}\ud800 y"]:
        assert gpt2.encode(text) == gpt2.encode_ordinary(text) == reference.encode_ordinary(text)
        assert gpt2.encode(text, allowed_special="all") == \
            reference.encode(text, allowed_special="all")
    assert gpt2.decode(gpt2.encode("a\ud800b")) == "a\ufffdb"


def test_special_token_arguments_must_be_a_set_or_all(gpt2):
    text = f"the end.{EOT}"
    for argument in ["allowed_special", "disallowed_special"]:
        for wrong in [EOT, None, 50256, [EOT, 50256]]:
            with pytest.raises(TypeError, match=argument + r'.*"all" or a set.*\{"<\|endoftext'):
                gpt2.encode(text, **{argument: wrong})
    for allowed in [[EOT], (EOT,), frozenset({EOT}), {EOT: 1}]:  # any collection of strings
        assert gpt2.encode(text, allowed_special=allowed)[-1] == 50256


@pytest.mark.parametrize("trainer", [train_bpe, train_bpe_naive])
def test_vocab_size_must_be_an_int(trainer):
    import numpy as np
    for wrong in [260.5, "300", True, 300.0, None]:
        with pytest.raises(TypeError, match="vocab_size must be an int of at least 256"):
            trainer("low lower", wrong)
    assert len(trainer("low lower", np.int64(258))) == 2
