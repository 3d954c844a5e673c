"""Tests of ``fastport_core.crypto``: known answers from an independent tool, properties, and limits.

The vectors in ``data/crypto_vectors.json`` come from ``data/make_crypto_vectors.mjs`` (Node.js crypto), so
a mistake in our reading of DESIGN.md §4 cannot hide behind a test that shares the mistake. The property
tests then cover what vectors cannot: round trips over arbitrary text, tampering with every bound field,
and the rule that ``open`` raises :class:`IntegrityError` and nothing else whatever the peer sends.
The legacy suite's weaknesses are pinned as tests too, so that ``docs/security.md`` cannot drift from them.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

import fastport_core.crypto as crypto
from fastport_core.crypto import (
    AuthenticatedSuite,
    LegacySuite,
    Sealed,
    Suite,
    SuiteName,
    generate_key,
    make_suite,
    parse_key,
)
from fastport_core.errors import IntegrityError, InvalidKeyError, LocalProtocolError

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "crypto_vectors.json").read_text(encoding="utf-8")
)
SUITE_NAMES: tuple[SuiteName, ...] = ("legacy", "authenticated")

KEY = base64.b64encode(bytes(range(100, 132))).decode()
OTHER_KEY = base64.b64encode(bytes(range(200, 232))).decode()
SUITES: dict[str, Suite] = {name: make_suite(name, KEY) for name in SUITE_NAMES}
AUTH = AuthenticatedSuite(KEY)
LEGACY = LegacySuite(KEY)

# Derandomised so that a run is reproducible; no deadline because CI machines stall.
PROPERTY = settings(derandomize=True, deadline=None, max_examples=150)

ENVELOPE: dict[str, Any] = {
    "session": "demo",
    "topic": "sensors/temp",
    "message_id": "msg-1",
    "timestamp": 1_732_560_000_000,
}

names = st.text(max_size=40)
timestamps = st.integers(min_value=-(2**63), max_value=2**64)
payloads = st.one_of(st.text(max_size=300), st.binary(max_size=300))


def _vector_cases(suite: str) -> list[Any]:
    return [pytest.param(case, id=case["name"]) for case in VECTORS[suite]]


def _vector_payload(case: dict[str, Any]) -> str | bytes:
    if case["encoding"] == "binary":
        return bytes.fromhex(case["payload_hex"])
    payload: str = case["payload"]
    return payload


def _envelope(case: dict[str, Any]) -> dict[str, Any]:
    return {field: case[field] for field in ("session", "topic", "message_id", "timestamp")}


def _open_fields(sealed: Sealed) -> dict[str, Any]:
    return {"data": sealed.data, "hash": sealed.hash, "encoding": sealed.encoding}


def _valid_tag(suite: AuthenticatedSuite, *, data: str, encoding: str, **envelope: Any) -> str:
    """A correct MAC over arbitrary (even malformed) ``data``: what only a key holder could produce.

    It lets the tests reach the code behind the MAC check (base64, lengths, padding, UTF-8).
    """
    return suite._tag(crypto._mac_input(data=data, encoding=encoding, **envelope))


def _sha256_hex(data: str) -> str:
    return hashlib.sha256(data.encode()).hexdigest()


def _data_of(iv: bytes, ciphertext: bytes) -> str:
    return base64.b64encode(iv).decode() + ":" + base64.b64encode(ciphertext).decode()


def _split(data: str) -> tuple[bytes, bytes]:
    iv_text, ciphertext_text = data.split(":")
    return base64.b64decode(iv_text), base64.b64decode(ciphertext_text)


# ------------------------------------------------------------------------------------ known answers


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_vectors_cover_the_interesting_shapes(suite_name: str) -> None:
    """Guard the vector file itself: it must keep exercising the cases the definition is subtle about."""
    cases = VECTORS[suite_name]
    payloads = [_vector_payload(case) for case in cases]
    text_lengths = [len(p.encode()) for p in payloads if isinstance(p, str)]
    assert any(not c["session"].isascii() and not c["topic"].isascii() for c in cases)
    assert any(not c["message_id"].isascii() for c in cases)
    assert 0 in text_lengths
    assert any(n > 32 for n in text_lengths)  # several blocks
    assert any(n > 0 and n % 16 == 0 for n in text_lengths)  # a whole block of padding
    assert any(isinstance(p, bytes) for p in payloads)
    assert len({c["iv_hex"] for c in cases}) > 1 and len({c["key"] for c in cases}) > 1
    assert len(cases) >= 6


@pytest.mark.parametrize("case", _vector_cases("legacy"))
def test_legacy_seal_matches_vector(case: dict[str, Any]) -> None:
    sealed = LegacySuite(case["key"]).seal(
        **_envelope(case), payload=_vector_payload(case), iv=bytes.fromhex(case["iv_hex"])
    )
    assert sealed == Sealed(data=case["data"], hash=case["hash"], encoding=case["encoding"])


@pytest.mark.parametrize("case", _vector_cases("legacy"))
def test_legacy_open_matches_vector(case: dict[str, Any]) -> None:
    opened = LegacySuite(case["key"]).open(
        **_envelope(case), data=case["data"], hash=case["hash"], encoding=case["encoding"]
    )
    assert opened == _vector_payload(case)
    assert type(opened) is type(_vector_payload(case))


@pytest.mark.parametrize("case", _vector_cases("authenticated"))
def test_authenticated_derived_keys_match_vector(case: dict[str, Any]) -> None:
    enc_key, mac_key = crypto._derive_keys(parse_key(case["key"]))
    assert enc_key.hex() == case["enc_key_hex"]
    assert mac_key.hex() == case["mac_key_hex"]


@pytest.mark.parametrize("case", _vector_cases("authenticated"))
def test_authenticated_mac_input_matches_vector(case: dict[str, Any]) -> None:
    message = crypto._mac_input(**_envelope(case), encoding=case["encoding"], data=case["data"])
    assert message.hex() == case["mac_input_hex"]


@pytest.mark.parametrize("case", _vector_cases("authenticated"))
def test_authenticated_seal_matches_vector(case: dict[str, Any]) -> None:
    sealed = AuthenticatedSuite(case["key"]).seal(
        **_envelope(case), payload=_vector_payload(case), iv=bytes.fromhex(case["iv_hex"])
    )
    assert sealed == Sealed(data=case["data"], hash=case["hash"], encoding=case["encoding"])


@pytest.mark.parametrize("case", _vector_cases("authenticated"))
def test_authenticated_open_matches_vector(case: dict[str, Any]) -> None:
    opened = AuthenticatedSuite(case["key"]).open(
        **_envelope(case), data=case["data"], hash=case["hash"], encoding=case["encoding"]
    )
    assert opened == _vector_payload(case)
    assert type(opened) is type(_vector_payload(case))


# ------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
@PROPERTY
@given(session=names, topic=names, message_id=names, timestamp=timestamps, payload=payloads)
def test_round_trip(
    suite_name: str, session: str, topic: str, message_id: str, timestamp: int, payload: str | bytes
) -> None:
    suite = SUITES[suite_name]
    sealed = suite.seal(
        session=session, topic=topic, message_id=message_id, timestamp=timestamp, payload=payload
    )
    assert sealed.encoding == ("binary" if isinstance(payload, bytes) else "text")
    assert sealed.data.isascii() and sealed.hash.isascii()
    opened = suite.open(
        session=session, topic=topic, message_id=message_id, timestamp=timestamp, **_open_fields(sealed)
    )
    assert opened == payload
    assert type(opened) is type(payload)


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_every_seal_uses_a_fresh_iv(suite_name: str) -> None:
    suite = SUITES[suite_name]
    sealed = [suite.seal(**ENVELOPE, payload="same plaintext") for _ in range(20)]
    assert len({s.data for s in sealed}) == 20
    assert len({_split(s.data)[0] for s in sealed}) == 20
    assert len({s.hash for s in sealed}) == 20
    assert all(suite.open(**ENVELOPE, **_open_fields(s)) == "same plaintext" for s in sealed)


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_bytes_like_payloads_are_binary(suite_name: str) -> None:
    suite = SUITES[suite_name]
    for payload in (bytearray(b"\x00\xff"), memoryview(b"\x00\xff")):
        sealed = suite.seal(**ENVELOPE, payload=payload)  # type: ignore[arg-type]
        assert sealed.encoding == "binary"
        assert suite.open(**ENVELOPE, **_open_fields(sealed)) == b"\x00\xff"


def test_suites_derive_their_keys_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = crypto._derive_keys

    def counting(key: bytes) -> tuple[bytes, bytes]:
        calls.append(key)
        return real(key)

    monkeypatch.setattr(crypto, "_derive_keys", counting)
    suite = AuthenticatedSuite(KEY)
    for _ in range(5):
        sealed = suite.seal(**ENVELOPE, payload="x")
        suite.open(**ENVELOPE, **_open_fields(sealed))
    assert len(calls) == 1


# ------------------------------------------------------------------- authenticated: tampering fails


_SEALED_TEXT = AUTH.seal(**ENVELOPE, payload="the payload, over a couple of AES blocks long")
_SEALED_BINARY = AUTH.seal(**ENVELOPE, payload=b"\x00binary\xff")


def _mutate_string(draw: st.DrawFn, value: str) -> str:
    """Change exactly one character of ``value`` (or, for an empty value, add one)."""
    if not value:
        return draw(st.characters())
    index = draw(st.integers(0, len(value) - 1))
    replacement = draw(st.characters().filter(lambda c: c != value[index]))
    return value[:index] + replacement + value[index + 1 :]


@st.composite
def _tampered(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    sealed = draw(st.sampled_from([_SEALED_TEXT, _SEALED_BINARY]))
    fields: dict[str, Any] = {**ENVELOPE, **_open_fields(sealed)}
    target = draw(
        st.sampled_from(["data", "hash", "session", "topic", "message_id", "timestamp", "encoding"])
    )
    if target == "timestamp":
        fields[target] = draw(st.integers().filter(lambda t: t != ENVELOPE["timestamp"]))
    elif target == "encoding":
        fields[target] = "text" if sealed.encoding == "binary" else "binary"
    elif target in ("session", "topic", "message_id") and draw(st.booleans()):
        fields[target] = draw(names.filter(lambda s: s != fields[target]))
    else:
        fields[target] = _mutate_string(draw, fields[target])
    return target, fields


@PROPERTY
@given(_tampered())
def test_authenticated_rejects_any_single_change(tampered: tuple[str, dict[str, Any]]) -> None:
    _target, fields = tampered
    with pytest.raises(IntegrityError):
        AUTH.open(**fields)


def test_authenticated_rejects_fields_shifting_between_each_other() -> None:
    """Length prefixes: moving a character from one field to the next must change the MAC input."""
    sealed = AUTH.seal(session="ab", topic="c", message_id="d", timestamp=1, payload="x")
    for session, topic, message_id in (("a", "bc", "d"), ("ab", "", "cd"), ("abc", "", "d")):
        with pytest.raises(IntegrityError):
            AUTH.open(
                session=session, topic=topic, message_id=message_id, timestamp=1, **_open_fields(sealed)
            )


def test_authenticated_rejects_swapped_topic_and_id() -> None:
    sealed = AUTH.seal(session="s", topic="a", message_id="b", timestamp=1, payload="x")
    with pytest.raises(IntegrityError):
        AUTH.open(session="s", topic="b", message_id="a", timestamp=1, **_open_fields(sealed))


def test_authenticated_rejects_a_wrong_key() -> None:
    sealed = AUTH.seal(**ENVELOPE, payload="secret")
    with pytest.raises(IntegrityError, match="authentication failed"):
        AuthenticatedSuite(OTHER_KEY).open(**ENVELOPE, **_open_fields(sealed))


def test_authenticated_refuses_the_legacy_forgery() -> None:
    """The IV bit-flip that forges a legacy message (see below) is caught by the MAC, re-hashed or not."""
    sealed = AUTH.seal(**ENVELOPE, payload="pay 100 EUR")
    iv, ciphertext = _split(sealed.data)
    forged = _data_of(iv[:4] + bytes([iv[4] ^ ord("1") ^ ord("9")]) + iv[5:], ciphertext)
    for tag in (sealed.hash, "v1:" + _sha256_hex(forged), _sha256_hex(forged)):
        with pytest.raises(IntegrityError):
            AUTH.open(**ENVELOPE, data=forged, hash=tag, encoding="text")


# ---------------------------------------------------------------------- malformed input: IntegrityError


_IV_B64 = base64.b64encode(bytes(16)).decode()
_BLOCK_B64 = base64.b64encode(bytes(16)).decode()
MALFORMED_DATA = {
    "empty": "",
    "no colon": _IV_B64 + _BLOCK_B64,
    "two colons": f"{_IV_B64}:{_BLOCK_B64}:{_BLOCK_B64}",
    "bad base64 iv": f"!!not base64!!:{_BLOCK_B64}",
    "bad base64 ciphertext": f"{_IV_B64}:{_BLOCK_B64[:-2]}",
    "non-ascii": f"{_IV_B64}:é{_BLOCK_B64}",
    "whitespace inside": f"{_IV_B64}:{_BLOCK_B64[:4]} {_BLOCK_B64[4:]}",
    "iv of 15 bytes": f"{base64.b64encode(bytes(15)).decode()}:{_BLOCK_B64}",
    "iv of 17 bytes": f"{base64.b64encode(bytes(17)).decode()}:{_BLOCK_B64}",
    "empty iv": f":{_BLOCK_B64}",
    "empty ciphertext": f"{_IV_B64}:",
    "ciphertext of 15 bytes": f"{_IV_B64}:{base64.b64encode(bytes(15)).decode()}",
    "ciphertext of 33 bytes": f"{_IV_B64}:{base64.b64encode(bytes(33)).decode()}",
}


@pytest.mark.parametrize("data", MALFORMED_DATA.values(), ids=MALFORMED_DATA.keys())
@pytest.mark.parametrize("encoding", ["text", "binary"])
def test_malformed_data_under_a_valid_tag_is_an_integrity_error(
    data: str, encoding: Literal["text", "binary"]
) -> None:
    """Only a key holder could send these to an authenticated receiver, but the parser must still hold."""
    tag = _valid_tag(AUTH, data=data, encoding=encoding, **ENVELOPE)
    with pytest.raises(IntegrityError):
        AUTH.open(**ENVELOPE, data=data, hash=tag, encoding=encoding)


@pytest.mark.parametrize("data", MALFORMED_DATA.values(), ids=MALFORMED_DATA.keys())
@pytest.mark.parametrize("encoding", ["text", "binary"])
def test_malformed_data_under_a_valid_legacy_hash_is_an_integrity_error(
    data: str, encoding: Literal["text", "binary"]
) -> None:
    with pytest.raises(IntegrityError):
        LEGACY.open(**ENVELOPE, data=data, hash=_sha256_hex(data), encoding=encoding)


def _bad_padding_data(key: bytes) -> str:
    """One block whose plaintext ends in 0x00, which no PKCS#7 padding does."""
    iv = bytes(range(16))
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return _data_of(iv, encryptor.update(b"fifteen bytes!!\x00") + encryptor.finalize())


