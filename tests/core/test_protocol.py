"""The JSON codec: strict parsing with the right error codes, and byte-exact encoding."""

from __future__ import annotations

import contextlib
import dataclasses

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastport_core.config import Limits
from fastport_core.errors import ErrorCode, RemoteProtocolError
from fastport_core.protocol import (
    CLIENT_PACKETS,
    SERVER_PACKETS,
    Ack,
    ErrorPacket,
    Init,
    InitResponse,
    MessagePacket,
    PacketParser,
    Publish,
    PublishResponse,
    Subscribe,
    SubscribeResponse,
    Unsubscribe,
    UnsubscribeResponse,
    encode,
    encode_error,
    encode_message,
    parse_client_packet,
    parse_server_packet,
)

names = st.text(min_size=1, max_size=40)
texts = st.text(max_size=60)
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
encodings = st.sampled_from(["text", "binary"])

client_frames = st.one_of(
    st.builds(Init, names, texts, st.none() | names),
    st.builds(Subscribe, names),
    st.builds(Unsubscribe, names),
    st.builds(Publish, names, texts, texts, ints, names, encodings),
    st.builds(Ack, names, names),
)
server_frames = st.one_of(
    st.builds(InitResponse, st.booleans(), st.none() | names, st.none() | texts, st.none() | texts),
    st.builds(SubscribeResponse, st.booleans(), names, st.none() | texts, st.none() | texts),
    st.builds(UnsubscribeResponse, st.booleans(), names, st.none() | texts, st.none() | texts),
    st.builds(
        PublishResponse, st.booleans(), names, st.integers(0, 10**6), st.none() | texts, st.none() | texts
    ),
    st.builds(MessagePacket, names, texts, texts, ints, names, encodings, st.integers(0, 1000)),
    st.builds(ErrorPacket, texts, texts),
)


@given(client_frames)
def test_client_frames_round_trip(frame: object) -> None:
    assert parse_client_packet(encode(frame)) == frame  # type: ignore[arg-type]


@given(client_frames)
def test_parsed_client_frames_are_frozen_and_hashable_like_constructed_ones(frame: object) -> None:
    parsed = parse_client_packet(encode(frame))  # type: ignore[arg-type]
    assert type(parsed) is type(frame)
    assert hash(parsed) == hash(frame)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(parsed, dataclasses.fields(parsed)[0].name, "changed")


@given(server_frames)
def test_server_frames_round_trip(frame: object) -> None:
    assert parse_server_packet(encode(frame)) == frame  # type: ignore[arg-type]


def test_wire_names_are_the_original_camel_case() -> None:
    wire = orjson.loads(encode(Publish("t", "d", "h", 5, "id-1")))
    assert wire == {
        "type": "publish",
        "topic": "t",
        "data": "d",
        "hash": "h",
        "timestamp": 5,
        "messageId": "id-1",
    }
    init = orjson.loads(encode(Init("s", "p")))
    assert init == {"type": "init", "sessionName": "s", "password": "p"}
    assert orjson.loads(encode(PublishResponse(True, "m", 0))) == {
        "type": "publish_response", "success": True, "messageId": "m", "deliveredTo": 0,
    }  # fmt: skip


def test_optional_fields_are_omitted_at_their_defaults() -> None:
    assert b"encoding" not in encode(Publish("t", "d", "h", 5, "m"))
    assert b'"encoding":"binary"' in encode(Publish("t", "d", "h", 5, "m", "binary"))
    assert b"retry" not in encode(MessagePacket("t", "d", "h", 5, "m"))
    assert b'"retry":2' in encode(MessagePacket("t", "d", "h", 5, "m", retry=2))


@given(names, texts, texts, ints, names, encodings, st.integers(0, 100))
def test_encode_message_is_byte_identical_to_encode(
    topic: str, data: str, hash_: str, ts: int, mid: str, enc: str, retry: int
) -> None:
    expected = encode(MessagePacket(topic, data, hash_, ts, mid, enc, retry))  # type: ignore[arg-type]
    assert encode_message(topic, data, hash_, ts, mid, enc, retry) == expected  # type: ignore[arg-type]


