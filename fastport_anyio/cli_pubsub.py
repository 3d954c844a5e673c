"""``fastport pub`` and ``fastport sub``: publish and print messages from a shell, like mosquitto_pub/_sub.

``fastport_anyio.cli`` builds the ``fastport`` parser and calls :func:`register` to add both commands;
each sets ``func`` (``Namespace -> int``, the exit code) on its parser and raises on failure: the CLI's one
top-level handler (:mod:`fastport_anyio.cli_errors`) turns every error into one line and an exit code.
This is the only module of the package besides the CLI's allowed to ``print``: it is the terminal's end
of the client. Unlike mosquitto's, topics are exact strings: there are no wildcards.

Connection options (every one also read from the environment, so secrets need not be on a command line,
where other users can see them in the process list)::

    --url       FASTPORT_URL       default ws://127.0.0.1:3000
    --session   FASTPORT_SESSION   required
    --password  FASTPORT_PASSWORD  required, unless a token is given:
    --token     FASTPORT_TOKEN     a scoped token (`fastport token mint`) instead of the password
    --key       FASTPORT_KEY       required, or --key-file (base64, from `fastport keygen`)
    --key-file  FASTPORT_KEY_FILE  a file holding the key (e.g. `fastport keygen > .fastport-key`)
    --suite     FASTPORT_SUITE     authenticated (default) or legacy
    --cafile    FASTPORT_CAFILE    PEM CA certificate(s) to trust for wss:// (default: the system's)

Output of ``sub``: one message per line on stdout, flushed at once (pipelines see it immediately). A text
payload is printed as is (so a payload with newlines spans several lines). A bytes payload is printed as
standard base64, so that its line stays one printable line whatever the bytes are. ``--raw`` writes every
payload verbatim instead (text as its UTF-8 bytes), with nothing before or after it, so ``sub --raw
--count 1`` reproduces exactly what ``pub --binary`` sent (several messages are simply concatenated).
``-v`` prefixes each line with the topic and a space (not with ``--raw``). Status lines (``subscribed to
...``, ``connection lost (...); reconnecting``, ``reconnected``) go to stderr, never mixed with the data;
``-q`` silences them. A message that cannot be verified or decrypted (a different key or suite on the
publishing side) is never printed, but always reported on stderr, with its topic and id.

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
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TextIO, get_args

import anyio

from fastport_core.client import IntegrityFailure
from fastport_core.client_api import DEFAULT_TIMEOUT, ConnectionState, Message, StateChange
from fastport_core.errors import ConnectError, InvalidKeyError, LocalProtocolError
from fastport_core.keys import SuiteName

from .cli_errors import EXIT_OK, UsageError
from .client import Client, connect

__all__ = [
    "ConnectionOptions",
    "connection_options",
    "format_message",
    "publish",
    "register",
    "subscribe",
]

DEFAULT_URL: Final = "ws://127.0.0.1:3000"
_SUITES: Final[tuple[str, ...]] = get_args(SuiteName)


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
    cafile: str | None = None
    """PEM CA certificate(s) to trust for ``wss://`` instead of the system's trust store."""

    def client(self) -> Client:
        """A client for these options; a bad key, URL, suite or CA file is a :class:`UsageError`."""
        ssl_context = None
        if self.cafile is not None:
            if not self.url.lower().startswith("wss://"):
                raise UsageError(f"--cafile (or FASTPORT_CAFILE) is for wss:// URLs, got {self.url!r}")
            try:
                ssl_context = ssl.create_default_context(cafile=self.cafile)
            except (OSError, ssl.SSLError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise UsageError(f"cannot load --cafile {self.cafile}: {reason}") from None
        try:
            return connect(
                self.url,
                session=self.session,
                password=self.password,
                token=self.token,
                key=self.key,
                suite=self.suite,
                ssl_context=ssl_context,
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
    keys = group.add_mutually_exclusive_group()
    keys.add_argument("--key", help="end-to-end key, base64 from `fastport keygen` (env FASTPORT_KEY)")
    keys.add_argument(
        "--key-file", metavar="FILE", help="file holding the key, e.g. .fastport-key (env FASTPORT_KEY_FILE)"
    )
    group.add_argument(
        "--suite", choices=_SUITES, help="envelope suite (env FASTPORT_SUITE; default authenticated)"
    )
    group.add_argument(
        "--cafile",
        metavar="PEM",
        help="CA certificate(s) to trust for wss://, e.g. a private CA (env FASTPORT_CAFILE; default: the "
        "system's trust store)",
    )


def _read_key_file(path: str, origin: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"cannot read {origin} {path}: {reason}") from None


def connection_options(args: argparse.Namespace, environ: Mapping[str, str]) -> ConnectionOptions:
    """Layer the flags over ``FASTPORT_*`` variables; a missing required value is a :class:`UsageError`.

    The key comes from ``--key``, ``--key-file``, ``FASTPORT_KEY`` or ``FASTPORT_KEY_FILE``, first found.
    """

    def pick(flag: str, variable: str) -> str | None:
        value: str | None = getattr(args, flag)
        return value if value is not None else environ.get(variable) or None

    key = args.key
    if key is None and args.key_file is not None:
        key = _read_key_file(args.key_file, "--key-file")
    if key is None:
        key = environ.get("FASTPORT_KEY") or None
    if key is None and environ.get("FASTPORT_KEY_FILE"):
        key = _read_key_file(environ["FASTPORT_KEY_FILE"], "FASTPORT_KEY_FILE")
    missing = [
        f"--{flag} (or {variable})"
        for flag, variable in (("session", "FASTPORT_SESSION"),)
        if pick(flag, variable) is None
    ]
    password, token = _credential(args, environ)
    if password is None and token is None:
        missing.append("--password or --token (or FASTPORT_PASSWORD or FASTPORT_TOKEN)")
    if key is None:
        missing.append("--key or --key-file (or FASTPORT_KEY or FASTPORT_KEY_FILE)")
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")
    suite = pick("suite", "FASTPORT_SUITE") or "authenticated"
    if suite not in _SUITES:
        raise UsageError(f"FASTPORT_SUITE must be one of {', '.join(_SUITES)}, got {suite!r}")
    return ConnectionOptions(
        url=pick("url", "FASTPORT_URL") or DEFAULT_URL,
        session=pick("session", "FASTPORT_SESSION") or "",
        password=password,
        key=key or "",
        suite=suite,  # type: ignore[arg-type]  # checked against _SUITES just above
        token=token,
        cafile=pick("cafile", "FASTPORT_CAFILE"),
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


def describe_integrity_failure(failure: IntegrityFailure) -> str:
    """The stderr line of ``sub`` for a message it could not verify or decrypt (never printed on stdout)."""
    return (
        f"message {failure.message_id!r} on {failure.topic!r} could not be authenticated or decrypted: "
        f"wrong key or suite? ({failure.reason})"
    )


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
    on_integrity_failure: Callable[[IntegrityFailure], object] | None = None,
) -> None:
    """Print every message of ``topics`` to ``out`` until ``count`` were printed (``None``: forever).

    ``on_ready`` is called once every subscription is confirmed (the CLI prints a status line then),
    ``on_state_change`` on every later connection state change (reconnections), ``on_integrity_failure``
    for every message that failed verification or decryption. If the client gives up (the session was
    dropped, the credentials stopped working, ``reconnect_give_up_after``), :class:`ConnectError` says why.
    """
    printed = 0
    done = anyio.Event()
    write_error: list[OSError] = []  # the client swallows a handler's exception: carry it out by hand

    def show(message: Message) -> None:
        nonlocal printed
        if done.is_set():
            return  # past --count (a message another topic's handler had already taken), or output failed
        try:
            if raw:
                payload = message.payload
                out.flush()
                out.buffer.write(payload.encode("utf-8") if isinstance(payload, str) else payload)
                out.buffer.flush()
            else:
                out.write(format_message(message, verbose=verbose) + "\n")
                out.flush()
        except OSError as exc:  # `fastport sub t | head -1`: the reader went away
            write_error.append(exc)
            done.set()
            return
        printed += 1
        if count is not None and printed >= count:
            done.set()

    async with options.client() as client:
        if on_integrity_failure is not None:
            client.on_integrity_failure(on_integrity_failure)
        for topic in topics:
            await client.subscribe(topic, show)
        if on_ready is not None:
            on_ready()
        if on_state_change is not None:
            client.on_state_change(on_state_change)
        closed = anyio.Event()
        lost: list[str] = []  # why the connection ended before the client gave up, for the final error

        def watch(change: StateChange) -> None:
            if change.state is ConnectionState.RECONNECTING and change.reason:
                lost.append(change.reason)
            elif change.state is ConnectionState.CLOSED:
                lost.append(change.reason)
                closed.set()

        client.on_state_change(watch)
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as task_group:

                async def stop_when(event: anyio.Event) -> None:
                    await event.wait()
                    scope.cancel()

                task_group.start_soon(stop_when, done)
                task_group.start_soon(stop_when, closed)
    if write_error:
        raise write_error[0]
    if not done.is_set():
        # The first reason is what ended the subscription (e.g. "4001: session dropped"); the last is why
        # the client then stopped trying (e.g. the dropped session's credentials no longer work).
        reasons = [reason for reason in dict.fromkeys((lost[0], lost[-1])) if reason] if lost else []
        raise ConnectError(
            f"gave up on {options.url}: " + ("; then ".join(reasons) or "the connection ended for good")
        )


# --------------------------------------------------------------------------------------------------------
# argparse glue.


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pub`` and ``sub`` to the ``fastport`` command's subparsers."""
    pub = subparsers.add_parser(
        "pub",
        help="publish one encrypted message and wait for the server's confirmation",
        description="Publish MESSAGE on TOPIC (an exact string: no wildcards), end-to-end encrypted; prints "
        "the message id once the server confirmed it. Exit codes: 0 ok, 1 runtime failure, 2 usage error.",
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
        description="Subscribe to TOPIC(s) (exact strings: no wildcards) and print each decrypted message on "
        "one line: text as is, bytes as base64 (or verbatim with --raw). A message that cannot be decrypted "
        "(wrong key or suite) is reported on stderr. Exit codes: 0 ok, 1 runtime failure, 2 usage error.",
    )
    sub.add_argument("topics", metavar="TOPIC", nargs="+")
    sub.add_argument("--count", "-C", type=int, metavar="N", help="exit after printing N messages")
    layout = sub.add_mutually_exclusive_group()
    layout.add_argument(
        "--raw",
        action="store_true",
        help="write each payload verbatim (text as UTF-8), nothing added (--count 1: exactly what was sent)",
    )
    layout.add_argument("--verbose", "-v", action="store_true", help="prefix each line with its topic")
    sub.add_argument("--quiet", "-q", action="store_true", help="no status line on stderr")
    _add_connection_options(sub)
    sub.set_defaults(func=run_sub)


def _status(message: str) -> None:
    print(f"fastport sub: {message}", file=sys.stderr, flush=True)


def _quiet_library_logging() -> None:
    """The library logs what the one-line error already says ("giving up: init refused ..."); with no
    handler configured, Python's last-resort handler would print it as an extra line on stderr."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())


def run_pub(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """``fastport pub``: exit code per the module docstring; failures raise (the CLI reports them)."""
    _quiet_library_logging()
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
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    options.client()  # a bad key or URL is a usage error, reported before any IO
    message_id = anyio.run(lambda: publish(options, args.topic, payload, timeout=args.timeout))
    print(message_id, flush=True)
    return EXIT_OK


def run_sub(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """``fastport sub``: exit code per the module docstring; failures raise (the CLI reports them)."""
    _quiet_library_logging()
    options = connection_options(args, os.environ if environ is None else environ)
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    options.client()  # a bad key or URL is a usage error, reported before any IO
    topics = ", ".join(repr(topic) for topic in args.topics)

    def ready() -> None:
        if not args.quiet:
            _status(f"subscribed to {topics} on {options.url}")

    def report_state(change: StateChange) -> None:
        if change.state is ConnectionState.RECONNECTING:
            _status(f"connection lost ({change.reason}); reconnecting")
        elif change.state is ConnectionState.CONNECTED:
            _status("reconnected")

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
            on_integrity_failure=lambda failure: _status(describe_integrity_failure(failure)),
        )
    )
    return EXIT_OK
