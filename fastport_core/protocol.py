"""The JSON protocol: one frozen dataclass per packet type, strict parsing, byte-exact encoding.

Names: a *packet* is one protocol message, the JSON object a WebSocket text message carries, with a
``type`` field; *frame* is kept for WebSocket frames (:mod:`.frames`), and *message* for the ``message``
packet and what the application receives (:class:`~fastport_core.client_api.Message`). Field names on
the wire are the original fastPort's camelCase; the dataclasses use snake_case. Parsing validates
everything (JSON object, known type, required fields present and of the right type, lengths within
:class:`~fastport_core.config.Limits`) and raises :class:`~fastport_core.errors.RemoteProtocolError`
carrying the :class:`ErrorCode` to answer with, so a core never has to guess how to reply to bad input.

The tables :data:`CLIENT_PACKETS` and :data:`SERVER_PACKETS` are the single source of the protocol's field
lists: the parsers are driven by them and ``docs/protocol.md`` is generated from them.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from .config import Limits
from .errors import ErrorCode, RemoteProtocolError

__all__ = [
    "CLIENT_PACKETS",
    "SERVER_PACKETS",
    "Ack",
    "AckReceived",
    "ClientPacket",
    "Encoding",
    "ErrorPacket",
    "FieldSpec",
    "Init",
    "InitResponse",
    "MessagePacket",
    "PacketParser",
    "PacketSpec",
    "Publish",
    "PublishResponse",
    "ServerPacket",
    "Subscribe",
    "SubscribeResponse",
    "Unsubscribe",
    "UnsubscribeResponse",
    "encode",
    "encode_error",
    "encode_message",
    "parse_client_packet",
    "parse_server_packet",
]

Encoding = Literal["text", "binary"]

_DEFAULT_LIMITS: Final = Limits()


# --------------------------------------------------------------------------------------------------------
# Events. Client → server.


@dataclass(frozen=True, slots=True)
class Init:
    """Authenticate this connection into one session, for the connection's whole life."""

    session_name: str
    password: str | None = None
    """The session password; or ``token`` instead (exactly one of the two)."""
    client_id: str | None = None
    """Identifies a subscriber across reconnections so its un-ACKed deliveries can resume (optional)."""
    persistent: bool = False
    """With ``client_id``: keep the subscriber across a clean close too (until it expires), not only
    across a lost connection."""
    token: str | None = None
    """A scoped JWT minted with the session's token key, instead of the password (DESIGN §10)."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    topic: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topic: str


@dataclass(frozen=True, slots=True)
class Publish:
    """A message for every other subscriber of ``topic`` in the sender's session.

    ``data`` and ``hash`` are opaque to the server (ciphertext and integrity tag); ``encoding`` is
    ``"binary"`` for a bytes payload and ``"text"`` otherwise (the wire omits it for text).
    """

    topic: str
    data: str
    hash: str
    timestamp: int
    message_id: str
    encoding: Encoding = "text"


@dataclass(frozen=True, slots=True)
class Ack:
    """The subscriber has the message: stop re-sending it to this subscriber (only)."""

    topic: str
    message_id: str


ClientPacket = Init | Subscribe | Unsubscribe | Publish | Ack


# --------------------------------------------------------------------------------------------------------
# Events. Server → client.


@dataclass(frozen=True, slots=True)
class InitResponse:
    success: bool
    session_name: str | None = None
    error: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class SubscribeResponse:
    success: bool
    topic: str
    error: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class UnsubscribeResponse:
    success: bool
    topic: str
    error: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class PublishResponse:
    """The server took responsibility for ``message_id`` (or refused it, with ``error``/``code``)."""

    success: bool
    message_id: str
    delivered_to: int = 0
    error: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class MessagePacket:
    """A delivery. ``retry`` counts re-sends (absent, i.e. 0, on the first send)."""

    topic: str
    data: str
    hash: str
    timestamp: int
    message_id: str
    encoding: Encoding = "text"
    retry: int = 0


@dataclass(frozen=True, slots=True)
class ErrorPacket:
    """A packet that could not be honoured. ``error`` is kept for existing clients, which read only it."""

    error: str
    code: str


@dataclass(frozen=True, slots=True)
class AckReceived:
    """To the publisher: the server is done with ``message_id`` (every delivery ACKed or given up).

    The original fastPort Dart client re-sends a publish until it gets this packet.
    """

    message_id: str
    topic: str


ServerPacket = (
    InitResponse
    | SubscribeResponse
    | UnsubscribeResponse
    | PublishResponse
    | MessagePacket
    | ErrorPacket
    | AckReceived
)


# --------------------------------------------------------------------------------------------------------
# The field tables.


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One wire field: its JSON name, the event attribute, its JSON type and whether it must be present."""

    wire: str
    attr: str
    kind: type
    required: bool = True
    limit: str | None = None
    """Name of the :class:`Limits` attribute bounding this string's length, if any."""
    nonempty: bool = False