def test_error_frame_keeps_the_error_field_existing_clients_read() -> None:
    exc = RemoteProtocolError("bad", code=ErrorCode.UNKNOWN_TYPE)
    assert orjson.loads(encode_error(exc)) == {"type": "error", "error": "bad", "code": "unknown_type"}


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"not json", ErrorCode.INVALID_JSON),
        (b"[1, 2]", ErrorCode.INVALID_JSON),
        (b'"init"', ErrorCode.INVALID_JSON),
        (b"{}", ErrorCode.INVALID_FRAME),
        (b'{"type": 3}', ErrorCode.INVALID_FRAME),
        (b'{"type": "hello"}', ErrorCode.UNKNOWN_TYPE),
        (b'{"type": "subscribe"}', ErrorCode.INVALID_FRAME),
        (b'{"type": "subscribe", "topic": ""}', ErrorCode.INVALID_FRAME),
        (b'{"type": "subscribe", "topic": 7}', ErrorCode.INVALID_FRAME),
        (b'{"type": "init", "sessionName": "s", "password": true}', ErrorCode.INVALID_FRAME),
        (b'{"type":"publish","topic":"t","data":"d","hash":"h","timestamp":true,"messageId":"m"}',
         ErrorCode.INVALID_FRAME),
        (b'{"type":"publish","topic":"t","data":"d","hash":"h","timestamp":1.5,"messageId":"m"}',
         ErrorCode.INVALID_FRAME),
        (b'{"type":"publish","topic":"t","data":"d","hash":"h","timestamp":1,"messageId":"m","encoding":"x"}',
         ErrorCode.INVALID_FRAME),
        (b'{"type":"ack","topic":"t"}', ErrorCode.INVALID_FRAME),
        (b'{"type":"init_response","success":true}', ErrorCode.UNKNOWN_TYPE),
        # orjson reads an integer past 64 bits as a float: refused as a mistyped field.
        (b'{"type":"publish","topic":"t","data":"d","hash":"h","timestamp":99999999999999999999,"messageId":"m"}',
         ErrorCode.INVALID_FRAME),
    ],
)  # fmt: skip
def test_bad_client_frames_raise_with_the_code_to_answer(raw: bytes, code: ErrorCode) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_client_packet(raw)
    assert info.value.code is code
    assert info.value.close_code is None


def test_length_limits_are_enforced_with_too_long() -> None:
    parser = PacketParser(CLIENT_PACKETS, Limits(max_topic_length=4, max_message_id_length=3))
    assert parser.parse(b'{"type":"subscribe","topic":"abcd"}') == Subscribe("abcd")
    for raw in (b'{"type":"subscribe","topic":"abcde"}', b'{"type":"ack","topic":"t","messageId":"abcd"}'):
        with pytest.raises(RemoteProtocolError) as info:
            parser.parse(raw)
        assert info.value.code is ErrorCode.TOO_LONG


def test_null_optional_fields_are_absent() -> None:
    assert parse_client_packet(b'{"type":"init","sessionName":"s","password":"p","clientId":null}') == Init(
        "s", "p"
    )


def test_unknown_extra_fields_are_ignored_for_forward_compatibility() -> None:
    assert parse_client_packet(b'{"type":"subscribe","topic":"t","qos":1}') == Subscribe("t")


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_remote_protocol_error(raw: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_client_packet(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


@given(st.sampled_from(sorted(CLIENT_PACKETS)), st.dictionaries(st.sampled_from(
    ["topic", "data", "hash", "timestamp", "messageId", "sessionName", "password", "clientId", "encoding"]
), json_values))  # fmt: skip
def test_arbitrary_json_objects_only_ever_raise_remote_protocol_error(
    kind: str, fields: dict[str, object]
) -> None:
    try:
        raw = orjson.dumps({"type": kind, **fields})
    except TypeError:
        return  # integers outside 64 bits cannot be encoded; not a frame anyone can send
    try:
        frame = parse_client_packet(raw)
    except RemoteProtocolError:
        return
    assert type(frame) is CLIENT_PACKETS[kind].event


def test_every_frame_type_is_in_exactly_one_table() -> None:
    assert not set(CLIENT_PACKETS) & set(SERVER_PACKETS)
    assert set(CLIENT_PACKETS) == {"init", "subscribe", "unsubscribe", "publish", "ack"}
