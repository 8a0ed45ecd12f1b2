"""utils/evaluation.py: the Ollama client against a local fake server, and the no-judge measures."""

import dataclasses
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from utils.evaluation import (OllamaNotRunning, calc_response_loss, generate_model_scores,
                              is_ollama_running, query_model, reference_overlap_scores, rouge_l)
from utils.instruct import format_example
from utils.model import GPT_TINY, GPTModel


class FakeOllama:
    """Speaks Ollama's /api/chat streaming format on 127.0.0.1; replies from a script."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                reply = fake.replies.pop(0)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                for i in range(0, len(reply), 3):  # stream in small pieces
                    chunk = {"model": body["model"], "done": False,
                             "message": {"role": "assistant", "content": reply[i:i + 3]}}
                    self.wfile.write((json.dumps(chunk) + "\n").encode())
                self.wfile.write((json.dumps({"done": True, "message": {"content": ""}}) + "\n").encode())

            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"Ollama is running")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/api/chat"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def ollama():
    servers = []

    def start(replies):
        servers.append(FakeOllama(replies))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_query_sends_model_seed_temperature_and_assembles_the_stream(ollama):
    server = ollama(["Hello there, learner!"])
    assert query_model("Hi?", model="llama3", url=server.url) == "Hello there, learner!"
    request = server.requests[0]
    assert request["model"] == "llama3"
    assert request["options"]["seed"] == 123 and request["options"]["temperature"] == 0.0
    assert request["messages"] == [{"role": "user", "content": "Hi?"}]
    assert is_ollama_running(server.url)


def test_non_numeric_judge_replies_are_skipped_and_counted(ollama):
    server = ollama(["85", "I would say about 70", "101", " 40\n"])
    entries = [{"instruction": f"q{i}", "input": "", "output": "ref", "model_response": "r"}
               for i in range(4)]
    scores = generate_model_scores(entries, "model_response", url=server.url, progress=False)
    assert list(scores) == [85, 40] and scores.skipped == 2 and scores.mean == 62.5
    assert "score the model response `r`" in server.requests[0]["messages"][0]["content"]


def test_no_server_gives_a_clear_message():
    url = "http://127.0.0.1:9/api/chat"  # the discard port: nothing listens there
    assert not is_ollama_running(url)
    with pytest.raises(OllamaNotRunning, match="ollama serve.*ollama pull llama3"):
        query_model("Hi?", url=url)


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
