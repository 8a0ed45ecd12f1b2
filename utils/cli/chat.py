"""Chat with your instruction-finetuned model in a terminal (hand-written command).

Loads a checkpoint written by notebooks/07_instruction_finetuning.ipynb (or any course
checkpoint), wraps each line you type in chapter 7's Alpaca prompt format, and prints the
response token by token as it is generated, stopping at <|endoftext|>:

    python -m utils.cli.chat                                   # checkpoints/07_instruction_model.pt
    python -m utils.cli.chat --checkpoint my_model.pt --temperature 0.7 --top-k 40

Type an instruction and press Enter; an empty line is ignored; `quit` or end of input
(Ctrl-D) exits, and so does Ctrl-C at the prompt (exit status 130); Ctrl-C during an answer
stops that answer and returns to the prompt. Bytes of the input that are not UTF-8 are read
as U+FFFD (the line says so). The model must know GPT-2's 50,257 tokens: the conversation is
tokenized with GPT-2's tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

from utils.checkpoint import CheckpointError, load_checkpoint
from utils.fast import CachedGPT
from utils.generation import generate
from utils.instruct import RESPONSE_HEADER, format_input
from utils.core.paths import checkpoint_dir
from utils.text import get_gpt2_tokenizer

__all__ = ["stream_response", "main"]

EOS_ID = 50256  # <|endoftext|>
GPT2_VOCAB_SIZE = 50_257  # the tokenizer's: every ID it gives must have an embedding row


def stream_response(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None):
    """Yield new token IDs one at a time until <|endoftext|> or `max_new_tokens`.
    The model runs behind notebook 08's key-value cache, so each token costs one position
    rather than the whole conversation; past the context length each token costs a full
    window, exactly as chapter 5's `generate` computes it."""
    context = model.cfg.context_length
    cached = CachedGPT(model)
    idx = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    for _ in range(max_new_tokens):
        longer = generate(cached, idx, 1, context, temperature=temperature, top_k=top_k,
                          eos_id=EOS_ID)
        if longer.shape[1] == idx.shape[1]:  # the model chose <|endoftext|>
            return
        idx = longer
        yield idx[0, -1].item()


def _answer(model, tokenizer, instruction: str, args, out) -> None:
    prompt = format_input({"instruction": instruction, "input": ""}) + RESPONSE_HEADER
    prompt_ids = tokenizer.encode(prompt, disallowed_special=())  # typed "<|endoftext|>" is text
    context = model.cfg.context_length
    if len(prompt_ids) >= context:
        print(f"[That instruction is {len(prompt_ids)} tokens with the prompt template, but this "
              f"model reads at most {context} tokens, including its answer. Please shorten it.]",
              file=out, flush=True)
        return
    generated: list[int] = []
    shown = ""
    for token_id in stream_response(model, prompt_ids, args.max_new_tokens, args.temperature,
                                    args.top_k):
        generated.append(token_id)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write("\n")


def _check_args(args) -> str | None:
    """What is wrong with the command-line values, before anything is loaded (None: fine)."""
    if args.max_new_tokens < 1:
        return f"--max-new-tokens must be at least 1, got {args.max_new_tokens}"
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        return f"--temperature must be a number >= 0 (0 = greedy), got {args.temperature}"
    if args.top_k is not None and args.top_k < 1:
        return f"--top-k must be at least 1, got {args.top_k}"
    return None


def _vocab_problem(model) -> str | None:
    """Why GPT-2's tokenizer cannot feed this model (None: it can)."""
    vocab = model.cfg.vocab_size
    if vocab < GPT2_VOCAB_SIZE:
        return (f"the checkpoint's vocab_size is {vocab:,}, smaller than the {GPT2_VOCAB_SIZE:,} "
                f"tokens of the GPT-2 tokenizer this chat uses (its token IDs would have no "
                f"embedding); pass a checkpoint of a model with vocab_size {GPT2_VOCAB_SIZE:,}")
    return None


def _read_leniently(stdin):
    """Standard input with undecodable bytes read as U+FFFD rather than raised."""
    with contextlib.suppress(AttributeError, ValueError, OSError):
        stdin.reconfigure(errors="replace")  # a text stream (sys.stdin); others read as they are
    return stdin


def main(argv: list[str] | None = None, stdin=None, out=None) -> int:
    """Run the chat; returns the exit status (0, 2 for a bad argument or model, 130 after
    Ctrl-C at the prompt)."""
    out = out or sys.stdout
    try:
        return _chat(argv, stdin, out)
    except KeyboardInterrupt:  # Ctrl-C while loading or at the prompt: leave quietly
        print("\nBye.", file=out, flush=True)
        return 130


def _chat(argv, stdin, out) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.cli.chat",
                                     description="Chat with an instruction-finetuned model.")
    parser.add_argument("--checkpoint", type=Path,
                        default=checkpoint_dir() / "07_instruction_model.pt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    stdin = _read_leniently(stdin or sys.stdin)
    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        model = load_checkpoint(args.checkpoint).eval()
    except (FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}\nRun chapter 7's notebook (07_instruction_finetuning.ipynb) to create "
              f"the model, or pass --checkpoint PATH.", file=sys.stderr)
        return 2
    problem = _vocab_problem(model)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    tokenizer = get_gpt2_tokenizer()
    torch.manual_seed(args.seed)
    print(f"Loaded {args.checkpoint.name} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters). Type an instruction; `quit` or Ctrl-D to leave.", file=out, flush=True)
    while True:
        print("\n>>> ", end="", file=out, flush=True)
        try:
            line = stdin.readline()
        except UnicodeDecodeError as exc:  # a stream that could not be told to replace them
            print(file=out, flush=True)
            print(f"error: standard input is not UTF-8 text (byte 0x{exc.object[exc.start]:02x}"
                  f" at position {exc.start}); save it as UTF-8 first", file=sys.stderr)
            return 1
        if not line or line.strip().lower() in {"quit", "exit"}:  # end of input, or asked to
            print("\nBye.", file=out, flush=True)
            return 0
        if "\ufffd" in line:
            print("[Some bytes of that line are not UTF-8 text; they were read as \ufffd.]",
                  file=out, flush=True)
        if line.strip():
            try:
                _answer(model, tokenizer, line.strip(), args, out)
            except KeyboardInterrupt:  # Ctrl-C mid-answer: stop this answer, back to the prompt
                print(" [stopped]", file=out, flush=True)


if __name__ == "__main__":
    sys.exit(main())
