"""What a stored message costs, in bytes: the unit of ``max_pending_bytes_per_session`` (DESIGN §3.6).

A bound on memory must count what memory holds. Counting the characters of ``data`` alone let a session
hold far more than its limit: a non-ASCII payload takes up to 4 bytes per character, and topic, message
id and hash (up to hundreds of bytes each) were free, as was a flood of empty messages. So a stored
message is charged the UTF-8 bytes of all four strings plus :data:`MESSAGE_OVERHEAD`, a fixed estimate of
the broker's bookkeeping for it (measured with ``tracemalloc`` on CPython 3.11: ~630 bytes per stored
message with one delivery, the dedupe entry and the retry-queue entry included, its strings excluded).
"""

from __future__ import annotations

from typing import Final

from .protocol import Publish

__all__ = ["MESSAGE_OVERHEAD", "message_size", "utf8_length"]

MESSAGE_OVERHEAD: Final = 512
"""Bytes charged per stored message on top of its strings (objects, table entries)."""


def utf8_length(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without encoding it when it is ASCII (``isascii`` is O(1) in CPython,
    and base64 ciphertext always is)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def message_size(publish: Publish) -> int:
    """The bytes a stored ``publish`` is charged: topic, id, hash and data in UTF-8, plus the overhead."""
    return (
        MESSAGE_OVERHEAD
        + utf8_length(publish.topic)
        + utf8_length(publish.message_id)
        + utf8_length(publish.hash)
        + utf8_length(publish.data)
    )