@pytest.mark.parametrize("encoding", ["text", "binary"])
def test_bad_padding_is_an_integrity_error(encoding: Literal["text", "binary"]) -> None:
    legacy_data = _bad_padding_data(parse_key(KEY))
    with pytest.raises(IntegrityError, match="padding"):
        LEGACY.open(**ENVELOPE, data=legacy_data, hash=_sha256_hex(legacy_data), encoding=encoding)
    enc_key, _ = crypto._derive_keys(parse_key(KEY))
    auth_data = _bad_padding_data(enc_key)
    tag = _valid_tag(AUTH, data=auth_data, encoding=encoding, **ENVELOPE)
    with pytest.raises(IntegrityError, match="padding"):
        AUTH.open(**ENVELOPE, data=auth_data, hash=tag, encoding=encoding)


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_invalid_utf8_text_is_an_integrity_error(suite_name: str) -> None:
    suite = SUITES[suite_name]
    sealed = suite.seal(**ENVELOPE, payload=b"\xff\xfe not utf-8")
    # A key holder sealed bytes but labelled them text (the MAC covers the label, so re-tag it).
    tag = (
        _valid_tag(AUTH, data=sealed.data, encoding="text", **ENVELOPE)
        if suite_name == "authenticated"
        else sealed.hash
    )
    with pytest.raises(IntegrityError, match="UTF-8"):
        suite.open(**ENVELOPE, data=sealed.data, hash=tag, encoding="text")


