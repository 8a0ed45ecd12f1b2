"""What notebook 02 exports into utils/text.py: tokenizers, the dataset and the loader."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from utils.core.assets import get_asset
from utils.text import (GPTDatasetV1, SimpleTokenizerV1, SimpleTokenizerV2,
                        create_dataloader_v1, get_gpt2_tokenizer)

STORY = ('I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow '
         'enough--so it was no great surprise to me to hear that, in the height of his glory, '
         'he had dropped his painting.')
COURSE_TEXT = ("Hello, do you like tea? <|endoftext|> In the sunlit terraces"
               " of someunknownPlace.")
COURSE_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812,
              2114, 286, 617, 34680, 27271, 13]


def story_vocab(extra=()):
    tokens = sorted({t for t in re.split(r'([,.:;?_!"()\']|--|\s)', STORY) if t.strip()})
    return {t: i for i, t in enumerate([*tokens, *extra])}


class CountingTokenizer:
    """A stand-in BPE: every whitespace-separated word becomes one ID (its position)."""

    def encode(self, text, allowed_special=None, disallowed_special=None):
        return list(range(len(text.split())))


# --- simple tokenizers ------------------------------------------------------------------

def test_v1_round_trip():
    tok = SimpleTokenizerV1(story_vocab())
    text = "Jack Gisburn had dropped his painting."
    assert tok.decode(tok.encode(text)) == text


def test_v1_unknown_word_is_a_clear_error_not_a_key_error():
    tok = SimpleTokenizerV1(story_vocab())
    with pytest.raises(ValueError) as err:
        tok.encode("Hello, Jack Gisburn")
    assert not isinstance(err.value, KeyError)
    assert "'Hello'" in str(err.value) and "SimpleTokenizerV2" in str(err.value)


def test_v2_maps_unknown_words_to_unk_and_keeps_endoftext():
    vocab = story_vocab(extra=("<|endoftext|>", "<|unk|>"))
    tok = SimpleTokenizerV2(vocab)
    ids = tok.encode("Hello, Jack <|endoftext|> palace.")
    assert ids == [vocab["<|unk|>"], vocab[","], vocab["Jack"], vocab["<|endoftext|>"],
                   vocab["<|unk|>"], vocab["."]]
    assert tok.decode(ids) == "<|unk|>, Jack <|endoftext|> <|unk|>."


def test_v2_needs_an_unk_token():
    with pytest.raises(ValueError, match="needs '<\\|unk\\|>'"):
        SimpleTokenizerV2(story_vocab())


# --- GPT-2 BPE --------------------------------------------------------------------------

def test_gpt2_tokenizer_works_offline_from_the_mirror(monkeypatch, tmp_path, mirror_dir,
                                                      no_network):
    monkeypatch.setenv("LLM_COURSE_DATA", str(tmp_path))  # an empty cache
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
    monkeypatch.setenv("LLM_COURSE_OFFLINE", "1")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    get_gpt2_tokenizer.cache_clear()
    try:
        tok = get_gpt2_tokenizer()
        assert tok.n_vocab == 50257
        ids = tok.encode(COURSE_TEXT, allowed_special={"<|endoftext|>"})
        assert ids == COURSE_IDS
        assert tok.decode(ids) == COURSE_TEXT
        assert (tmp_path / "gpt2" / "encoder.json").is_file()  # fetched via the mirror
        for name in ("gpt2-vocab-bpe", "gpt2-encoder-json"):  # and left where tiktoken looks
            url = get_asset(name).url
            shared = tmp_path / "tiktoken" / hashlib.sha1(url.encode()).hexdigest()
            assert shared.read_bytes() == (tmp_path / get_asset(name).filename).read_bytes()
    finally:
        get_gpt2_tokenizer.cache_clear()


# --- sliding windows --------------------------------------------------------------------

@pytest.mark.parametrize("max_length,stride", [(4, 1), (4, 2), (4, 4), (3, 5)])
def test_windows_and_targets(max_length, stride):
    text = " ".join(["w"] * 20)  # token IDs 0..19
    ds = GPTDatasetV1(text, CountingTokenizer(), max_length, stride)
    starts = list(range(0, 20 - max_length, stride))
    assert len(ds) == len(starts)
    for k, start in enumerate(starts):
        x, y = ds[k]
        assert x.tolist() == list(range(start, start + max_length))
        assert y.tolist() == list(range(start + 1, start + max_length + 1))  # shifted by one


def test_text_too_short_for_one_window_is_a_clear_error():
    with pytest.raises(ValueError, match=r"has 4 tokens.*max_length \+ 1 = 5"):
        GPTDatasetV1("a b c d", CountingTokenizer(), max_length=4, stride=1)
    with pytest.raises(ValueError, match="has 0 tokens"):
        GPTDatasetV1("", CountingTokenizer(), max_length=4, stride=1)
    with pytest.raises(ValueError, match="must be positive"):
        GPTDatasetV1("a b c d e f", CountingTokenizer(), max_length=4, stride=0)


@pytest.fixture
def verdict(monkeypatch, mirror_dir):
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
    return (mirror_dir / "the-verdict.txt").read_text(encoding="utf-8")


def test_loader_first_batch_matches_the_book(verdict):
    loader = create_dataloader_v1(verdict, batch_size=1, max_length=4, stride=1, shuffle=False)
    x, y = next(iter(loader))
    assert x.tolist() == [[40, 367, 2885, 1464]] and y.tolist() == [[367, 2885, 1464, 1807]]


def test_loader_shapes_and_drop_last(verdict):
    loader = create_dataloader_v1(verdict, batch_size=8, max_length=4, stride=4, shuffle=False)
    batches = list(loader)
    assert len(batches) == (5145 - 4 + 3) // 4 // 8  # 1286 windows, 160 full batches
    assert all(x.shape == (8, 4) and y.shape == (8, 4) for x, y in batches)
    assert all(x.dtype == torch.long for x, _ in batches)


def test_shuffled_loader_is_deterministic_with_a_seed(verdict):
    def first_two():
        torch.manual_seed(123)
        it = iter(create_dataloader_v1(verdict, batch_size=4, max_length=8, stride=8))
        return [next(it)[0] for _ in range(2)]

    a, b = first_two(), first_two()
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    unshuffled = next(iter(create_dataloader_v1(verdict, batch_size=4, max_length=8, stride=8,
                                                shuffle=False)))[0]
    assert not torch.equal(a[0], unshuffled)


def test_loader_that_would_be_empty_is_a_clear_error(verdict):
    with pytest.raises(ValueError, match="loader would be empty"):
        create_dataloader_v1(verdict[:200], batch_size=64, max_length=4, stride=4)
    with pytest.raises(ValueError, match="one input/target window needs"):
        create_dataloader_v1("Too short.", max_length=256)
