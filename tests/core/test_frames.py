"""The frame codec: every RFC 6455 rule it enforces, and a differential test against wsproto (DESIGN §6.2).

Frames under test are built here by :func:`raw_frame`, independently of the codec's encoder (so invalid
frames can be built too, and an encoder bug cannot hide a decoder bug).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import events as ws
from wsproto.connection import Connection, ConnectionState, ConnectionType

from fastport_core.errors import CloseCode, LocalProtocolError, RemoteProtocolError
from fastport_core.frames import (
    DEFAULT_MAX_FRAGMENTS,
    NO_STATUS_RECEIVED,
    BinaryMessage,
    Close,
    FrameDecoder,
    FrameEvent,
    Opcode,
    Ping,
    Pong,
    TextMessage,
    encode_close_payload,
    encode_frame,
    encode_text_frame,
    is_valid_close_code,
)

KEY = b"\x37\xfa\x21\x3d"
BIG = 2**64  # a message size limit that never triggers (wsproto has none)


def raw_header(first: int, length: int, *, masked: bool = True, length_form: str = "minimal") -> bytes:
    """The first bytes of a frame, up to (not including) the masking key, with any length encoding."""
    mask_bit = 0x80 if masked else 0
    if length_form == "16" or (length_form == "minimal" and 126 <= length < 0x10000):
        return bytes((first, mask_bit | 126)) + length.to_bytes(2, "big")
    if length_form == "64" or (length_form == "minimal" and length >= 0x10000):
        return bytes((first, mask_bit | 127)) + length.to_bytes(8, "big")
    return bytes((first, mask_bit | length))


def raw_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    key: bytes | None = KEY,
    length_form: str = "minimal",
) -> bytes:
    """A frame exactly as described, valid or not; ``key=None`` leaves it unmasked."""
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    header = raw_header(first, len(payload), masked=key is not None, length_form=length_form)
    if key is None:
        return header + payload
    return header + key + bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def decode_all(data: bytes | Iterable[bytes], *, client: bool = False, limit: int = BIG) -> list[FrameEvent]:
    """Feed ``data`` (one chunk or several) and collect every event; violations propagate."""
    decoder = FrameDecoder(client=client, max_message_size=limit)
    events: list[FrameEvent] = []
    for chunk in [data] if isinstance(data, bytes) else data:
        decoder.feed(chunk)
        while (event := decoder.next_event()) is not None:
            events.append(event)
    return events


def rejection(data: bytes, *, client: bool = False, limit: int = BIG) -> CloseCode | None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(data, client=client, limit=limit)
    return info.value.close_code


# -- valid input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_masked_text_of_every_length_form(size: int) -> None:
    text = ("aé€" * size)[:size]
    assert decode_all(raw_frame(Opcode.TEXT, text.encode())) == [TextMessage(text)]


def test_binary_ping_pong_close() -> None:
    data = (
        raw_frame(Opcode.BINARY, b"\x00\xff")
        + raw_frame(Opcode.PING, b"p")
        + raw_frame(Opcode.PONG, b"")
        + raw_frame(Opcode.CLOSE, close_payload(1000, "bye é".encode()))
    )
    assert decode_all(data) == [BinaryMessage(b"\x00\xff"), Ping(b"p"), Pong(b""), Close(1000, "bye é")]


def test_close_without_code_reports_1005() -> None:
    assert decode_all(raw_frame(Opcode.CLOSE)) == [Close(NO_STATUS_RECEIVED, "")]


def test_nothing_is_decoded_after_close() -> None:
    decoder = FrameDecoder(client=False, max_message_size=BIG)
    decoder.feed(raw_frame(Opcode.CLOSE) + raw_frame(Opcode.TEXT, b"late"))
    assert decoder.next_event() == Close(NO_STATUS_RECEIVED, "")
    assert decoder.finished
    decoder.feed(raw_frame(Opcode.TEXT, b"later"))
    assert decoder.next_event() is None


def test_fragmented_message_with_control_frames_between_fragments() -> None:
    data = (
        raw_frame(Opcode.TEXT, b"he", fin=False)
        + raw_frame(Opcode.PING, b"1")
        + raw_frame(Opcode.CONTINUATION, b"ll", fin=False)
        + raw_frame(Opcode.PONG, b"2")
        + raw_frame(Opcode.CONTINUATION, b"o", fin=True)
        + raw_frame(Opcode.BINARY, b"a", fin=False)
        + raw_frame(Opcode.CONTINUATION, b"b", fin=True)
    )
    expected = [Ping(b"1"), Pong(b"2"), TextMessage("hello"), BinaryMessage(b"ab")]
    assert decode_all(data) == expected
    assert decode_all(data[i : i + 1] for i in range(len(data))) == expected  # one byte at a time


def test_utf8_character_split_across_fragments() -> None:
    encoded = "€".encode()
    data = raw_frame(Opcode.TEXT, encoded[:1], fin=False) + raw_frame(Opcode.CONTINUATION, encoded[1:])
    assert decode_all(data) == [TextMessage("€")]


def test_unmasked_frames_on_the_client_side() -> None:
    data = raw_frame(Opcode.TEXT, b"hi", key=None) + raw_frame(Opcode.PING, b"", key=None)
    assert decode_all(data, client=True) == [TextMessage("hi"), Ping(b"")]


def test_zero_mask_key_and_empty_fragments() -> None:
    data = raw_frame(Opcode.BINARY, b"", fin=False, key=b"\0\0\0\0") + raw_frame(Opcode.CONTINUATION, b"x")
    assert decode_all(data) == [BinaryMessage(b"x")]


@pytest.mark.parametrize("code", [1000, 1003, 1007, 1011, 1012, 1013, 3000, 4004, 4999])
def test_valid_close_codes(code: int) -> None:
    assert is_valid_close_code(code)
    assert decode_all(raw_frame(Opcode.CLOSE, close_payload(code))) == [Close(code, "")]


# -- violations -------------------------------------------------------------------------------------------

PROTOCOL_ERRORS = {
    "rsv1": raw_frame(Opcode.TEXT, b"x", rsv=4),
    "rsv2": raw_frame(Opcode.TEXT, b"x", rsv=2),
    "rsv3 on a control frame": raw_frame(Opcode.PING, rsv=1),
    "reserved data opcode": raw_frame(0x3, b"x"),
    "reserved control opcode": raw_frame(0xB),
    "unmasked client frame": raw_frame(Opcode.TEXT, b"x", key=None),
    "control payload over 125": raw_frame(Opcode.PING, b"x" * 126),
    "fragmented control frame": raw_frame(Opcode.PONG, fin=False),
    "continuation without a start": raw_frame(Opcode.CONTINUATION, b"x"),
    "new message inside a fragmented one": raw_frame(Opcode.TEXT, b"a", fin=False)
    + raw_frame(Opcode.BINARY, b"b"),
    "16-bit length for a short payload": raw_frame(Opcode.BINARY, b"x" * 5, length_form="16"),
    "64-bit length for a medium payload": raw_frame(Opcode.BINARY, b"x" * 200, length_form="64"),
    "64-bit length with the top bit set": raw_header(0x82, 2**63 + 5) + KEY,
    "close with a 1-byte payload": raw_frame(Opcode.CLOSE, b"\x03"),
    **{
        f"close code {code}": raw_frame(Opcode.CLOSE, close_payload(code))
        for code in (0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2999, 5000, 65535)
    },
}


@pytest.mark.parametrize("data", PROTOCOL_ERRORS.values(), ids=PROTOCOL_ERRORS.keys())
def test_protocol_errors_close_with_1002(data: bytes) -> None:
    assert rejection(data) is CloseCode.PROTOCOL_ERROR


def test_masked_frame_to_a_client_is_rejected() -> None:
    assert rejection(raw_frame(Opcode.TEXT, b"x"), client=True) is CloseCode.PROTOCOL_ERROR


INVALID_UTF8 = {
    "invalid byte": raw_frame(Opcode.TEXT, b"ok \xff"),
    "surrogate": raw_frame(Opcode.TEXT, b"\xed\xa0\x80"),
    "overlong": raw_frame(Opcode.TEXT, b"\xc0\xaf"),
    "truncated at the end of a message": raw_frame(Opcode.TEXT, b"a", fin=False)
    + raw_frame(Opcode.CONTINUATION, "€".encode()[:2]),
    "close reason": raw_frame(Opcode.CLOSE, close_payload(1000, b"\xff")),
}


@pytest.mark.parametrize("data", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
def test_invalid_utf8_closes_with_1007(data: bytes) -> None:
    assert rejection(data) is CloseCode.INVALID_PAYLOAD


def test_invalid_utf8_fails_fast_in_the_first_fragment() -> None:
    decoder = FrameDecoder(client=False, max_message_size=BIG)
    decoder.feed(raw_frame(Opcode.TEXT, b"\xff", fin=False) + raw_frame(Opcode.PING))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()  # before the ping behind it, and without waiting for the last fragment
    assert info.value.close_code is CloseCode.INVALID_PAYLOAD


def test_decoder_is_dead_after_a_violation() -> None:
    decoder = FrameDecoder(client=False, max_message_size=BIG)
    decoder.feed(raw_frame(0x3) + raw_frame(Opcode.TEXT, b"x"))
    with pytest.raises(RemoteProtocolError) as first:
        decoder.next_event()
    decoder.feed(raw_frame(Opcode.TEXT, b"y"))
    with pytest.raises(RemoteProtocolError) as again:
        decoder.next_event()
    assert again.value is first.value
    assert decoder.finished


# -- size limit -------------------------------------------------------------------------------------------


def test_message_at_the_limit_is_accepted() -> None:
    assert decode_all(raw_frame(Opcode.BINARY, b"x" * 100), limit=100) == [BinaryMessage(b"x" * 100)]


@pytest.mark.parametrize("size", [101, 1000, 70_000, 2**40])
def test_oversize_frame_is_refused_from_its_header_alone(size: int) -> None:
    decoder = FrameDecoder(client=False, max_message_size=100)
    decoder.feed(raw_header(0x82, size))  # no payload, not even the masking key
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.close_code is CloseCode.MESSAGE_TOO_BIG


def test_fragmented_message_over_the_limit_is_refused_at_the_crossing_header() -> None:
    decoder = FrameDecoder(client=False, max_message_size=100)
    decoder.feed(raw_frame(Opcode.TEXT, b"x" * 60, fin=False) + raw_frame(Opcode.PING))
    assert decoder.next_event() == Ping(b"")
    decoder.feed(raw_frame(Opcode.CONTINUATION, b"x" * 41)[:2])
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.close_code is CloseCode.MESSAGE_TOO_BIG


def test_fragmented_message_exactly_at_the_limit() -> None:
    data = raw_frame(Opcode.BINARY, b"x" * 60, fin=False) + raw_frame(Opcode.CONTINUATION, b"y" * 40)
    assert decode_all(data, limit=100) == [BinaryMessage(b"x" * 60 + b"y" * 40)]
    # The running total starts again with the next message.
    assert decode_all(data + data, limit=100) == [BinaryMessage(b"x" * 60 + b"y" * 40)] * 2


def fragmented(count: int, opcode: Opcode = Opcode.TEXT) -> bytes:
    """One message in ``count`` frames: "a", then empty continuations, then "b" (``count`` >= 2)."""
    middle = raw_frame(Opcode.CONTINUATION, b"", fin=False) * (count - 2)
    return raw_frame(opcode, b"a", fin=False) + middle + raw_frame(Opcode.CONTINUATION, b"b")


def test_fragments_up_to_the_limit_are_accepted_and_the_next_is_refused_from_its_header() -> None:
    decoder = FrameDecoder(client=False, max_message_size=BIG, max_fragments=3)
    decoder.feed(fragmented(3) + fragmented(3, Opcode.BINARY))  # the count starts again per message
    assert [decoder.next_event(), decoder.next_event()] == [TextMessage("ab"), BinaryMessage(b"ab")]
    decoder.feed(raw_frame(Opcode.TEXT, b"", fin=False) + raw_frame(Opcode.CONTINUATION, b"", fin=False) * 2)
    decoder.feed(raw_frame(Opcode.CONTINUATION, b"x")[:2])  # the 4th frame's header, no key or payload
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.close_code is CloseCode.MESSAGE_TOO_BIG
    with pytest.raises(LocalProtocolError):
        FrameDecoder(client=False, max_message_size=BIG, max_fragments=0)


def test_a_flood_of_empty_continuation_frames_is_cut_at_the_default_limit() -> None:
    flood = raw_frame(Opcode.TEXT, b"{", fin=False) + raw_frame(Opcode.CONTINUATION, b"", fin=False) * 100_000
    decoder = FrameDecoder(client=False, max_message_size=BIG)
    decoder.feed(flood)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert info.value.close_code is CloseCode.MESSAGE_TOO_BIG
    assert "1024 fragments" in info.value.message


def test_the_fragment_limit_is_the_one_difference_from_wsproto() -> None:
    """wsproto bounds neither size nor fragments; at the limit both agree, one frame past it only we refuse.

    The generated differential streams cut a message into at most 5 frames, far below the limit, so the
    differential tests above compare everything else exactly."""
    assert DEFAULT_MAX_FRAGMENTS > 5
    at_limit = [fragmented(DEFAULT_MAX_FRAGMENTS)]
    assert outcome_of_ours(at_limit) == outcome_of_wsproto(at_limit) == [("text", "ab")]
    past_limit = [fragmented(DEFAULT_MAX_FRAGMENTS + 1)]
    assert outcome_of_wsproto(past_limit) == [("text", "ab")]
    assert outcome_of_ours(past_limit) == [("rejected", CloseCode.MESSAGE_TOO_BIG)]


# -- encoding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_encode_text_frame_is_the_unmasked_text_frame(size: int) -> None:
    payload = b"a" * size
    assert encode_text_frame(payload) == encode_frame(Opcode.TEXT, payload, mask=False)
    assert encode_text_frame(payload) == raw_frame(Opcode.TEXT, payload, key=None)


def test_client_frames_are_masked_with_fresh_keys() -> None:
    first, second = (encode_frame(Opcode.BINARY, b"\0" * 64, mask=True) for _ in range(2))
    assert first[1] & 0x80 and second[1] & 0x80
    assert first[2:6] != second[2:6]  # 2**-32 chance of a false failure
    assert decode_all(first) == [BinaryMessage(b"\0" * 64)]


def test_control_frames_over_125_bytes_cannot_be_encoded() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(Opcode.PING, b"x" * 126, mask=False)


def test_close_payload_truncates_the_reason_at_a_character_boundary() -> None:
    payload = encode_close_payload(CloseCode.NORMAL, "é" * 100)
    assert len(payload) <= 125
    assert decode_all(raw_frame(Opcode.CLOSE, payload)) == [Close(1000, "é" * 61)]


@pytest.mark.parametrize("code", [1005, 1006, 1015, 999, 5000])
def test_close_payload_refuses_codes_that_may_not_be_sent(code: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_close_payload(code, "")


def chunked(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` split at the given offsets (any integers; taken modulo the length and sorted)."""
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


