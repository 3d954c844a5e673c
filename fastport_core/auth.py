"""Session credentials and failed-``init`` throttling (docs/security.md, "Server-side secrets").

Two pieces, both sans-IO:

* :class:`PasswordHash` stores a session password or secret key as an scrypt hash and verifies a candidate
  in constant time, with a verified-password cache that makes reconnect storms cheap (see its docstring
  for the trade-off).
* :class:`AuthThrottle` slows down password guessing from one peer address with an exponential delay,
  expressed as deadlines so the broker can fold it into its own ``next_deadline`` / ``handle_timeout``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

__all__ = ["SCRYPT_N", "AuthThrottle", "PasswordHash"]

SCRYPT_N: Final = 2**14
"""Default scrypt CPU/memory cost (``ServerConfig.password_hash_cost``): ~16 MiB, tens of ms per hash."""
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SALT_BYTES: Final = 16
DIGEST_BYTES: Final = 32
_SCRYPT_MAXMEM: Final = 256 * 1024 * 1024
"""Room for costs above the default (hashlib's default ceiling of 32 MiB stops at N=2**14 with r=8)."""

_FAST_TAG_KEY: Final = os.urandom(32)
"""Key of the verified-password cache tags. Per process and never stored, so a tag is useless elsewhere."""


def _utf8(secret: str) -> bytes:
    # surrogatepass: a str that is not valid Unicode still hashes (and simply never matches) instead of
    # raising out of an authentication path.
    return secret.encode("utf-8", "surrogatepass")


class PasswordHash:
    """An scrypt hash of a secret (N from the config, r=8, p=1, 16-byte random salt, 32-byte digest).

    :meth:`verify` compares digests with :func:`hmac.compare_digest`, so its timing does not depend on how
    much of a candidate matches.

    **Verified-password cache (a deliberate trade-off).** One scrypt costs tens of milliseconds of CPU and
    blocks the caller (the whole sans-IO core, which is single-threaded per server). When a server restarts
    or a network blip drops a fleet of clients, every client re-``init``s at once, and paying scrypt per
    legitimate reconnect would stall all traffic for seconds. So after a *successful* verification the
    object remembers ``HMAC-SHA256(process_key, salt + password)`` under a random per-process key, and a
    later candidate whose tag matches is accepted in microseconds. Failed verifications always pay the
    full scrypt, so guessing gets no cheaper. The cost: while the process lives, its memory holds a fast
    (HMAC) verifier of every password that was used since it started, next to the key. Someone who can read
    the process memory can brute-force those passwords far faster than through scrypt (but such an
    attacker can also read passwords as they arrive). Nothing of the cache is ever persisted.
    """

    __slots__ = ("_digest", "_n", "_salt", "_verified_tag")

    def __init__(self, salt: bytes, digest: bytes, *, n: int = SCRYPT_N) -> None:
        self._salt = salt
        self._digest = digest
        self._n = n
        self._verified_tag: bytes | None = None

    @classmethod
    def create(
        cls, secret: str, *, n: int = SCRYPT_N, random: Callable[[int], bytes] = os.urandom
    ) -> PasswordHash:
        """Hash ``secret`` with a fresh salt drawn from ``random``."""
        salt = random(SALT_BYTES)
        return cls(salt, cls._scrypt(_utf8(secret), salt, n), n=n)

    @staticmethod
    def _scrypt(secret: bytes, salt: bytes, n: int) -> bytes:
        return hashlib.scrypt(
            secret, salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, maxmem=_SCRYPT_MAXMEM, dklen=DIGEST_BYTES
        )

    def verify(self, candidate: str) -> bool:
        """Whether ``candidate`` is the hashed secret (constant-time comparison; cached after a success)."""
        secret = _utf8(candidate)
        tag = hmac.digest(_FAST_TAG_KEY, self._salt + secret, "sha256")
        cached = self._verified_tag
        if cached is not None and hmac.compare_digest(tag, cached):
            return True
        if not hmac.compare_digest(self._scrypt(secret, self._salt, self._n), self._digest):
            return False
        self._verified_tag = tag
        return True

    def __repr__(self) -> str:
        return f"PasswordHash(scrypt n={self._n} r={SCRYPT_R} p={SCRYPT_P})"


class _Failures:
    """A peer's run of failed attempts: how many, and when the last one happened."""

    __slots__ = ("count", "last")

    def __init__(self, last: float) -> None:
        self.count = 1
        self.last = last


class AuthThrottle:
    """Exponential delays per peer address after failed ``init`` attempts.

    After a peer's ``k``-th consecutive failure, every attempt from it is refused (without running scrypt,
    so guessing cannot burn the server's CPU either) until ``min(base * 2**(k-1), maximum)`` seconds have
    passed since that failure. A peer with no failure for ``maximum`` seconds is forgotten, which resets
    its count. With the defaults (0.5 s, 30 s) that holds a guesser to about 7 guesses per minute per
    address. A success does not reset the count: otherwise one valid login to any session would buy
    free guesses at another.

    Peers are kept in order of their last failure, so the next one to be forgotten is always the first
    (O(1) deadline, no heap) and, past ``capacity`` peers, the first is also the one evicted.
    Addresses shared by many clients (NAT) share a throttle: that is the price of throttling by address.
    """

    __slots__ = ("_base", "_capacity", "_maximum", "_peers")

    def __init__(self, base: float, maximum: float, capacity: int) -> None:
        self._base = base
        self._maximum = maximum
        self._capacity = capacity
        self._peers: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def retry_at(self, peer: str, now: float) -> float | None:
        """When ``peer`` may next try, if it is throttled at ``now``; ``None`` if it may try now."""
        failures = self._peers.get(peer)
        if failures is None:
            return None
        until = failures.last + self._delay(failures.count)
        return until if now < until else None

    def record_failure(self, peer: str, now: float) -> float:
        """Count a failed attempt from ``peer``; returns until when it is throttled."""
        peers = self._peers
        failures = peers.pop(peer, None)
        if failures is None or now - failures.last >= self._maximum:
            failures = _Failures(now)
        else:
            failures.count += 1
            failures.last = now
        peers[peer] = failures
        if len(peers) > self._capacity:
            peers.popitem(last=False)
        return now + self._delay(failures.count)

    def next_deadline(self) -> float | None:
        """When the peer with the oldest last failure is to be forgotten."""
        for failures in self._peers.values():
            return failures.last + self._maximum
        return None

    def handle_timeout(self, now: float) -> None:
        """Forget every peer without a failure for ``maximum`` seconds."""
        peers = self._peers
        while peers:
            failures = next(iter(peers.values()))
            # The same sum as next_deadline's, so that a deadline reported as due is always handled.
            if failures.last + self._maximum > now:
                return
            peers.popitem(last=False)

    def _delay(self, count: int) -> float:
        # The exponent is capped so that a long run of failures cannot overflow the float.
        return min(self._base * 2.0 ** min(count - 1, 64), self._maximum)
