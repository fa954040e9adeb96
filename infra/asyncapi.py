"""Kiln's event catalogue as an AsyncAPI 3.0 document, `docs/asyncapi.yaml`, made from the code.

The document is for whoever talks to Kiln's bus without Kiln's Python: a client in another
language, a code generator, an operator reading what flows where. It holds every subject
(`channels`, from `shared.subjects`), the JSON Schema of every event (`components`, from the
msgspec structs of `shared.events`), the headers that travel with them (`shared.bus`), the
JetStream streams that keep them, and who sends and receives what (`operations`, from each
service's `Service` declaration and the SDK's `Access`). Nothing the code already says is
written here a second time, so the document follows the code; `--check` fails when the
checked-in copy is older than the code.

    python -m infra.asyncapi           # write docs/asyncapi.yaml (`make asyncapi`)
    python -m infra.asyncapi --check   # exit 1 if docs/asyncapi.yaml is out of date
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import yaml
from nats.js.api import RetentionPolicy

from shared import subjects
from shared.access import Access, matches
from shared.bus import ORIGINAL_SUBJECT_HEADER, REASON_HEADER
from shared.events import ID_PATTERN, MSGPACK, TERMINAL, AnyEvent
from shared.service import Service
from shared.settings import EMBEDDED_NATS_PORT, PROJECT_ROOT
from shared.subjects import ALL_BUCKETS, ALL_CHANNELS, Channel, Stream, stream_of

OUTPUT = PROJECT_ROOT / "docs" / "asyncapi.yaml"
SCHEMAS = "#/components/schemas/"
JSON = "application/json"
NATS_BINDING_VERSION = "0.1.0"  # the AsyncAPI NATS bindings' version (operation `queue`)
CLIENT = "client"  # the operations' tag and id prefix for the SDK, or any client like it

# The real declarations, in the order a request meets them. Imported only when the whole
# document is made, so that `document()` can be tested with declarations of one's own.
SERVICE_MODULES = (
    "services.quota.__main__",
    "services.context.__main__",
    "services.render.__main__",
    "services.delivery.__main__",
)
CLIENT_MODULE = "kiln.client"


class DeclarationsMissing(Exception):
    """A service's `SERVICE`, or the SDK's `CLIENT_ACCESS`, cannot be imported."""


# -- what the code says only at its call sites --------------------------------------------
# `Channel` does not say which headers its publishers set: that is decided where each one
# publishes (`kiln.client.submit`, `context`'s job, `Bus.publish(first_on_subject=True)`,
# `Bus.dead_letter`). This table repeats it, and must follow those call sites.


@dataclass(frozen=True)
class Wire:
    """The JetStream headers a publisher sets on one channel."""

    msg_id: str | None = None  # the `Nats-Msg-Id` it sends: de-duplication within the window
    expected_last: str | None = None  # the `Nats-Expected-Last-Subject-Sequence` it sends
    why: str = ""  # what a reader should know about them


ONE_PER_SUBJECT = Wire(
    expected_last="0",
    why="JetStream takes one message on the subject, ever: a second one is refused, whoever sends it.",
)
WIRE: dict[str, Wire] = {
    subjects.PROMPT_SUBMITTED.template: Wire(msg_id="<user>:<request>:prompt-submitted"),
    subjects.QUOTA_DECIDED.template: ONE_PER_SUBJECT,
    subjects.RENDER_JOB.template: Wire(msg_id="<user>:<request>:render-requested"),
    subjects.RENDER_CANCEL.template: Wire(msg_id="<user>:<request>:cancel"),
    subjects.RENDER_EVENT.template: ONE_PER_SUBJECT,
    subjects.OUTCOME.template: ONE_PER_SUBJECT,
    subjects.CONVERSATION.template: Wire(
        expected_last="<stream sequence of the last turn>",
        why="The stream sequence of the conversation's last turn as its composer read it (0 for the first turn): "
        "a turn composed from a stale read is refused, and composed again.",
    ),
    subjects.DEAD_LETTER.template: Wire(
        msg_id="<stream>:<stream sequence>", why="The id names the message dead-lettered: one dead letter per message."
    ),
}

# Channels that carry no event: the message they carry instead.
MARKERS = {
    subjects.RENDER_CANCEL.template: "CancelRequested",
    subjects.DEAD_LETTER.template: "DeadLetter",
    subjects.AUDIT_CHECKPOINT.template: "AuditCheckpoint",
}
EMPTY_REQUEST = "EmptyRequest"

_ID_RULE = f"Matches `{ID_PATTERN.pattern}` (a subject token: no dots, spaces or wildcards)."
# What each subject token means. A new token in `shared.subjects` needs a line here: the
# document refuses to guess what it holds.
TOKENS: dict[str, str] = {
    "user": f"The user's id. {_ID_RULE} It is the payload's `user_id`, where there is one: a consumer "
    "dead-letters a message whose subject names another user.",
    "request": f"The request's id: the client's idempotency key, unique among the user's requests. {_ID_RULE}",
    "conversation": f"The conversation's id. {_ID_RULE}",
    "tier": "The render lane; workers pull `paid` before `free`.",
    "worker": "The render worker's id (by default `<host>-<pid>`).",
    "service": "The service that could not handle the message.",
}
# The payload field that repeats a token's value, where the channel's events all have it.
TOKEN_FIELDS = {
    "user": "user_id",
    "request": "request_id",
    "conversation": "conversation_id",
    "worker": "worker_id",
    "tier": "tier",
}
TOKEN_EXAMPLES = {"user": ["alice"], "request": ["3f2a9c0e"], "conversation": ["c1"], "worker": ["gpu-host-4121"]}


# -- the document -------------------------------------------------------------------------


def document(services: list[Service], client: Access | None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of Kiln's bus, as these services and this client use it."""
    # 1. Check inputs: operation ids are made of service names, channel ids of subjects.
    names = [service.name for service in services]
    if len(set(names)) != len(names) or CLIENT in names:
        raise ValueError(f"service names must be unique and not {CLIENT!r}, but are {names}")
    ids = [channel_id(channel) for channel in ALL_CHANNELS]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two channels would have one name in the document: {sorted(ids)}")

    # 2. Channels (each request/reply channel followed by its reply channel).
    channels: dict[str, Any] = {}
    for channel in ALL_CHANNELS:
        channels[channel_id(channel)] = _channel(channel, services)
        if channel.reply is not None:
            channels[_reply_id(channel)] = _reply_channel(channel)

    # 3. Operations: each service's, then the client's.
    operations: dict[str, Any] = {}
    for service in services:
        _add(operations, _service_operations(service))
    if client is not None:
        _add(operations, _client_operations(client))

    return {
        "asyncapi": "3.0.0",
        "info": _info(),
        "defaultContentType": JSON,
        "servers": _servers(),
        "channels": channels,
        "operations": operations,
        "components": {"schemas": _schemas(), "messages": _messages()},
        "x-kiln-buckets": _buckets(services, client),
    }


