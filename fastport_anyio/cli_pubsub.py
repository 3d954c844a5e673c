"""``fastport pub`` and ``fastport sub``: publish and print messages from a shell, like mosquitto_pub/_sub.

``fastport_anyio.cli`` builds the ``fastport`` parser and calls :func:`register` to add both commands;
each sets ``func`` (``Namespace -> int``, the exit code) on its parser. This is the only module of the
package allowed to ``print``: it is the terminal's end of the client.

Connection options (every one also read from the environment, so secrets need not be on a command line,
where other users can see them in the process list)::

    --url       FASTPORT_URL       default ws://127.0.0.1:3000
    --session   FASTPORT_SESSION   required
    --password  FASTPORT_PASSWORD  required, unless a token is given:
    --token     FASTPORT_TOKEN     a scoped token (`fastport token mint`) instead of the password
    --key       FASTPORT_KEY       required (base64, from `fastport keygen`)
    --suite     FASTPORT_SUITE     authenticated (default) or legacy

Output of ``sub``: one message per line on stdout, flushed at once (pipelines see it immediately). A text
payload is printed as is (so a payload with newlines spans several lines). A bytes payload is printed as
standard base64, so that its line stays one printable line whatever the bytes are; ``--raw`` writes bytes
payloads verbatim instead (followed by a newline), for piping binary data. ``-v`` prefixes each line with
the topic and a space. Status lines (``subscribed to ...``, ``connection lost (...); reconnecting``,
``reconnected``) go to stderr, never mixed with the data; ``-q`` silences them.

Exit codes: 0 success (``pub`` confirmed; ``sub`` received ``--count`` messages); 1 runtime failure
(server unreachable, authentication refused, publish not confirmed, connection given up); 2 usage error
(bad arguments, missing or invalid key, bad URL or topic); 130 interrupted (Ctrl-C). Every error is one
line on stderr, prefixed with the command (``fastport pub: invalid key: ...``).
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TextIO, get_args

import anyio

from fastport_core.client_api import DEFAULT_TIMEOUT, ConnectionState, Message, StateChange
from fastport_core.crypto import SuiteName
from fastport_core.errors import (
    AuthenticationError,
    ConnectError,
    FastportError,
    InvalidKeyError,
    LocalProtocolError,
    PublishTimeoutError,
)

from .client import Client, connect

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "publish",
    "register",
    "subscribe",
]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

DEFAULT_URL: Final = "ws://127.0.0.1:3000"
_SUITES: Final[tuple[str, ...]] = get_args(SuiteName)


class UsageError(Exception):
    """A problem with the command line or the environment: exit code 2."""


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """Where and as whom to connect, after the flags and the environment are layered."""

    url: str
    session: str
    password: str | None
    key: str
    suite: SuiteName
    token: str | None = None
    """Instead of ``password`` (exactly one of the two is set)."""

    def client(self) -> Client:
        """A client for these options; a bad key, URL or suite is a :class:`UsageError` (before any IO)."""
        try:
            return connect(
                self.url,
                session=self.session,
                password=self.password,
                token=self.token,
                key=self.key,
                suite=self.suite,
            )
        except InvalidKeyError as exc:
            raise UsageError(f"invalid key: {exc}") from None
        except LocalProtocolError as exc:
            raise UsageError(str(exc)) from None


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection (flags override the environment)")
    group.add_argument("--url", help=f"server URL, ws:// or wss:// (env FASTPORT_URL; default {DEFAULT_URL})")
    group.add_argument("--session", help="session name (env FASTPORT_SESSION)")
    group.add_argument("--password", help="session password (env FASTPORT_PASSWORD; prefer it to the flag)")
    group.add_argument("--token", help="a scoped token instead of the password (env FASTPORT_TOKEN)")
    group.add_argument("--key", help="end-to-end key, base64 from `fastport keygen` (env FASTPORT_KEY)")
    group.add_argument(
        "--suite", choices=_SUITES, help="envelope suite (env FASTPORT_SUITE; default authenticated)"
    )


def connection_options(args: argparse.Namespace, environ: Mapping[str, str]) -> ConnectionOptions:
    """Layer the flags over ``FASTPORT_*`` variables; a missing required value is a :class:`UsageError`."""

    def pick(flag: str, variable: str) -> str | None:
        value: str | None = getattr(args, flag)
        return value if value is not None else environ.get(variable) or None

    missing = [
        f"--{flag} (or {variable})"
        for flag, variable in (("session", "FASTPORT_SESSION"), ("key", "FASTPORT_KEY"))
        if pick(flag, variable) is None
    ]
    password, token = _credential(args, environ)
    if password is None and token is None:
        missing.insert(1, "--password or --token (or FASTPORT_PASSWORD or FASTPORT_TOKEN)")
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")
    suite = pick("suite", "FASTPORT_SUITE") or "authenticated"
    if suite not in _SUITES:
        raise UsageError(f"FASTPORT_SUITE must be one of {', '.join(_SUITES)}, got {suite!r}")
    return ConnectionOptions(
        url=pick("url", "FASTPORT_URL") or DEFAULT_URL,
        session=pick("session", "FASTPORT_SESSION") or "",
        password=password,
        key=pick("key", "FASTPORT_KEY") or "",
        suite=suite,  # type: ignore[arg-type]  # checked against _SUITES just above
        token=token,
    )


def _credential(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(password, token)``, at most one set: a flag wins over the environment; two of a kind conflict."""
    for password, token, where in (
        (args.password, args.token, "--password and --token"),
        (environ.get("FASTPORT_PASSWORD") or None, environ.get("FASTPORT_TOKEN") or None,
         "FASTPORT_PASSWORD and FASTPORT_TOKEN"),
    ):  # fmt: skip
        if password is not None and token is not None:
            raise UsageError(f"give {where.replace(' and ', ' or ')}, not both")
        if password is not None or token is not None:
            return password, token
    return None, None