@dataclass(frozen=True, slots=True)
class PacketSpec:
    name: str
    event: type
    fields: tuple[FieldSpec, ...]
    doc: str


def _f(wire: str, attr: str, kind: type, *, required: bool = True, limit: str | None = None,
       nonempty: bool = False) -> FieldSpec:  # fmt: skip
    return FieldSpec(wire, attr, kind, required, limit, nonempty)


_TOPIC = _f("topic", "topic", str, limit="max_topic_length", nonempty=True)
_MESSAGE_ID = _f("messageId", "message_id", str, limit="max_message_id_length", nonempty=True)

CLIENT_PACKETS: Final[Mapping[str, PacketSpec]] = {
    spec.name: spec
    for spec in (
        PacketSpec("init", Init, (
            _f("sessionName", "session_name", str, limit="max_session_name_length", nonempty=True),
            _f("password", "password", str, required=False, limit="max_password_length"),
            _f("clientId", "client_id", str, required=False, limit="max_message_id_length", nonempty=True),
            _f("persistent", "persistent", bool, required=False),
            _f("token", "token", str, required=False, limit="max_token_length", nonempty=True),
        ), "Authenticate into a session with `password` or `token`. Answer: `init_response`."),
        PacketSpec("subscribe", Subscribe, (_TOPIC,),
                  "Receive a topic or each topic a filter (`+`, `#`) matches. Answer: `subscribe_response`."),
        PacketSpec("unsubscribe", Unsubscribe, (_TOPIC,),
                  "Stop a topic or filter, spelled as subscribed. Answer: `unsubscribe_response`."),
        PacketSpec("publish", Publish, (
            _TOPIC,
            _f("data", "data", str),
            _f("hash", "hash", str, limit="max_hash_length"),
            _f("timestamp", "timestamp", int),
            _MESSAGE_ID,
            _f("encoding", "encoding", str, required=False),
        ), "Send to every other subscriber of the topic in the session. Answer: `publish_response`."),
        PacketSpec("ack", Ack, (_TOPIC, _MESSAGE_ID), "Confirm a `message`: stops its re-sends. No answer."),
    )
}  # fmt: skip

_MESSAGE_ID_OUT = _f("messageId", "message_id", str)

SERVER_PACKETS: Final[Mapping[str, PacketSpec]] = {
    spec.name: spec
    for spec in (
        PacketSpec("init_response", InitResponse, (
            _f("success", "success", bool),
            _f("sessionName", "session_name", str, required=False),
            _f("error", "error", str, required=False),
            _f("code", "code", str, required=False),
        ), "Answer to `init`; on failure `error` and `code` say why."),
        PacketSpec("subscribe_response", SubscribeResponse, (
            _f("success", "success", bool), _f("topic", "topic", str),
            _f("error", "error", str, required=False), _f("code", "code", str, required=False),
        ), "Answer to `subscribe`."),
        PacketSpec("unsubscribe_response", UnsubscribeResponse, (
            _f("success", "success", bool), _f("topic", "topic", str),
            _f("error", "error", str, required=False), _f("code", "code", str, required=False),
        ), "Answer to `unsubscribe`."),
        PacketSpec("publish_response", PublishResponse, (
            _f("success", "success", bool), _f("messageId", "message_id", str),
            _f("deliveredTo", "delivered_to", int, required=False),
            _f("error", "error", str, required=False), _f("code", "code", str, required=False),
        ), "The server took the message; `deliveredTo` counts its subscribers."),
        PacketSpec("message", MessagePacket, (
            _f("topic", "topic", str), _f("data", "data", str), _f("hash", "hash", str),
            _f("timestamp", "timestamp", int), _f("messageId", "message_id", str),
            _f("encoding", "encoding", str, required=False), _f("retry", "retry", int, required=False),
        ), "A delivery to a subscriber; answer with `ack`. `retry` counts re-sends."),
        PacketSpec("error", ErrorPacket, (_f("error", "error", str), _f("code", "code", str)),
                  "A packet could not be honoured."),
        PacketSpec("ack_received", AckReceived, (_MESSAGE_ID_OUT, _f("topic", "topic", str)),
                  "To the publisher, once every delivery of its message is settled (ACKed or given up; "
                  "at once if it went to no one). `ServerConfig.send_ack_received` turns it off."),
    )
}  # fmt: skip