def channel_id(channel: Channel) -> str:
    """The channel's name in the document: its fixed tokens after `kiln`, camelCased
    (`kiln.render.jobs.{tier}.{user}` → `renderJobs`)."""
    words = [part for part in channel.template.split(".")[1:] if not part.startswith("{")]
    return words[0] + "".join(word.capitalize() for word in words[1:])


def _reply_id(channel: Channel) -> str:
    return channel_id(channel) + "Reply"


def _reply_message(channel: Channel) -> str:
    return _reply_id(channel)[0].upper() + _reply_id(channel)[1:]


def _add(operations: dict[str, Any], more: dict[str, Any]) -> None:
    clash = operations.keys() & more.keys()
    if clash:
        raise ValueError(f"two operations are both named {sorted(clash)}: a service declares one channel twice")
    operations.update(more)


def _info() -> dict[str, Any]:
    return {
        "title": "Kiln",
        "version": importlib.metadata.version("kiln"),
        "description": _description(),
    }


def _description() -> str:
    s = subjects
    ends = ", ".join(f"`{event.__name__}`" for event in TERMINAL)
    outcomes = s.OUTCOMES
    return f"""\
Kiln's event catalogue: every subject on its NATS bus, what travels on it, the stream that \
keeps it, and which service sends or receives it. Generated from the code by \
`python -m infra.asyncapi`: do not edit it by hand.

## A request, end to end

1. The client subscribes to `{s.RENDER_PROGRESS.template}` and `{s.OUTCOME.template}`, then \
publishes `PromptSubmitted` on `{s.PROMPT_SUBMITTED.template}` with the header \
`Nats-Msg-Id: {WIRE[s.PROMPT_SUBMITTED.template].msg_id}`. The request id is the client's \
idempotency key: with no outcome after 30 s, publish the same prompt again.
2. **quota** decides: `QuotaGranted` or `QuotaDenied` on `{s.QUOTA_DECIDED.template}` (a denial is \
also the request's outcome).
3. **context** turns a grant into one fully specified `RenderRequested` on `{s.RENDER_JOB.template}`, \
and records the turn on `{s.CONVERSATION.template}`.
4. **render** draws it, publishing `RenderProgress` (plain NATS) and then `RenderCompleted` or \
`RenderFailed` on `{s.RENDER_EVENT.template}`. A client may cancel with an empty message on \
`{s.RENDER_CANCEL.template}`.
5. **delivery** turns the render result into the outcome: `ImageDelivered` (with a signed \
download link that expires) or `RequestFailed`.

## What ends a request

Exactly one of {ends}, on `{s.OUTCOME.template}`. Every outcome is published with \
`Nats-Expected-Last-Subject-Sequence: 0`, so JetStream refuses a second one on the subject for \
as long as `{outcomes.name}` keeps it. Trust the stored outcome (the last message of the \
subject in `{outcomes.name}`), not only a live one: a plain subscriber also sees a refused message.

## Conventions

- Payloads are JSON; a message whose `Content-Type` header is `{MSGPACK}` is MessagePack instead.
- Events are one tagged union (`components.schemas.AnyEvent`): `type` names the event, `v` its \
schema version. Readers ignore fields they do not know, so a newer writer never breaks an older reader.
- User, request and conversation ids match `{ID_PATTERN.pattern}`; times are ISO 8601 strings, \
read as UTC when they carry no zone.
- Every event carries the W3C `traceparent` of the span that published it.
- Images are not on the bus: they live in the object store named in `x-kiln-buckets`.
"""


