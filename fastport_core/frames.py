"""A minimal RFC 6455 frame codec: the per-frame receive and send path of every open connection.

Why not wsproto here: its generic decoder (partial frames, extension hooks, a lane-by-lane translate
masker) costs 15-30 µs per received frame, the largest single cost of a relay in the design probe
(docs/architecture.md §9). This codec handles exactly what fastport needs (text, binary, continuation,
ping, pong, close; no extensions) and nothing else, and wsproto stays the reference it is differentially
tested against (``tests/core/test_frames.py``).

Theory of operation of :class:`FrameDecoder`:

* Received bytes are appended to one buffer and consumed through an offset, so parsing a frame never
  copies the bytes behind it. When a ``feed`` finds the buffer fully consumed, the new chunk *becomes* the
  buffer (no copy at all, the common case on a server where a read holds whole frames); leftovers are
  compacted only when new bytes must be appended to them.
* A frame's header is parsed as soon as it is complete, and every rule that the header decides (reserved
  bits, opcode, masking, control-frame limits, fragmentation order, minimal length encoding and the size
  limit) is enforced then, *before* any of the payload is waited for or buffered. The header is simply
  re-parsed when more bytes arrive for an incomplete frame: that is a few integer operations, and it
  keeps the decoder free of partial-frame state.
* Payloads are unmasked by ``websockets``' compiled ``apply_mask`` (0.1 µs for a 567-byte publish
  against 1.6 µs for the big-integer XOR this codec used before: ~15% of the server core's time per
  1:1 message, docs/performance.md); where that extension is missing (a platform with no wheel of it),
  by one big-integer XOR (C-speed integer operations, no per-byte Python loop).
* Data frames are reassembled into whole messages; control frames may arrive between fragments and are
  returned at once. Text is validated as UTF-8: an unfragmented message with one ``bytes.decode``, a
  fragmented one incrementally per fragment, so that invalid bytes fail the connection as soon as they
  arrive (RFC 6455 §8.1 "fail fast", which is also what wsproto does).
* A violation raises :class:`~fastport_core.errors.RemoteProtocolError` with the close code to answer
  with (1002, 1007 or 1009). The decoder is then dead: ``feed`` discards its input and every later
  ``next_event`` raises the same error again, so a caller cannot accidentally carry on.
* After a Close frame the decoder is finished: the peer must send nothing after it (RFC 6455 §5.5.1), so
  later bytes are discarded and ``next_event`` returns ``None``.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from .errors import CloseCode, LocalProtocolError, RemoteProtocolError

_compiled_mask: Callable[[bytes | bytearray, bytes | bytearray], bytes] | None
try:
    from websockets.speedups import apply_mask as _compiled_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    _compiled_mask = None

__all__ = [
    "ABNORMAL_CLOSURE",
    "DEFAULT_MAX_FRAGMENTS",
    "MAX_CONTROL_PAYLOAD",
    "NO_STATUS_RECEIVED",
    "BinaryMessage",
    "Close",
    "FrameDecoder",
    "FrameEvent",
    "Opcode",
    "Ping",
    "Pong",
    "TextMessage",
    "encode_close_payload",
    "encode_frame",
    "encode_text_frame",
    "is_valid_close_code",
]


class Opcode(IntEnum):
    """The frame opcodes of RFC 6455 §5.2 that fastport speaks (every other value is rejected)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


DEFAULT_MAX_FRAGMENTS: Final = 1024
"""Frames one message may be cut into (``Limits.max_fragments_per_message``): a bound on the work and the
list entries a stream of empty continuation frames can cost, far above what real clients send."""
MAX_CONTROL_PAYLOAD: Final = 125
"""RFC 6455 §5.5: control frames carry at most 125 bytes and are never fragmented."""
NO_STATUS_RECEIVED: Final = 1005
"""The code reported for a Close frame without a status code (RFC 6455 §7.1.5); never sent."""
ABNORMAL_CLOSURE: Final = 1006
"""The code reported when the transport ended without a completed closing handshake; never sent."""


@dataclass(frozen=True, slots=True)
class TextMessage:
    """A complete (reassembled) text message, already validated as UTF-8."""

    text: str


@dataclass(frozen=True, slots=True)
class BinaryMessage:
    """A complete (reassembled) binary message."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's Close frame: ``code`` is :data:`NO_STATUS_RECEIVED` when the frame carried none."""

    code: int
    reason: str