MESSAGES = st.one_of(
    st.text(max_size=300).map(TextMessage),
    st.binary(max_size=300).map(BinaryMessage),
    st.integers(126, 70_000).map(lambda size: BinaryMessage(random.Random(size).randbytes(size))),
    st.binary(max_size=125).map(Ping),
    st.binary(max_size=125).map(Pong),
)


def encode_event(event: FrameEvent, *, mask: bool) -> bytes:
    if isinstance(event, TextMessage):
        return encode_frame(Opcode.TEXT, event.text.encode(), mask=mask)
    if isinstance(event, BinaryMessage):
        return encode_frame(Opcode.BINARY, event.data, mask=mask)
    if isinstance(event, Ping | Pong):
        return encode_frame(Opcode.PING if isinstance(event, Ping) else Opcode.PONG, event.payload, mask=mask)
    return encode_frame(Opcode.CLOSE, encode_close_payload(event.code, event.reason), mask=mask)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(MESSAGES, max_size=8),
    cuts=st.lists(st.integers(0, 2**20), max_size=12),
    client=st.booleans(),
)
def test_round_trip(events: list[FrameEvent], cuts: list[int], client: bool) -> None:
    """What one side encodes, the other side's decoder returns unchanged, however the bytes are cut."""
    data = b"".join(encode_event(event, mask=client) for event in events)
    assert decode_all(chunked(data, cuts), client=not client) == events


