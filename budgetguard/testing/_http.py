"""HTTP plumbing of the stub OpenAI server: a quiet, keep-alive, stoppable threading server.

The application is a callable ``app(handler, method)``; the handler gives it the request
body and two ways to answer: a JSON body with ``Content-Length`` or server-sent events over
chunked transfer encoding. Both can be cut short on purpose to simulate broken connections.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["ERRORS", "HTTPError", "Handler", "LocalHTTPServer", "error_body"]

ERRORS: dict[int, tuple[str, str, str | None]] = {  # status -> (message, type, code)
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model.", "invalid_request_error", None),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    429: (
        "Rate limit reached for requests. Please try again later.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


class HTTPError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str | None = None, **fields: Any) -> None:
        super().__init__(message or f"HTTP {status}")
        self.status, self.message, self.fields = status, message, fields


def error_body(exc: HTTPError) -> dict[str, Any]:
    default_type = "server_error" if exc.status >= 500 else "invalid_request_error"
    message, type_, code = ERRORS.get(exc.status, (f"Error {exc.status}.", default_type, None))
    error = {"message": exc.message or message, "type": type_, "param": None, "code": code}
    return {"error": {**error, **exc.fields}}


class LocalHTTPServer(ThreadingHTTPServer):
    """A threading server that tracks its connections so ``stop()`` can end all of them."""

    daemon_threads = True
    # A thousand clients connecting at once must all be accepted: the default backlog of 5
    # drops the rest's SYNs, which the clients resend only a second later.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], app: Callable[[Handler, str], None]) -> None:
        self.app = app
        self._conn_lock = threading.Lock()
        self._conns: dict[Any, threading.Thread] = {}
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name="StubOpenAIServer-conn",
            daemon=True,
        )
        with self._conn_lock:
            self._conns[request] = thread
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._conns.pop(request, None)

    def close_connections(self) -> None:
        """Shut down every open connection, waking handlers blocked on idle keep-alives."""
        with self._conn_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def join_handlers(self, timeout: float) -> None:
        with self._conn_lock:
            threads = list(self._conns.values())
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client went away mid-response: nothing worth printing


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler; silent; delegates every request to ``server.app``."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm the body waits for
    # the client's delayed ACK of the headers (40 ms on Linux), as real servers never do.
    disable_nagle_algorithm = True
    server_version = "budgetguard-stub-openai/1"
    timeout = 60  # seconds an idle keep-alive connection is kept open
    server: LocalHTTPServer
    started = False  # whether a status line was written for the current request

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._run("GET")

    def do_POST(self) -> None:
        self._run("POST")

    def do_DELETE(self) -> None:
        self._run("DELETE")

    def _run(self, method: str) -> None:
        self.started = False
        try:
            self.server.app(self, method)
        except (BrokenPipeError, ConnectionError, TimeoutError):
            self.close_connection = True

    def read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.started = True
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("x-request-id", "req_" + uuid.uuid4().hex[:24])
        self.send_header("openai-processing-ms", "1")
        self.end_headers()

    def abort(self) -> None:
        """Drop the connection after the current (incomplete) response."""
        self.close_connection = True
        self.wfile.flush()

    def send_json(
        self, status: int, payload: Any, headers: dict[str, str] | None = None, *, cut: bool = False
    ) -> None:
        """Send a JSON body with Content-Length; ``cut`` sends half of it and drops the line."""
        data = json.dumps(payload).encode()
        self._head(
            status,
            {
                "Content-Type": "application/json",
                "Content-Length": str(len(data)),
                **(headers or {}),
            },
        )
        self.wfile.write(data[: len(data) // 2] if cut else data)
        if cut:
            self.abort()
        self.wfile.flush()

    def send_stream(
        self,
        events: Iterable[Any],
        headers: dict[str, str] | None = None,
        break_after: int | None = None,
    ) -> bool:
        """Send ``data: <json>`` events then ``data: [DONE]``, chunked.

        With ``break_after``, the connection is dropped after that many events, with neither
        ``[DONE]`` nor the final empty chunk, so the client sees an incomplete body.
        Returns whether the stream was completed.
        """
        self._head(
            200,
            {
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "Transfer-Encoding": "chunked",
                **(headers or {}),
            },
        )

        def write(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        for sent, event in enumerate(events):
            if break_after is not None and sent >= break_after:
                self.abort()
                return False
            write(b"data: " + json.dumps(event).encode() + b"\n\n")
        write(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        return True
