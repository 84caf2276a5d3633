"""A private ``redis-server`` for tests and benchmarks, and the ``redis_server`` fixture.

The server listens on 127.0.0.1 on a free port, keeps no data on disk (``--save ""``,
no AOF) and works in its own temporary directory, so tests never touch a Redis that is
already running on this machine (6379) or any data they did not create.

Use it directly::

    with RedisServer() as server:
        store = RedisStore(server.url)

or through the ``redis_server`` fixture (session scope), which both ``tests/contract`` and
``tests/integration`` import from their conftest. Without a ``redis-server`` binary the
fixture skips with the reason, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["RedisServer", "find_redis_server", "free_port", "redis_server", "require_redis_server"]


def find_redis_server() -> str | None:
    """Path of a ``redis-server`` binary (``$REDIS_SERVER``, ``PATH``, ``/usr/bin``), or ``None``."""
    candidates = [
        os.environ.get("REDIS_SERVER"),
        shutil.which("redis-server"),
        "/usr/bin/redis-server",
        "/usr/local/bin/redis-server",
    ]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM the server if the test process dies (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, started and stopped by the test.

    Args:
        binary: The ``redis-server`` to run (default: :func:`find_redis_server`).
        port: The port (default: a free one, kept across :meth:`restart`).
        startup_timeout: Seconds to wait for PING to answer.
        extra_args: More ``redis-server`` options, e.g. ``("--appendonly", "yes")`` for a
            server whose data survives :meth:`restart` (they come last, so they win).
    """

    def __init__(
        self,
        binary: str | None = None,
        *,
        port: int | None = None,
        startup_timeout: float = 10.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        found = binary or find_redis_server()
        if found is None:
            msg = "no redis-server binary found (install redis-server or set REDIS_SERVER)"
            raise FileNotFoundError(msg)
        self.binary = found
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="budgetguard-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.running:
            return self
        log = self.dir / "redis.log"
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--logfile", str(log),
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(  # noqa: S603 - our own arguments
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - tests start servers from the main thread
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                text = log.read_text(errors="replace") if log.exists() else ""
                msg = f"redis-server on port {self.port} exited with {self.process.returncode}: {err}{text[-2000:]}"
                raise RuntimeError(msg)
            if _ping(self.port):
                return self
            time.sleep(0.02)
        self.kill()
        msg = f"redis-server on port {self.port} did not answer PING within {self.startup_timeout} s"
        raise RuntimeError(msg)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL if it does not exit in ``timeout``)."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # in case it was paused
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL and wait."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung server)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        """Stop, then start again on the same port (with no data: nothing is persisted)."""
        self.stop()
        return self.start()

    def _reap(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must run the Redis tests", pytrace=False)
    pytest.skip(reason)


def require_redis_server() -> str:
    """The ``redis-server`` binary; otherwise skip the test (fail it under ``CI=true``)."""
    binary = find_redis_server()
    if binary is None:
        _missing("redis-server not found (apt-get install redis-server, or set REDIS_SERVER)")
    assert binary is not None
    return binary


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole test session (skip if none; fail on CI)."""
    server = RedisServer(require_redis_server())
    try:
        server.start()
    except RuntimeError as exc:
        server.close()
        _missing(f"redis-server would not start: {exc}")
    try:
        yield server
    finally:
        server.close()
