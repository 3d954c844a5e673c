"""The server's settings: a TOML config file, layered under environment variables and command-line flags.

Pure parsing (``tomllib``, no sockets, no logging set-up): :func:`load_settings` returns a typed, frozen
:class:`ServerSettings` that the CLI passes to :func:`fastport_anyio.serve`. Layering, lowest first::

    built-in defaults  <  the config file  <  FASTPORT_* environment variables  <  command-line flags

The file can declare everything, so that ``fastport serve --config FILE`` needs no admin API call::

    [server]     host, port, certfile, keyfile, store, log_level, shutdown_timeout, and every scalar field of
                 ServerConfig by its name (ping_interval, handshake_timeout, slow_consumer_policy, ...);
                 durations in seconds, as ServerConfig has them
    [limits]     every Limits field by its name (bytes and counts)
    [defaults]   session settings, with the admin API's names and units: retryInterval, maxRetryLimit,
                 messageExpiryTime, sessionExpiry (milliseconds), so a createSession body can be pasted
    [admin]      user, password
    [[sessions]] name, password, and optionally secretKey, tokenKey and the [defaults] keys

Why the two naming styles: ``[server]`` and ``[limits]`` are this server's own knobs and use the names of
the core's dataclasses (generated into docs/operations.md, so they cannot drift), while sessions keep the
original fastPort admin API's camelCase and milliseconds, which operators already know.

Unknown keys and wrongly typed values are :class:`ConfigError` naming the file, the table and the key
(with a close match when there is one): a typo must not silently fall back to a default. The accepted
keys come from the dataclasses' fields, so a limit added to the core is configurable with no change here.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, Final

from .admin import AdminCredentials
from .config import Limits, ServerConfig, SessionSettings
from .errors import LocalProtocolError
from .tokens import decode_token_key

__all__ = [
    "ENVIRONMENT_VARIABLES",
    "LOG_LEVELS",
    "ConfigError",
    "Overrides",
    "ServerSettings",
    "SessionSpec",
    "load_settings",
]

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Environment variable → the :class:`Overrides` field it sets (between the file and the flags).
ENVIRONMENT_VARIABLES: Final[Mapping[str, str]] = {
    "FASTPORT_HOST": "host",
    "FASTPORT_PORT": "port",
    "FASTPORT_LOG_LEVEL": "log_level",
    "FASTPORT_STORE": "store",
    "FASTPORT_CLUSTER": "cluster",
    "FASTPORT_CLUSTER_USER": "cluster_user",
    "FASTPORT_CLUSTER_PASSWORD": "cluster_password",
    "FASTPORT_CLUSTER_TOKEN": "cluster_token",
    "FASTPORT_ADMIN_USER": "admin_user",
    "FASTPORT_ADMIN_PASSWORD": "admin_password",
}

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 3000
DEFAULT_SHUTDOWN_TIMEOUT: Final = 5.0


class ConfigError(Exception):
    """A config file, environment variable or flag that cannot be used; the message names where it is."""


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """A session to create when the server starts (from ``[[sessions]]`` or given to ``serve``).

    ``secret_key`` authorises dropping and suspending the session through the admin API. When it is
    ``None`` the server generates one that nobody ever sees, so such a session can only go away with the
    process: set one in the file if operators must be able to drop or suspend it. ``token_key`` (base64 of
    32 bytes) signs the session's scoped tokens; when it is ``None`` the server generates one, and tokens
    can be minted only after ``rotateTokenKey`` (which needs the secret key): set it in the file if
    application backends mint tokens for the session.
    """

    name: str
    password: str = field(repr=False)
    secret_key: str | None = field(default=None, repr=False)
    token_key: str | None = field(default=None, repr=False)
    settings: SessionSettings | None = None
    """``None``: the server's ``default_session_settings``."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Everything ``fastport serve`` needs, after layering; the CLI hands it to :func:`serve`."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    config: ServerConfig = field(default_factory=ServerConfig)
    sessions: tuple[SessionSpec, ...] = ()
    admin: AdminCredentials | None = None
    """``None``: the admin API is off (there is no default password)."""
    certfile: Path | None = None
    """PEM certificate chain; set, the server speaks ``wss://`` and ``https://`` only."""
    keyfile: Path | None = None
    """PEM private key, when it is not in ``certfile``."""
    store: Path | None = None
    """The SQLite database that keeps sessions, resumable subscribers and un-ACKed messages across
    restarts; ``None``: the broker runs in memory."""
    cluster: tuple[str, ...] = ()
    """NATS URLs (``nats://host:port``): the server is a node of a cluster over NATS JetStream, which keeps
    the state instead of a store (DESIGN §8); empty: a single broker."""
    cluster_user: str | None = None
    cluster_password: str | None = field(default=None, repr=False)
    cluster_token: str | None = field(default=None, repr=False)
    cluster_ca: Path | None = None
    """A CA file NATS's TLS certificate is verified against."""
    cluster_replicas: int = 1
    """JetStream replicas of each session's stream and of the sessions' bucket."""
    log_level: str = "INFO"
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    """Seconds a graceful stop waits for clients to answer the 1001 close before dropping them."""
    source: Path | None = None
    """The config file these settings came from, if any (for log lines)."""


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values above the file: from the environment or from flags. ``None`` means "not given here"."""

    host: str | None = None
    port: int | str | None = None
    certfile: str | Path | None = None
    keyfile: str | Path | None = None
    store: str | Path | None = None
    cluster: str | None = None
    cluster_user: str | None = None
    cluster_password: str | None = None
    cluster_token: str | None = None
    cluster_ca: str | Path | None = None
    cluster_replicas: int | None = None
    log_level: str | None = None
    admin_user: str | None = None
    admin_password: str | None = None
    shutdown_timeout: float | None = None
    max_uninitialised_per_address: int | None = None
    """The one core limit with a flag of its own: the first knob to turn when many clients share one address
    (NAT, a proxy) and connect at once."""


# --------------------------------------------------------------------------------------------------------
# Key tables, derived from the core's dataclasses.

#: ``[server]`` keys that belong to the adapter rather than to :class:`ServerConfig`.
_ADAPTER_KEYS: Final[Mapping[str, type]] = {
    "host": str, "port": int, "certfile": str, "keyfile": str, "store": str, "log_level": str,
    "shutdown_timeout": float, "cluster": str, "cluster_user": str, "cluster_password": str,
    "cluster_token": str, "cluster_ca": str, "cluster_replicas": int,
}  # fmt: skip


def _scalar_fields(cls: type) -> dict[str, Any]:
    """name → resolved type of every non-dataclass field of ``cls`` (nested configs have own tables)."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    return {
        f.name: hints[f.name]
        for f in fields(cls)
        if not hasattr(type(getattr(defaults, f.name)), "__dataclass_fields__")
    }


