"""The event schemas: both encodings, forward compatibility, clear errors."""

import re
from datetime import UTC, datetime

import msgspec
import pytest

from shared import events
from shared.events import (
    MAX_EVENT_BYTES,
    MSGPACK,
    Composition,
    PromptSubmitted,
    QuotaDenied,
    QuotaGranted,
    WorkerHeartbeat,
    check_ids,
    decode,
    decode_json,
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


def _prompt_json(**extra: object) -> bytes:
    fields = {"type": "PromptSubmitted", "request_id": "r1", "user_id": "alice", "prompt": "a red circle"}
    return msgspec.json.encode(fields | extra)


def _prompt_msgpack(**extra: object) -> bytes:
    fields = {"type": "PromptSubmitted", "request_id": "r1", "user_id": "alice", "prompt": "p"}
    return msgspec.msgpack.encode(fields | extra)


DEEP = b"[" * 30_000 + b"]" * 30_000  # deeper than msgspec goes, under the size limit


@pytest.mark.parametrize(
    ("data", "content_type", "reason"),
    [
        (_prompt_json(prompt="a\x00b"), None, "`$.prompt` contains a NUL"),
        (_prompt_json(style="\x00"), None, "`$.style` contains a NUL"),
        (_prompt_json()[:-1] + b',"x":' + DEEP + b"}", None, "nested too deeply"),  # in a field no one reads
        (_prompt_msgpack(x=None)[:-1] + b"\x91" * 60_000 + b"\xc0", MSGPACK, "nested too deeply"),
        (_prompt_json(strength=-0.0), None, "-0.0"),
        (
            msgspec.msgpack.encode(
                {
                    "type": "PromptSubmitted",
                    "request_id": "r1",
                    "user_id": "alice",
                    "prompt": "p",
                    "strength": float("nan"),
                }
            ),
            MSGPACK,
            "nan",
        ),
        (
            msgspec.msgpack.encode(
                {
                    "type": "PromptSubmitted",
                    "request_id": "r1",
                    "user_id": "alice",
                    "prompt": "p",
                    "strength": float("inf"),
                }
            ),
            MSGPACK,
            "inf",
        ),
        (_prompt_json(prompt="x" * MAX_EVENT_BYTES), None, "more than the"),
        (_prompt_json()[:-1] + b',"prompt":"\xff\xfe"}', None, "UTF-8"),
    ],
    ids=["nul", "nul-in-style", "deep-json", "deep-msgpack", "minus-zero", "nan", "inf", "oversized", "bad-utf8"],
)
def test_hostile_payloads_are_refused_with_a_reason(data: bytes, content_type: str | None, reason: str):
    with pytest.raises(msgspec.DecodeError, match=re.escape(reason)):
        decode(data, content_type)


def test_a_heartbeat_or_a_body_gets_the_same_guards():
    with pytest.raises(msgspec.DecodeError, match="nested too deeply"):
        decode_json(b'{"worker_id": "w", "x": ' + DEEP + b"}", WorkerHeartbeat)


@pytest.mark.parametrize(
    "value",
    [
        {"a\x00": 1},
        {"a": [1, 2, {"b": float("-inf")}]},
        ("ok", ["\x00"]),
        Composition(text="t", subject="s", degraded="x\x00"),
        {"fine": [1, "two", 3.5, None, True]},
        Composition(text="t", subject="s"),
    ],
    ids=["key", "nested-list", "tuple", "struct", "fine-dict", "fine-struct"],
)
def test_the_quick_walk_refuses_what_the_slow_walk_refuses(value: object):
    # Every decode runs the quick walk; only when it finds something does the slow one name the field.
    try:
        events._refuse_odd_values(value)
        refused = False
    except msgspec.DecodeError:
        refused = True
    assert events._has_odd_value(value) is refused
