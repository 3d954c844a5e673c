"""Session credentials and failed-``init`` throttling (docs/security.md, "Server-side secrets").

Two pieces, both sans-IO:

* :class:`PasswordHash` stores a session password or secret key as an scrypt hash and verifies a candidate
  in constant time, with a verified-password cache that makes reconnect storms cheap (see its docstring
  for the trade-off).
* :class:`AuthThrottle` slows down password guessing from one address (per session, and for the admin
  API) with a failure budget and then an exponential delay, expressed as deadlines so the broker can fold
  it into its own ``next_deadline`` / ``handle_timeout``. :mod:`.peers` says which address that is.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Final

__all__ = ["SCRYPT_N", "AuthThrottle", "PasswordCheck", "PasswordHash"]

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
        if self.verify_cached(candidate):
            return True
        if not self.verify_slow(candidate):
            return False
        self.remember(candidate)
        return True

    def _tag(self, candidate: str) -> bytes:
        return hmac.digest(_FAST_TAG_KEY, self._salt + _utf8(candidate), "sha256")

    def verify_cached(self, candidate: str) -> bool:
        """Whether ``candidate`` matches the verified-password cache (microseconds; ``False``: unknown)."""
        cached = self._verified_tag
        return cached is not None and hmac.compare_digest(self._tag(candidate), cached)

    def verify_slow(self, candidate: str) -> bool:
        """The full scrypt check, with no side effect: safe to run on another thread (see
        :class:`PasswordCheck`); :meth:`remember` a success afterwards, on the owner's thread."""
        return hmac.compare_digest(self._scrypt(_utf8(candidate), self._salt, self._n), self._digest)

    def remember(self, candidate: str) -> None:
        """Cache ``candidate`` as verified (only after :meth:`verify_slow` said so)."""
        self._verified_tag = self._tag(candidate)

    def encode(self) -> str:
        """``scrypt$N$r$p$salt$digest`` (base64): what a store keeps; :meth:`decode` reads it back."""
        salt = base64.b64encode(self._salt).decode("ascii")
        digest = base64.b64encode(self._digest).decode("ascii")
        return f"scrypt${self._n}${SCRYPT_R}${SCRYPT_P}${salt}${digest}"

    @classmethod
    def decode(cls, text: str) -> PasswordHash:
        """Read :meth:`encode`'s form; raises :class:`ValueError` for anything else (a damaged store)."""
        parts = text.split("$")
        if len(parts) != 6 or parts[0] != "scrypt" or (int(parts[2]), int(parts[3])) != (SCRYPT_R, SCRYPT_P):
            raise ValueError("not an scrypt password hash this version writes")
        n = int(parts[1])
        if n < 2 or n & (n - 1):
            raise ValueError(f"scrypt N must be a power of two, got {n}")
        return cls(base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True), n=n)

    def __repr__(self) -> str:
        return f"PasswordHash(scrypt n={self._n} r={SCRYPT_R} p={SCRYPT_P})"


class PasswordCheck:
    """One scrypt verification the server core wants run off its thread (DESIGN §3.7: scrypt must not stall
    every connection).

    The adapter calls :meth:`run` in a worker thread (it reads only immutable data), then hands the result
    back with ``ServerCore.verification_done(check, ok, now)`` on the core's thread.
    """

    __slots__ = ("_hash", "_password", "conn")

    def __init__(self, conn: int, password_hash: PasswordHash, password: str) -> None:
        self.conn = conn
        self._hash = password_hash
        self._password = password

    @property
    def password_hash(self) -> PasswordHash:
        return self._hash

    def run(self) -> bool:
        """The scrypt comparison itself: tens of milliseconds of CPU, no side effect."""
        return self._hash.verify_slow(self._password)

    def __repr__(self) -> str:
        return f"PasswordCheck(conn={self.conn})"


class _Failures:
    """A key's failures: the bucket level right after its last failure, and when that failure happened."""

    __slots__ = ("last", "level")

    def __init__(self, last: float) -> None:
        self.level = 1.0
        self.last = last


class AuthThrottle:
    """Delays per key (an address, with a scope such as the session name) after failed attempts.

    Throttling must slow down guessing, not users, so each key has a **budget**: ``budget`` failures per
    ``window`` seconds cost nothing. Failures fill a leaky bucket that drains at ``budget / window`` per
    second; while its level is above ``budget``, every attempt under the key is refused (without running
    scrypt, so guessing cannot burn the server's CPU either) until ``min(base * 2**(k-1), maximum)``
    seconds after the last failure, ``k`` being how far the level is above the budget (rounded up). A
    client that mistypes once, or a few clients behind one NAT that mistype now and then, never wait; a
    guesser gets ``budget`` free guesses per window and then exponentially fewer. A success does not
    empty the bucket: otherwise one valid login would buy free guesses.

    A key without a failure for ``window`` seconds is forgotten (its bucket is then at most ``budget``
    lower, so it restarts with its budget). Keys are kept in order of their last failure, so the next one
    to be forgotten is always the first (O(1) deadline, no heap) and, past ``capacity`` keys, the first is
    also the one evicted: the table's memory is bounded whatever the peers send.

    ``budget=0`` (and ``window=None``, meaning ``maximum``) gives the plain exponential throttle: every
    failure counts, and a key is forgotten ``maximum`` seconds after its last failure.
    """

    __slots__ = ("_base", "_budget", "_capacity", "_drain", "_maximum", "_peers", "_window")

    def __init__(
        self, base: float, maximum: float, capacity: int, *, budget: int = 0, window: float | None = None
    ) -> None:
        self._base = base
        self._maximum = maximum
        self._capacity = capacity
        self._budget = budget
        self._window = maximum if window is None else window
        self._drain = budget / self._window
        self._peers: OrderedDict[Hashable, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def retry_at(self, key: Hashable, now: float) -> float | None:
        """When ``key`` may next try, if it is throttled at ``now``; ``None`` if it may try now."""
        failures = self._peers.get(key)
        if failures is None or failures.level <= self._budget:
            return None
        until = failures.last + self._delay(failures.level)
        return until if now < until else None

    def record_failure(self, key: Hashable, now: float) -> float:
        """Count a failed attempt under ``key``; returns until when it is throttled (``now``: not at all)."""
        peers = self._peers
        failures = peers.pop(key, None)
        if failures is None or failures.last + self._window <= now:
            failures = _Failures(now)
        else:
            # A clock that went backwards drains nothing (and cannot make the level infinite).
            drained = max(now - failures.last, 0.0) * self._drain
            failures.level = max(failures.level - drained, 0.0) + 1.0
            failures.last = now
        peers[key] = failures
        if len(peers) > self._capacity:
            peers.popitem(last=False)
        if failures.level <= self._budget:
            return now
        return now + self._delay(failures.level)

    def next_deadline(self) -> float | None:
        """When the key with the oldest last failure is to be forgotten."""
        for failures in self._peers.values():
            return failures.last + self._window
        return None

    def handle_timeout(self, now: float) -> None:
        """Forget every key without a failure for ``window`` seconds."""
        peers = self._peers
        while peers:
            failures = next(iter(peers.values()))
            # The same sum as next_deadline's, so that a deadline reported as due is always handled.
            if failures.last + self._window > now:
                return
            peers.popitem(last=False)

    def _delay(self, level: float) -> float:
        # The exponent is capped so that a long run of failures cannot overflow the float.
        excess = math.ceil(level - self._budget - 1e-9)
        return min(self._base * 2.0 ** min(excess - 1, 64), self._maximum)