# -- differential test against wsproto --------------------------------------------------------------------

Outcome = tuple[object, ...]

VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 3999, 4000, 4999]
INVALID_CODES = [0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2000, 2999, 5000, 65535]

payloads = st.binary(max_size=40)
mask_keys = st.binary(min_size=4, max_size=4)


def masked(opcode: int, payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(lambda payload, key: raw_frame(opcode, payload, key=key), payloads, mask_keys)


pings_and_pongs = st.one_of(masked(Opcode.PING, payloads), masked(Opcode.PONG, payloads))
valid_closes = masked(
    Opcode.CLOSE,
    st.one_of(
        st.just(b""),
        st.builds(close_payload, st.sampled_from(VALID_CODES), st.text(max_size=30).map(str.encode)),
    ),
)
closes = masked(  # valid or not: any code, any reason, or a payload too short for a code
    Opcode.CLOSE,
    st.one_of(
        st.just(b""),
        st.binary(min_size=1, max_size=1),
        st.builds(
            close_payload,
            st.sampled_from(VALID_CODES + INVALID_CODES) | st.integers(0, 65535),
            st.text(max_size=30).map(str.encode) | st.binary(min_size=1, max_size=10),
        ),
    ),
)


@st.composite
def messages(draw: st.DrawFn, *, any_bytes_as_text: bool = False) -> list[bytes]:
    """A data message cut into fragments (at byte offsets, so UTF-8 characters split), controls between.

    With ``any_bytes_as_text`` it is a text message of arbitrary (mostly invalid UTF-8) bytes.
    """
    text = any_bytes_as_text or draw(st.booleans())
    if any_bytes_as_text:
        payload = draw(st.binary(min_size=1, max_size=20))
    elif text:
        payload = draw(st.text(max_size=60)).encode()
    else:
        payload = draw(st.binary(max_size=300))
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
    pieces = [payload[a:b] for a, b in itertools.pairwise([0, *cuts, len(payload)])]
    frames = []
    for index, piece in enumerate(pieces):
        opcode = (Opcode.TEXT if text else Opcode.BINARY) if index == 0 else Opcode.CONTINUATION
        frames.append(raw_frame(opcode, piece, fin=index == len(pieces) - 1, key=draw(mask_keys)))
        if index < len(pieces) - 1 and draw(st.booleans()):
            frames.append(draw(st.one_of(pings_and_pongs, pings_and_pongs, pings_and_pongs, valid_closes)))
    return frames


@st.composite
def defective_frames(draw: st.DrawFn, defect: str) -> list[bytes]:
    """A frame with one ``defect``. A "continuation frame" or "data frame" is valid in itself but may be
    wrong where it lands (a stray continuation, a new message inside a fragmented one, a fragment left
    open before the next message)."""
    opcode: int = draw(
        st.sampled_from([Opcode.TEXT, Opcode.BINARY, Opcode.CONTINUATION, Opcode.PING, Opcode.PONG])
    )
    payload = draw(payloads)
    key: bytes | None = draw(mask_keys)
    fin, rsv, length_form = True, 0, "minimal"
    if defect == "continuation frame":
        opcode, fin = Opcode.CONTINUATION, draw(st.booleans())
    elif defect == "data frame":
        opcode, fin = draw(st.sampled_from([Opcode.TEXT, Opcode.BINARY])), draw(st.booleans())
    elif defect == "reserved bits":
        rsv = draw(st.integers(1, 7))
    elif defect == "unmasked":
        key = None
    elif defect == "reserved opcode":
        opcode = draw(st.sampled_from([0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF]))
    elif defect == "non-minimal length":
        length_form = draw(st.sampled_from(["16", "64"]))
    elif defect == "fragmented control":
        opcode, fin = draw(st.sampled_from([Opcode.PING, Opcode.PONG, Opcode.CLOSE])), False
    elif defect == "oversize control":
        opcode, payload = (
            draw(st.sampled_from([Opcode.PING, Opcode.PONG])),
            draw(st.binary(min_size=126, max_size=130)),
        )
    return [raw_frame(opcode, payload, fin=fin, rsv=rsv, key=key, length_form=length_form)]


FAULTS = {
    **{
        defect: defective_frames(defect)
        for defect in (
            "continuation frame",
            "data frame",
            "reserved bits",
            "unmasked",
            "reserved opcode",
            "non-minimal length",
            "fragmented control",
            "oversize control",
        )
    },
    "any close payload": closes.map(lambda frame: [frame]),
    "text of arbitrary bytes": messages(any_bytes_as_text=True),
    "length with the top bit set": st.just([raw_header(0x82, 2**63 + 5) + KEY]),
}


@st.composite
def streams(draw: st.DrawFn, fault: st.SearchStrategy[list[bytes]] | None = None) -> bytes:
    """Valid traffic, a Close frame or not, and the ``fault``, each inserted at any frame boundary (so
    also between the fragments of a message)."""
    items = draw(st.lists(st.one_of(messages(), pings_and_pongs.map(lambda frame: [frame])), max_size=6))
    frames = [frame for item in items for frame in item]
    extras = [closes.map(lambda frame: [frame])] if draw(st.booleans()) else []
    for extra in [*extras, *([fault] if fault is not None else [])]:
        index = draw(st.integers(0, len(frames)))
        frames[index:index] = draw(extra)
    return b"".join(frames)


def outcome_of_ours(chunks: list[bytes]) -> list[Outcome]:
    decoder = FrameDecoder(client=False, max_message_size=BIG)
    outcome: list[Outcome] = []
    for chunk in chunks:
        decoder.feed(chunk)
        try:
            while (event := decoder.next_event()) is not None:
                if isinstance(event, TextMessage):
                    outcome.append(("text", event.text))
                elif isinstance(event, BinaryMessage):
                    outcome.append(("binary", event.data))
                elif isinstance(event, Ping | Pong):
                    outcome.append((type(event).__name__.lower(), event.payload))
                else:
                    outcome.append(("close", event.code, event.reason))
                    return outcome
        except RemoteProtocolError as exc:
            outcome.append(("rejected", exc.close_code))
            return outcome
    return outcome


def outcome_of_wsproto(chunks: list[bytes]) -> list[Outcome]:
    """wsproto's events, its partial messages reassembled; a parse failure is its CloseConnection hint."""
    connection = Connection(ConnectionType.SERVER)
    outcome: list[Outcome] = []
    parts: list[str | bytes | bytearray] = []
    for chunk in chunks:
        connection.receive_data(chunk)
        for event in connection.events():
            if isinstance(event, ws.TextMessage | ws.BytesMessage):
                parts.append(event.data)
                if event.message_finished:
                    if isinstance(event, ws.TextMessage):
                        outcome.append(("text", "".join(part for part in parts if isinstance(part, str))))
                    else:
                        outcome.append(
                            ("binary", b"".join(bytes(p) for p in parts if not isinstance(p, str)))
                        )
                    parts = []
            elif isinstance(event, ws.Ping | ws.Pong):
                outcome.append((type(event).__name__.lower(), bytes(event.payload)))
            elif isinstance(event, ws.CloseConnection):
                # A peer's Close moves wsproto to REMOTE_CLOSING; a parse failure leaves it OPEN.
                if connection.state is ConnectionState.REMOTE_CLOSING:
                    outcome.append(("close", int(event.code), event.reason or ""))
                else:
                    outcome.append(("rejected", int(event.code)))
                return outcome
    return outcome


cuts = st.lists(st.integers(0, 4096), max_size=10)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=streams(), cuts=cuts)
def test_same_outcome_as_wsproto(data: bytes, cuts: list[int]) -> None:
    chunks = chunked(data, cuts)
    assert outcome_of_ours(chunks) == outcome_of_wsproto(chunks)


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_same_outcome_as_wsproto_with_a_fault(
    fault: st.SearchStrategy[list[bytes]], data: st.DataObject
) -> None:
    chunks = chunked(data.draw(streams(fault)), data.draw(cuts))
    assert outcome_of_ours(chunks) == outcome_of_wsproto(chunks)