_SERVER_CONFIG_FIELDS: Final = _scalar_fields(ServerConfig)
_LIMIT_FIELDS: Final = _scalar_fields(Limits)
_SESSION_WIRE_KEYS: Final = tuple(SessionSettings.WIRE_FIELDS)
_SESSION_KEYS: Final = ("name", "password", "secretKey", "tokenKey", *_SESSION_WIRE_KEYS)
_TABLES: Final = ("server", "limits", "defaults", "admin", "sessions")


class _Where:
    """Builds error messages that name the source, the table and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, table: str, key: str | None, message: str) -> ConfigError:
        place = f"[{table}]" if key is None else f"[{table}] {key}"
        return ConfigError(f"{self.source}: {place}: {message}")

    def check_keys(self, table: str, values: Mapping[str, Any], known: tuple[str, ...] | list[str]) -> None:
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"
                raise self.error(table, None, f"unknown key {key!r}{hint}")


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _coerce(where: _Where, table: str, key: str, value: object, kind: Any) -> Any:
    """Check a TOML value against a dataclass field type; ``false`` stands for ``None`` where allowed."""
    args = typing.get_args(kind)
    if args and type(None) in args:
        if value is False:
            return None
        (kind,) = (arg for arg in args if arg is not type(None))
    if isinstance(kind, type) and issubclass(kind, Enum):
        choices = [member.value for member in kind]
        if value not in choices:
            raise where.error(table, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return kind(value)
    if kind is bool:
        if type(value) is not bool:
            raise where.error(table, key, f"must be true or false, got {_type_name(value)}")
        return value
    if kind is int:
        if type(value) is not int:
            raise where.error(table, key, f"must be an integer, got {_type_name(value)}")
        return value
    if kind is float:
        if type(value) not in (int, float):
            raise where.error(table, key, f"must be a number, got {_type_name(value)}")
        return float(typing.cast(float, value))
    if kind is str:
        if type(value) is not str or not value:
            raise where.error(table, key, f"must be a non-empty string, got {_type_name(value)}")
        return value
    if typing.get_origin(kind) is tuple:  # tuple[str, ...]: a TOML array of strings
        if not isinstance(value, list) or not all(type(item) is str and item for item in value):
            raise where.error(table, key, f"must be an array of non-empty strings, got {_type_name(value)}")
        return tuple(value)
    raise AssertionError(f"no coercion for field type {kind!r}")  # a new kind of field in the core


def _table(where: _Where, document: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = document.get(name, {})
    if not isinstance(value, dict):
        raise where.error(name, None, "must be a table")
    return value


# --------------------------------------------------------------------------------------------------------
# Parsing.


@dataclass(frozen=True, slots=True)
class _FileValues:
    """What one file says; adapter-level ``[server]`` and ``[admin]`` values are layered later."""

    config: ServerConfig
    sessions: tuple[SessionSpec, ...]
    overrides: Overrides


def _parse(document: Mapping[str, Any], source: str, base_dir: Path | None) -> _FileValues:
    """Validate a parsed TOML document (``source`` names it in errors; relative paths are taken from
    ``base_dir``, the file's directory, so a file works wherever the server is started from)."""
    where = _Where(source)
    where.check_keys("top level", document, list(_TABLES))
    server = _table(where, document, "server")
    limits = _table(where, document, "limits")
    defaults = _table(where, document, "defaults")
    admin = _table(where, document, "admin")
    sessions = document.get("sessions", [])
    if not isinstance(sessions, list) or not all(isinstance(s, dict) for s in sessions):
        raise where.error("sessions", None, "must be an array of tables ([[sessions]])")

    where.check_keys("server", server, [*_ADAPTER_KEYS, *_SERVER_CONFIG_FIELDS])
    where.check_keys("limits", limits, list(_LIMIT_FIELDS))
    where.check_keys("defaults", defaults, list(_SESSION_WIRE_KEYS))
    where.check_keys("admin", admin, ["user", "password"])

    try:
        limit_values = Limits(
            **{k: _coerce(where, "limits", k, v, _LIMIT_FIELDS[k]) for k, v in limits.items()}
        )
    except LocalProtocolError as exc:
        raise where.error("limits", None, str(exc)) from None
    try:
        session_defaults = SessionSettings.from_wire(defaults)
    except LocalProtocolError as exc:
        raise where.error("defaults", None, str(exc)) from None
    core_values = {
        k: _coerce(where, "server", k, v, _SERVER_CONFIG_FIELDS[k])
        for k, v in server.items()
        if k in _SERVER_CONFIG_FIELDS
    }
    try:
        config = ServerConfig(limits=limit_values, default_session_settings=session_defaults, **core_values)
    except LocalProtocolError as exc:
        raise where.error("server", None, str(exc)) from None

    adapter: dict[str, Any] = {
        key: _coerce(where, "server", key, server[key], kind)
        for key, kind in _ADAPTER_KEYS.items()
        if key in server
    }
    for key in ("certfile", "keyfile", "store", "cluster_ca"):
        if key in adapter and base_dir is not None:
            adapter[key] = base_dir / adapter[key]
    for key in ("user", "password"):
        if key in admin:
            adapter[f"admin_{key}"] = _coerce(where, "admin", key, admin[key], str)

    specs: list[SessionSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(sessions):
        table = f"sessions #{index + 1}"
        where.check_keys(table, entry, list(_SESSION_KEYS))
        for required in ("name", "password"):
            if required not in entry:
                raise where.error(table, None, f"missing key {required!r}")
        name = typing.cast(str, _coerce(where, table, "name", entry["name"], str))
        if name in seen:
            raise where.error(table, "name", f"session {name!r} is declared twice")
        seen.add(name)
        secret = entry.get("secretKey")
        token_key = entry.get("tokenKey")
        if token_key is not None:
            token_key = typing.cast(str, _coerce(where, table, "tokenKey", token_key, str))
            try:
                decode_token_key(token_key)
            except LocalProtocolError as exc:
                raise where.error(table, "tokenKey", str(exc)) from None
        settings = None
        if any(key in entry for key in _SESSION_WIRE_KEYS):
            try:
                settings = SessionSettings.from_wire(entry, base=session_defaults)
            except LocalProtocolError as exc:
                raise where.error(table, None, str(exc)) from None
        specs.append(
            SessionSpec(
                name=name,
                password=typing.cast(str, _coerce(where, table, "password", entry["password"], str)),
                secret_key=None
                if secret is None
                else typing.cast(str, _coerce(where, table, "secretKey", secret, str)),
                token_key=token_key,
                settings=settings,
            )
        )
    return _FileValues(config, tuple(specs), Overrides(**adapter))


def _read_file(path: Path) -> _FileValues:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the config file is not UTF-8 text: {exc}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return _parse(document, str(path), path.parent)


def _from_environment(environ: Mapping[str, str]) -> Overrides:
    values: dict[str, Any] = {
        attr: environ[name] for name, attr in ENVIRONMENT_VARIABLES.items() if environ.get(name)
    }
    return Overrides(**values)


def _layer(*layers: Overrides) -> dict[str, Any]:
    """Later layers win, field by field; ``None`` never overrides."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for f in fields(layer):
            value = getattr(layer, f.name)
            if value is not None:
                merged[f.name] = value
    return merged


def _port(value: int | str, where: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise ConfigError(f"{where}: port must be an integer, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where}: port must be 0-65535 (0: any free port), got {port}")
    return port


def load_settings(
    config_file: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Overrides = Overrides(),
) -> ServerSettings:
    """Layer defaults < ``config_file`` < ``environ`` (default ``os.environ``) < ``overrides`` (flags).

    Raises :class:`ConfigError` for anything unusable, naming the file and key or the variable.
    """
    path = Path(config_file) if config_file is not None else None
    file_values = _read_file(path) if path is not None else _parse({}, "<defaults>", None)
    environment = _from_environment(os.environ if environ is None else environ)
    merged = _layer(file_values.overrides, environment, overrides)

    def origin(attr: str) -> str:
        """Where the winning value of ``attr`` came from, for error messages."""
        if getattr(overrides, attr) is not None:
            return f"--{attr.replace('_', '-')}"
        for name, env_attr in ENVIRONMENT_VARIABLES.items():
            if env_attr == attr and getattr(environment, attr) is not None:
                return name
        return str(path) if path is not None else attr

    log_level = str(merged.get("log_level", "INFO")).upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"{origin('log_level')}: log level must be one of {', '.join(LOG_LEVELS)}")
    user, password = merged.get("admin_user"), merged.get("admin_password")
    admin = None
    if (user is None) != (password is None):
        missing = "password" if password is None else "user"
        raise ConfigError(
            f"admin {missing} missing: give both --admin-user and --admin-password "
            "(or FASTPORT_ADMIN_USER and FASTPORT_ADMIN_PASSWORD, or [admin] user and password), or neither"
        )
    if user is not None and password is not None:
        try:
            admin = AdminCredentials(user, password)
        except LocalProtocolError as exc:
            raise ConfigError(f"{origin('admin_user')}: {exc}") from None
    certfile = Path(merged["certfile"]) if "certfile" in merged else None
    keyfile = Path(merged["keyfile"]) if "keyfile" in merged else None
    store = Path(merged["store"]) if merged.get("store") else None
    cluster = tuple(url.strip() for url in str(merged.get("cluster") or "").split(",") if url.strip())
    if cluster and store is not None:
        raise ConfigError(
            f"{origin('cluster')}: a cluster node keeps its state in NATS JetStream: give --cluster or "
            "--store, not both"
        )
    for url in cluster:
        if not url.startswith(("nats://", "tls://")):
            raise ConfigError(f"{origin('cluster')}: {url!r} is not a nats:// or tls:// URL")
    replicas = int(merged.get("cluster_replicas", 1))
    if not 1 <= replicas <= 5:  # JetStream's own bound
        raise ConfigError(f"{origin('cluster_replicas')}: replicas must be 1 to 5")
    if keyfile is not None and certfile is None:
        raise ConfigError(f"{origin('keyfile')}: a keyfile needs a certfile")
    shutdown_timeout = float(merged.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT))
    if shutdown_timeout < 0:
        raise ConfigError(f"{origin('shutdown_timeout')}: shutdown timeout must be >= 0")
    config = file_values.config
    if (per_address := merged.get("max_uninitialised_per_address")) is not None:
        try:
            limits = replace(config.limits, max_uninitialised_per_address=per_address)
        except LocalProtocolError as exc:
            raise ConfigError(f"{origin('max_uninitialised_per_address')}: {exc}") from None
        config = replace(config, limits=limits)
    return ServerSettings(
        host=str(merged.get("host", DEFAULT_HOST)),
        port=_port(merged.get("port", DEFAULT_PORT), origin("port")),
        config=config,
        sessions=file_values.sessions,
        admin=admin,
        certfile=certfile,
        keyfile=keyfile,
        store=store,
        cluster=cluster,
        cluster_user=merged.get("cluster_user"),
        cluster_password=merged.get("cluster_password"),
        cluster_token=merged.get("cluster_token"),
        cluster_ca=Path(merged["cluster_ca"]) if merged.get("cluster_ca") else None,
        cluster_replicas=replicas,
        log_level=log_level,
        shutdown_timeout=shutdown_timeout,
        source=path,
    )
