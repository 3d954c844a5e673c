"""The HTTP admin API (DESIGN §2) as a pure function from a parsed request to a response.

The server core owns the socket and h11: it parses a request, calls :meth:`AdminApi.handle` with the
method, target, headers and complete body, and sends back the :class:`HttpResponse` it gets (adding
``Content-Length``). Nothing here sees bytes of a connection, so every answer can be tested in memory.

Theory of operation, in the order ``handle`` decides:

1. The path (the target without its query) picks a route from :data:`ROUTES`; no route → 404.
2. A route accepts one method; another → 405 with ``Allow``.
3. Protected routes (``/api/*`` and ``/metrics``) need the admin credentials. Without configured
   credentials the admin API is *off* and they answer 403 ``admin_disabled`` (there is no default
   password); otherwise HTTP Basic credentials are checked in constant time (:meth:`AdminApi.check_login`,
   which the web console's login calls too), and anything else (missing, wrong, malformed header)
   answers 401 with ``WWW-Authenticate``. Wrong or malformed credentials count as failed logins of the
   client's address in the same :class:`~fastport_core.auth.AuthThrottle` as failed ``init`` frames (under
   their own scope): past the failure budget the address gets 429 ``auth_throttled`` without a check.
   ``/healthz`` is open, for load balancers, reveals only counts and costs O(1).
4. ``/api/*`` bodies must be a JSON object with the original fastPort's camelCase fields; durations are
   milliseconds and become seconds through :meth:`SessionSettings.from_wire`. Unknown fields are ignored
   and ``Content-Type`` is not checked, as the original server did not.
5. Refused values raise :class:`LocalProtocolError` (from :class:`SessionSettings` or the broker, whose
   subclasses map to 409 / 404 / 403); any other refusal (a limit, a name too long) answers 400, with the
   refusal's message.

Every error answer is JSON ``{success: false, error, code}`` with an :class:`AdminErrorCode`, and every
request is counted in ``http_requests`` by route (never the raw target, so that garbage URLs cannot grow
the number of series) and status. ``handle`` raises for no input; it lets through only an exception that
is not a :class:`LocalProtocolError` from the broker, which is a bug there, not an answer.

``dropSession`` and ``suspendSession`` answer 404 for an unknown session but 403 for a wrong password or
secret key, so they tell which session names exist. Only an admin-authenticated caller can ask, and the
admin controls every session anyway, so clear answers win over hiding names here (unlike ``init`` on the
WebSocket, which is open to anyone and does not tell them apart).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from http import HTTPStatus
from typing import Any, Final, Protocol, Self

import orjson

from .auth import AuthThrottle
from .broker import (
    AccessDeniedError,
    BrokerStats,
    ClusterUnavailableError,
    SessionExistsError,
    StoreUnavailableError,
    UnknownSessionError,
)
from .config import ServerConfig, SessionSettings
from .errors import ErrorCode, LocalProtocolError
from .metrics import Metrics
from .peers import throttle_key

__all__ = [
    "ROUTES",
    "AdminApi",
    "AdminCredentials",
    "AdminErrorCode",
    "BrokerLike",
    "HttpErrorCode",
    "HttpResponse",
    "LoginOutcome",
    "Route",
]

_JSON: Final = "application/json"
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format's content type (prometheus-client's ``CONTENT_TYPE_PLAIN_0_0_4``)."""
_CHALLENGE: Final = 'Basic realm="fastport"'


class BrokerLike(Protocol):
    """What the admin API needs of the broker: :class:`~fastport_core.broker.Broker` provides it, and tests
    use a fake."""

    @property
    def metrics(self) -> Metrics: ...

    def create_session(
        self, name: str, password: str, now: float, settings: SessionSettings | None = None
    ) -> str: ...

    def drop_session(self, name: str, password: str, secret_key: str, now: float) -> None: ...

    def suspend_session(
        self, name: str, password: str, secret_key: str, suspend: bool, now: float
    ) -> None: ...

    def token_key(self, name: str) -> str: ...

    def rotate_token_key(self, name: str, password: str, secret_key: str, now: float) -> str: ...

    def stats(self) -> BrokerStats: ...

    def health(self) -> tuple[int, int]:
        """``(sessions, connections)``, in O(1): ``/healthz`` is open and may be polled hard."""
        ...

    @property
    def store_available(self) -> bool:
        """``False`` while a durable broker cannot write its store (``/healthz`` answers 503)."""
        ...

    @property
    def unavailable_code(self) -> ErrorCode:
        """What ``/healthz`` reports meanwhile: ``store_unavailable``, or ``cluster_unavailable``."""
        ...


