"""The ``fastport`` command: ``serve``, ``keygen``, ``session create|drop|suspend|resume|rotate-token-key``,
``token mint``, ``pub``, ``sub``.

Each subcommand is added by a small ``add_*_parser(subparsers)`` function that sets ``func``
(``Namespace -> int``, the exit code) on its parser; ``pub`` and ``sub`` come from
:mod:`fastport_anyio.cli_pubsub` and ``token`` from :mod:`fastport_anyio.cli_token`, each through its
``register(subparsers)``. Every failure a user can cause or meet is one line on stderr
(``fastport serve: ...``), never a traceback, with a documented exit code; :func:`main` is the one place
that does it, through :mod:`fastport_anyio.cli_errors`:

* 0: success (for ``serve``: stopped by SIGINT or SIGTERM, gracefully);
* 1: runtime failure (the port is in use, the admin API is unreachable or refused the request), and any
  unexpected error (one line asking for a report; ``--debug`` or ``FASTPORT_DEBUG=1`` adds the traceback);
* 2: usage or configuration error (bad flags, a bad config file, an unreadable certificate);
* 130: interrupted (Ctrl-C).

``session`` talks to the admin API with the standard library's :mod:`http.client` (no dependency), with
the same admin credentials as the server (``--admin-user/--admin-password`` or ``FASTPORT_ADMIN_USER`` /
``FASTPORT_ADMIN_PASSWORD``), and prints the JSON answer on one line.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import errno
import functools
import gc
import getpass
import http.client
import importlib.metadata
import importlib.util
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import anyio
import anyio.abc

from fastport_core import compiled
from fastport_core.config import SessionSettings
from fastport_core.config_file import ConfigError, Overrides, ServerSettings, load_settings
from fastport_core.errors import LocalProtocolError
from fastport_core.keys import generate_key

from . import cli_pubsub, cli_store, cli_token
from .cli_errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CommandError, debug_requested, report_failure
from .cluster import ClusterError, ClusterOptions, NatsCluster
from .durability import Store
from .server import Server
from .store import SqliteStore, StoreError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "SECRET_KEY_NOTICE",
    "CommandError",
    "add_keygen_parser",
    "add_serve_parser",
    "add_session_parser",
    "build_parser",
    "main",
]

DEFAULT_ADMIN_URL: Final = "http://127.0.0.1:3000"
SECRET_KEY_NOTICE: Final = (
    "fastport session: the secret key above is shown only once: store it now; dropping or suspending the "
    "session needs it. The token key signs scoped tokens: give it only to the backend that mints them "
    "(rotate-token-key replaces it)."
)
HTTP_TIMEOUT: Final = 10.0

_EPILOG: Final = """\
exit codes: 0 success; 1 runtime failure (port in use, server or admin API unreachable or refusing);
            2 usage or configuration error (bad flags, bad config file, unreadable certificate);
            130 interrupted. --debug (or FASTPORT_DEBUG=1) adds the traceback to an error."""

logger = logging.getLogger(__name__)

Subparsers = argparse._SubParsersAction  # the type argparse gives add_subparsers(); not exported by name


def _parser_kwargs(help_text: str, description: str) -> dict[str, Any]:
    return {
        "help": help_text,
        "description": description,
        "epilog": _EPILOG,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


# --------------------------------------------------------------------------------------------------------
# fastport serve


def add_serve_parser(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        **_parser_kwargs(
            "run the broker",
            "Run the broker until SIGINT or SIGTERM (then stop gracefully: clients get close 1001).\n"
            "Settings are layered: config file < FASTPORT_* environment variables < these flags.",
        ),
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="TOML config file (see docs/operations.md)")
    parser.add_argument("--host", help="address to listen on (env FASTPORT_HOST; default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, help="TCP port, 0 for any free one (env FASTPORT_PORT; default 3000)"
    )
    parser.add_argument("--admin-user", help="admin API user (env FASTPORT_ADMIN_USER); no user: API off")
    parser.add_argument(
        "--admin-password", help="admin API password (env FASTPORT_ADMIN_PASSWORD, safer than the flag)"
    )
    parser.add_argument("--certfile", metavar="PEM", help="TLS certificate chain: serve wss:// and https://")
    parser.add_argument("--keyfile", metavar="PEM", help="TLS private key, if not in --certfile")
    parser.add_argument(
        "--store",
        metavar="PATH",
        help="SQLite database that keeps sessions, resumable subscribers and un-ACKed messages across "
        "restarts, created when missing (env FASTPORT_STORE; default: in memory)",
    )
    parser.add_argument(
        "--cluster",
        metavar="URLS",
        help="run as a node of a cluster over NATS JetStream: comma-separated nats:// URLs (env "
        "FASTPORT_CLUSTER; needs the cluster extra; instead of --store)",
    )
    parser.add_argument("--cluster-user", metavar="USER", help="NATS user (env FASTPORT_CLUSTER_USER)")
    parser.add_argument(
        "--cluster-password", metavar="PASSWORD", help="NATS password (env FASTPORT_CLUSTER_PASSWORD)"
    )
    parser.add_argument("--cluster-token", metavar="TOKEN", help="NATS token (env FASTPORT_CLUSTER_TOKEN)")
    parser.add_argument(
        "--cluster-ca", metavar="PEM", help="CA file for NATS's TLS certificate (tls:// URLs)"
    )
    parser.add_argument(
        "--cluster-replicas",
        type=int,
        metavar="N",
        help="JetStream replicas of each session's stream (default 1; 3 on a three-server NATS cluster)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="log level (env FASTPORT_LOG_LEVEL; default INFO)",
    )
    parser.add_argument(
        "--max-uninitialised-per-address",
        type=int,
        metavar="N",
        help="connections one address may hold before a successful init (default 64; [limits] in the file)",
    )
    parser.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDR",
        help="a reverse proxy's address or CIDR network whose X-Forwarded-For/Forwarded header names the "
        "client (repeatable; replaces the config file's trusted_proxies)",
    )
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio", help="event loop")
    parser.add_argument(
        "--uvloop", action="store_true", help="use uvloop (asyncio backend; must be installed)"
    )
    parser.set_defaults(func=run_serve)


def serve_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """The layered settings of ``fastport serve``; a :class:`CommandError` (exit 2) if unusable."""
    overrides = Overrides(
        host=args.host,
        port=args.port,
        certfile=args.certfile,
        keyfile=args.keyfile,
        store=args.store,
        cluster=args.cluster,
        cluster_user=args.cluster_user,
        cluster_password=args.cluster_password,
        cluster_token=args.cluster_token,
        cluster_ca=args.cluster_ca,
        cluster_replicas=args.cluster_replicas,
        log_level=args.log_level,
        admin_user=args.admin_user,
        admin_password=args.admin_password,
        max_uninitialised_per_address=args.max_uninitialised_per_address,
    )
    try:
        settings = load_settings(args.config, environ=environ, overrides=overrides)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    proxies = getattr(args, "trusted_proxy", None)
    if proxies:
        try:
            config = dataclasses.replace(settings.config, trusted_proxies=tuple(proxies))
        except LocalProtocolError as exc:
            raise CommandError(f"--trusted-proxy: {exc}", EXIT_USAGE) from None
        settings = dataclasses.replace(settings, config=config)
    return settings


def make_ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """A server TLS context from ``certfile``/``keyfile``; a :class:`CommandError` (exit 2) if unusable."""
    if settings.certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.certfile, settings.keyfile)
    except (OSError, ssl.SSLError) as exc:
        files = str(settings.certfile) + (f", {settings.keyfile}" if settings.keyfile else "")
        if isinstance(exc, ssl.SSLError):
            reason = _pem_problem(settings.certfile, settings.keyfile) or str(exc)
        else:
            reason = exc.strerror or str(exc)
        raise CommandError(f"cannot load the TLS certificate ({files}): {reason}", EXIT_USAGE) from None
    return context


def _pem_problem(certfile: Path, keyfile: Path | None) -> str | None:
    """What is missing from the PEM files, in words (OpenSSL only says ``[SSL] PEM lib``)."""
    try:
        cert_text = certfile.read_text(encoding="ascii", errors="replace")
        key_text = cert_text if keyfile is None else keyfile.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        return f"{certfile} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    if "PRIVATE KEY-----" not in key_text:
        if keyfile is None:
            return (
                f"{certfile} holds no private key: give the key file with --keyfile "
                "(or keyfile in the config file's [server] table)"
            )
        return f"{keyfile} holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
    return None


def _backend_options(args: argparse.Namespace) -> dict[str, Any]:
    if not args.uvloop:
        return {}
    if args.backend != "asyncio":
        raise CommandError("--uvloop needs --backend asyncio", EXIT_USAGE)
    if importlib.util.find_spec("uvloop") is None:
        raise CommandError("--uvloop: uvloop is not installed (pip install uvloop)", EXIT_USAGE)
    return {"use_uvloop": True}


async def serve_until_signalled(
    settings: ServerSettings,
    ssl_context: ssl.SSLContext | None,
    *,
    signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
    store: Store | None = None,
) -> None:
    """Run a server for ``settings`` until one of ``signals``; then stop it gracefully.

    A second signal during the graceful stop drops the remaining connections at once. With
    ``settings.cluster`` the node joins its cluster first (a :class:`ClusterError` if it cannot).
    """
    cluster = (
        await NatsCluster.connect(cluster_options(settings), settings.config) if settings.cluster else None
    )
    async with Server(
        settings.host,
        settings.port,
        config=settings.config,
        sessions=settings.sessions,
        admin=settings.admin,
        ssl_context=ssl_context,
        shutdown_timeout=settings.shutdown_timeout,
        store=store,
        cluster=cluster,
    ) as server:
        with anyio.open_signal_receiver(*signals) as received:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(_stop_on_signals, server, received, task_group)
                await server.wait_stopped()
                task_group.cancel_scope.cancel()


async def _stop_on_signals(
    server: Server, received: AsyncIterator[int], task_group: anyio.abc.TaskGroup
) -> None:
    stopping = False
    async for signum in received:
        name = signal.Signals(signum).name
        if stopping:
            logger.info("%s received again: dropping the remaining connections now", name)
            task_group.start_soon(server.shutdown, 0.0)
        else:
            logger.info("%s received: stopping gracefully", name)
            task_group.start_soon(server.shutdown)
        stopping = True


GC_YOUNG_THRESHOLD: Final = 10_000
"""Allocations between two collections of Python's youngest GC generation in a ``fastport serve`` process
(Python's default: 700). A broker under load keeps thousands of young objects alive at once (the
deliveries of a fan-out burst, the store's records awaiting their commit), which the default traverses again
and again, and promotes, so the costly full collections come ~14 times as often. Measured side by side
(docs/performance.md, "Python's garbage collector"): 8-10 % less CPU per fan-out delivery interpreted and
~12 % compiled, 6-8 % per 1:1 message interpreted, a few per cent durable, no change at a trickle. What
lingers meanwhile is only cyclic garbage, which the broker makes little of; the threshold is the
process's, so a program that embeds :class:`Server` keeps its own."""


def _tune_gc() -> None:
    """Raise the young generation's threshold to :data:`GC_YOUNG_THRESHOLD` (the others unchanged)."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def run_serve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    settings = serve_settings(args, environ)
    options = _backend_options(args)
    _configure_logging(settings.log_level)
    _tune_gc()
    ssl_context = make_ssl_context(settings)
    if settings.source is not None:
        logger.info("config file: %s", settings.source)
    logger.debug("event loop: %s%s", args.backend, " (uvloop)" if options else "")
    if settings.cluster and args.backend != "asyncio":
        raise CommandError("--cluster runs on the asyncio backend (nats-py is asyncio only)", EXIT_USAGE)
    store = _open_store(settings)
    logger.info("fastport %s (%s)", _version(), _core_kind())
    try:
        anyio.run(
            functools.partial(serve_until_signalled, settings, ssl_context, store=store),
            backend=args.backend,
            backend_options=options,
        )
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        if exc.errno == errno.EADDRINUSE:
            raise CommandError(f"cannot listen on {where}: the address is already in use") from None
        raise CommandError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    except ClusterError as exc:
        raise CommandError(f"cannot join the cluster: {exc}", EXIT_USAGE) from None
    except LocalProtocolError as exc:  # a config session the broker refuses (name too long, ...)
        raise CommandError(f"cannot create the configured sessions: {exc}", EXIT_USAGE) from None
    logger.info("stopped")
    return EXIT_OK


def cluster_options(settings: ServerSettings) -> ClusterOptions:
    """How the node reaches NATS, from its settings (``--cluster`` and the ``cluster_*`` keys)."""
    return ClusterOptions(
        settings.cluster,
        user=settings.cluster_user,
        password=settings.cluster_password,
        token=settings.cluster_token,
        tls_ca=str(settings.cluster_ca) if settings.cluster_ca is not None else None,
        replicas=settings.cluster_replicas,
    )


def _open_store(settings: ServerSettings) -> SqliteStore | None:
    """The ``--store`` database, opened (created when missing) before anything listens; exit 2 if unusable."""
    if settings.store is None:
        return None
    config = settings.config
    try:
        store = SqliteStore.open(
            settings.store, dedupe_ttl=config.dedupe_ttl, dedupe_window=config.limits.dedupe_window
        )
    except StoreError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    logger.info("store: %s", settings.store)
    return store


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )


# --------------------------------------------------------------------------------------------------------
# fastport keygen


def add_keygen_parser(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "keygen",
        **_parser_kwargs(
            "print a new end-to-end key",
            "Print a new random 32-byte key, base64: give it to every client of a session (never to the "
            "server).",
        ),
    )
    parser.set_defaults(func=run_keygen)


def run_keygen(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    print(generate_key())
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------
# fastport session create|drop|suspend|resume


def add_session_parser(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "session",
        **_parser_kwargs(
            "create, drop, suspend or resume a session through the admin API",
            "Manage sessions on a running server through its admin API (HTTP, same port).",
        ),
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(action: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(
            action, **_parser_kwargs(help_text, help_text[0].upper() + help_text[1:] + ".")
        )
        sub.add_argument("name", metavar="SESSION")
        sub.add_argument(
            "--password", help="session password (env FASTPORT_PASSWORD; prompted for on a terminal)"
        )
        sub.add_argument(
            "--url",
            help=f"server URL, http(s):// or ws(s):// (env FASTPORT_ADMIN_URL; default {DEFAULT_ADMIN_URL})",
        )
        sub.add_argument("--admin-user", help="admin user (env FASTPORT_ADMIN_USER)")
        sub.add_argument("--admin-password", help="admin password (env FASTPORT_ADMIN_PASSWORD)")
        sub.add_argument(
            "--cafile", metavar="PEM", help="CA certificate(s) to trust for https:// (env FASTPORT_CAFILE)"
        )
        sub.set_defaults(func=run_session)
        return sub

    create = common("create", "create a session; prints its secret key, shown once")
    create.add_argument("--retry-interval", type=int, metavar="MS", help="ms between re-sends")
    create.add_argument("--max-retry-limit", type=int, metavar="N", help="re-sends before giving up")
    create.add_argument("--message-expiry-time", type=int, metavar="MS", help="ms before a message expires")
    create.add_argument(
        "--session-expiry", type=int, metavar="MS", help="ms idle before the session is dropped"
    )
    for action, text in (
        ("drop", "drop a session and close its connections"),
        ("suspend", "suspend a session (no new connections, no delivery)"),
        ("resume", "resume a suspended session"),
        ("rotate-token-key", "replace the session's token key (old tokens stop working); prints the new one"),
    ):
        sub = common(action, text)
        sub.add_argument("--secret-key", help="the session's secret key (env FASTPORT_SECRET_KEY)")


_CREATE_OPTIONS: Final = {
    "retry_interval": "retryInterval",
    "max_retry_limit": "maxRetryLimit",
    "message_expiry_time": "messageExpiryTime",
    "session_expiry": "sessionExpiry",
}


def _pick(value: str | None, environ: Mapping[str, str], variable: str) -> str | None:
    return value if value is not None else environ.get(variable) or None


def _secret(value: str | None, environ: Mapping[str, str], variable: str, flag: str, prompt: str) -> str:
    """A secret from its flag, its variable, or (on a terminal) a prompt that does not echo it."""
    picked = _pick(value, environ, variable)
    if picked is not None:
        return picked
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            entered = getpass.getpass(prompt)
        except (EOFError, KeyboardInterrupt):
            entered = ""
        if entered:
            return entered
    raise CommandError(f"missing {flag} (or {variable})", EXIT_USAGE)


def _create_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The session settings flags of ``session create`` as admin API fields, checked with the server's
    own rule before anything is sent or prompted for, so that an error names the flag that was typed."""
    settings = {
        wire: getattr(args, option)
        for option, wire in _CREATE_OPTIONS.items()
        if getattr(args, option) is not None
    }
    flags = {wire: "--" + option.replace("_", "-") for option, wire in _CREATE_OPTIONS.items()}
    try:
        SessionSettings.from_wire(settings, names=flags)
    except LocalProtocolError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    return settings


def session_request(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """The admin API path and JSON body for ``fastport session ACTION`` (a usage error if incomplete)."""
    settings = _create_settings(args) if args.action == "create" else {}
    password = _secret(args.password, environ, "FASTPORT_PASSWORD", "--password", "session password: ")
    body: dict[str, Any] = {"sessionName": args.name, "password": password}
    if args.action == "create":
        return "/api/createSession", body | settings
    body["secretKey"] = _secret(
        args.secret_key, environ, "FASTPORT_SECRET_KEY", "--secret-key", "session secret key: "
    )
    if args.action == "drop":
        return "/api/dropSession", body
    if args.action == "rotate-token-key":
        return "/api/rotateTokenKey", body
    body["suspend"] = args.action == "suspend"
    return "/api/suspendSession", body


def _admin_connection(url: str, cafile: str | None) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.hostname:
        raise CommandError(f"--url must be http(s)://HOST:PORT or ws(s)://HOST:PORT, got {url!r}", EXIT_USAGE)
    try:
        port = parts.port
    except ValueError:
        raise CommandError(f"--url has an invalid port: {url!r}", EXIT_USAGE) from None
    if scheme == "https":
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise CommandError(f"cannot load --cafile {cafile}: {exc}", EXIT_USAGE) from None
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, port, timeout=HTTP_TIMEOUT, context=context
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, port, timeout=HTTP_TIMEOUT)
    return connection, f"{scheme}://{parts.netloc}"


def call_admin_api(
    url: str, path: str, body: Mapping[str, Any], user: str, password: str, *, cafile: str | None = None
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to ``path`` with HTTP Basic credentials; returns (status, JSON answer).

    Unreachable servers and non-JSON answers are :class:`CommandError` (exit 1).
    """
    connection, base = _admin_connection(url, cafile)
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
    try:
        connection.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise CommandError(f"cannot reach the admin API at {base}: {reason}") from None
    finally:
        connection.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise CommandError(f"{base}{path} answered {response.status} without a JSON object (is it fastport?)")
    return response.status, answer


def run_session(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    if args.action == "create":
        _create_settings(args)  # a bad flag fails before any prompt
    user = _pick(args.admin_user, env, "FASTPORT_ADMIN_USER")
    if user is None:
        raise CommandError("missing --admin-user (or FASTPORT_ADMIN_USER)", EXIT_USAGE)
    admin_password = _secret(
        args.admin_password, env, "FASTPORT_ADMIN_PASSWORD", "--admin-password", "admin password: "
    )
    url = _pick(args.url, env, "FASTPORT_ADMIN_URL") or DEFAULT_ADMIN_URL
    path, body = session_request(args, env)
    cafile = _pick(args.cafile, env, "FASTPORT_CAFILE")
    status, answer = call_admin_api(url, path, body, user, admin_password, cafile=cafile)
    if status == 200:
        print(json.dumps(answer), flush=True)  # one line, as docs/operations.md shows it (and jq reads it)
        if args.action == "create":
            print(SECRET_KEY_NOTICE, file=sys.stderr, flush=True)
        return EXIT_OK
    error = answer.get("error", "no reason given")
    code = answer.get("code", status)
    if status == 401:
        raise CommandError(f"the admin API refused the credentials ({code}): {error}")
    raise CommandError(f"the admin API answered {status} ({code}): {error}")


# --------------------------------------------------------------------------------------------------------
# The command.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastport",
        description="fastport: a secure, session-isolated pub/sub broker over WebSockets.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fastport {_version()} ({_core_kind()})")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(subparsers)
    add_keygen_parser(subparsers)
    add_session_parser(subparsers)
    cli_pubsub.register(subparsers)  # pub, sub
    cli_token.register(subparsers)  # token mint
    cli_store.register(subparsers)  # store check, store backup
    _add_debug_flag(parser, default=False)
    return parser


def _core_kind() -> str:
    """How the core runs: ``FASTPORT_COMPILE=1`` builds compile it (setup.py); both behave the same."""
    return "compiled core" if compiled() else "interpreted core"


def _version() -> str:
    try:
        return importlib.metadata.version("fastport")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _add_debug_flag(parser: argparse.ArgumentParser, *, default: object) -> None:
    """``--debug`` on ``parser`` and every subcommand below it, so it can go anywhere on the line."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the traceback of an error (or FASTPORT_DEBUG=1)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug_flag(sub, default=argparse.SUPPRESS)  # SUPPRESS: never resets the outer value


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fastport`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Every failure goes through :func:`~fastport_anyio.cli_errors.report_failure`: one line, one exit code.
    """
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SystemExit:
        raise
    except BaseException as exc:  # the one place where every failure becomes one line (cli_errors)
        return report_failure(args.command, exc, debug=debug_requested(args.debug, os.environ))


if __name__ == "__main__":  # pragma: no cover - python -m fastport_anyio is the supported spelling
    sys.exit(main())