def _servers() -> dict[str, Any]:
    return {
        "nats": {
            "host": f"127.0.0.1:{EMBEDDED_NATS_PORT}",
            "protocol": "nats",
            "description": (
                f"The embedded NATS server that `make run` starts (`nats://127.0.0.1:{EMBEDDED_NATS_PORT}`). "
                "A deployment names its own with `KILN_NATS_URL` (NATS 2.9 or later, with JetStream)."
            ),
        }
    }


# -- channels -----------------------------------------------------------------------------


def _channel(channel: Channel, services: list[Service]) -> dict[str, Any]:
    stream = stream_of(channel)
    if channel.kept and stream is None:
        raise ValueError(f"{channel.template} is kept, but no stream in shared.subjects.ALL_STREAMS keeps it")
    described: dict[str, Any] = {
        "address": channel.template,
        "description": "\n\n".join(filter(None, (channel.doc, _storage(channel, stream), _headers_rule(channel)))),
        "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in _message_names(channel)},
    }
    if channel.tokens:
        described["parameters"] = {token: _parameter(channel, token, services) for token in channel.tokens}
    if stream is not None:
        described["x-kiln-stream"] = _stream_facts(stream)
    if channel.template in WIRE:
        described["x-kiln-headers"] = _wire_headers(WIRE[channel.template])
    return described


def _message_names(channel: Channel) -> list[str]:
    if channel.events:
        return [event.__name__ for event in channel.events]
    if channel.reply is not None:
        return [EMPTY_REQUEST]
    if channel.template in MARKERS:
        return [MARKERS[channel.template]]
    raise ValueError(f"{channel.template} carries no events: name its message in infra/asyncapi.py MARKERS")


