"""utils/instruct.py: the prompt format, the collate function (whose masked targets chapter 5's
loss skips), the data split, and the dataset, which reads typed special tokens as text."""

import torch

from utils.instruct import (InstructionDataset, custom_collate_fn, format_example, format_input,
                            split_instruction_data)
from utils.model import GPT_TINY, GPTModel
from utils.text import get_gpt2_tokenizer
from utils.train import calc_loss_batch

PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.")


def test_format_input_with_and_without_input():
    with_input = {"instruction": "Fix the spelling.", "input": "Ocassion", "output": "Occasion"}
    assert format_input(with_input) == (
        f"{PREAMBLE}\n\n### Instruction:\nFix the spelling.\n\n### Input:\nOcassion")
    no_input = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert format_input(no_input) == f"{PREAMBLE}\n\n### Instruction:\nName a color."
    assert format_example(no_input) == format_input(no_input) + "\n\n### Response:\nBlue."


def test_collate_pads_shifts_and_masks_the_book_example():
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4],
                               [5, 6, 50256, 50256, 50256],
                               [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256],
                                [6, 50256, -100, -100, -100],
                                [8, 9, 50256, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.long


def test_collate_truncates_to_the_allowed_length_and_uses_custom_ids():
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6]], pad_token_id=99,
                                        ignore_index=-1, allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 99]]
    assert targets.tolist() == [[1, 2, 3], [6, 99, -1]]


def test_chapter_5_loss_ignores_what_the_collate_function_masks():
    torch.manual_seed(0)
    model = GPTModel(GPT_TINY).eval()
    inputs, targets = custom_collate_fn([[1, 2, 3, 4, 5], [6, 7]])
    with torch.no_grad():
        loss = calc_loss_batch(inputs, targets, model, "cpu")  # what chapter 7 trains with
        logits = model(inputs)
        kept = targets != -100
        by_hand = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
        torch.testing.assert_close(loss, by_hand)
        padded = inputs.clone()
        padded[1, 2:] = 99  # the padding after the end token predicts only masked targets
        torch.testing.assert_close(calc_loss_batch(padded, targets, model, "cpu"), loss,
                                   rtol=1e-6, atol=0)


def test_split_sizes_of_the_course_data():
    data = [{"instruction": str(i), "input": "", "output": ""} for i in range(1100)]
    train, test, val = split_instruction_data(data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train[0]["instruction"] == "0" and test[0]["instruction"] == "935"
    assert val[-1]["instruction"] == "1099"


def test_dataset_tokenizes_the_full_example():
    class Chars:
        def encode(self, text, allowed_special=None, disallowed_special=None):
            return [ord(c) for c in text]

    entry = {"instruction": "Hi", "input": "", "output": "Hello"}
    ds = InstructionDataset([entry], Chars())
    assert len(ds) == 1 and ds[0] == [ord(c) for c in format_example(entry)]


def test_typed_special_tokens_are_text(mirror_dir, monkeypatch):
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
    tokenizer = get_gpt2_tokenizer()
    entry = {"instruction": "Repeat <|endoftext|> twice.", "input": "", "output": "<|endoftext|>"}
    ids = InstructionDataset([entry], tokenizer)[0]
    assert 50256 not in ids  # the collate function adds the one real end-of-text token
    assert tokenizer.decode(ids) == format_example(entry)
