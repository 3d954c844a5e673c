"""Shared keys and suite names: what configuring end-to-end encryption needs, without a cipher.

Split from :mod:`.crypto` (which re-exports every name here) so that the server, which never encrypts but
parses token keys, and the command line, which makes keys, do not import the ``cryptography`` package
at start-up (~7 MiB of the server's baseline memory, docs/performance.md); the suites import it when a
client first makes one.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Final, Literal

from fastport_core.errors import InvalidKeyError

__all__ = ["KEYGEN_HINT", "KEY_SIZE", "SuiteName", "generate_key", "parse_key"]

SuiteName = Literal["legacy", "authenticated"]
"""The suites a client can be configured with; ``authenticated`` is the default everywhere."""

KEY_SIZE: Final = 32
"""AES-256 key length, and the length of the shared key both suites start from."""
KEYGEN_HINT: Final = "make one with `fastport keygen`"


def generate_key() -> str:
    """Return a new shared key: standard base64 of 32 bytes from ``os.urandom``.

    This is what ``fastport keygen`` prints; every client of a topic must be given the same one out of band.
    """
    return base64.b64encode(os.urandom(KEY_SIZE)).decode("ascii")


def parse_key(key: str | bytes) -> bytes:
    """Turn a configured key into the 32 raw bytes the suites use, or raise :class:`InvalidKeyError`.

    A ``str`` is base64, standard or URL-safe alphabet, padding optional, surrounding whitespace ignored:
    keys are pasted from terminals and environment variables, and being strict about those details would
    only produce confusing failures. ``bytes`` are taken as the raw key. Either way the result must be
    exactly 32 bytes; the error says what was wrong (length, alphabet, type) and never repeats the key.

    32 bytes that are printable text (``b"my-shared-aes-key-of-32-bytes!!!"``) are refused: that is a
    password-strength key in disguise, not 256 random bits. The original fastPort Dart client never used
    such a key either: it base64-decodes its ``aesKey`` and requires 32 bytes, exactly as a ``str`` here.
    """
    if isinstance(key, str):
        return _parse_text_key(key)
    if isinstance(key, bytes | bytearray | memoryview):
        raw = bytes(key)
        if len(raw) != KEY_SIZE:
            hint = ""
            if raw.strip() and _decodes_to_key(raw):
                hint = " (it looks like base64 text: pass it as str, not bytes)"
            raise InvalidKeyError(
                f"raw key is {len(raw)} bytes; AES-256 needs {KEY_SIZE}{hint} — {KEYGEN_HINT}"
            )
        if _is_text(raw):
            raise InvalidKeyError(
                f"raw key is {KEY_SIZE} bytes of printable text, not random bytes: a text is a password, not "
                f"an AES-256 key (original fastPort clients base64-decode their aesKey too) — {KEYGEN_HINT}"
            )
        return raw
    raise InvalidKeyError(
        f"key must be a base64 str or {KEY_SIZE} raw bytes, not {type(key).__name__} — {KEYGEN_HINT}"
    )


def _parse_text_key(key: str) -> bytes:
    text = key.strip()
    if not text:
        raise InvalidKeyError(f"key is empty — {KEYGEN_HINT}")
    # A 32-character text is most likely copied from the original guide's `aesKey: 'shared-aes-key-32-...'`
    # example; the original Dart client base64-decodes aesKey as we do, so such a text was never a key.
    raw_hint = (
        f" (a {KEY_SIZE}-character text is not a key: the key is the base64 of {KEY_SIZE} random bytes, "
        "as the original fastPort clients' aesKey is)"
        if len(text.encode("utf-8", "surrogatepass")) == KEY_SIZE
        else ""
    )
    if not text.isascii():
        raise InvalidKeyError(
            f"key is not base64: it contains non-ASCII characters{raw_hint} — {KEYGEN_HINT}"
        )
    normalised = text.replace("-", "+").replace("_", "/")
    normalised += "=" * (-len(normalised) % 4)
    try:
        raw = base64.b64decode(normalised, validate=True)
    except binascii.Error:
        raise InvalidKeyError(
            f"key is not valid base64 (standard or URL-safe alphabet){raw_hint} — {KEYGEN_HINT}"
        ) from None
    if len(raw) != KEY_SIZE:
        raise InvalidKeyError(
            f"key decodes to {len(raw)} bytes; AES-256 needs {KEY_SIZE}{raw_hint} — {KEYGEN_HINT}"
        )
    return raw


def _is_text(raw: bytes) -> bool:
    """Whether ``raw`` is printable UTF-8 text (for 32 random bytes that has odds of about 1 in 10**13)."""
    try:
        return raw.decode("utf-8").isprintable()
    except UnicodeDecodeError:
        return False


def _decodes_to_key(raw: bytes) -> bool:
    try:
        return len(base64.b64decode(raw.strip(), validate=True)) == KEY_SIZE
    except (binascii.Error, ValueError):
        return False
