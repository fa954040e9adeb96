"""Kiln's event schemas: what travels on the bus, one `msgspec.Struct` per event.

Wire format: JSON, encoded by msgspec (readable with any NATS tool and by `jq`). A message
whose `Content-Type` header says `application/msgpack` is decoded as MessagePack instead, so
audit tools and other clients may use either. Every event carries `type` (the tag) and `v`
(its schema version); unknown fields are ignored, so a newer writer never breaks an older
reader. Each event holds what a reader needs without a lookup: request, user, conversation
and a timestamp.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Literal

import msgspec

# Users and requests appear as subject tokens, so they are restricted to characters NATS
# allows in a token (no dots, spaces or wildcards).
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MSGPACK = "application/msgpack"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Event(msgspec.Struct, kw_only=True, tag_field="type", tag=True):
    v: int = 1
    request_id: str
    user_id: str
    conversation_id: str = ""


class PromptSubmitted(Event, kw_only=True):
    """A client asks for an image. `request_id` is the client's idempotency key."""

    prompt: str
    width: int = 32
    height: int = 32
    steps: int = 10
    seed: int | None = None
    submitted_at: datetime = msgspec.field(default_factory=utcnow)


DenialReason = Literal["daily_limit", "rate_limit", "capacity", "invalid"]
# Fleet pressure, from the render workers' heartbeats; quota sheds load by it.
Pressure = Literal["normal", "elevated", "critical"]


class QuotaGranted(Event, kw_only=True):
    """Quota lets the request through. Carries the submission so context needs no lookup."""

    plan: str
    used: int  # images granted today including this one
    limit: int  # images allowed today: the plan's daily limit plus admin grants
    day: str  # the UTC day the grant counts against, YYYY-MM-DD
    tier: str = "free"  # the render lane: "paid" lanes are pulled before "free"
    pressure: Pressure = "normal"  # the fleet pressure the decision saw
    over_soft_cap: bool = False  # served, but past the plan's soft cap: flagged for monitoring
    tokens_left: float | None = None  # the rate bucket after this grant (None: no bucket)
    submission: PromptSubmitted
    decided_at: datetime = msgspec.field(default_factory=utcnow)


class QuotaDenied(Event, kw_only=True):
    plan: str
    reason: DenialReason
    detail: str
    retry_at: datetime | None = None  # when asking again can succeed; None for `invalid`
    pressure: Pressure = "normal"
    decided_at: datetime = msgspec.field(default_factory=utcnow)


class RenderRequested(Event, kw_only=True):
    """A fully specified render job, as the render workers pull it."""

    prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    steps: int
    guidance: float = 3.0
    seed: int
    tier: str = "free"
    requested_at: datetime = msgspec.field(default_factory=utcnow)


class RenderProgress(Event, kw_only=True):
    step: int
    total_steps: int
    at: datetime = msgspec.field(default_factory=utcnow)


class RenderCompleted(Event, kw_only=True):
    image_key: str  # object key in the image store, never the image itself
    width: int
    height: int
    seed: int
    render_ms: float  # the pipeline's own time, without queueing or storage
    worker_id: str
    completed_at: datetime = msgspec.field(default_factory=utcnow)


class RenderFailed(Event, kw_only=True):
    reason: str
    detail: str
    worker_id: str
    failed_at: datetime = msgspec.field(default_factory=utcnow)


class ImageDelivered(Event, kw_only=True):
    image_key: str
    url: str
    render_ms: float
    delivered_at: datetime = msgspec.field(default_factory=utcnow)


class RequestFailed(Event, kw_only=True):
    """The request ended without an image. `stage` names the service that gave up."""

    stage: str
    reason: str
    detail: str
    failed_at: datetime = msgspec.field(default_factory=utcnow)


AnyEvent = (
    PromptSubmitted
    | QuotaGranted
    | QuotaDenied
    | RenderRequested
    | RenderProgress
    | RenderCompleted
    | RenderFailed
    | ImageDelivered
    | RequestFailed
)

class WorkerHeartbeat(msgspec.Struct, kw_only=True):
    """A render worker's telemetry, once a second on `kiln.fleet.telemetry.<worker>` (plain
    NATS: only the latest matters). Quota derives the fleet pressure from it."""

    v: int = 1
    worker_id: str
    device: str  # "cpu" or "cuda:N"
    model: str
    queue_depth: int  # jobs waiting in the render queue, all tiers
    cpu_load: float  # 1-minute load average per core
    # GPU figures (from NVML) on a GPU worker; None on a CPU worker.
    gpu_temperature_c: float | None = None
    gpu_utilisation: float | None = None  # 0..1
    gpu_memory_used: float | None = None  # 0..1
    images_per_s: float = 0.0
    at: datetime = msgspec.field(default_factory=utcnow)


# Events that end a request: a client waits for exactly one of these.
TERMINAL = (QuotaDenied, ImageDelivered, RequestFailed)

_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder(AnyEvent)
_msgpack_decoder = msgspec.msgpack.Decoder(AnyEvent)


def encode(event: msgspec.Struct) -> bytes:
    return _json_encoder.encode(event)


def decode(data: bytes, content_type: str | None = None) -> AnyEvent:
    """Decode one event; raises `msgspec.DecodeError` (a `ValueError`) with the reason."""
    if content_type == MSGPACK:
        return _msgpack_decoder.decode(data)
    return _json_decoder.decode(data)


def check_ids(event: Event) -> None:
    """Raise ValueError naming the field when an id cannot be a subject token, or a text
    cannot be stored (PostgreSQL's JSONB refuses the NUL character)."""
    if isinstance(event, PromptSubmitted) and "\x00" in event.prompt:
        raise ValueError("`prompt` contains a NUL character")
    for field in ("request_id", "user_id"):
        value = getattr(event, field)
        if not ID_PATTERN.match(value):
            raise ValueError(f"`{field}` must match {ID_PATTERN.pattern} but is {value!r}")
    if event.conversation_id and not ID_PATTERN.match(event.conversation_id):
        raise ValueError(
            f"`conversation_id` must match {ID_PATTERN.pattern} but is {event.conversation_id!r}"
        )
