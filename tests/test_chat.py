"""The chat command: a scripted conversation with a tiny model, streaming through the cache,
typed special tokens read as text, and one-line errors for bad arguments and a missing model."""

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
