"""Shared fixtures: a loopback HTTP server, a network guard, and the offline mirror."""

from __future__ import annotations

import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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


@pytest.fixture
def mirror_dir() -> Path:
    """The offline mirror named by $LLM_COURSE_MIRROR (CI sets it to ../shared/data)."""
    value = os.environ.get("LLM_COURSE_MIRROR")
    if not value or not Path(value).is_dir():
        pytest.skip("set LLM_COURSE_MIRROR to a folder of the course's data files")
    return Path(value)


class FileServer:
    """A real HTTP server on 127.0.0.1 whose routes the test configures.

    `routes[path] = (status, body, behaviour)` where behaviour is "ok", "drop" (send the
    headers for the whole body, half the bytes, then close), "no-range" (ignore Range) or
    "hang" (answer only after 3 seconds). GET and POST are served alike.
    Every request is recorded in `requests` as (path, Range header or None).
    """

    def __init__(self):
        self.routes: dict[str, tuple[int, bytes, str]] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.do_GET()

            def do_GET(self):  # noqa: N802 (http.server's naming)
                server.requests.append((self.path, self.headers.get("Range")))
                status, body, behaviour = server.routes.get(self.path, (404, b"missing", "ok"))
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

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.close()
