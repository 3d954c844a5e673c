"""When a client dials again after a failure, and when it stops trying (docs/clients.md, "Reconnection").

Policy: exponential backoff with *full jitter*. The n-th consecutive failure (counting from 0) waits a
delay drawn uniformly from ``[0, cap_n]`` where ``cap_0 = initial`` and each failure doubles the cap up to
``maximum``::

    delay_n = uniform(0, min(maximum, initial * 2**n))

Why full jitter rather than "exponential plus a little jitter" or "decorrelated jitter": when a broker
restarts, every client loses its connection in the same instant. Full jitter spreads their reconnections
evenly over the whole window, so the server sees a flat arrival rate instead of synchronised waves, and
it needs no state besides the attempt count (decorrelated jitter carries the previous delay and has a
longer tail for the same mean). AWS's analysis ("Exponential Backoff And Jitter", 2015) measured it as
the policy with the least total work for the same completion time.

Give-up: ``give_up_after`` seconds of *continuous* failure (measured from the first failure after the
last success) end the retries. The last attempt is scheduled no later than that horizon, so a client
configured to give up after 60 s does not sleep 30 s past it before noticing.

The cap is doubled as a float and clamped at ``maximum`` rather than computed as ``initial * 2**n``,
so no attempt count can overflow it. Randomness comes from an injectable :class:`random.Random`, so tests
are deterministic; it is jitter, not a secret.
"""

from __future__ import annotations

import random

from .config import ClientConfig
from .errors import LocalProtocolError

__all__ = ["Backoff"]


class Backoff:
    """Reconnect timing of one client: exponential backoff, full jitter, and the give-up horizon."""

    __slots__ = ("_attempts", "_cap", "_failing_since", "_give_up_after", "_initial", "_maximum", "_rng")

    def __init__(
        self,
        *,
        initial: float,
        maximum: float,
        give_up_after: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise LocalProtocolError(f"need 0 < initial <= maximum, got initial={initial}, maximum={maximum}")
        if give_up_after is not None and give_up_after <= 0:
            raise LocalProtocolError(f"give_up_after must be positive or None, got {give_up_after}")
        self._initial = initial
        self._maximum = maximum
        self._give_up_after = give_up_after
        self._rng = rng if rng is not None else random.Random()
        self._cap = initial
        self._attempts = 0
        self._failing_since: float | None = None

    @classmethod
    def from_config(cls, config: ClientConfig, rng: random.Random | None = None) -> Backoff:
        """The policy a :class:`ClientConfig` describes (``reconnect_*`` fields)."""
        return cls(
            initial=config.reconnect_initial_delay,
            maximum=config.reconnect_max_delay,
            give_up_after=config.reconnect_give_up_after,
            rng=rng,
        )

    @property
    def attempts(self) -> int:
        """Consecutive failures since the last :meth:`reset`."""
        return self._attempts

    @property
    def cap(self) -> float:
        """The upper bound of the next delay: ``min(maximum, initial * 2**attempts)``."""
        return self._cap

    @property
    def failing_since(self) -> float | None:
        """When the current run of failures began, or ``None`` after a success."""
        return self._failing_since

    def next_delay(self) -> float:
        """Draw the next delay in ``[0, cap]`` and double the cap (up to ``maximum``)."""
        delay = self._rng.uniform(0.0, self._cap)
        self._cap = min(self._maximum, self._cap * 2)
        self._attempts += 1
        return delay

    def schedule(self, now: float) -> float | None:
        """Record a failure at ``now``; return when to dial again, or ``None`` to give up.

        The returned time is never later than the give-up horizon, so the final attempt happens at it.
        """
        if self._failing_since is None:
            self._failing_since = now
        delay = self.next_delay()
        if self._give_up_after is None:
            return now + delay
        horizon = self._failing_since + self._give_up_after
        if now >= horizon:
            return None
        return min(now + delay, horizon)

    def reset(self) -> None:
        """A connection succeeded: start again from ``initial``, with a fresh give-up clock."""
        self._cap = self._initial
        self._attempts = 0
        self._failing_since = None
