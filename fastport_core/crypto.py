"""End-to-end envelope suites: how a client turns a payload into a frame's ``data`` and ``hash`` and back.

Theory of operation
-------------------
The server is a blind relay: it routes ``data`` and ``hash`` without a key. Everything cryptographic happens
here, on the clients, and this module is the one place that implements it (``docs/security.md`` is the
normative text, with the threat model, and ``tests/core/data/crypto_vectors.json`` pins it with vectors
computed by an independent implementation).

Both suites share the ``data`` format of the original fastPort clients::

    data = base64(iv) + ":" + base64(AES-256-CBC/PKCS7(k, iv, plaintext bytes))

with a fresh random 16-byte IV per message. They differ in the key ``k`` and in ``hash``:

``legacy``
    ``k`` is the shared key itself and ``hash = hex(sha256(utf8(data)))``. This is what the existing Dart and
    Node clients speak, so it exists for interop only. The hash has no key: anyone who can touch the frame
    (the server, a TLS-less network attacker) can change ``data`` and recompute ``hash``, and CBC lets them
    flip chosen plaintext bits through the IV. It catches accidental corruption, nothing more.

``authenticated`` (the default)
    Two keys are derived from the shared key with HKDF-SHA256 (``info`` ``fastport/v1/enc`` and
    ``fastport/v1/mac``), ``data`` is encrypted under the first, and ``hash = "v1:" + hex(HMAC-SHA256(mac_key,
    M))`` where ``M`` is the length-prefixed concatenation of a domain tag, the session, topic, message id,
    timestamp, encoding and ``data``. The receiver checks the MAC in constant time *before* touching the
    ciphertext (encrypt-then-MAC), so a forged or moved message is refused without ever reaching the CBC
    decryption or the padding check: no malleability, no padding oracle, and a ciphertext cannot be replayed
    under another session, topic, id, time or encoding.

Errors
------
``open`` raises :class:`~fastport_core.errors.IntegrityError` and nothing else, whatever the peer sent: the
client core turns it into an integrity event, and any other exception escaping here would be a bug that a
hostile server could trigger at will. Misuse on the sending side (a bad key, a payload that is neither
``str`` nor ``bytes``) raises :class:`~fastport_core.errors.LocalProtocolError` or its subclass
:class:`~fastport_core.errors.InvalidKeyError`. No message ever contains key material.

The module is sans-IO: it reads no clock (the caller passes ``timestamp``) and its only source of
randomness is ``os.urandom``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Final, Literal, Protocol, get_args

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fastport_core.errors import IntegrityError, LocalProtocolError

from .keys import KEY_SIZE, SuiteName, generate_key, parse_key

__all__ = [
    "AuthenticatedSuite",
    "Encoding",
    "LegacySuite",
    "Sealed",
    "Suite",
    "SuiteName",
    "generate_key",
    "make_suite",
    "parse_key",
]

Encoding = Literal["text", "binary"]
"""How the plaintext is handed back: ``text`` (a ``str``, UTF-8 on the wire) or ``binary`` (``bytes``)."""

IV_SIZE: Final = 16
"""AES block size, which CBC requires as the IV length."""

_ENCODINGS: Final[tuple[str, ...]] = get_args(Encoding)
_SUITE_NAMES: Final[tuple[str, ...]] = get_args(SuiteName)
_PKCS7: Final = padding.PKCS7(algorithms.AES.block_size)

_MAC_DOMAIN: Final = b"fastport/v1"
_MAC_PREFIX: Final = "v1:"
_INFO_ENC: Final = b"fastport/v1/enc"
_INFO_MAC: Final = b"fastport/v1/mac"
_HEX_DIGITS: Final = frozenset("0123456789abcdef")
_SHA256_HEX_LEN: Final = 64


# --------------------------------------------------------------------------------------------------- keys


def _derive_keys(key: bytes) -> tuple[bytes, bytes]:
    """HKDF-SHA256 ``(enc_key, mac_key)`` of the ``authenticated`` suite (no salt, distinct ``info``).

    Separate keys keep the cipher and the MAC independent even though users configure a single secret.
    """

    def derive(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(key)

    return derive(_INFO_ENC), derive(_INFO_MAC)


# ------------------------------------------------------------------------------------------ the envelope


@dataclass(frozen=True, slots=True)
class Sealed:
    """What :meth:`Suite.seal` produces: the ``data`` and ``hash`` fields of a ``publish`` frame.

    ``encoding`` is ``"binary"`` for a ``bytes`` payload (the frame carries ``encoding: "binary"``) and
    ``"text"`` otherwise (the frame omits the field, which is what the original clients expect).
    """

    data: str
    hash: str
    encoding: Encoding


class Suite(Protocol):
    """An envelope suite. Both implementations are immutable and safe to share between threads."""

    @property
    def name(self) -> SuiteName:
        """The suite's configuration name."""
        ...

    def seal(
        self,
        *,
        session: str,
        topic: str,
        message_id: str,
        timestamp: int,
        payload: str | bytes,
        iv: bytes | None = None,
    ) -> Sealed:
        """Encrypt ``payload`` for ``topic``. Leave ``iv`` as ``None`` (a fresh random IV); it exists for
        known-answer tests only."""
        ...

    def open(
        self,
        *,
        session: str,
        topic: str,
        message_id: str,
        timestamp: int,
        data: str,
        hash: str,
        encoding: Encoding,
    ) -> str | bytes:
        """Verify and decrypt a received message; raise :class:`IntegrityError` (only) if that fails."""
        ...