def test_differential_harness_sees_rejections_and_closes() -> None:
    """Guard against a vacuous differential test: both kinds of terminal outcome are really compared."""
    for data, expected in [
        (raw_frame(Opcode.TEXT, b"\xff"), ("rejected", 1007)),
        (raw_frame(0x3), ("rejected", 1002)),
        (raw_frame(Opcode.CLOSE, close_payload(4000, b"x")), ("close", 4000, "x")),
    ]:
        assert outcome_of_ours([data]) == outcome_of_wsproto([data]) == [expected]


def test_every_close_code_same_as_wsproto() -> None:
    """Exhaustive over the codes that matter: 0-5000 and the top of the range."""
    for code in [*range(5001), 65535]:
        chunks = [raw_frame(Opcode.CLOSE, close_payload(code, b"reason"))]
        assert outcome_of_ours(chunks) == outcome_of_wsproto(chunks), code


def test_every_header_bit_combination_same_as_wsproto() -> None:
    """Exhaustive over FIN x RSV x opcode x MASK, each frame alone and each behind an open fragment."""
    for fin, rsv, opcode, key in itertools.product((True, False), range(8), range(16), (KEY, None)):
        frame = raw_frame(opcode, b"ab", fin=fin, rsv=rsv, key=key)
        for prefix in (b"", raw_frame(Opcode.TEXT, b"x", fin=False)):
            chunks = [prefix + frame + raw_frame(Opcode.PING, b"after")]
            assert outcome_of_ours(chunks) == outcome_of_wsproto(chunks), (fin, rsv, opcode, key, prefix)


@given(st.binary(max_size=2000), st.binary(min_size=4, max_size=4))
def test_compiled_and_integer_masks_agree(payload: bytes, key: bytes) -> None:
    """The server unmasks with websockets' compiled ``apply_mask`` where it is installed, and with the
    big-integer XOR where it is not: both must give the same bytes, and masking twice gives them back."""
    from fastport_core import frames

    assert frames._compiled_mask is not None, "the dev install has websockets' speedups"
    masked = frames._integer_mask(payload, key)
    assert frames._compiled_mask(payload, key) == masked
    assert frames._integer_mask(masked, key) == payload
    assert frames._integer_mask(bytearray(payload), bytearray(key)) == frames._compiled_mask(
        bytearray(payload), bytearray(key)
    )
