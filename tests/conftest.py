"""Shared fixtures: one loopback HTTP server for every test that talks HTTP (downloads, the
Ollama judge, a gated "Hub"), a network guard, and the offline mirror."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest


_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture
def no_network(monkeypatch):
    """Make any connection to a non-loopback address fail, as on a machine with no internet."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in _LOOPBACK:
            raise OSError(f"network access blocked in tests (tried {host})")
        return real_connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in _LOOPBACK:
            raise socket.gaierror(f"network access blocked in tests (looked up {host})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


@pytest.fixture(scope="session")
def mirror_dir() -> Path:
    """The offline mirror named by $LLM_COURSE_MIRROR (CI sets it to ../shared/data)."""
    value = os.environ.get("LLM_COURSE_MIRROR")
    if not value or not Path(value).is_dir():
        pytest.skip("set LLM_COURSE_MIRROR to a folder of the course's data files")
    return Path(value)


@dataclasses.dataclass
class Request:
    """One request the loopback server received."""

    method: str
    path: str
    headers: Message  # case-insensitive: headers.get("range") finds "Range"
    body: bytes

    def json(self):
        return json.loads(self.body)


# A handler route answers (status, headers, body); a body that is a list of byte strings is
# streamed piece by piece with no Content-Length, and the connection closed, as Ollama does.
Handler = Callable[[Request], "tuple[int, dict[str, str], bytes | list[bytes]]"]


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 whose routes the test configures.

    `routes[path]` is either a static `(status, body, behaviour)`, where behaviour is "ok",
    "drop" (send the headers for the whole body, half the bytes, then close), "no-range"
    (ignore Range) or "hang" (answer only after 3 seconds), or a function that takes the
    `Request` and returns `(status, headers, body)` (redirects, token checks, streamed
    replies). Unrouted paths answer 404. GET and POST are served alike. Every request is
    recorded, in order, in `requests`.
    """

    def __init__(self):
        self.routes: dict[str, tuple[int, bytes, str] | Handler] = {}
        self.requests: list[Request] = []
        server = self

        class Served(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.do_GET(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def do_GET(self, body: bytes = b""):  # noqa: N802 (http.server's naming)
                request = Request(self.command, self.path, self.headers, body)
                server.requests.append(request)
                route = server.routes.get(self.path, (404, b"missing", "ok"))
                if callable(route):
                    self.answer(*route(request))
                else:
                    self.serve_static(*route)

            def answer(self, status: int, headers: dict[str, str], body) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for piece in [body] if isinstance(body, bytes) else body:
                    self.wfile.write(piece)
                    self.wfile.flush()

            def serve_static(self, status: int, body: bytes, behaviour: str) -> None:
                if behaviour == "hang":
                    time.sleep(3)
                start = 0
                rng = self.headers.get("Range")
                if rng and status == 200 and behaviour != "no-range":
                    start = int(rng.split("=")[1].split("-")[0])
                    status = 206
                payload = body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if behaviour == "drop":
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                else:
                    self.wfile.write(payload)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Served)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    """A `LoopbackServer` with no routes yet, closed after the test."""
    server = LoopbackServer()
    yield server
    server.close()