def _storage(channel: Channel, stream: Stream | None) -> str:
    if stream is not None:
        queue = ""
        if stream.retention == RetentionPolicy.WORK_QUEUE:
            queue = " A work queue: a message leaves the stream once a consumer acks it."
        return (
            f"Kept in the JetStream stream `{stream.name}` for {_duration(stream.max_age_s)};"
            f" a repeated `Nats-Msg-Id` is dropped within {_duration(stream.duplicate_window_s)}.{queue}"
        )
    if channel.reply is not None:
        return (
            "Plain NATS request/reply, not kept: send an empty request and read the JSON answer on "
            'your inbox; a service that cannot answer says `{"error": "…"}`. No answer: the service is not running.'
        )
    return "Plain NATS, not kept: a subscriber hears only what is published while it listens."


def _headers_rule(channel: Channel) -> str | None:
    wire = WIRE.get(channel.template)
    if wire is None:
        return None
    rules = [f"`{name}: {value}`" for name, value in _wire_headers(wire).items()]
    return " ".join(filter(None, ("Published with " + " and ".join(rules) + ".", wire.why)))


def _wire_headers(wire: Wire) -> dict[str, str]:
    headers = {"Nats-Msg-Id": wire.msg_id, "Nats-Expected-Last-Subject-Sequence": wire.expected_last}
    return {name: value for name, value in headers.items() if value is not None}


def _stream_facts(stream: Stream) -> dict[str, Any]:
    return {
        "name": stream.name,
        "retention": str(stream.retention.value),
        "storage": "file",  # `Bus.declare` makes every stream file-backed
        "maxAgeSeconds": stream.max_age_s,
        "duplicateWindowSeconds": stream.duplicate_window_s,
        **({"maxMessagesPerSubject": 1, "discard": "new per subject"} if stream.one_per_subject else {}),
    }


def _duration(seconds: float) -> str:
    if seconds == 0:
        return "good (no age limit)"
    day = 24 * 3600
    if seconds >= day and seconds % day == 0:
        return f"{int(seconds // day)} days" if seconds != day else "1 day"
    return f"{seconds:g} s"


def _parameter(channel: Channel, token: str, services: list[Service]) -> dict[str, Any]:
    if token not in TOKENS:
        raise ValueError(
            f"{channel.template} has the token {{{token}}}, which infra/asyncapi.py TOKENS does not describe"
        )
    parameter: dict[str, Any] = {"description": TOKENS[token]}
    if token == "tier":
        parameter["enum"] = list(subjects.TIERS)
    if token == "service" and services:
        parameter["enum"] = sorted(service.name for service in services if service.consumes)
    if token in TOKEN_EXAMPLES:
        parameter["examples"] = TOKEN_EXAMPLES[token]
    field = TOKEN_FIELDS.get(token)
    if field is not None and channel.events and all(_has_field(event, field) for event in channel.events):
        parameter["location"] = f"$message.payload#/{field}"
    return parameter


def _has_field(event: type, name: str) -> bool:
    return any(field.name == name for field in msgspec.structs.fields(event))


def _reply_channel(channel: Channel) -> dict[str, Any]:
    name = _reply_message(channel)
    return {
        "address": None,  # AsyncAPI: null = an address known only at run time
        "description": f"The requester's inbox (`_INBOX.…`): where the answer to `{channel.template}` comes back.",
        "messages": {name: {"$ref": f"#/components/messages/{name}"}},
    }


# -- operations ---------------------------------------------------------------------------


def _ref(channel_name: str, message: str | None = None) -> dict[str, str]:
    return {"$ref": f"#/channels/{channel_name}" + (f"/messages/{message}" if message else "")}


def _operation(
    action: str, channel: Channel, who: str, summary: str, messages: list[str] | None = None, **more: Any
) -> dict[str, Any]:
    """An operation on `channel`; `messages` defaults to all the channel carries. A request
    on a request/reply channel comes with its reply."""
    name = channel_id(channel)
    operation: dict[str, Any] = {
        "action": action,
        "channel": _ref(name),
        "summary": summary,
        "messages": [_ref(name, message) for message in (messages or _message_names(channel))],
        "tags": [{"name": who}],
    }
    if channel.reply is not None:
        operation["reply"] = {
            "channel": _ref(_reply_id(channel)),
            "messages": [_ref(_reply_id(channel), _reply_message(channel))],
        }
    return operation | more