BAD_ARGUMENTS: dict[str, dict[str, Any]] = {
    "timestamp as str": {"timestamp": "1732560000000"},
    "timestamp as float": {"timestamp": 1.5},
    "timestamp as bool": {"timestamp": True},
    "timestamp as None": {"timestamp": None},
    "unknown encoding": {"encoding": "base64"},
    "encoding None": {"encoding": None},
    "data None": {"data": None},
    "data bytes": {"data": b"AAAA:AAAA"},
    "hash None": {"hash": None},
    "hash bytes": {"hash": b"v1:00"},
    "topic None": {"topic": None},
    "session int": {"session": 3},
    "message id list": {"message_id": ["a"]},
    "lone surrogate data": {"data": "\udc00"},
    "lone surrogate hash": {"hash": "v1:\ud800"},
    "non-ascii hash": {"hash": "v1:é"},
    "empty hash": {"hash": ""},
}


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
@pytest.mark.parametrize("change", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_mistyped_open_arguments_are_integrity_errors(suite_name: str, change: dict[str, Any]) -> None:
    """Frames come from JSON the peer controls; no field value may escape as TypeError & co."""
    suite = SUITES[suite_name]
    fields = {**ENVELOPE, **_open_fields(suite.seal(**ENVELOPE, payload="x")), **change}
    with pytest.raises(IntegrityError):
        suite.open(**fields)


@pytest.mark.parametrize("field", ["session", "topic", "message_id"])
def test_authenticated_lone_surrogates_in_names_are_integrity_errors(field: str) -> None:
    """Stdlib json decodes "\\ud800" to a lone surrogate, which cannot be UTF-8 encoded for the MAC.

    (The legacy suite ignores these fields altogether.)
    """
    fields = {**ENVELOPE, **_open_fields(AUTH.seal(**ENVELOPE, payload="x")), field: "a\ud800b"}
    with pytest.raises(IntegrityError):
        AUTH.open(**fields)


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
@PROPERTY
@given(data=st.text(max_size=80), hash=st.text(max_size=80), encoding=st.sampled_from(["text", "binary"]))
def test_arbitrary_input_only_ever_raises_integrity_error(
    suite_name: str, data: str, hash: str, encoding: Literal["text", "binary"]
) -> None:
    suite = SUITES[suite_name]
    with pytest.raises(IntegrityError):
        suite.open(**ENVELOPE, data=data, hash=hash, encoding=encoding)


@PROPERTY
@given(
    iv=st.binary(min_size=16, max_size=16),
    ciphertext=st.binary(min_size=16, max_size=64).map(lambda b: b[: len(b) // 16 * 16]),
    encoding=st.sampled_from(["text", "binary"]),
    raw=st.booleans(),
    text=st.text(max_size=60),
)
def test_well_formed_garbage_under_valid_tags_opens_or_raises_integrity_error(
    iv: bytes, ciphertext: bytes, encoding: Literal["text", "binary"], raw: bool, text: str
) -> None:
    """Past the hash/MAC check, random ciphertext reaches decryption: the only outcomes allowed are a
    payload (random padding that happens to be valid) or IntegrityError."""
    data = _data_of(iv, ciphertext) if raw else text
    legacy_hash = _sha256_hex(data)
    auth_tag = _valid_tag(AUTH, data=data, encoding=encoding, **ENVELOPE)
    for suite, tag in ((LEGACY, legacy_hash), (AUTH, auth_tag)):
        try:
            opened = suite.open(**ENVELOPE, data=data, hash=tag, encoding=encoding)
        except IntegrityError:
            continue
        assert isinstance(opened, bytes if encoding == "binary" else str)


# ----------------------------------------------------------------------- suite mix-ups say so clearly


def test_legacy_message_to_an_authenticated_receiver_names_the_legacy_suite() -> None:
    sealed = LEGACY.seal(**ENVELOPE, payload="hi")
    with pytest.raises(IntegrityError, match="'legacy' suite"):
        AUTH.open(**ENVELOPE, **_open_fields(sealed))


def test_authenticated_message_to_a_legacy_receiver_names_the_authenticated_suite() -> None:
    sealed = AUTH.seal(**ENVELOPE, payload="hi")
    with pytest.raises(IntegrityError, match="'authenticated' suite"):
        LEGACY.open(**ENVELOPE, **_open_fields(sealed))


def test_a_future_tag_version_is_named() -> None:
    with pytest.raises(IntegrityError, match="'v2:' tag is from a newer fastport"):
        AUTH.open(**ENVELOPE, data="a:b", hash="v2:" + "0" * 64, encoding="text")


# ------------------------------------------------------------------ legacy: the documented limitations


def test_legacy_limit_anyone_can_forge_by_flipping_iv_bits_and_rehashing() -> None:
    """docs/security.md: the legacy hash is unkeyed and CBC is malleable, so the server can change a
    message's meaning without the key. This test pins that the forgery is *accepted*."""
    sealed = LEGACY.seal(**ENVELOPE, payload="pay 100 EUR")
    iv, ciphertext = _split(sealed.data)
    # Plaintext block 1 = D(C1) XOR IV: XOR-ing IV[4] with '1'^'9' turns "100" into "900".
    forged = _data_of(iv[:4] + bytes([iv[4] ^ ord("1") ^ ord("9")]) + iv[5:], ciphertext)
    opened = LEGACY.open(**ENVELOPE, data=forged, hash=_sha256_hex(forged), encoding="text")
    assert opened == "pay 900 EUR"


def test_legacy_limit_messages_can_be_moved_to_another_topic_session_id_or_time() -> None:
    sealed = LEGACY.seal(**ENVELOPE, payload="open the door")
    moved: dict[str, Any] = {
        "session": "other",
        "topic": "doors/front",
        "message_id": "replayed-42",
        "timestamp": 0,
    }
    assert LEGACY.open(**moved, **_open_fields(sealed)) == "open the door"


@PROPERTY
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_legacy_limit_rehashed_ciphertext_changes_are_accepted_or_fail_only_at_decryption(
    position: int, flip: int
) -> None:
    sealed = LEGACY.seal(**ENVELOPE, payload=b"a binary payload of a few AES blocks", iv=bytes(16))
    iv, ciphertext = _split(sealed.data)
    blob = bytearray(iv + ciphertext)
    blob[position % len(blob)] ^= flip
    forged = _data_of(bytes(blob[:16]), bytes(blob[16:]))
    try:
        opened = LEGACY.open(**ENVELOPE, data=forged, hash=_sha256_hex(forged), encoding="binary")
    except IntegrityError as error:
        assert "padding" in str(error)  # the hash passed: only decryption noticed
    else:
        assert opened != b"a binary payload of a few AES blocks"


def test_legacy_detects_accidental_corruption_when_not_rehashed() -> None:
    sealed = LEGACY.seal(**ENVELOPE, payload="hello")
    corrupted = sealed.data[:-3] + ("A" if sealed.data[-3] != "A" else "B") + sealed.data[-2:]
    with pytest.raises(IntegrityError, match="hash does not match"):
        LEGACY.open(**ENVELOPE, data=corrupted, hash=sealed.hash, encoding="text")


def test_legacy_hash_is_lowercase_sha256_hex_of_data() -> None:
    sealed = LEGACY.seal(**ENVELOPE, payload="hello")
    assert sealed.hash == hashlib.sha256(sealed.data.encode()).hexdigest()


# -------------------------------------------------------------------------------------- sealing misuse


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
@pytest.mark.parametrize("iv", [b"", bytes(15), bytes(17), "0" * 16], ids=["empty", "15", "17", "str"])
def test_seal_refuses_a_wrong_iv(suite_name: str, iv: Any) -> None:
    with pytest.raises(LocalProtocolError, match="iv must be 16 bytes"):
        SUITES[suite_name].seal(**ENVELOPE, payload="x", iv=iv)


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
@pytest.mark.parametrize("payload", [None, 3, ["x"], "lone \ud800 surrogate"], ids=repr)
def test_seal_refuses_a_bad_payload(suite_name: str, payload: Any) -> None:
    with pytest.raises(LocalProtocolError, match="payload"):
        SUITES[suite_name].seal(**ENVELOPE, payload=payload)


@pytest.mark.parametrize(
    "change",
    [{"timestamp": True}, {"timestamp": "1"}, {"topic": None}, {"topic": "\ud800"}, {"session": b"s"}],
    ids=repr,
)
def test_authenticated_seal_refuses_bad_envelope_fields(change: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        AUTH.seal(**{**ENVELOPE, **change}, payload="x")


def test_make_suite() -> None:
    assert isinstance(make_suite("authenticated", KEY), AuthenticatedSuite)
    assert isinstance(make_suite("legacy", KEY), LegacySuite)
    assert make_suite("authenticated", KEY).name == "authenticated"
    assert make_suite("legacy", KEY).name == "legacy"
    with pytest.raises(LocalProtocolError, match="unknown crypto suite 'aes-gcm'") as info:
        make_suite("aes-gcm", KEY)  # type: ignore[arg-type]
    assert not isinstance(info.value, InvalidKeyError)


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_suites_do_not_show_their_key(suite_name: str) -> None:
    raw = parse_key(KEY)
    enc_key, mac_key = crypto._derive_keys(raw)
    shown = repr(SUITES[suite_name]) + str(SUITES[suite_name])
    for secret in (KEY, raw.hex(), enc_key.hex(), mac_key.hex(), repr(raw)):
        assert secret not in shown
    with pytest.raises(AttributeError):
        SUITES[suite_name].name = "legacy"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ keys


def test_generate_key_makes_distinct_standard_base64_keys() -> None:
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert len(key) == 44 and key.endswith("=")
        assert len(base64.b64decode(key, validate=True)) == 32
        assert parse_key(key) == base64.b64decode(key)


def test_parse_key_accepts_the_usual_spellings() -> None:
    raw = bytes([0xFB, 0xFF, 0xBF] * 10 + [0x01, 0x02])  # encodes with '+' and '/'
    standard = base64.b64encode(raw).decode()
    assert "+" in standard and "/" in standard
    url_safe = base64.urlsafe_b64encode(raw).decode()
    for spelling in (
        standard,
        f"  {standard}\n",
        f"\t{standard}\r\n",
        url_safe,
        url_safe.rstrip("="),
        standard.rstrip("="),
    ):
        assert parse_key(spelling) == raw
    assert parse_key(raw) == raw
    assert parse_key(bytearray(raw)) == raw  # type: ignore[arg-type]


def _key_error(key: Any) -> InvalidKeyError:
    with pytest.raises(InvalidKeyError) as info:
        parse_key(key)
    error = info.value
    # The chain is suppressed so a traceback cannot carry the key either (binascii errors may quote it).
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    message = str(error)
    if isinstance(key, str) and len(key.strip()) >= 4:
        assert key.strip() not in message
    if isinstance(key, bytes) and len(key.strip()) >= 4:
        assert key.strip() not in message.encode()
        assert key.strip().decode("latin-1") not in message
    assert repr(key) not in message or key is None
    return error


SECRET_ISH = "s3cr3t-k3y!-do-not-echo-me"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (base64.b64encode(bytes(16)).decode(), "key decodes to 16 bytes; AES-256 needs 32"),
        (base64.b64encode(bytes(31)).decode(), "key decodes to 31 bytes"),
        (base64.b64encode(bytes(33)).decode(), "key decodes to 33 bytes"),
        (base64.b64encode(bytes(64)).decode(), "key decodes to 64 bytes"),
        (SECRET_ISH, "not valid base64"),
        (base64.b64encode(bytes(32)).decode()[:-2] + "!=", "not valid base64"),
        ("A" * 43 + "=" * 3, "not valid base64"),
        ("clé-secrète-très-longue", "non-ASCII"),
        ("", "key is empty"),
        (" \n\t", "key is empty"),
        (bytes(31), "raw key is 31 bytes; AES-256 needs 32"),
        (b"", "raw key is 0 bytes"),
        (base64.b64encode(bytes(range(32))), "pass it as str"),
        (None, "not NoneType"),
        (12345, "not int"),
        (["key"], "not list"),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, str) else None,
)
def test_parse_key_refuses_bad_keys_clearly(key: Any, expected: str) -> None:
    error = _key_error(key)
    assert expected in str(error)
    assert "fastport keygen" in str(error)
    assert isinstance(error, LocalProtocolError) and isinstance(error, ValueError)


def test_a_32_character_text_is_not_a_key_in_any_form() -> None:
    """The original guide shows `aesKey: 'shared-aes-key-32-bytes...'` (32 characters), but its Dart client
    base64-decodes aesKey and requires 32 bytes: the UTF-8 bytes of such a text were never its key, and
    as a key they would be a password in disguise. Neither spelling is accepted."""
    original = "my-shared-aes-key-of-32-bytes!!!"
    assert len(original) == 32
    message = str(_key_error(original))
    assert "is not a key" in message and "encode()" not in message
    for text in (original, "clé-partagée-de-32-octets!!", " " * 32):
        raw = text.encode()
        if len(raw) == 32:
            assert "printable text" in str(_key_error(raw))
    random_bytes = bytes(range(256))[::8]  # 32 bytes, mostly not printable
    assert parse_key(random_bytes) == random_bytes


@pytest.mark.parametrize("suite_class", [LegacySuite, AuthenticatedSuite])
def test_suites_refuse_bad_keys(suite_class: type[LegacySuite | AuthenticatedSuite]) -> None:
    with pytest.raises(InvalidKeyError):
        suite_class(bytes(16))
    with pytest.raises(InvalidKeyError):
        make_suite(suite_class.name, SECRET_ISH)


# ------------------------------------------------------------------------------------------ sans-IO


def test_crypto_module_is_sans_io() -> None:
    tree = ast.parse(Path(crypto.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {
        "socket",
        "asyncio",
        "threading",
        "time",
        "select",
        "selectors",
        "anyio",
        "trio",
        "random",
    }