def _payload_bytes(payload: str | bytes) -> tuple[bytes, Encoding]:
    if isinstance(payload, str):
        try:
            return payload.encode("utf-8"), "text"
        except UnicodeEncodeError:
            raise LocalProtocolError(
                "payload str is not valid Unicode (it holds a lone surrogate); publish bytes instead"
            ) from None
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), "binary"
    raise LocalProtocolError(f"payload must be str or bytes, not {type(payload).__name__}")


def _fresh_or_given_iv(iv: bytes | None) -> bytes:
    if iv is None:
        return os.urandom(IV_SIZE)
    if not isinstance(iv, bytes) or len(iv) != IV_SIZE:
        raise LocalProtocolError(f"iv must be {IV_SIZE} bytes (and should be left as None outside tests)")
    return iv


def _encrypt(aes: algorithms.AES, iv: bytes, plaintext: bytes) -> str:
    """The shared ``data`` format: ``base64(iv):base64(AES-CBC(PKCS7(plaintext)))``.

    ``cryptography`` binds the IV into the cipher context, so a context per message is unavoidable; the
    validated ``algorithms.AES`` key object is built once per suite.
    """
    padder = _PKCS7.padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(aes, modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return base64.b64encode(iv).decode("ascii") + ":" + base64.b64encode(ciphertext).decode("ascii")


def _decrypt(aes: algorithms.AES, data: str) -> bytes:
    """Inverse of :func:`_encrypt`; every way ``data`` can be malformed becomes :class:`IntegrityError`."""
    iv_text, colon, ciphertext_text = data.partition(":")
    if not colon:
        raise IntegrityError("message data is not 'iv:ciphertext' (no colon)")
    try:
        # validate=True refuses anything outside the alphabet (a second colon included); non-ASCII text
        # raises ValueError, of which binascii.Error is a subclass.
        iv = base64.b64decode(iv_text, validate=True)
        ciphertext = base64.b64decode(ciphertext_text, validate=True)
    except ValueError:
        raise IntegrityError("message data is not valid base64") from None
    if len(iv) != IV_SIZE:
        raise IntegrityError(f"message IV is {len(iv)} bytes, expected {IV_SIZE}")
    if not ciphertext or len(ciphertext) % IV_SIZE:
        raise IntegrityError(
            f"message ciphertext is {len(ciphertext)} bytes, not a positive multiple of {IV_SIZE}"
        )
    decryptor = Cipher(aes, modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = _PKCS7.unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise IntegrityError("message does not decrypt (bad padding): wrong key or altered data") from None


def _as_payload(plaintext: bytes, encoding: Encoding) -> str | bytes:
    if encoding == "binary":
        return plaintext
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError:
        raise IntegrityError("message decrypts to invalid UTF-8 text") from None


def _check_open_args(*, texts: tuple[object, ...], timestamp: object, encoding: object) -> None:
    # Frames are decoded from JSON by someone else; a mistyped field must still end as IntegrityError.
    if not all(isinstance(text, str) for text in texts):
        raise IntegrityError("message session, topic, id, data and hash must be strings")
    if encoding not in _ENCODINGS:
        raise IntegrityError(f"unknown message encoding (expected one of {', '.join(_ENCODINGS)})")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise IntegrityError("message timestamp is not an integer")


def _other_suite_hint(hash: str, *, receiving: SuiteName) -> str:
    """Name the suite a ``hash`` seems to come from: mixed-suite configurations are the usual culprit."""
    if receiving != "authenticated" and hash.startswith(_MAC_PREFIX):
        return "; it looks like an 'authenticated' suite tag: configure the same suite on every client"
    if receiving != "legacy" and len(hash) == _SHA256_HEX_LEN and _HEX_DIGITS.issuperset(hash):
        return "; it looks like a 'legacy' suite hash: configure the same suite on every client"
    version, colon, _ = hash.partition(":")
    if colon and version[:1] == "v" and version[1:].isdigit():
        return f"; its '{version}:' tag is from a newer fastport version"
    return ""


# ------------------------------------------------------------------------------------------------ legacy


class LegacySuite:
    """The original fastPort envelope, for interop with the existing Dart and Node clients only.

    ``hash`` is an unkeyed SHA-256 of ``data``: it detects accidental corruption, but the server or any
    network attacker can alter the ciphertext (CBC is malleable) and recompute it, and the padding check
    runs on attacker-chosen ciphertext. It binds nothing else: a message can be moved to another topic.
    Prefer :class:`AuthenticatedSuite` wherever every client can be upgraded.
    """

    __slots__ = ("_aes",)

    name: Final = "legacy"

    def __init__(self, key: str | bytes) -> None:
        self._aes = algorithms.AES(parse_key(key))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def seal(
        self,
        *,
        session: str,
        topic: str,
        message_id: str,
        timestamp: int,
        payload: str | bytes,
        iv: bytes | None = None,
    ) -> Sealed:
        """Encrypt under the raw key; session, topic, id and timestamp are not bound (the format has none)."""
        del session, topic, message_id, timestamp
        plaintext, encoding = _payload_bytes(payload)
        data = _encrypt(self._aes, _fresh_or_given_iv(iv), plaintext)
        return Sealed(data=data, hash=hashlib.sha256(data.encode("ascii")).hexdigest(), encoding=encoding)

    def open(
        self,
        *,
        session: str,
        topic: str,
        message_id: str,
        timestamp: int,
        data: str,
        hash: str,
        encoding: Encoding,
    ) -> str | bytes:
        """Check the SHA-256 (constant time, out of habit: it is not a secret) and decrypt."""
        _check_open_args(
            texts=(session, topic, message_id, data, hash), timestamp=timestamp, encoding=encoding
        )
        try:
            expected = hashlib.sha256(data.encode("utf-8")).hexdigest()
        except UnicodeEncodeError:
            raise IntegrityError("message data is not valid Unicode") from None
        # compare_digest refuses non-ASCII str, so compare bytes; surrogatepass keeps any str encodable.
        if not hmac.compare_digest(expected.encode("ascii"), hash.encode("utf-8", "surrogatepass")):
            raise IntegrityError(
                "message hash does not match its data" + _other_suite_hint(hash, receiving="legacy")
            )
        return _as_payload(_decrypt(self._aes, data), encoding)


# ----------------------------------------------------------------------------------------- authenticated


def _field(value: str) -> bytes:
    """``F(s)``: 4-byte big-endian length, then the UTF-8 bytes, so no field can bleed into the next."""
    raw = value.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def _mac_input(
    *, session: str, topic: str, message_id: str, timestamp: int, encoding: str, data: str
) -> bytes:
    """``M`` of the ``authenticated`` suite (docs/security.md): all a receiver relies on, under one MAC.

    May raise ``UnicodeEncodeError`` (lone surrogates) or ``OverflowError`` (a field of 4 GiB or more);
    callers check types first and map those two to their own error type.
    """
    return b"".join(
        (
            _MAC_DOMAIN,
            _field(session),
            _field(topic),
            _field(message_id),
            _field(str(timestamp)),
            _field(encoding),
            _field(data),
        )
    )


class AuthenticatedSuite:
    """The default envelope: AES-256-CBC under an HKDF-derived key, then HMAC-SHA256 over the ciphertext
    and everything that gives it meaning (encrypt-then-MAC).

    Keys are derived once here, not per message: HKDF costs more than the cipher on a short message.
    """

    __slots__ = ("_aes", "_mac")

    name: Final = "authenticated"

    def __init__(self, key: str | bytes) -> None:
        enc_key, mac_key = _derive_keys(parse_key(key))
        self._aes = algorithms.AES(enc_key)
        # An HMAC object keyed once and copied per message skips re-hashing the padded key every time.
        self._mac = hmac.new(mac_key, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _tag(self, message: bytes) -> str:
        mac = self._mac.copy()
        mac.update(message)
        return _MAC_PREFIX + mac.hexdigest()

    def seal(
        self,
        *,
        session: str,
        topic: str,
        message_id: str,
        timestamp: int,
        payload: str | bytes,
        iv: bytes | None = None,
    ) -> Sealed:
        """Encrypt, then MAC the ciphertext together with its session, topic, id, timestamp and encoding."""
        if isinstance(timestamp, bool) or not isinstance(timestamp, int):
            raise LocalProtocolError("timestamp must be an int (milliseconds)")
        if not (isinstance(session, str) and isinstance(topic, str) and isinstance(message_id, str)):
            raise LocalProtocolError("session, topic and message id must be str")
        plaintext, encoding = _payload_bytes(payload)
        data = _encrypt(self._aes, _fresh_or_given_iv(iv), plaintext)
        try:
            message = _mac_input(
                session=session,
                topic=topic,
                message_id=message_id,
                timestamp=timestamp,
                encoding=encoding,
                data=data,
            )
        except (UnicodeEncodeError, OverflowError):
            raise LocalProtocolError(
                "session, topic and message id must be valid Unicode (no lone surrogates)"
            ) from None
        return Sealed(data=data, hash=self._tag(message), encoding=encoding)

    def open(
        self,
        *,
        session: str,
        topic: str,
        message_id: str,
        timestamp: int,
        data: str,
        hash: str,
        encoding: Encoding,
    ) -> str | bytes:
        """Verify the MAC in constant time, and only then decrypt (so forgeries never reach CBC/padding)."""
        _check_open_args(
            texts=(session, topic, message_id, data, hash), timestamp=timestamp, encoding=encoding
        )
        if not hash.startswith(_MAC_PREFIX):
            raise IntegrityError(
                "message tag has no 'v1:' prefix, so it was not sealed by the 'authenticated' suite"
                + _other_suite_hint(hash, receiving="authenticated")
            )
        try:
            message = _mac_input(
                session=session,
                topic=topic,
                message_id=message_id,
                timestamp=timestamp,
                encoding=encoding,
                data=data,
            )
        except (UnicodeEncodeError, OverflowError):
            raise IntegrityError("message fields are not strings of valid Unicode") from None
        expected = self._tag(message).encode("ascii")
        if not hmac.compare_digest(expected, hash.encode("utf-8", "surrogatepass")):
            raise IntegrityError(
                "message authentication failed: wrong key, or the message was altered or moved "
                "(its session, topic, id, timestamp or encoding differ from what was sealed)"
            )
        return _as_payload(_decrypt(self._aes, data), encoding)


def make_suite(name: SuiteName, key: str | bytes) -> Suite:
    """Build the suite a client is configured with; an unknown name is a configuration error."""
    if name == "authenticated":
        return AuthenticatedSuite(key)
    if name == "legacy":
        return LegacySuite(key)
    raise LocalProtocolError(f"unknown crypto suite {name!r}; expected one of {', '.join(_SUITE_NAMES)}")