# --------------------------------------------------------------------------------------------------------
# The commands as coroutines (tests drive these directly, on either backend).


async def publish(options: ConnectionOptions, topic: str, payload: str | bytes, *, timeout: float) -> str:
    """Connect, publish one message, wait for the server's confirmation; return the message id."""
    async with options.client() as client:
        return await client.publish(topic, payload, timeout=timeout)


def format_message(message: Message, *, verbose: bool) -> str:
    """The line ``sub`` prints for a message (without ``--raw``): text as is, bytes as base64."""
    payload = message.payload
    text = payload if isinstance(payload, str) else base64.b64encode(payload).decode("ascii")
    return f"{message.topic} {text}" if verbose else text


async def subscribe(
    options: ConnectionOptions,
    topics: Sequence[str],
    *,
    out: TextIO,
    count: int | None = None,
    raw: bool = False,
    verbose: bool = False,
    on_ready: Callable[[], object] | None = None,
    on_state_change: Callable[[StateChange], object] | None = None,
) -> None:
    """Print every message of ``topics`` to ``out`` until ``count`` were printed (``None``: forever).

    ``on_ready`` is called once every subscription is confirmed (the CLI prints a status line then), and
    ``on_state_change`` on every later connection state change (reconnections).
    """
    printed = 0
    done = anyio.Event()

    def show(message: Message) -> None:
        nonlocal printed
        if done.is_set():
            return  # past --count: a message another topic's handler had already taken
        if raw and isinstance(message.payload, bytes):
            out.flush()
            prefix = f"{message.topic} ".encode() if verbose else b""
            out.buffer.write(prefix + message.payload + b"\n")
            out.buffer.flush()
        else:
            out.write(format_message(message, verbose=verbose) + "\n")
            out.flush()
        printed += 1
        if count is not None and printed >= count:
            done.set()

    async with options.client() as client:
        for topic in topics:
            await client.subscribe(topic, show)
        if on_ready is not None:
            on_ready()
        if on_state_change is not None:
            client.on_state_change(on_state_change)
        closed = anyio.Event()
        client.on_state_change(
            lambda change: closed.set() if change.state is ConnectionState.CLOSED else None
        )
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as task_group:

                async def stop_when(event: anyio.Event) -> None:
                    await event.wait()
                    scope.cancel()

                task_group.start_soon(stop_when, done)
                task_group.start_soon(stop_when, closed)
        if not done.is_set():
            # The client gave up reconnecting (reconnect_give_up_after, or the session went away).
            raise ConnectError(f"the connection to {options.url} ended for good")