def _service_operations(service: Service) -> dict[str, Any]:
    name = service.name
    operations: dict[str, Any] = {}
    for consume in service.consumes:
        channel, stream = consume.stream.channel, consume.stream.name
        batch = ", whatever is waiting as one batch" if consume.batched else ""
        operations[f"{name}.consume.{channel_id(channel)}"] = _operation(
            "receive",
            channel,
            name,
            f"{name} pulls `{stream}` with the durable consumer `{consume.durable}` (explicit ack{batch}); "
            "an event of another type is dead-lettered.",
            messages=_accepted(consume.accepts, channel, name),
            **{"x-kiln-consumer": {"stream": stream, "durable": consume.durable, "batched": consume.batched}},
        )
    for answer in service.answers:
        operations[f"{name}.answer.{channel_id(answer.channel)}"] = _operation(
            "receive",
            answer.channel,
            name,
            f"{name} answers; one of its processes takes each request.",
            bindings={"nats": {"queue": name, "bindingVersion": NATS_BINDING_VERSION}},
        )
    for listen in service.listens:
        operations[f"{name}.listen.{channel_id(listen.channel)}"] = _operation(
            "receive", listen.channel, name, f"{name} listens; every one of its processes hears every message."
        )
    for channel in service.hears:
        operations[f"{name}.hear.{channel_id(channel)}"] = _operation(
            "receive", channel, name, f"{name} subscribes now and then (while it follows a request)."
        )
    for stream in service.reads:
        operations[f"{name}.read.{channel_id(stream.channel)}"] = _operation(
            "receive",
            stream.channel,
            name,
            f"{name} reads `{stream.name}` directly: a subject's last message or its history.",
        )
    for channel in service.publishes:
        operations[f"{name}.{_send_verb(channel)}.{channel_id(channel)}"] = _operation(
            "send", channel, name, f"{name} {_SENDS[_send_verb(channel)]}."
        )
    # Only a consumer dead-letters (`shared.consuming`), though `Service.access` allows any
    # service its own dead-letter subject.
    if service.consumes:
        operations[f"{name}.deadLetter"] = _operation(
            "send",
            subjects.DEAD_LETTER,
            name,
            f"{name} dead-letters on `{subjects.dead_letter(name)}` what it cannot handle.",
        )
    return operations


_SENDS = {"publish": "publishes", "request": "asks, and waits for the answer"}


def _send_verb(channel: Channel) -> str:
    return "request" if channel.reply is not None else "publish"


def _accepted(accepts: tuple[type, ...], channel: Channel, service: str) -> list[str]:
    strays = [kind.__name__ for kind in accepts if kind not in channel.events]
    if strays:
        raise ValueError(f"{service} consumes {strays} from {channel.template}, which carries no such event")
    return [kind.__name__ for kind in accepts]


def _client_operations(access: Access) -> dict[str, Any]:
    """What a client may do, read off its `Access`: each pattern it may publish or subscribe
    to must be (inside) one of the channels."""
    _check_covered(access)
    operations: dict[str, Any] = {}
    for channel in ALL_CHANNELS:
        if _allowed(access.publish, channel):
            verb = _send_verb(channel)
            operations[f"{CLIENT}.{verb}.{channel_id(channel)}"] = _operation(
                "send", channel, CLIENT, f"A client {_SENDS[verb]}."
            )
        if _allowed(access.subscribe, channel):
            operations[f"{CLIENT}.subscribe.{channel_id(channel)}"] = _operation(
                "receive", channel, CLIENT, "A client subscribes."
            )
        stream = stream_of(channel)
        if stream is not None and stream.name in access.streams:
            operations[f"{CLIENT}.read.{channel_id(channel)}"] = _operation(
                "receive",
                channel,
                CLIENT,
                f"A client reads `{stream.name}` directly: a subject's last message (a request's recorded "
                "decision or outcome) or its history.",
            )
    return operations