_WIRE_NAMES: Final[Mapping[type, tuple[str, tuple[FieldSpec, ...]]]] = {
    spec.event: (spec.name, spec.fields) for spec in (*CLIENT_PACKETS.values(), *SERVER_PACKETS.values())
}


# --------------------------------------------------------------------------------------------------------
# Parsing.


def _invalid(message: str, code: ErrorCode = ErrorCode.INVALID_FRAME) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=code)


_JSON_TYPE_NAMES: Final[Mapping[type, str]] = {str: "a string", int: "an integer", bool: "a boolean"}


def _field_error(spec: PacketSpec, fs: FieldSpec, value: Any, max_length: int) -> RemoteProtocolError:
    """Why ``value`` is not acceptable for ``fs`` (the slow path: only reached for bad input)."""
    if value is None:
        return _invalid(f"{spec.name}: missing field {fs.wire!r}")
    # An exact type test: bool is an int subclass, and neither may stand for the other on the wire.
    if type(value) is not fs.kind:
        return _invalid(f"{spec.name}: field {fs.wire!r} must be {_JSON_TYPE_NAMES[fs.kind]}")
    if fs.nonempty and not value:
        return _invalid(f"{spec.name}: field {fs.wire!r} must not be empty")
    if fs.wire == "encoding":
        return _invalid(f'{spec.name}: field \'encoding\' must be "text" or "binary"')
    message = f"{spec.name}: field {fs.wire!r} is longer than {max_length} characters"
    return _invalid(message, ErrorCode.TOO_LONG)


def _compile_builder(spec: PacketSpec, limits: Limits) -> Callable[[dict[str, Any]], Any]:
    """Generate the validating constructor of one packet type from its field table.

    Parsing runs once per received packet, so instead of interpreting the table field by field, each packet
    type gets a straight-line function (the technique ``dataclasses`` itself uses for ``__init__``): one
    dict lookup and one combined check per field. The event is then built without its ``__init__``: a
    frozen dataclass's ``__init__`` assigns through ``object.__setattr__``, which costs ~1.3 µs for a
    ``Publish``; ``object.__new__`` plus each slot's own descriptor ``__set__`` builds the identical
    (still frozen) object in ~0.5 µs. The events have no ``__post_init__`` (checked here), so nothing is
    skipped. The slow path, working out *which* rule a bad value broke, is :func:`_field_error`.
    """
    event_fields = dataclasses.fields(spec.event)
    if [f.name for f in event_fields] != [fs.attr for fs in spec.fields]:
        raise AssertionError(f"{spec.name}: the wire table must list the event's fields in order")
    if hasattr(spec.event, "__post_init__"):
        raise AssertionError(f"{spec.name}: the builder does not run __post_init__")
    namespace: dict[str, Any] = {
        "_event": spec.event, "_spec": spec, "_field_error": _field_error, "_new": object.__new__,
    }  # fmt: skip
    lines = ["def build(obj):"]
    for i, (fs, ef) in enumerate(zip(spec.fields, event_fields, strict=True)):
        max_length = getattr(limits, fs.limit) if fs.limit else -1
        namespace[f"_fs{i}"] = fs
        slot = spec.event.__dict__[fs.attr]
        if not isinstance(slot, types.MemberDescriptorType):
            raise AssertionError(f"{spec.name}: the event must be a slotted dataclass")
        namespace[f"_set{i}"] = slot.__set__
        namespace[f"_default{i}"] = None if ef.default is dataclasses.MISSING else ef.default
        bad = [f"type(v{i}) is not {fs.kind.__name__}"]
        if fs.nonempty:
            bad.append(f"not v{i}")
        if max_length >= 0:
            bad.append(f"len(v{i}) > {max_length}")
        if fs.wire == "encoding":
            bad.append(f"(v{i} != 'text' and v{i} != 'binary')")
        lines.append(f"    v{i} = obj.get({fs.wire!r})")
        check = f"if {' or '.join(bad)}: raise _field_error(_spec, _fs{i}, v{i}, {max_length})"
        if fs.required:
            lines.append(f"    {check}")
        else:
            lines += [f"    if v{i} is None: v{i} = _default{i}", f"    elif {check[3:]}"]
    lines.append("    event = _new(_event)")
    lines += [f"    _set{i}(event, v{i})" for i in range(len(spec.fields))]
    lines.append("    return event")
    exec("\n".join(lines), namespace)
    builder: Callable[[dict[str, Any]], Any] = namespace["build"]
    return builder