FrameEvent = TextMessage | BinaryMessage | Ping | Pong | Close
"""What :meth:`FrameDecoder.next_event` returns: a whole message or one control frame."""

# Plain ints for the hot path: comparing against module globals is cheaper than enum attribute lookups.
_CONTINUATION: Final = int(Opcode.CONTINUATION)
_TEXT: Final = int(Opcode.TEXT)
_BINARY: Final = int(Opcode.BINARY)
_PING: Final = int(Opcode.PING)
_PONG: Final = int(Opcode.PONG)
_FIN: Final = 0x80
_RSV: Final = 0x70
_MASK_BIT: Final = 0x80
_CONTROL_BIT: Final = 0x08

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


def is_valid_close_code(code: int) -> bool:
    """Whether ``code`` may appear in a Close frame on the wire (RFC 6455 §7.4).

    Allowed: the codes RFC 6455 defines for use on the wire (1000-1003, 1007-1011), two registered since
    (1012 service restart, 1013 try again later), and the library/application range 3000-4999. Refused:
    1004-1006 and 1015 (reserved or local-only), and the rest of 1000-2999, including 1014 (registered
    later and rarely used). The set is exactly wsproto's, so the differential test can hold us to it.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1013 or 3000 <= code <= 4999


def _header(first_byte: int, length: int, mask_bit: int) -> bytes:
    """A frame header with the minimal length encoding (RFC 6455 §5.2 requires it)."""
    if length < 126:
        return bytes((first_byte, length | mask_bit))
    if length < 0x10000:
        return bytes((first_byte, 126 | mask_bit)) + length.to_bytes(2, "big")
    return bytes((first_byte, 127 | mask_bit)) + length.to_bytes(8, "big")


def _integer_mask(payload: bytes | bytearray, key: bytes | bytearray) -> bytes:
    """Mask or unmask ``payload`` with the 4-byte ``key`` in one big-integer XOR (its own inverse)."""
    length = len(payload)
    if not length:
        return b""
    stream = (key * ((length >> 2) + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(length, "little")


_xor_mask: Final = _integer_mask if _compiled_mask is None else _compiled_mask
"""Mask or unmask a payload with a 4-byte key (RFC 6455 §5.3): the compiled one when installed."""


def encode_frame(opcode: Opcode, payload: bytes, *, mask: bool) -> bytes:
    """One complete frame (FIN set; fastport never fragments what it sends).

    ``mask`` must be true exactly on the client side: a client masks every frame with a fresh random key
    (RFC 6455 §5.3), a server never masks. A control frame over 125 bytes is a
    :class:`~fastport_core.errors.LocalProtocolError`.
    """
    code = int(opcode)
    if code & _CONTROL_BIT and len(payload) > MAX_CONTROL_PAYLOAD:
        raise LocalProtocolError(f"a {opcode.name} frame carries at most {MAX_CONTROL_PAYLOAD} bytes")
    if mask:
        key = os.urandom(4)
        return _header(_FIN | code, len(payload), _MASK_BIT) + key + _xor_mask(payload, key)
    return _header(_FIN | code, len(payload), 0) + payload


_SMALL_TEXT_HEADERS: Final = tuple(bytes((_FIN | _TEXT, length)) for length in range(126))


def encode_text_frame(payload: bytes) -> bytes:
    """An unmasked text frame: the server's hot path (one encoding per publish, shared by subscribers).

    ``payload`` must already be UTF-8 (it is the JSON encoder's output); it is not validated again here.
    """
    length = len(payload)
    if length < 126:
        return _SMALL_TEXT_HEADERS[length] + payload
    return _header(_FIN | _TEXT, length, 0) + payload


def encode_close_payload(code: int, reason: str) -> bytes:
    """The payload of a Close frame: the code, then the reason in UTF-8 cut to fit in 125 bytes.

    The reason is truncated (at a character boundary) rather than refused, because reasons are often
    error messages of unbounded length and a close must never fail for a long message. A code that must
    not appear on the wire (see :func:`is_valid_close_code`) is a local error.
    """
    if not is_valid_close_code(code):
        raise LocalProtocolError(f"close code {code} cannot be sent")
    encoded = reason.encode("utf-8")
    if len(encoded) > MAX_CONTROL_PAYLOAD - 2:
        encoded = encoded[: MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + encoded


class FrameDecoder:
    """Incremental decoder of one direction of a connection: bytes in, messages and control frames out.

    ``client`` is the side this decoder runs on: a server-side decoder (``client=False``) requires every
    frame to be masked and a client-side one requires them unmasked (RFC 6455 §5.1). ``max_message_size``
    bounds one message after reassembly, in payload bytes; it is checked against each header (for a
    fragmented message, against the running total) so an oversize message is refused before its bytes
    arrive. ``max_fragments`` bounds the frames of one message: without it a peer could open a message and
    send empty continuation frames for ever, each costing a list entry and a parse; the frame past it is
    refused from its header with 1009 (wsproto has no such bound: the one deliberate difference).
    Use: :meth:`feed` the received bytes, then call :meth:`next_event` until it returns ``None``.
    """

    __slots__ = (
        "_buffer",
        "_error",
        "_finished",
        "_fragment_count",
        "_fragment_opcode",
        "_fragment_size",
        "_fragments",
        "_key_size",
        "_mask_bit",
        "_max_fragments",
        "_max_message_size",
        "_position",
        "_text_fragments",
        "_utf8",
    )

    def __init__(
        self, *, client: bool, max_message_size: int, max_fragments: int = DEFAULT_MAX_FRAGMENTS
    ) -> None:
        if max_message_size < 0:
            raise LocalProtocolError("max_message_size must not be negative")
        if max_fragments < 1:
            raise LocalProtocolError("max_fragments must be at least 1")
        self._max_fragments = max_fragments
        # A server-side decoder expects the mask bit and a 4-byte key in every header, a client-side none.
        self._mask_bit = 0 if client else _MASK_BIT
        self._key_size = 0 if client else 4
        self._max_message_size = max_message_size
        self._buffer: bytes | bytearray = b""
        self._position = 0
        self._error: RemoteProtocolError | None = None
        self._finished = False
        # The fragmented message being reassembled: its opcode (0 when none is open), its total size in
        # bytes so far, and its pieces: bytes for binary, str for text (decoded fragment by fragment).
        self._fragment_opcode = 0
        self._fragment_size = 0
        self._fragment_count = 0
        self._fragments: list[bytes] = []
        self._text_fragments: list[str] = []
        self._utf8: codecs.IncrementalDecoder | None = None

    @property
    def finished(self) -> bool:
        """True once a Close frame was decoded or a violation was found: no further event will come."""
        return self._finished or self._error is not None

    def feed(self, data: bytes) -> None:
        """Append received bytes. Ignored once :attr:`finished` (nothing more will be decoded).

        ``data`` may be kept without a copy, so it must be immutable ``bytes``, never a reused buffer.
        """
        if self._finished or self._error is not None:
            return
        buffer = self._buffer
        if self._position >= len(buffer):
            self._buffer = data
        elif isinstance(buffer, bytearray):
            if self._position:
                del buffer[: self._position]
            buffer += data
        else:
            self._buffer = bytearray(buffer[self._position :]) + data
        self._position = 0

    def next_event(self) -> FrameEvent | None:
        """The next complete message or control frame, or ``None`` until more bytes are fed.

        Raises :class:`~fastport_core.errors.RemoteProtocolError` (with ``close_code`` set) on the first
        violation, and the same error on every later call.
        """
        if self._error is not None:
            raise self._error
        while not self._finished:
            buffer = self._buffer
            start = self._position
            available = len(buffer) - start
            if available < 2:
                return None
            first, second = buffer[start], buffer[start + 1]
            opcode = first & 0x0F
            fin = first & _FIN
            length = second & 0x7F
            if first & _RSV:
                raise self._fail("reserved bits set without a negotiated extension")
            if opcode & _CONTROL_BIT:
                if opcode > _PONG:
                    raise self._fail(f"unknown opcode {opcode:#x}")
                if not fin:
                    raise self._fail("fragmented control frame")
                if length > MAX_CONTROL_PAYLOAD:
                    raise self._fail(f"control frame with a {length}-byte payload (at most 125)")
            elif opcode > _BINARY:
                raise self._fail(f"unknown opcode {opcode:#x}")
            elif opcode == _CONTINUATION:
                if not self._fragment_opcode:
                    raise self._fail("continuation frame without a message to continue")
                if self._fragment_count >= self._max_fragments:
                    raise self._fail(
                        f"message in more than {self._max_fragments} fragments", CloseCode.MESSAGE_TOO_BIG
                    )
            elif self._fragment_opcode:
                raise self._fail("new data frame while a fragmented message is still open")
            if second & _MASK_BIT != self._mask_bit:
                raise self._fail(
                    "unmasked frame from a client" if self._mask_bit else "masked frame from a server"
                )

            header_size = 2
            if length == 126:
                if available < 4:
                    return None
                length = buffer[start + 2] << 8 | buffer[start + 3]
                if length < 126:
                    raise self._fail("payload length not minimally encoded")
                header_size = 4
            elif length == 127:
                if available < 10:
                    return None
                length = int.from_bytes(buffer[start + 2 : start + 10], "big")
                if length >> 63:
                    raise self._fail("payload length with the most significant bit set")
                if length < 0x10000:
                    raise self._fail("payload length not minimally encoded")
                header_size = 10
            if not opcode & _CONTROL_BIT:
                total = length + self._fragment_size if opcode == _CONTINUATION else length
                if total > self._max_message_size:
                    raise self._fail(
                        f"message of at least {total} bytes exceeds the limit of {self._max_message_size}",
                        CloseCode.MESSAGE_TOO_BIG,
                    )

            payload_start = start + header_size + self._key_size
            end = payload_start + length
            if len(buffer) < end:
                return None
            if self._key_size:
                payload = _xor_mask(buffer[payload_start:end], buffer[payload_start - 4 : payload_start])
            else:
                payload = bytes(buffer[payload_start:end])
            self._position = end

            if opcode & _CONTROL_BIT:
                return self._control_event(opcode, payload)
            if fin and opcode:
                return self._whole_message(opcode, payload)
            message = self._add_fragment(opcode, payload, fin)
            if message is not None:
                return message
        return None

    def _fail(self, message: str, close_code: CloseCode = CloseCode.PROTOCOL_ERROR) -> RemoteProtocolError:
        """Record the violation that kills this decoder and drop what it buffered."""
        self._error = RemoteProtocolError(message, close_code=close_code)
        self._buffer = b""
        self._position = 0
        self._fragments = []
        self._text_fragments = []
        return self._error

    def _fail_utf8(self, what: str, exc: UnicodeDecodeError) -> RemoteProtocolError:
        return self._fail(f"{what} is not valid UTF-8 ({exc.reason})", CloseCode.INVALID_PAYLOAD)

    def _whole_message(self, opcode: int, payload: bytes) -> TextMessage | BinaryMessage:
        if opcode == _BINARY:
            return BinaryMessage(payload)
        try:
            return TextMessage(payload.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise self._fail_utf8("text message", exc) from None

    def _add_fragment(self, opcode: int, payload: bytes, fin: int) -> TextMessage | BinaryMessage | None:
        """Add one fragment of a fragmented message; the message once its last fragment arrived."""
        if opcode:
            self._fragment_opcode = opcode
            self._utf8 = _Utf8Decoder() if opcode == _TEXT else None
        self._fragment_size += len(payload)
        self._fragment_count += 1
        utf8 = self._utf8
        if utf8 is None:
            self._fragments.append(payload)
        else:
            try:
                self._text_fragments.append(utf8.decode(payload, bool(fin)))
            except UnicodeDecodeError as exc:
                raise self._fail_utf8("text message", exc) from None
        if not fin:
            return None
        self._fragment_opcode = 0
        self._fragment_size = 0
        self._fragment_count = 0
        self._utf8 = None
        if utf8 is None:
            data = b"".join(self._fragments)
            self._fragments = []
            return BinaryMessage(data)
        text = "".join(self._text_fragments)
        self._text_fragments = []
        return TextMessage(text)

    def _control_event(self, opcode: int, payload: bytes) -> Ping | Pong | Close:
        if opcode == _PING:
            return Ping(payload)
        if opcode == _PONG:
            return Pong(payload)
        event = self._close_event(payload)
        self._finished = True
        self._buffer = b""
        self._position = 0
        return event

    def _close_event(self, payload: bytes) -> Close:
        """Validate a Close payload (RFC 6455 §5.5.1, §7.4): empty, or a valid code then UTF-8 text."""
        if not payload:
            return Close(NO_STATUS_RECEIVED, "")
        if len(payload) == 1:
            raise self._fail("close frame with a 1-byte payload")
        code = payload[0] << 8 | payload[1]
        if not is_valid_close_code(code):
            raise self._fail(f"close frame with invalid code {code}")
        try:
            return Close(code, payload[2:].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise self._fail_utf8("close reason", exc) from None
