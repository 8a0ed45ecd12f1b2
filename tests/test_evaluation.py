"""utils/evaluation.py: the Ollama client against the loopback server speaking Ollama's
streaming format (and its errors: a missing model, a timeout, no server), and the measures
that need no judge (the response loss, ROUGE-L)."""

import dataclasses
import json
import math

import pytest
import torch

from utils.evaluation import (OllamaError, OllamaNotRunning, calc_response_loss,
                              generate_model_scores, is_ollama_running, query_model,
                              reference_overlap_scores, rouge_l)
from utils.instruct import format_example
from utils.model import GPT_TINY, GPTModel
from utils.text import get_gpt2_tokenizer


def ollama_replies(replies):
    """A handler for /api/chat that streams the next scripted reply in Ollama's format."""
    replies = list(replies)

    def chat(request):
        model, reply = request.json()["model"], replies.pop(0)
        lines = [{"model": model, "done": False,
                  "message": {"role": "assistant", "content": reply[i:i + 3]}}
                 for i in range(0, len(reply), 3)]  # in small pieces
        lines.append({"done": True, "message": {"content": ""}})
        return 200, {"Content-Type": "application/x-ndjson"}, [
            (json.dumps(line) + "\n").encode() for line in lines]

    return chat


@pytest.fixture
def ollama(http_server):
    """Start a fake Ollama server with scripted replies; returns its /api/chat URL."""
    def start(replies):
        http_server.routes["/"] = (200, b"Ollama is running", "ok")
        http_server.routes["/api/chat"] = ollama_replies(replies)
        return http_server.url("/api/chat")

    return start


def test_query_sends_model_seed_temperature_and_assembles_the_stream(ollama, http_server):
    url = ollama(["Hello there, learner!"])
    assert query_model("Hi?", model="llama3", url=url) == "Hello there, learner!"
    request = http_server.requests[0]
    assert (request.method, request.path) == ("POST", "/api/chat")
    body = request.json()
    assert body["model"] == "llama3"
    assert body["options"]["seed"] == 123 and body["options"]["temperature"] == 0.0
    assert body["messages"] == [{"role": "user", "content": "Hi?"}]
    assert is_ollama_running(url)


def test_non_numeric_judge_replies_are_skipped_and_counted(ollama, http_server):
    url = ollama(["85", "I would say about 70", "101", " 40\n"])
    entries = [{"instruction": f"q{i}", "input": "", "output": "ref", "model_response": "r"}
               for i in range(4)]
    scores = generate_model_scores(entries, "model_response", url=url, progress=False)
    assert list(scores) == [85, 40] and scores.skipped == 2 and scores.mean == 62.5
    prompt = http_server.requests[0].json()["messages"][0]["content"]
    assert "score the model response `r`" in prompt


def test_no_server_gives_a_clear_message():
    url = "http://127.0.0.1:9/api/chat"  # the discard port: nothing listens there
    assert not is_ollama_running(url)
    with pytest.raises(OllamaNotRunning, match="ollama serve.*ollama pull llama3"):
        query_model("Hi?", url=url)


def test_the_judge_says_what_to_do_about_a_missing_model_or_a_slow_server(http_server):
    http_server.routes["/api/chat"] = (404, b'{"error":"model not found"}', "ok")
    with pytest.raises(OllamaError, match="ollama pull llama3"):
        query_model("hi", url=http_server.url("/api/chat"))
    http_server.routes["/slow/api/chat"] = (200, b"", "hang")
    with pytest.raises(OllamaError, match="No reply from the Ollama server within 1 s"):
        query_model("hi", url=http_server.url("/slow/api/chat"), timeout=1)


def test_rouge_l():
    assert rouge_l("The capital is Paris.", "the capital is paris") == 1.0
    assert rouge_l("bananas", "The capital is Paris.") == 0.0
    assert rouge_l("", "anything") == 0.0
    # LCS of [paris is the capital] and [the capital of france is paris] is [the capital]: 2
    p, r = 2 / 4, 2 / 6
    assert rouge_l("Paris is the capital.", "The capital of France is Paris.") == pytest.approx(
        2 * p * r / (p + r))
    assert reference_overlap_scores([{"output": "a b", "resp": "a b"}], "resp") == [1.0]


class Chars:
    def encode(self, text, allowed_special=None, disallowed_special=None):
        return [ord(c) % 100 for c in text]


def test_response_loss_scores_only_the_response_tokens():
    torch.manual_seed(0)
    model = GPTModel(dataclasses.replace(GPT_TINY, context_length=256)).eval()  # fits the prompt
    entry = {"instruction": "Say hi.", "input": "", "output": "hi"}
    loss = calc_response_loss(model, [entry], Chars(), "cpu", pad_token_id=3)
    # by hand: the targets are "hi" plus the end token, predicted after the full prompt
    ids = Chars().encode(format_example(entry)) + [3]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0]
    n = 3  # "h", "i", end token
    expected = torch.nn.functional.cross_entropy(logits[-n:], torch.tensor(ids[-n:]))
    assert math.isclose(loss, expected.item(), rel_tol=1e-5)


def test_response_loss_with_no_response_inside_the_context_is_a_clear_error(mirror_dir,
                                                                              monkeypatch):
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror_dir))
    torch.manual_seed(0)
    model = GPTModel(GPT_TINY).eval()  # context 64
    entry = {"instruction": "word " * 80, "input": "", "output": "Yes."}
    with pytest.raises(ValueError, match="No reference response fits in the model's context of 64"):
        calc_response_loss(model, [entry], get_gpt2_tokenizer(), "cpu")