class PacketParser:
    """Parses one direction's packets against one :class:`Limits`.

    Each packet type's validating constructor is generated once, here, from the field tables and the
    limits (see :func:`_compile_builder`); cores build one parser and keep it.
    """

    __slots__ = ("_builders",)

    def __init__(self, packets: Mapping[str, PacketSpec], limits: Limits) -> None:
        self._builders = {name: _compile_builder(spec, limits) for name, spec in packets.items()}

    def parse(self, text: str | bytes) -> Any:
        """Parse one packet. Raises :class:`RemoteProtocolError` carrying the code to answer with."""
        try:
            obj: Any = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise _invalid(f"frame is not valid JSON: {exc}", ErrorCode.INVALID_JSON) from None
        if type(obj) is not dict:
            raise _invalid(f"frame must be a JSON object, got {type(obj).__name__}", ErrorCode.INVALID_JSON)
        frame_type = obj.get("type")
        if type(frame_type) is not str:
            raise _invalid("frame has no string 'type' field")
        builder = self._builders.get(frame_type)
        if builder is None:
            raise _invalid(f"unknown frame type {frame_type[:64]!r}", ErrorCode.UNKNOWN_TYPE)
        return builder(obj)


_DEFAULT_CLIENT_PARSER: Final = PacketParser(CLIENT_PACKETS, _DEFAULT_LIMITS)
_DEFAULT_SERVER_PARSER: Final = PacketParser(SERVER_PACKETS, _DEFAULT_LIMITS)


def parse_client_packet(text: str | bytes, limits: Limits | None = None) -> ClientPacket:
    """Parse one client → server packet (cores keep a :class:`PacketParser` instead of calling this)."""
    parser = _DEFAULT_CLIENT_PARSER if limits is None else PacketParser(CLIENT_PACKETS, limits)
    packet: ClientPacket = parser.parse(text)
    return packet


def parse_server_packet(text: str | bytes, limits: Limits | None = None) -> ServerPacket:
    """Parse one server → client packet."""
    parser = _DEFAULT_SERVER_PARSER if limits is None else PacketParser(SERVER_PACKETS, limits)
    packet: ServerPacket = parser.parse(text)
    return packet


# --------------------------------------------------------------------------------------------------------
# Encoding.


def _omitted(fs: FieldSpec, value: object) -> bool:
    """Optional fields at their default are left off the wire, as the original protocol does."""
    if fs.required:
        return False
    return (
        value is None
        or (fs.attr == "encoding" and value == "text")
        or (fs.attr == "retry" and value == 0)
        or (fs.attr == "persistent" and value is False)
    )


def encode(packet: ClientPacket | ServerPacket) -> bytes:
    """Serialise any event to its JSON text-packet payload (UTF-8 bytes), ``type`` first."""
    frame_type, specs = _WIRE_NAMES[type(packet)]
    obj: dict[str, Any] = {"type": frame_type}
    for fs in specs:
        value = getattr(packet, fs.attr)
        if not _omitted(fs, value):
            obj[fs.wire] = value
    return orjson.dumps(obj)


def encode_message(  # noqa: PLR0917 - positional on purpose: this runs once per publish
    topic: str, data: str, hash: str, timestamp: int, message_id: str, encoding: Encoding, retry: int = 0
) -> bytes:
    """The server's hot path: a ``message`` payload straight from a publish's fields.

    Byte-identical to ``encode(MessagePacket(...))`` (a test pins that), without building the event first.
    """
    obj: dict[str, Any] = {
        "type": "message", "topic": topic, "data": data, "hash": hash, "timestamp": timestamp,
        "messageId": message_id,
    }  # fmt: skip
    if encoding != "text":
        obj["encoding"] = encoding
    if retry:
        obj["retry"] = retry
    return orjson.dumps(obj)


def encode_error(exc: RemoteProtocolError) -> bytes:
    """The ``error`` frame that answers a frame the peer got wrong."""
    return encode(ErrorPacket(exc.message, exc.code))
