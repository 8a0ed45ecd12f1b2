"""The chat command: a scripted conversation with a tiny model, streaming through the cache,
typed special tokens read as text, and one-line errors for bad arguments and a missing model."""

import dataclasses
import io

import pytest
import torch

import utils.cli.chat as chat
from utils.cli.chat import main, stream_response
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.generation import generate
from utils.instruct import RESPONSE_HEADER, format_input
from utils.text import get_gpt2_tokenizer
from utils.model import GPT_TINY, GPTModel


def tiny_checkpoint(path):
    torch.manual_seed(0)
    return save_checkpoint(path, GPTModel(GPT_TINY))


def test_scripted_conversation(tmp_path, mirror_dir, monkeypatch):
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    stdin = io.StringIO("Name a color.\n\n" + "word " * 80 + "\n")  # then end of input
    out = io.StringIO()
    assert main(["--checkpoint", str(ckpt), "--max-new-tokens", "6"], stdin=stdin, out=out) == 0
    text = out.getvalue()
    assert text.count(">>> ") == 4  # three lines read, then end of input
    assert "model reads at most 64 tokens" in text  # the long one is refused
    assert text.rstrip().endswith("Bye.")
    first_answer = text.split(">>> ")[1].split("\n")[0]
    model = load_checkpoint(ckpt).eval()  # what plain greedy generation answers
    tokenizer = get_gpt2_tokenizer()
    prompt = tokenizer.encode(format_input({"instruction": "Name a color.", "input": ""})
                              + RESPONSE_HEADER)
    expected = generate(model, torch.tensor([prompt]), 6, GPT_TINY.context_length, eos_id=50256)
    assert first_answer == tokenizer.decode(expected[0, len(prompt):].tolist())


def test_stream_stops_at_end_of_text():
    class SaysEnd(torch.nn.Module):  # an output head that says 7, 7, then <|endoftext|>
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            logits = torch.zeros(*x.shape[:2], 50257)
            logits[:, :, 50256 if self.calls > 2 else 7] = 1.0
            return logits

    torch.manual_seed(0)
    model = GPTModel(GPT_TINY).eval()
    model.out_head = SaysEnd()
    assert list(stream_response(model, [1, 2], max_new_tokens=10)) == [7, 7]


def test_stream_through_the_cache_matches_plain_generation():
    torch.manual_seed(0)
    model = GPTModel(GPT_TINY).eval()
    prompt = [5, 17, 301, 42]
    streamed = list(stream_response(model, prompt, max_new_tokens=40))  # through the cache
    plain = generate(model, torch.tensor([prompt]), 40, GPT_TINY.context_length, eos_id=50256)
    assert len(streamed) == 40 and streamed == plain[0, len(prompt):].tolist()
    torch.manual_seed(1)
    sampled = list(stream_response(model, prompt, max_new_tokens=10, temperature=1.0, top_k=5))
    torch.manual_seed(1)
    plain = generate(model, torch.tensor([prompt]), 10, GPT_TINY.context_length,
                     temperature=1.0, top_k=5, eos_id=50256)
    assert sampled == plain[0, len(prompt):].tolist()


def test_stream_goes_on_past_the_context_length():
    torch.manual_seed(0)
    model = GPTModel(GPT_TINY).eval()  # context 64
    assert len(list(stream_response(model, list(range(60)), max_new_tokens=30))) == 30


def test_typed_special_tokens_are_text(tmp_path, mirror_dir, monkeypatch):
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    prompts = []

    def remember_prompt(model, prompt_ids, *args):
        prompts.append(prompt_ids)
        return stream_response(model, prompt_ids, *args)

    monkeypatch.setattr(chat, "stream_response", remember_prompt)
    out = io.StringIO()
    code = main(["--checkpoint", str(ckpt), "--max-new-tokens", "3"],
                stdin=io.StringIO("What is <|endoftext|>?\n"), out=out)
    assert code == 0 and out.getvalue().rstrip().endswith("Bye.")
    [prompt] = prompts
    assert 50256 not in prompt  # not the end-of-text token, which would end the answer at once
    assert "What is <|endoftext|>?" in get_gpt2_tokenizer().decode(prompt)


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--temperature", "nan"], "--temperature must be a number >= 0"),
    (["--temperature", "-1"], "--temperature must be a number >= 0"),
    (["--top-k", "0"], "--top-k must be at least 1")])
def test_bad_arguments_are_one_line_errors_before_loading_anything(args, message, capsys):
    assert main(["--checkpoint", "/no/such/file.pt", *args], stdin=io.StringIO("")) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "No checkpoint" not in captured.err
    assert captured.out == ""


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "none.pt")], stdin=io.StringIO("")) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: No checkpoint at")
    assert "07_instruction_finetuning" in captured.err and captured.out == ""


def _run(argv, stdin, out):
    """main(), with a Ctrl-C that escapes it turned into a test failure (not the end of the
    whole pytest run, which is what an escaping KeyboardInterrupt would be)."""
    try:
        return main(argv, stdin=stdin, out=out)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the chat as a KeyboardInterrupt traceback")


def test_a_checkpoint_with_a_smaller_vocabulary_is_refused_in_one_line(tmp_path, mirror_dir,
                                                                      monkeypatch, capsys):
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "small-vocab.pt",
                           GPTModel(dataclasses.replace(GPT_TINY, vocab_size=1000)))
    assert main(["--checkpoint", str(ckpt)], stdin=io.StringIO("Name a color.\n")) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "vocab_size is 1,000" in captured.err and "50,257" in captured.err
    assert captured.out == ""  # refused at load, before the first prompt


def test_stdin_that_is_not_utf8_is_read_with_replacement_characters(tmp_path, mirror_dir,
                                                                    monkeypatch):
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    stdin = io.TextIOWrapper(io.BytesIO(b"Caf\xe9 \xff?\nName a color.\n"), encoding="utf-8",
                             errors="strict")  # as sys.stdin decodes a pipe
    out = io.StringIO()
    assert _run(["--checkpoint", str(ckpt), "--max-new-tokens", "2"], stdin, out) == 0
    text = out.getvalue()
    assert text.count("not UTF-8 text") == 1 and text.count(">>> ") == 3  # both lines answered
    assert text.rstrip().endswith("Bye.")


class _CtrlCAtPrompt:
    """Standard input on which the user presses Ctrl-C instead of typing."""

    def readline(self):
        raise KeyboardInterrupt


def test_ctrl_c_at_the_prompt_leaves_quietly(tmp_path, mirror_dir, monkeypatch, capsys):
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    out = io.StringIO()
    assert _run(["--checkpoint", str(ckpt)], _CtrlCAtPrompt(), out) == 130
    assert out.getvalue().rstrip().endswith("Bye.")
    assert capsys.readouterr().err == ""


def test_ctrl_c_mid_answer_stops_it_and_returns_to_the_prompt(tmp_path, mirror_dir, monkeypatch):
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    answers = []

    def interrupted_once(model, prompt_ids, *args):
        answers.append(prompt_ids)
        yield 464  # "The"
        if len(answers) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first answer streams
        yield 3124  # " color"

    monkeypatch.setattr(chat, "stream_response", interrupted_once)
    out = io.StringIO()
    code = _run(["--checkpoint", str(ckpt)], io.StringIO("Name a color.\nAgain.\n"), out)
    assert code == 0 and len(answers) == 2  # the second line was read and answered
    first, second = out.getvalue().split(">>> ")[1:3]
    assert first == "The [stopped]\n\n" and second == "The color\n\n"
    assert out.getvalue().rstrip().endswith("Bye.")
