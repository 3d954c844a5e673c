"""The web console (DESIGN §9): static pages, the admin's login cookie, and the history behind the charts.

The server core asks :meth:`Console.handle` first for every plain HTTP request; ``None`` means "not mine"
and the admin API (:mod:`.admin`) answers instead. Like the admin API this is a pure function of a parsed
request (and of ``now``): the pages' bytes come in from the adapter (:func:`static_routes` maps them to URL
paths; the adapter reads them with ``importlib.resources``), so nothing here touches a file.

What it serves
--------------
* ``/admin/``, ``/playground/`` and ``/client/fastport.js``: the package's static files, with a strict
  Content-Security-Policy (:data:`SECURITY_HEADERS`: scripts and styles from this origin only, no inline
  code, no framing) and an exact ``Content-Type``. Pages embed no credentials.
* ``/console/*``: the JSON endpoints the admin page calls. ``status`` is open (it tells whether the admin
  API is on and whether the caller is logged in); ``login`` checks the admin credentials through
  :meth:`AdminApi.check_login <fastport_core.admin.AdminApi.check_login>`, the very check the HTTP Basic
  path uses, throttled with the same per-address failure budget (429, ``login_throttled``); the others
  need the login cookie.

The login
---------
A successful login sets ``fastport_console=<256-bit random token>; Path=/console/; HttpOnly;
SameSite=Strict; Max-Age=<login_ttl>`` (``Secure`` when the server runs TLS). The server keeps only the
token's SHA-256 (a bounded table, :data:`MAX_LOGINS`; the oldest login is forgotten first) with its expiry
and a CSRF token. The browser never stores the password; the page keeps the CSRF token in memory only.

Every ``POST`` (login included) must carry ``X-Fastport-CSRF`` (for logged-in requests equal to the login's
CSRF token, compared in constant time), and a request whose ``Origin`` does not name this host, or whose
``Sec-Fetch-Site`` is neither ``same-origin`` nor ``none``, is refused. A cross-site page can neither
read the token nor set a custom header without a CORS preflight, which this server never grants; the
SameSite=Strict cookie is a third, independent line.

Acting as the admin
-------------------
The JSON admin API asks for each session's password and secret key to drop or suspend it (the original's
rule, kept for API callers). The console is logged in as the server admin, who controls every session, so
``/console/dropSession`` and ``/console/suspendSession`` take only ``sessionName`` and call the broker's
``*_as_admin`` methods; ``/console/createSession`` is the admin API's own ``createSession`` (same body,
same answer), run as already authorised.

History
-------
While the admin API is on, the console samples the broker every :data:`SAMPLE_INTERVAL` seconds through
the core's own deadline (:meth:`next_deadline` / :meth:`handle_timeout`) into a ring of
:data:`HISTORY_SAMPLES`, so a page opened now shows the last minutes at once. Rates are differences of the
core's counters between consecutive samples.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import orjson

from .admin import AdminApi, HttpErrorCode, HttpResponse, LoginOutcome
from .broker import BrokerStats, ClusterUnavailableError, StoreUnavailableError, UnknownSessionError
from .errors import LocalProtocolError
from .metrics import Metrics

__all__ = [
    "CONTENT_TYPES",
    "COOKIE_NAME",
    "CSRF_HEADER",
    "HISTORY_SAMPLES",
    "MAX_LOGINS",
    "SAMPLE_INTERVAL",
    "SECURITY_HEADERS",
    "Console",
    "ConsoleBroker",
    "ConsoleErrorCode",
    "StaticFile",
    "static_routes",
]

COOKIE_NAME: Final = "fastport_console"
CSRF_HEADER: Final = "x-fastport-csrf"
MAX_LOGINS: Final = 32
"""Live console logins kept; a new one past this forgets the oldest (bounded memory, whatever the peer)."""
SAMPLE_INTERVAL: Final = 5.0
HISTORY_SAMPLES: Final = 120
"""Ten minutes of samples at :data:`SAMPLE_INTERVAL`."""

_JSON: Final = "application/json"

#: file extension → Content-Type of the static files; any other extension is refused at start.
CONTENT_TYPES: Final[Mapping[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}

#: Sent with every console answer (pages, scripts and JSON).
SECURITY_HEADERS: Final[tuple[tuple[str, str], ...]] = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
)
_NO_STORE: Final = (("Cache-Control", "no-store"),)
_REVALIDATE: Final = (("Cache-Control", "no-cache"),)
# The client module may be imported by pages of other origins (it is public code, and holds no secret).
_SHARED_MODULE: Final = (
    ("Access-Control-Allow-Origin", "*"),
    ("Cross-Origin-Resource-Policy", "cross-origin"),
)
_SHARED_PREFIX: Final = "/client/"


class ConsoleBroker(Protocol):
    """What the console needs of the broker (:class:`~fastport_core.broker.Broker` provides it)."""

    @property
    def metrics(self) -> Metrics: ...

    def stats(self) -> BrokerStats: ...

    def drop_session_as_admin(self, name: str, now: float) -> None: ...

    def suspend_session_as_admin(self, name: str, suspend: bool, now: float) -> None: ...


@dataclass(frozen=True, slots=True)
class StaticFile:
    """One page, script or style sheet, as served."""

    body: bytes
    content_type: str


def static_routes(files: Mapping[str, bytes]) -> dict[str, StaticFile]:
    """URL path → file, from the package's web files keyed by their relative path (``admin/index.html``).

    Each ``index.html`` is also served at its directory's path (``/admin/``). An extension outside
    :data:`CONTENT_TYPES` raises :class:`LocalProtocolError`: a file must never go out with a guessed type.
    """
    routes: dict[str, StaticFile] = {}
    for name, body in files.items():
        extension = name[name.rfind(".") :] if "." in name.rpartition("/")[2] else ""
        content_type = CONTENT_TYPES.get(extension)
        if content_type is None or name.startswith("/") or ".." in name.split("/"):
            raise LocalProtocolError(f"cannot serve web file {name!r}: unknown type or unsafe path")
        static = StaticFile(body, content_type)
        routes["/" + name] = static
        if name == "index.html" or name.endswith("/index.html"):
            routes["/" + name.removesuffix("index.html")] = static
    return routes


class ConsoleErrorCode(HttpErrorCode):
    """The ``code`` of a console error answer."""

    ADMIN_DISABLED = (
        "admin_disabled",
        HTTPStatus.FORBIDDEN,
        "The server runs without admin credentials: the console offers nothing.",
    )
    LOGIN_FAILED = "login_failed", HTTPStatus.UNAUTHORIZED, "Wrong admin user or password."
    LOGIN_THROTTLED = (
        "login_throttled",
        HTTPStatus.TOO_MANY_REQUESTS,
        "Too many failed admin logins from this address (the admin API's budget): wait ``Retry-After`` s.",
    )
    LOGIN_REQUIRED = (
        "login_required",
        HTTPStatus.UNAUTHORIZED,
        "No valid console login cookie (never given, expired, or logged out).",
    )
    CSRF_FAILED = (
        "csrf_failed",
        HTTPStatus.FORBIDDEN,
        "A POST without the right X-Fastport-CSRF header, or from another origin.",
    )
    INVALID_REQUEST = "invalid_request", HTTPStatus.BAD_REQUEST, "The body is not the JSON object expected."
    UNKNOWN_SESSION = "unknown_session", HTTPStatus.NOT_FOUND, "No session of that name."
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
    METHOD_NOT_ALLOWED = (
        "method_not_allowed",
        HTTPStatus.METHOD_NOT_ALLOWED,
        "The path exists but takes another method.",
    )


class _Refused(Exception):
    def __init__(
        self, code: ConsoleErrorCode, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers


@dataclass(slots=True)
class _Login:
    csrf: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    sessions: int
    connections: int
    subscribers: int
    unacked: int
    pending_bytes: int
    publishes: int
    deliveries: int
    given_up: int


@dataclass(frozen=True, slots=True)
class _Totals:
    """Per-session counter totals (publishes, deliveries, give-ups) at one time."""

    at: float
    per_session: Mapping[str, tuple[int, int, int]]


def _session_totals(metrics: Metrics) -> dict[str, tuple[int, int, int]]:
    """One pass over the counters: ``session → (publishes, deliveries, deliveries_given_up)``."""
    totals: dict[str, list[int]] = {}
    slot = {"publishes": 0, "deliveries": 1, "deliveries_given_up": 2}
    for name, labels, value in metrics.items():
        index = slot.get(name)
        if index is not None and labels:
            totals.setdefault(labels[0], [0, 0, 0])[index] += value
    return {name: (p, d, g) for name, (p, d, g) in totals.items()}


def _rate(new: int, old: int, seconds: float) -> float:
    return round(max(new - old, 0) / seconds, 3) if seconds > 0 else 0.0


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    """The single value of header ``name`` (lower case); ``None`` if absent or repeated."""
    values = [value for key, value in headers if key.lower() == name]
    return values[0] if len(values) == 1 else None


def _cookie(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == "cookie":
            for pair in value.split(";"):
                cookie_name, equals, cookie_value = pair.strip().partition("=")
                if equals and cookie_name == name:
                    return cookie_value
    return None


def _json_object(body: bytes) -> Mapping[str, Any]:
    try:
        obj: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if type(obj) is not dict:
        raise _Refused(ConsoleErrorCode.INVALID_REQUEST, "body must be a JSON object")
    return obj


def _session_name(fields: Mapping[str, Any]) -> str:
    name = fields.get("sessionName")
    if type(name) is not str or not name:
        raise _Refused(ConsoleErrorCode.INVALID_REQUEST, "field 'sessionName' must be a non-empty string")
    return name


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


_Handler = Callable[["Console", Sequence[tuple[str, str]], bytes, float, str], HttpResponse]


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    login: bool
    """Needs a valid login cookie (and, for POST, its CSRF token)."""
    handler: _Handler


class Console:
    """Answers the console's HTTP requests and keeps the charts' history; one instance per server."""

    __slots__ = (
        "_admin",
        "_broker",
        "_due",
        "_history",
        "_history_on",
        "_login_ttl",
        "_logins",
        "_random",
        "_secure_cookie",
        "_static",
        "_totals",
    )

    def __init__(
        self,
        broker: ConsoleBroker,
        admin: AdminApi,
        static: Mapping[str, StaticFile],
        *,
        random: Callable[[int], bytes],
        login_ttl: float = 8 * 3600.0,
        secure_cookie: bool = False,
        history: bool = True,
    ) -> None:
        self._broker = broker
        self._admin = admin
        self._static = dict(static)
        self._random = random
        self._login_ttl = login_ttl
        self._secure_cookie = secure_cookie
        self._history_on = history
        self._logins: dict[bytes, _Login] = {}
        self._history: deque[_Sample] = deque(maxlen=HISTORY_SAMPLES)
        # The last two per-session totals: the sessions table's rates are taken over the last interval.
        self._totals: deque[_Totals] = deque(maxlen=2)
        self._due = -math.inf
        """When the next sample is taken; in the past at first, so the first timer call samples."""

    # -- the core's timer --------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The next sample time; ``None`` while the admin API is off (nobody could see the charts)."""
        return self._due if self._admin.enabled and self._history_on else None

    def handle_timeout(self, now: float) -> None:
        if not self._admin.enabled or not self._history_on or now < self._due:
            return
        self._due = now + SAMPLE_INTERVAL
        stats = self._broker.stats()
        per_session = _session_totals(self._broker.metrics)
        self._totals.append(_Totals(now, per_session))
        values = per_session.values()
        self._history.append(
            _Sample(
                at=now,
                sessions=stats.sessions,
                connections=stats.connections,
                subscribers=stats.subscribers,
                unacked=stats.inflight_deliveries,
                pending_bytes=stats.pending_bytes,
                publishes=sum(v[0] for v in values),
                deliveries=sum(v[1] for v in values),
                given_up=sum(v[2] for v in values),
            )
        )
        # Logins past their expiry are forgotten here too, so the table only holds live ones.
        for key in [key for key, login in self._logins.items() if login.expires_at <= now]:
            del self._logins[key]

    # -- requests ----------------------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        now: float,
        *,
        peer: str = "",
    ) -> HttpResponse | None:
        """Answer a console request, or return ``None`` for a path that is not the console's.

        ``peer``: the client's address; failed logins count against its admin login budget.
        """
        path = target.partition("?")[0]
        static = self._static.get(path)
        if static is not None:
            response = self._serve_static(method, path, static)
            self._broker.metrics.inc("http_requests", path, str(response.status))
            return response
        if path in _REDIRECTS:
            return HttpResponse(
                int(HTTPStatus.PERMANENT_REDIRECT), b"", "text/plain", (("Location", _REDIRECTS[path]),)
            )
        route = ROUTES.get(path)
        if route is None:
            return None
        try:
            if method != route.method:
                message = f"this endpoint takes {route.method} only"
                raise _Refused(ConsoleErrorCode.METHOD_NOT_ALLOWED, message)
            if method == "POST":
                self._check_origin(headers)
            if route.login:
                self._require_login(headers, now, check_csrf=method == "POST")
            response = route.handler(self, headers, body, now, peer)
        except _Refused as refused:
            response = self._error(refused.code, refused.message, refused.headers)
        self._broker.metrics.inc("http_requests", path, str(response.status))
        return response

    def _serve_static(self, method: str, path: str, static: StaticFile) -> HttpResponse:
        if method not in ("GET", "HEAD"):
            return self._error(ConsoleErrorCode.METHOD_NOT_ALLOWED, "static files take GET only")
        headers = SECURITY_HEADERS + _REVALIDATE
        if path.startswith(_SHARED_PREFIX):
            headers += _SHARED_MODULE
        return HttpResponse(int(HTTPStatus.OK), static.body, static.content_type, headers)

    def _error(
        self, code: ConsoleErrorCode, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> HttpResponse:
        body = orjson.dumps({"success": False, "error": message, "code": code})
        return HttpResponse(int(code.status), body, _JSON, SECURITY_HEADERS + _NO_STORE + headers)

    @staticmethod
    def _json(obj: Mapping[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
        all_headers = SECURITY_HEADERS + _NO_STORE + headers
        return HttpResponse(int(HTTPStatus.OK), orjson.dumps(obj), _JSON, all_headers)

    @staticmethod
    def _check_origin(headers: Sequence[tuple[str, str]]) -> None:
        """Refuse a POST that a browser marks as coming from another site, or that lacks the CSRF header."""
        if not _header(headers, CSRF_HEADER):
            raise _Refused(ConsoleErrorCode.CSRF_FAILED, f"missing {CSRF_HEADER} header")
        fetch_site = _header(headers, "sec-fetch-site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            raise _Refused(ConsoleErrorCode.CSRF_FAILED, "cross-site request refused")
        origin = _header(headers, "origin")
        if origin is not None:
            host = _header(headers, "host")
            try:
                netloc = urlsplit(origin).netloc
            except ValueError:
                netloc = ""
            if host is None or netloc.lower() != host.lower():
                raise _Refused(ConsoleErrorCode.CSRF_FAILED, "request from another origin refused")

    def _login_of(self, headers: Sequence[tuple[str, str]], now: float) -> _Login | None:
        token = _cookie(headers, COOKIE_NAME)
        if not token:
            return None
        login = self._logins.get(_digest(token))
        return login if login is not None and login.expires_at > now else None

    def _require_login(self, headers: Sequence[tuple[str, str]], now: float, *, check_csrf: bool) -> _Login:
        if not self._admin.enabled:
            raise _Refused(ConsoleErrorCode.ADMIN_DISABLED, "admin API disabled: the console is off")
        login = self._login_of(headers, now)
        if login is None:
            raise _Refused(ConsoleErrorCode.LOGIN_REQUIRED, "log in first")
        if check_csrf:
            given = (_header(headers, CSRF_HEADER) or "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, login.csrf.encode("ascii")):
                raise _Refused(ConsoleErrorCode.CSRF_FAILED, "wrong CSRF token")
        return login

    def _token(self) -> str:
        return base64.urlsafe_b64encode(self._random(32)).rstrip(b"=").decode("ascii")

    def _set_cookie(self, token: str, max_age: int) -> tuple[str, str]:
        secure = "; Secure" if self._secure_cookie else ""
        value = f"{COOKIE_NAME}={token}; Path=/console/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
        return ("Set-Cookie", value)

    # -- endpoints ---------------------------------------------------------------------------------------

    def _status(self, headers: Sequence[tuple[str, str]], body: bytes, now: float, peer: str) -> HttpResponse:
        login = self._login_of(headers, now) if self._admin.enabled else None
        answer: dict[str, Any] = {"adminEnabled": self._admin.enabled, "loggedIn": login is not None}
        if login is not None:
            answer["csrfToken"] = login.csrf
        return self._json(answer)

    def _login(self, headers: Sequence[tuple[str, str]], body: bytes, now: float, peer: str) -> HttpResponse:
        if not self._admin.enabled:
            raise _Refused(ConsoleErrorCode.ADMIN_DISABLED, "admin API disabled: the console is off")
        fields = _json_object(body)
        user, password = fields.get("user"), fields.get("password")
        if type(user) is not str or type(password) is not str:
            raise _Refused(ConsoleErrorCode.INVALID_REQUEST, "fields 'user' and 'password' must be strings")
        encode = "utf-8", "surrogateescape"
        outcome = self._admin.check_login(user.encode(*encode), password.encode(*encode), peer, now)
        if outcome is LoginOutcome.THROTTLED:
            wait = self._admin.retry_after(peer, now)
            message = f"too many failed logins: retry in {wait} s"
            raise _Refused(ConsoleErrorCode.LOGIN_THROTTLED, message, (("Retry-After", str(wait)),))
        if outcome is not LoginOutcome.OK:
            raise _Refused(ConsoleErrorCode.LOGIN_FAILED, "wrong admin user or password")
        if len(self._logins) >= MAX_LOGINS:
            oldest = min(self._logins, key=lambda key: self._logins[key].expires_at)
            del self._logins[oldest]
        token, csrf = self._token(), self._token()
        self._logins[_digest(token)] = _Login(csrf, now + self._login_ttl)
        cookie = self._set_cookie(token, int(self._login_ttl))
        return self._json({"success": True, "csrfToken": csrf}, (cookie,))

    def _logout(self, headers: Sequence[tuple[str, str]], body: bytes, now: float, peer: str) -> HttpResponse:
        token = _cookie(headers, COOKIE_NAME)
        if token:
            self._logins.pop(_digest(token), None)
        return self._json({"success": True}, (self._set_cookie("", 0),))

    def _overview(
        self, headers: Sequence[tuple[str, str]], body: bytes, now: float, peer: str
    ) -> HttpResponse:
        return self._json(self.overview(now))

    def overview(self, now: float) -> dict[str, Any]:
        """What the admin page shows: every session with its figures, and the history for the charts."""
        stats = self._broker.stats()
        totals = _session_totals(self._broker.metrics)
        previous = self._totals[-2] if len(self._totals) == 2 else None
        latest = self._totals[-1] if self._totals else None
        sessions = []
        for name in sorted(stats.per_session):
            s = stats.per_session[name]
            publishes, deliveries, given_up = totals.get(name, (0, 0, 0))
            rates = (0.0, 0.0)
            if previous is not None and latest is not None:
                new = latest.per_session.get(name, (0, 0, 0))
                old = previous.per_session.get(name, (0, 0, 0))
                seconds = latest.at - previous.at
                rates = (_rate(new[0], old[0], seconds), _rate(new[1], old[1], seconds))
            sessions.append(
                {
                    "sessionName": name,
                    "connections": s.connections,
                    "subscribers": s.subscribers,
                    "detachedSubscribers": s.detached_subscribers,
                    "storedMessages": s.stored_messages,
                    "unackedMessages": s.inflight_deliveries,
                    "pendingBytes": s.pending_bytes,
                    "suspended": s.suspended,
                    "publishes": publishes,
                    "deliveries": deliveries,
                    "givenUp": given_up,
                    "publishRate": rates[0],
                    "deliveryRate": rates[1],
                }
            )
        history = []
        samples = list(self._history)
        for before, sample in zip([None, *samples], samples, strict=False):  # each with the one before
            seconds = sample.at - before.at if before is not None else 0.0
            history.append(
                {
                    "age": round(now - sample.at, 3),
                    "sessions": sample.sessions,
                    "connections": sample.connections,
                    "subscribers": sample.subscribers,
                    "unackedMessages": sample.unacked,
                    "pendingBytes": sample.pending_bytes,
                    "publishRate": _rate(sample.publishes, before.publishes, seconds) if before else 0.0,
                    "deliveryRate": _rate(sample.deliveries, before.deliveries, seconds) if before else 0.0,
                    "givenUpRate": _rate(sample.given_up, before.given_up, seconds) if before else 0.0,
                }
            )
        return {
            "sessions": sessions,
            "connections": stats.connections,
            "sampleInterval": SAMPLE_INTERVAL,
            "historyLength": HISTORY_SAMPLES,
            "history": history,
        }

    def _create_session(
        self, headers: Sequence[tuple[str, str]], body: bytes, now: float, peer: str
    ) -> HttpResponse:
        # The admin API's own createSession: one place validates the fields and shapes the answer.
        answer = self._admin.handle("POST", "/api/createSession", (), body, now, preauthorised=True)
        return HttpResponse(answer.status, answer.body, answer.content_type, SECURITY_HEADERS + _NO_STORE)

    def _drop_session(
        self, headers: Sequence[tuple[str, str]], body: bytes, now: float, peer: str
    ) -> HttpResponse:
        name = _session_name(_json_object(body))
        try:
            self._broker.drop_session_as_admin(name, now)
        except UnknownSessionError as exc:
            raise _Refused(ConsoleErrorCode.UNKNOWN_SESSION, str(exc)) from None
        except StoreUnavailableError as exc:
            raise _Refused(_unavailable(exc), str(exc)) from None
        return self._json({"success": True, "sessionName": name})

    def _suspend_session(
        self, headers: Sequence[tuple[str, str]], body: bytes, now: float, peer: str
    ) -> HttpResponse:
        fields = _json_object(body)
        name = _session_name(fields)
        suspend = fields.get("suspend")
        if type(suspend) is not bool:
            raise _Refused(ConsoleErrorCode.INVALID_REQUEST, "field 'suspend' must be true or false")
        try:
            self._broker.suspend_session_as_admin(name, suspend, now)
        except UnknownSessionError as exc:
            raise _Refused(ConsoleErrorCode.UNKNOWN_SESSION, str(exc)) from None
        except StoreUnavailableError as exc:
            raise _Refused(_unavailable(exc), str(exc)) from None
        return self._json({"success": True, "sessionName": name, "suspended": suspend})


_REDIRECTS: Final[Mapping[str, str]] = {"/admin": "/admin/", "/playground": "/playground/"}

#: path → route of the console's JSON endpoints (also the ``path`` label of ``http_requests``).
ROUTES: Final[Mapping[str, _Route]] = {
    "/console/status": _Route("GET", False, Console._status),
    "/console/login": _Route("POST", False, Console._login),
    "/console/logout": _Route("POST", False, Console._logout),
    "/console/overview": _Route("GET", True, Console._overview),
    "/console/createSession": _Route("POST", True, Console._create_session),
    "/console/dropSession": _Route("POST", True, Console._drop_session),
    "/console/suspendSession": _Route("POST", True, Console._suspend_session),
}


def _unavailable(exc: StoreUnavailableError) -> ConsoleErrorCode:
    if isinstance(exc, ClusterUnavailableError):
        return ConsoleErrorCode.CLUSTER_UNAVAILABLE
    return ConsoleErrorCode.STORE_UNAVAILABLE