# --------------------------------------------------------------------------------------------------------
# argparse glue.


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pub`` and ``sub`` to the ``fastport`` command's subparsers."""
    pub = subparsers.add_parser(
        "pub",
        help="publish one encrypted message and wait for the server's confirmation",
        description="Publish MESSAGE on TOPIC, end-to-end encrypted; prints the message id once the "
        "server confirmed it. Exit codes: 0 ok, 1 runtime failure, 2 usage error.",
    )
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument("message", metavar="MESSAGE", help="the payload; '-' reads it from stdin")
    pub.add_argument(
        "--binary",
        action="store_true",
        help="publish the payload as bytes (encoding 'binary'): MESSAGE's UTF-8 bytes, or stdin verbatim",
    )
    pub.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the confirmation, reconnecting if needed (default {DEFAULT_TIMEOUT:g})",
    )
    _add_connection_options(pub)
    pub.set_defaults(func=run_pub)

    sub = subparsers.add_parser(
        "sub",
        help="print decrypted messages, one per line",
        description="Subscribe to TOPIC(s) and print each decrypted message on one line: text as is, "
        "bytes as base64 (or verbatim with --raw). Exit codes: 0 ok, 1 runtime failure, 2 usage error.",
    )
    sub.add_argument("topics", metavar="TOPIC", nargs="+")
    sub.add_argument("--count", "-C", type=int, metavar="N", help="exit after printing N messages")
    sub.add_argument("--raw", action="store_true", help="write bytes payloads verbatim instead of base64")
    sub.add_argument("--verbose", "-v", action="store_true", help="prefix each line with its topic")
    sub.add_argument("--quiet", "-q", action="store_true", help="no status line on stderr")
    _add_connection_options(sub)
    sub.set_defaults(func=run_sub)


def _error(command: str, message: str) -> None:
    print(f"fastport {command}: {message}", file=sys.stderr, flush=True)


def _run(command: str, body: Callable[[], int]) -> int:
    """Map every failure to its one-line message and exit code."""
    root = logging.getLogger()
    if not root.handlers:
        # The library logs what the one-line error already says ("giving up: init refused ..."); with no
        # handler configured, Python's last-resort handler would print it as an extra line on stderr.
        root.addHandler(logging.NullHandler())
    try:
        return body()
    except UsageError as exc:
        _error(command, str(exc))
        return EXIT_USAGE
    except LocalProtocolError as exc:  # a bad topic or payload: the user's input
        _error(command, str(exc))
        return EXIT_USAGE
    except AuthenticationError as exc:
        _error(command, f"authentication refused: {exc}")
        return EXIT_FAILURE
    except ConnectError as exc:
        _error(command, str(exc))
        return EXIT_FAILURE
    except PublishTimeoutError as exc:
        _error(command, str(exc))
        return EXIT_FAILURE
    except FastportError as exc:
        _error(command, f"{type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def run_pub(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """``fastport pub``: exit code per the module docstring."""

    def body() -> int:
        options = connection_options(args, os.environ if environ is None else environ)
        payload: str | bytes
        if args.message == "-":
            data = sys.stdin.buffer.read()
            try:
                payload = data if args.binary else data.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError("stdin is not UTF-8 text: publish it with --binary") from None
        else:
            payload = args.message.encode("utf-8", "surrogateescape") if args.binary else args.message
        if args.timeout <= 0:
            raise UsageError("--timeout must be positive")
        options.client()  # a bad key or URL is a usage error, reported before any IO
        message_id = anyio.run(lambda: publish(options, args.topic, payload, timeout=args.timeout))
        print(message_id, flush=True)
        return EXIT_OK

    return _run("pub", body)


def run_sub(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """``fastport sub``: exit code per the module docstring."""

    def body() -> int:
        options = connection_options(args, os.environ if environ is None else environ)
        if args.count is not None and args.count < 1:
            raise UsageError("--count must be at least 1")
        options.client()  # a bad key or URL is a usage error, reported before any IO
        topics = ", ".join(repr(topic) for topic in args.topics)

        def ready() -> None:
            if not args.quiet:
                _error("sub", f"subscribed to {topics} on {options.url}")

        def report_state(change: StateChange) -> None:
            if change.state is ConnectionState.RECONNECTING:
                _error("sub", f"connection lost ({change.reason}); reconnecting")
            elif change.state is ConnectionState.CONNECTED:
                _error("sub", "reconnected")

        anyio.run(
            lambda: subscribe(
                options,
                args.topics,
                out=sys.stdout,
                count=args.count,
                raw=args.raw,
                verbose=args.verbose,
                on_ready=ready,
                on_state_change=None if args.quiet else report_state,
            )
        )
        return EXIT_OK

    return _run("sub", body)
