"""Scoped tokens (DESIGN §10): what an application's backend mints, and what ``init`` with ``token`` checks.

A token is a JWT signed with HS256 under the session's 32-byte *token key* (``createSession`` returns it
as base64; ``rotateTokenKey`` replaces it). Its claims:

``exp`` (required)
    Expiry, seconds since the epoch. ``init`` is refused at or after it, and a connection that
    authenticated with the token is closed (4007) when it comes.
``nbf`` (optional)
    Not before: ``init`` is refused until then.
``session`` (optional)
    The session name the token is for: when present, ``init`` into another session is refused (a guard
    against one token key configured for two sessions). ``fastport token mint`` always sets it.
``sub`` (optional)
    The only ``clientId`` the token may ``init`` with (a resumable subscriber bound to this holder).
``publish``, ``subscribe`` (optional, default empty)
    Lists of topic filters: a publish must match one of ``publish``; a subscription filter must be
    *within* one of ``subscribe`` (:func:`~fastport_core.topics.filter_within`).

Verification is PyJWT's, with the algorithm pinned (``alg: none``, HS512 or RS256 tokens are refused, so
the key can never be confused with a public key) and ``exp`` required. PyJWT would compare ``exp`` with
the process clock; the core never reads a clock, so PyJWT's time checks are turned off and
:func:`verify_token` compares ``exp`` and ``nbf`` with the ``now`` it is given (wall-clock seconds, from
the adapter). There is no leeway: the server's clock decides (docs/security.md, clock skew).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from .errors import ErrorCode, InvalidKeyError, LocalProtocolError, RemoteProtocolError
from .keys import parse_key
from .topics import check_filter, within_any

__all__ = ["ALGORITHM", "TokenScope", "decode_token_key", "mint_token", "verify_token"]

ALGORITHM: Final = "HS256"


@dataclass(frozen=True, slots=True)
class TokenScope:
    """What a verified token grants the connection that authenticated with it."""

    expires_at: float
    """``exp``: wall-clock seconds since the epoch."""
    client_id: str | None
    """``sub``: the one ``clientId`` allowed, or ``None`` for any."""
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def may_publish(self, topic: str) -> bool:
        return within_any(topic, self.publish)

    def may_subscribe(self, topic_filter: str) -> bool:
        return within_any(topic_filter, self.subscribe)


def decode_token_key(token_key: str) -> bytes:
    """The 32 raw bytes of a base64 token key; :class:`LocalProtocolError` (never repeating it) if not."""
    try:
        return parse_key(token_key)
    except InvalidKeyError as exc:
        raise LocalProtocolError(f"invalid token key: {exc}") from None


def _invalid(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=ErrorCode.INVALID_TOKEN)


def _filters(claims: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if type(value) is not list or not all(type(item) is str and item for item in value):
        raise _invalid(f"token claim {name!r} must be a list of non-empty topic filters")
    for item in value:
        try:
            check_filter(item)
        except RemoteProtocolError as exc:
            raise _invalid(f"token claim {name!r}: {exc.message}") from None
    return tuple(value)


def _seconds(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _invalid(f"token claim {name!r} must be a number of seconds since the epoch")
    return float(value)


def verify_token(token: str, key: bytes, now: float, *, session: str | None = None) -> TokenScope:
    """Verify ``token`` against the raw ``key`` of ``session`` at wall-clock ``now``; return what it grants.

    Raises :class:`RemoteProtocolError` with ``invalid_token`` (not a JWT, bad signature, other
    algorithm, missing or malformed claims, not yet valid) or ``token_expired``.
    """
    import jwt  # here, not at module level: a server that never sees a token does not load PyJWT

    try:
        # Signature and presence checks only: the time checks are done below, against the core's ``now``.
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            options={"require": ["exp"], "verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except jwt.MissingRequiredClaimError:
        raise _invalid("the token has no 'exp' claim (tokens must expire)") from None
    except jwt.InvalidTokenError as exc:
        raise _invalid(f"the token does not verify for this session ({type(exc).__name__})") from None
    expires_at = _seconds(claims, "exp")
    assert expires_at is not None  # required above
    not_before = _seconds(claims, "nbf")
    if session is not None and claims.get("session", session) != session:
        raise _invalid("the token is for another session")
    sub = claims.get("sub")
    if sub is not None and (type(sub) is not str or not sub):
        raise _invalid("token claim 'sub' must be a non-empty string (the clientId it binds)")
    scope = TokenScope(expires_at, sub, _filters(claims, "publish"), _filters(claims, "subscribe"))
    if now >= expires_at:
        raise RemoteProtocolError("the token has expired", code=ErrorCode.TOKEN_EXPIRED)
    if not_before is not None and now < not_before:
        raise _invalid("the token is not valid yet (nbf)")
    return scope


def mint_token(
    token_key: str | bytes,
    *,
    expires_at: float,
    session: str | None = None,
    sub: str | None = None,
    publish: Iterable[str] = (),
    subscribe: Iterable[str] = (),
) -> str:
    """A token for a session's key (base64 str, or its 32 raw bytes), for backends and ``fastport token
    mint``. ``expires_at`` is seconds since the epoch; the caller reads its own clock. Filters are checked
    here, so a backend cannot mint a token the server would refuse as malformed."""
    key = decode_token_key(token_key) if isinstance(token_key, str) else bytes(token_key)
    if len(key) != 32:
        raise LocalProtocolError(f"token key must be 32 bytes, got {len(key)}")
    claims: dict[str, Any] = {"exp": int(expires_at)}
    if session is not None:
        claims["session"] = session
    if sub is not None:
        claims["sub"] = sub
    for name, filters in (("publish", list(publish)), ("subscribe", list(subscribe))):
        for item in filters:
            try:
                check_filter(item)
            except RemoteProtocolError as exc:
                raise LocalProtocolError(exc.message) from None
        claims[name] = filters
    import jwt

    return jwt.encode(claims, key, algorithm=ALGORITHM)