@dataclass(frozen=True, slots=True)
class AdminCredentials:
    """The admin user and password (from flags or the environment); ``None`` instead turns the API off."""

    user: str
    password: str = field(repr=False)
    """Kept out of ``repr`` so that logging the configuration cannot leak it."""

    def __post_init__(self) -> None:
        # RFC 7617: a user-id with a colon cannot be sent in Basic credentials, so it could never log in.
        if not self.user or ":" in self.user:
            raise LocalProtocolError("admin user must be non-empty and contain no ':'")
        if not self.password:
            raise LocalProtocolError("admin password must not be empty (omit the credentials to turn off)")


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """One answer for the server core to send; it adds ``Content-Type`` from ``content_type`` and
    ``Content-Length`` from ``body``."""

    status: int
    body: bytes
    content_type: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()


class HttpErrorCode(StrEnum):
    """Base of the HTTP error-code enums (the admin API's, the web console's): each member carries its one
    HTTP ``status`` and its meaning in ``doc`` (as :class:`~fastport_core.errors.ErrorCode` does), so each
    status table lives in one place."""

    status: HTTPStatus
    doc: str

    def __new__(cls, value: str, status: HTTPStatus, doc: str) -> Self:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        member.doc = doc
        return member


class AdminErrorCode(HttpErrorCode):
    """The ``code`` of an admin API error answer."""

    INVALID_JSON = "invalid_json", HTTPStatus.BAD_REQUEST, "The body is not a JSON object."
    INVALID_REQUEST = (
        "invalid_request",
        HTTPStatus.BAD_REQUEST,
        "A field is missing, mistyped or out of range, or the broker refused the values (e.g. a limit).",
    )
    UNAUTHORIZED = (
        "unauthorized",
        HTTPStatus.UNAUTHORIZED,
        "No valid admin credentials (missing, wrong, or a malformed ``Authorization`` header).",
    )
    ADMIN_DISABLED = (
        "admin_disabled",
        HTTPStatus.FORBIDDEN,
        "The server runs without admin credentials, so the admin API is off.",
    )
    ACCESS_DENIED = "access_denied", HTTPStatus.FORBIDDEN, "Wrong session password or secret key."
    NOT_FOUND = "not_found", HTTPStatus.NOT_FOUND, "No such endpoint."
    UNKNOWN_SESSION = "unknown_session", HTTPStatus.NOT_FOUND, "No session of that name."
    METHOD_NOT_ALLOWED = (
        "method_not_allowed",
        HTTPStatus.METHOD_NOT_ALLOWED,
        "The endpoint exists but takes another method (named in ``Allow``).",
    )
    SESSION_EXISTS = "session_exists", HTTPStatus.CONFLICT, "A session of that name already exists."
    STORE_UNAVAILABLE = (
        "store_unavailable",
        HTTPStatus.SERVICE_UNAVAILABLE,
        "The broker cannot write its store (a full disk, an I/O error): nothing changed; retry shortly.",
    )
    CLUSTER_UNAVAILABLE = (
        "cluster_unavailable",
        HTTPStatus.SERVICE_UNAVAILABLE,
        "The cluster node has lost its engine (NATS): nothing changed; retry shortly (or on another node).",
    )
    AUTH_THROTTLED = (
        "auth_throttled",
        HTTPStatus.TOO_MANY_REQUESTS,
        "Too many failed logins from this address: wait (``Retry-After`` seconds) before trying again.",
    )


class LoginOutcome(StrEnum):
    """What :meth:`AdminApi.check_login` decided."""

    OK = "ok"
    DENIED = "denied"
    """Wrong user or password (counted as a failed login of the address)."""
    THROTTLED = "throttled"
    """The address is past its failure budget: refused without comparing anything."""
    DISABLED = "disabled"
    """The server has no admin credentials: nobody can log in."""


#: Broker refusals with a code of their own; any other LocalProtocolError is INVALID_REQUEST.
_BROKER_REFUSALS: Final[tuple[tuple[type[LocalProtocolError], AdminErrorCode], ...]] = (
    (SessionExistsError, AdminErrorCode.SESSION_EXISTS),
    (UnknownSessionError, AdminErrorCode.UNKNOWN_SESSION),
    (AccessDeniedError, AdminErrorCode.ACCESS_DENIED),
    (ClusterUnavailableError, AdminErrorCode.CLUSTER_UNAVAILABLE),
    (StoreUnavailableError, AdminErrorCode.STORE_UNAVAILABLE),
)


