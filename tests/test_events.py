"""The event schemas: both encodings, forward compatibility, clear errors."""

from datetime import UTC, datetime

import msgspec
import pytest

from shared.events import (
    MSGPACK,
    PromptSubmitted,
    QuotaDenied,
    QuotaGranted,
    check_ids,
    decode,
    encode,
)


def _prompt(**overrides) -> PromptSubmitted:
    fields = dict(request_id="r1", user_id="alice", prompt="a red circle")
    return PromptSubmitted(**(fields | overrides))


def test_json_round_trip_keeps_type_and_fields():
    event = _prompt(seed=7)
    data = encode(event)
    assert b'"type":"PromptSubmitted"' in data and b'"v":1' in data
    assert decode(data) == event


def test_nested_submission_round_trips():
    grant = QuotaGranted(
        request_id="r1", user_id="alice", plan="free", used=1, limit=3, day="2026-11-26", submission=_prompt()
    )
    decoded = decode(encode(grant))
    assert isinstance(decoded, QuotaGranted) and decoded.submission.prompt == "a red circle"


def test_msgpack_is_readable_when_the_header_says_so():
    event = QuotaDenied(
        request_id="r1",
        user_id="alice",
        plan="free",
        reason="daily_limit",
        detail="3 of 3",
        retry_at=datetime(2026, 11, 27, tzinfo=UTC),
    )
    assert decode(msgspec.msgpack.encode(event), MSGPACK) == event


def test_unknown_fields_from_a_newer_writer_are_ignored():
    data = b'{"type":"PromptSubmitted","v":2,"request_id":"r","user_id":"u","prompt":"p","mood":"sunny"}'
    assert decode(data).prompt == "p"


@pytest.mark.parametrize(
    "data",
    [b"\x00garbage", b'{"type":"NoSuchEvent","request_id":"r","user_id":"u"}', b'{"type":"PromptSubmitted"}'],
)
def test_undecodable_messages_raise_decode_error(data):
    with pytest.raises(msgspec.DecodeError):
        decode(data)


@pytest.mark.parametrize("field,value", [("user_id", "a.b"), ("request_id", "has space"), ("user_id", "")])
def test_ids_that_cannot_be_subject_tokens_are_named(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        check_ids(_prompt(**{field: value}))


def test_a_prompt_postgres_cannot_store_is_named():
    with pytest.raises(ValueError, match="`prompt` contains a NUL"):
        check_ids(_prompt(prompt="a\x00b"))