def _allowed(patterns: frozenset[str], channel: Channel) -> bool:
    return any(matches(pattern, channel.pattern) for pattern in patterns)


def _check_covered(access: Access) -> None:
    loose = sorted(p for p in access.publish | access.subscribe if not any(matches(p, c.pattern) for c in ALL_CHANNELS))
    unknown = sorted(access.streams - {stream.name for stream in subjects.ALL_STREAMS})
    if loose or unknown:
        raise ValueError(f"the client's access names subjects {loose} and streams {unknown} that no channel describes")


# -- components ---------------------------------------------------------------------------


def _events() -> list[type]:
    """Every struct that travels as a message, once each, in the channels' order."""
    kinds = [kind for channel in ALL_CHANNELS for kind in (*channel.events, channel.reply) if kind is not None]
    return list(dict.fromkeys(kinds))


def _schemas() -> dict[str, Any]:
    (*_, any_event), schemas = msgspec.json.schema_components([*_events(), AnyEvent], ref_template=SCHEMAS + "{name}")
    # AsyncAPI's `discriminator` is the property's name, not OpenAPI's object with a mapping
    # (each event's `type` is its schema's name, so the mapping says nothing more).
    any_event["discriminator"] = any_event["discriminator"]["propertyName"]
    schemas["AnyEvent"] = {"description": "Every event, told apart by `type`.", **any_event}
    schemas["AnswerError"] = {
        "type": "object",
        "description": "A request/reply answer when the service could not answer (`shared.bus.Bus.answer`).",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    }
    schemas |= _header_schemas()
    return dict(sorted(schemas.items()))


def _header_schemas() -> dict[str, Any]:
    content_type = {
        "type": "string",
        "enum": [JSON, MSGPACK],
        "default": JSON,
        "description": f"How the payload is encoded: JSON unless this says `{MSGPACK}`.",
    }
    traceparent = {
        "type": "string",
        "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        "description": "W3C trace context of the span that published it; a client may send its own to root "
        "the request's trace.",
    }
    msg_id = {
        "type": "string",
        "description": "JetStream drops a second message with this id within the stream's duplicate window. "
        "Its format on each channel: the channel's `x-kiln-headers`.",
    }
    expected = {
        "type": "string",
        "pattern": "^[0-9]+$",
        "description": "JetStream refuses the message unless the subject's last message has this stream sequence "
        "(`0`: the subject holds none, so a per-request subject takes one message ever).",
    }
    return {
        "EventHeaders": {
            "type": "object",
            "properties": {
                "Content-Type": content_type,
                "traceparent": traceparent,
                "Nats-Msg-Id": msg_id,
                "Nats-Expected-Last-Subject-Sequence": expected,
            },
        },
        "MarkerHeaders": {"type": "object", "properties": {"Nats-Msg-Id": msg_id}, "required": ["Nats-Msg-Id"]},
        "DeadLetterHeaders": {
            "type": "object",
            "properties": {
                REASON_HEADER: {"type": "string", "description": "Why the service could not handle the message."},
                ORIGINAL_SUBJECT_HEADER: {"type": "string", "description": "The subject the message came on."},
                "Nats-Msg-Id": msg_id,
                "Content-Type": content_type,
                "traceparent": traceparent,
            },
            "required": [REASON_HEADER, ORIGINAL_SUBJECT_HEADER],
        },
    }


def _messages() -> dict[str, Any]:
    messages = {kind.__name__: _event_message(kind) for kind in _events() if kind not in _replies()}
    for channel in ALL_CHANNELS:
        if channel.reply is not None:
            messages[_reply_message(channel)] = _answer_message(channel)
    messages[EMPTY_REQUEST] = {
        "name": EMPTY_REQUEST,
        "summary": "An empty request: the subject says what is asked.",
    }
    messages["CancelRequested"] = {
        "name": "CancelRequested",
        "summary": "Drop this request: an empty message, its subject names the request. It then ends as "
        "`RequestFailed` (reason `cancelled`).",
        "headers": {"$ref": SCHEMAS + "MarkerHeaders"},
    }
    messages["DeadLetter"] = {
        "name": "DeadLetter",
        "summary": "A message a service could not handle, its bytes unchanged: usually an event (`AnyEvent`), "
        "possibly one that does not decode.",
        "headers": {"$ref": SCHEMAS + "DeadLetterHeaders"},
    }
    messages["AuditCheckpoint"] = {
        "name": "AuditCheckpoint",
        "summary": "quota's log head, signed: JSON `{position, hash, at, key, signature}`; `signature` is "
        "ed25519 (hex) by `key` over the sorted-key JSON of `{position, hash, at}`.",
    }
    return dict(sorted(messages.items()))


