"""One fault-injecting TCP proxy for every client test (async or blocking): a thread, a selector, no loop.

It sits between a client and the server so a test can break the network without touching either side's
internals: :meth:`Proxy.cut` closes every relayed connection (both sockets), ``refuse`` closes new
connections as soon as they are accepted (a server that is down), and :meth:`Proxy.freeze_upstream` /
:meth:`Proxy.freeze_downstream` stop forwarding one direction of the live connections for good (the peer
keeps a valid prefix of the stream: an ACK or a ``publish_response`` that never arrives). Being a thread,
it serves clients of any event loop, or none.
"""

from __future__ import annotations

import selectors
import socket
import threading

WAIT = 10.0
"""Upper bound on the proxy's own bookkeeping (a failing test, not a passing one, pays it)."""


class Proxy:
    """A TCP relay from a local port to ``127.0.0.1:target_port``; see the module docstring."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.refuse = False
        self.accepted = 0
        """Connections accepted so far (refused ones included): dial attempts, for tests to wait on."""
        self._peers: dict[socket.socket, socket.socket] = {}
        self._downstream: set[socket.socket] = set()  # sockets connected to the server
        self._frozen: set[socket.socket] = set()  # sources whose data is dropped
        self._requests: list[tuple[str, threading.Event]] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="test-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Close every relayed connection (both sides), and wait until it is done."""
        self._request("cut")

    def freeze_upstream(self) -> None:
        """Drop what the clients send on the live connections from now on (ACKs, publishes)."""
        self._request("freeze_up")

    def freeze_downstream(self) -> None:
        """Drop what the server sends on the live connections from now on (confirmations, messages)."""
        self._request("freeze_down")

    def wait_accepted(self, count: int) -> None:
        """Wait until ``count`` connections were accepted in all."""
        with self._changed:
            assert self._changed.wait_for(lambda: self.accepted >= count, WAIT), self.accepted

    def close(self) -> None:
        self._request("stop")
        self._thread.join(WAIT)

    def _request(self, what: str) -> None:
        done = threading.Event()
        with self._lock:
            self._requests.append((what, done))
        self._wake_w.send(b"x")
        assert done.wait(WAIT)

    def _drop(self, sock: socket.socket) -> None:
        other = self._peers.pop(sock, None)
        for one in (sock, other):
            if one is not None:
                self._peers.pop(one, None)
                self._downstream.discard(one)
                self._frozen.discard(one)
                self._selector.unregister(one)
                one.close()

    def _serve_requests(self) -> bool:
        self._wake_r.recv(1024)
        with self._lock:
            requests, self._requests = self._requests, []
        stop = False
        for what, done in requests:
            if what in ("cut", "stop"):
                for one in list(self._peers):
                    if one in self._peers:
                        self._drop(one)
            elif what == "freeze_up":
                self._frozen.update(one for one in self._peers if one not in self._downstream)
            elif what == "freeze_down":
                self._frozen.update(self._downstream)
            stop = stop or what == "stop"
            done.set()
        return not stop

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        with self._changed:
            self.accepted += 1
            self._changed.notify_all()
        if self.refuse:
            client.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        self._peers[client], self._peers[upstream] = upstream, client
        self._downstream.add(upstream)
        self._selector.register(client, selectors.EVENT_READ)
        self._selector.register(upstream, selectors.EVENT_READ)

    def _run(self) -> None:
        try:
            while True:
                for key, _ in self._selector.select():
                    sock = key.fileobj
                    if sock is self._wake_r:
                        if not self._serve_requests():
                            return
                    elif sock is self._listener:
                        self._accept()
                    elif isinstance(sock, socket.socket) and sock in self._peers:
                        try:
                            data = sock.recv(65536)
                        except OSError:
                            data = b""
                        if not data:
                            self._drop(sock)
                        elif sock not in self._frozen:
                            try:
                                self._peers[sock].sendall(data)
                            except OSError:
                                self._drop(sock)
        finally:
            for one in list(self._peers):
                one.close()
            self._selector.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()