class _Refused(Exception):
    """Carries an error answer out of the request's checks to ``handle``."""

    def __init__(self, code: AdminErrorCode, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers

    def response(self) -> HttpResponse:
        fields = {"success": False, "error": self.message, "code": self.code}
        return _json(self.code.status, fields, self.headers)


def _json(
    status: HTTPStatus, obj: Mapping[str, Any], headers: tuple[tuple[str, str], ...] = ()
) -> HttpResponse:
    return HttpResponse(int(status), orjson.dumps(obj), _JSON, headers)


def _refusal(exc: LocalProtocolError) -> _Refused:
    """The answer to values the broker (or :class:`SessionSettings`) refused, with their message."""
    code = next(
        (code for cls, code in _BROKER_REFUSALS if isinstance(exc, cls)), AdminErrorCode.INVALID_REQUEST
    )
    return _Refused(code, str(exc))


# --------------------------------------------------------------------------------------------------------
# Request parsing.


def _basic_credentials(headers: Sequence[tuple[str, str]]) -> tuple[bytes, bytes] | None:
    """``(user, password)`` bytes of the one ``Authorization: Basic`` header, or ``None`` if there is no
    such header, more than one, or it does not decode (each then answers 401, never an exception)."""
    values = [value for name, value in headers if name.lower() == "authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text, are both ValueErrors
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


def _json_object(body: bytes) -> Mapping[str, Any]:
    try:
        obj: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if type(obj) is not dict:
        raise _Refused(AdminErrorCode.INVALID_JSON, "body must be a JSON object")
    return obj


def _text(fields: Mapping[str, Any], wire: str) -> str:
    value = fields.get(wire)
    if value is None:
        raise _Refused(AdminErrorCode.INVALID_REQUEST, f"missing field {wire!r}")
    if type(value) is not str or not value:
        raise _Refused(AdminErrorCode.INVALID_REQUEST, f"field {wire!r} must be a non-empty string")
    return value


def _owner(fields: Mapping[str, Any]) -> tuple[str, str, str]:
    """``sessionName``, ``password`` and ``secretKey``: what drop and suspend need to prove ownership."""
    return _text(fields, "sessionName"), _text(fields, "password"), _text(fields, "secretKey")


def _flag(fields: Mapping[str, Any], wire: str) -> bool:
    value = fields.get(wire)
    if value is None:
        raise _Refused(AdminErrorCode.INVALID_REQUEST, f"missing field {wire!r}")
    if type(value) is not bool:
        raise _Refused(AdminErrorCode.INVALID_REQUEST, f"field {wire!r} must be true or false")
    return value


# --------------------------------------------------------------------------------------------------------
# The API.


class AdminApi:
    """Answers admin HTTP requests for one broker; one instance serves every connection.

    ``metrics_text`` replaces the ``/metrics`` body (Prometheus text format 0.0.4) when the server wants
    more than the core's series; by default it is prometheus-client's rendering of a private registry
    holding a :class:`~fastport_core.exposition.CoreCollector` over the broker. ``session_defaults`` is the
    server's default :class:`SessionSettings`, the base that ``createSession``'s given fields override (so
    a request that sets only ``retryInterval`` keeps the operator's other defaults). ``throttle`` counts
    failed logins; the server core passes the broker's (:attr:`Broker.throttle`), so that one mechanism,
    with one set of deadlines, throttles every login; by default the API keeps its own.
    """

    __slots__ = (
        "_broker",
        "_credentials",
        "_metrics_text",
        "_password_digest",
        "_session_defaults",
        "_throttle",
        "_user_digest",
    )

    def __init__(
        self,
        broker: BrokerLike,
        credentials: AdminCredentials | None,
        *,
        metrics_text: Callable[[], bytes] | None = None,
        session_defaults: SessionSettings | None = None,
        throttle: AuthThrottle | None = None,
    ) -> None:
        self._broker = broker
        if throttle is None:
            defaults = ServerConfig()
            throttle = AuthThrottle(
                defaults.auth_throttle_base,
                defaults.auth_throttle_max,
                defaults.limits.max_throttled_peers,
                budget=defaults.auth_failure_budget,
                window=defaults.auth_throttle_window,
            )
        self._throttle = throttle
        self._credentials = credentials
        self._session_defaults = session_defaults
        # Digests, compared instead of the secrets themselves, make every comparison the same length, so
        # not even the credentials' lengths leak through timing. surrogateescape gives back the very bytes
        # of a credential that came from a non-UTF-8 environment variable.
        self._user_digest = (
            _digest(credentials.user.encode("utf-8", "surrogateescape")) if credentials else b""
        )
        self._password_digest = (
            _digest(credentials.password.encode("utf-8", "surrogateescape")) if credentials else b""
        )
        self._metrics_text = metrics_text or _PrometheusText(broker)

    def handle(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        now: float,
        *,
        peer: str = "",
        preauthorised: bool = False,
    ) -> HttpResponse:
        """Answer one request (``body`` complete; ``now`` in monotonic seconds, for the broker).

        ``peer``: the client's address, which failed logins are throttled by (``""`` throttles nothing).
        ``preauthorised``: the caller already proved admin rights another way (the web console's session
        cookie, :mod:`.console`), so the Basic credentials are not asked for.
        """
        path = target.partition("?")[0]
        route = ROUTES.get(path)
        try:
            if route is None:
                raise _Refused(AdminErrorCode.NOT_FOUND, "no such endpoint")
            if method != route.method:
                message = f"this endpoint takes {route.method} only"
                raise _Refused(AdminErrorCode.METHOD_NOT_ALLOWED, message, (("Allow", route.method),))
            if route.protected and not preauthorised:
                self._authorize(headers, peer, now)
            response = route.handler(self, body, now)
        except _Refused as refused:
            response = refused.response()
        except LocalProtocolError as exc:
            response = _refusal(exc).response()
        self._broker.metrics.inc("http_requests", path if route else "other", str(response.status))
        return response

    def check_login(self, user: bytes | str, password: bytes | str, peer: str, now: float) -> LoginOutcome:
        """The one admin credential check (Basic auth here, the web console's login form elsewhere).

        Compares in constant time; a wrong pair counts as a failed login of ``peer`` (the client's
        address; ``""`` throttles nothing), and an address past its failure budget is refused without a
        comparison until its delay has passed.
        """
        if self._credentials is None:
            return LoginOutcome.DISABLED
        key = ("admin", throttle_key(peer)) if peer else None
        if key is not None and self._throttle.retry_at(key, now) is not None:
            return LoginOutcome.THROTTLED
        if self._matches(_raw(user), _raw(password)):
            return LoginOutcome.OK
        if key is not None:
            self._throttle.record_failure(key, now)
        return LoginOutcome.DENIED

    def _authorize(self, headers: Sequence[tuple[str, str]], peer: str, now: float) -> None:
        if self._credentials is None:
            message = "admin API disabled: start the server with admin credentials"
            raise _Refused(AdminErrorCode.ADMIN_DISABLED, message)
        given = _basic_credentials(headers)
        # A missing header is the first step of a Basic exchange (a browser asks after the challenge),
        # not a failed login; a malformed one counts as a wrong pair.
        outcome = LoginOutcome.DENIED
        if given is not None or any(name.lower() == "authorization" for name, _ in headers):
            outcome = self.check_login(*(given or (b"", b"")), peer, now)
        if outcome is LoginOutcome.OK:
            return
        if outcome is LoginOutcome.THROTTLED:
            wait = self.retry_after(peer, now)
            raise _Refused(
                AdminErrorCode.AUTH_THROTTLED,
                f"too many failed logins: retry in {wait} s",
                (("Retry-After", str(wait)),),
            )
        raise _Refused(
            AdminErrorCode.UNAUTHORIZED, "admin credentials required", (("WWW-Authenticate", _CHALLENGE),)
        )

    @property
    def enabled(self) -> bool:
        """Whether admin credentials are configured (without them every protected route answers 403)."""
        return self._credentials is not None

    def retry_after(self, peer: str, now: float) -> int:
        """Whole seconds (at least 1) until ``peer`` may try to log in again (``Retry-After``)."""
        retry_at = self._throttle.retry_at(("admin", throttle_key(peer)), now) if peer else None
        return max(1, math.ceil((retry_at or now) - now))

    def _matches(self, user: bytes, password: bytes) -> bool:
        # Both comparisons always run (``&``, not ``and``), so the time taken does not tell whether the
        # user name alone was right.
        user_ok = hmac.compare_digest(_digest(user), self._user_digest)
        password_ok = hmac.compare_digest(_digest(password), self._password_digest)
        return user_ok & password_ok

    def _create_session(self, body: bytes, now: float) -> HttpResponse:
        fields = _json_object(body)
        name, password = _text(fields, "sessionName"), _text(fields, "password")
        settings = None
        if any(fields.get(wire) is not None for wire in SessionSettings.WIRE_FIELDS):
            settings = SessionSettings.from_wire(fields, base=self._session_defaults)
        secret_key = self._broker.create_session(name, password, now, settings)
        # The original's fields (its clients read ``password`` back). The secret key is shown this once;
        # no-store keeps it, the password and the token key out of any cache on the way.
        token_key = self._broker.token_key(name)
        answer = {
            "success": True,
            "sessionName": name,
            "password": password,
            "secretKey": secret_key,
            "tokenKey": token_key,
        }
        return _json(HTTPStatus.OK, answer, (("Cache-Control", "no-store"),))

    def _drop_session(self, body: bytes, now: float) -> HttpResponse:
        fields = _json_object(body)
        name, password, secret_key = _owner(fields)
        self._broker.drop_session(name, password, secret_key, now)
        return _json(HTTPStatus.OK, {"success": True, "sessionName": name})

    def _suspend_session(self, body: bytes, now: float) -> HttpResponse:
        fields = _json_object(body)
        name, password, secret_key = _owner(fields)
        suspend = _flag(fields, "suspend")
        self._broker.suspend_session(name, password, secret_key, suspend, now)
        return _json(HTTPStatus.OK, {"success": True, "sessionName": name, "suspended": suspend})

    def _rotate_token_key(self, body: bytes, now: float) -> HttpResponse:
        name, password, secret_key = _owner(_json_object(body))
        token_key = self._broker.rotate_token_key(name, password, secret_key, now)
        answer = {"success": True, "sessionName": name, "tokenKey": token_key}
        return _json(HTTPStatus.OK, answer, (("Cache-Control", "no-store"),))

    def _healthz(self, body: bytes, now: float) -> HttpResponse:
        sessions, connections = self._broker.health()
        if not self._broker.store_available:
            # A load balancer should send clients elsewhere: this node refuses publishes meanwhile.
            status = self._broker.unavailable_code.value
            fields = {"status": status, "sessions": sessions, "connections": connections}
            return _json(HTTPStatus.SERVICE_UNAVAILABLE, fields)
        return _json(HTTPStatus.OK, {"status": "ok", "sessions": sessions, "connections": connections})

    def _metrics(self, body: bytes, now: float) -> HttpResponse:
        return HttpResponse(int(HTTPStatus.OK), self._metrics_text(), METRICS_CONTENT_TYPE)


class _PrometheusText:
    """The default ``/metrics`` body: prometheus-client's rendering of a private registry holding a
    :class:`~fastport_core.exposition.CoreCollector` over the broker.

    prometheus-client (and :mod:`.exposition`) is imported at the first scrape, not when the server starts:
    a server that is never scraped does not carry it (~1.5 MiB of the process's baseline memory,
    docs/performance.md).
    """

    __slots__ = ("_broker", "_render")

    def __init__(self, broker: BrokerLike) -> None:
        self._broker = broker
        self._render: Callable[[], bytes] | None = None

    def __call__(self) -> bytes:
        if self._render is None:
            from prometheus_client.exposition import generate_latest
            from prometheus_client.registry import CollectorRegistry

            from .exposition import CoreCollector

            registry = CollectorRegistry(auto_describe=False)
            registry.register(CoreCollector(self._broker.metrics, self._broker.stats))
            self._render = partial(generate_latest, registry)
        return self._render()


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def _raw(credential: bytes | str) -> bytes:
    """A credential as bytes: text from a form as UTF-8 (surrogateescape, like the configured ones)."""
    if isinstance(credential, bytes):
        return credential
    try:
        return credential.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate outside surrogateescape's range: never a credential
        return credential.encode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: the method it takes, whether it needs the admin credentials, and its handler."""

    method: str
    protected: bool
    handler: Callable[[AdminApi, bytes, float], HttpResponse]


#: path → route. The paths are also the ``path`` label of ``http_requests`` (unknown paths: ``other``).
ROUTES: Final[Mapping[str, Route]] = {
    "/api/createSession": Route("POST", True, AdminApi._create_session),
    "/api/dropSession": Route("POST", True, AdminApi._drop_session),
    "/api/suspendSession": Route("POST", True, AdminApi._suspend_session),
    "/api/rotateTokenKey": Route("POST", True, AdminApi._rotate_token_key),
    "/healthz": Route("GET", False, AdminApi._healthz),
    "/metrics": Route("GET", True, AdminApi._metrics),
}