def _replies() -> set[type]:
    return {channel.reply for channel in ALL_CHANNELS if channel.reply is not None}


def _event_message(kind: type) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": kind.__name__,
        "contentType": JSON,
        "headers": {"$ref": SCHEMAS + "EventHeaders"},
        "payload": {"$ref": SCHEMAS + kind.__name__},
    }
    summary = _summary(kind)
    if summary:
        message["summary"] = summary
    if kind in TERMINAL:
        message["description"] = "Ends the request: a client waits for exactly one such outcome."
        message["x-kiln-ends-request"] = True
    return message


def _summary(kind: type) -> str | None:
    """The first paragraph of the class's own docstring (not one it inherits)."""
    doc = kind.__dict__.get("__doc__")
    if not doc:
        return None
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _answer_message(channel: Channel) -> dict[str, Any]:
    (answer,), _ = msgspec.json.schema_components([channel.reply], ref_template=SCHEMAS + "{name}")
    return {
        "name": _reply_message(channel),
        "contentType": JSON,
        "summary": f"The answer to `{channel.template}`, or an `AnswerError`.",
        "payload": {"oneOf": [answer, {"$ref": SCHEMAS + "AnswerError"}]},
    }


def _buckets(services: list[Service], client: Access | None) -> list[dict[str, Any]]:
    """Key-value buckets and object stores: not channels, but a client stores masks and a
    reader may look up records in them."""
    users = {service.name: {bucket.name for bucket in service.buckets} for service in services}
    if client is not None:
        users[CLIENT] = set(client.buckets)
    described = []
    for bucket in ALL_BUCKETS:
        entry: dict[str, Any] = {"name": bucket.name, "kind": bucket.kind, "description": bucket.doc}
        if bucket.ttl_s is not None:
            entry["ttlSeconds"] = bucket.ttl_s
        entry["usedBy"] = sorted(user for user, names in users.items() if bucket.name in names)
        described.append(entry)
    return described


# -- YAML and the command line ------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style for text of several lines; no anchors (a reader should see every object
    where it is used, and a shared dict must not change the output)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _text)


def to_yaml(doc: dict[str, Any]) -> str:
    """The document as YAML, byte for byte the same for the same document (keys in the
    order the document builds them, which is the order of `shared.subjects`)."""
    header = "# Generated by `python -m infra.asyncapi` (make asyncapi) from the code: do not edit.\n"
    return header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def real_declarations() -> tuple[list[Service], Access]:
    """The four services' `SERVICE` and the SDK's `CLIENT_ACCESS`, imported now."""
    services = [_import(module, "SERVICE") for module in SERVICE_MODULES]
    return services, _import(CLIENT_MODULE, "CLIENT_ACCESS")


def _import(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise DeclarationsMissing(f"{module}.{name} cannot be imported: {error}") from error


def _relative(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.asyncapi", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from what the code makes")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"where the document goes ({_relative(OUTPUT)})")
    arguments = parser.parse_args(argv)
    try:
        text = to_yaml(document(*real_declarations()))
    except DeclarationsMissing as error:
        print(f"cannot make the AsyncAPI document: {error}", file=sys.stderr)
        return 1
    name = _relative(arguments.output)
    if arguments.check:
        current = arguments.output.read_text(encoding="utf-8") if arguments.output.exists() else None
        if current != text:
            print(f"{name} is out of date: run make asyncapi", file=sys.stderr)
            return 1
        return 0
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(text, encoding="utf-8")
    print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
