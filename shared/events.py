"""Kiln's event schemas: what travels on the bus, one `msgspec.Struct` per event.

Wire format: JSON, encoded by msgspec (readable with any NATS tool and by `jq`). A message
whose `Content-Type` header says `application/msgpack` is decoded as MessagePack instead, so
audit tools and other clients may use either. Every event carries `type` (the tag) and `v`
(its schema version); unknown fields are ignored, so a newer writer never breaks an older
reader. Each event holds what a reader needs without a lookup: request, user, conversation
and a timestamp.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal, TypeVar

import msgspec

# Users and requests appear as subject tokens, so they are restricted to characters NATS
# allows in a token (no dots, spaces or wildcards).
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MSGPACK = "application/msgpack"


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """A time without a zone (from a client that sent none) is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# What a prompt gets when it names no size or steps: Kiln's own model draws 32×32 pictures.
DEFAULT_SIZE = 32
DEFAULT_STEPS = 10
# The largest job Kiln takes, one source for all: quota denies a request past them before it
# is charged, context and render check again. Sides are multiples of 8 (the model's latents).
MIN_SIDE, MAX_SIDE = 8, 512
MAX_STEPS = 50


class Event(msgspec.Struct, kw_only=True, tag_field="type", tag=True):
    v: int = 1
    request_id: str
    user_id: str
    conversation_id: str = ""


class Planned(Event, kw_only=True):
    """An event after quota's grant: it carries the user's plan on, so that every outcome
    can be counted by plan without a lookup."""

    plan: str = ""


# `edit_of` may name the conversation's latest image instead of a request id.
LAST_IMAGE = "last"


class PromptSubmitted(Event, kw_only=True):
    """A client asks for an image. `request_id` is the client's idempotency key.

    An edit names an earlier request of the same user whose image it starts from
    (`edit_of`: its request id, or `"last"` for the conversation's latest image), how far it
    may move away from it (`strength`, 0..1), and optionally a mask in the image store
    (`mask_key`, under `<user>/masks/`; white = repaint). Within a conversation, context
    also reads an instruction like "make it blue" as an edit of the latest image.

    `style` names a style preset that stays with the conversation from then on ("none"
    drops it); None keeps the conversation's style."""

    prompt: str
    style: str | None = None
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    seed: int | None = None
    edit_of: str | None = None
    strength: float = 0.8
    mask_key: str | None = None
    submitted_at: datetime = msgspec.field(default_factory=utcnow)


DenialReason = Literal["daily_limit", "rate_limit", "capacity", "invalid", "too_costly", "concurrency"]
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
    # Seconds of a worker's time the image should take (priced from the workers' measured
    # speed; None: not measured yet) and what the plan allows an image (None: no budget).
    estimate_s: float | None = None
    budget_s: float | None = None
    # Degraded under fleet pressure (free plans, before any is denied): the steps to render
    # instead of the submission's, and why. None: as asked.
    steps: int | None = None
    degraded: str | None = None
    submission: PromptSubmitted
    decided_at: datetime = msgspec.field(default_factory=utcnow)


class QuotaDenied(Event, kw_only=True):
    plan: str
    reason: DenialReason
    detail: str
    retry_at: datetime | None = None  # when asking again can succeed; None for `invalid`
    pressure: Pressure = "normal"
    decided_at: datetime = msgspec.field(default_factory=utcnow)


RenderMode = Literal["text", "edit", "inpaint"]


class Composition(msgspec.Struct, kw_only=True):
    """How context turned what the user typed into what is drawn, kept with the request so
    the user can see it: `prompt` = `subject` + the style's fragment."""

    text: str  # what the user typed
    subject: str  # what the picture shows: the text, or an earlier subject with an edit applied
    style: str = ""  # the style preset in force ("" for none)
    edit_of: str | None = None  # the request whose image this edits
    written: str | None = None  # the quoted text the picture shows, as the text model writes it
    degraded: str | None = None  # why it is drawn with less than asked (quota, while the fleet is loaded)


class TurnComposed(Event, kw_only=True):
    """One turn of a conversation, as context composed it (stream KILN_CONVERSATIONS, subject
    `kiln.conversation.<user>.<conversation>`). A conversation is the list of its turns."""

    prompt: str
    composition: Composition
    composed_at: datetime = msgspec.field(default_factory=utcnow)


class RenderRequested(Planned, kw_only=True):
    """A fully specified render job, as the render workers pull it. `edit` starts from the
    image at `source_key`; `inpaint` also repaints only where the mask at `mask_key` is white."""

    prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    steps: int
    guidance: float = 3.0
    seed: int
    tier: str = "free"
    mode: RenderMode = "text"
    source_key: str | None = None
    mask_key: str | None = None
    strength: float = 0.8
    composition: Composition | None = None
    text: str | None = None  # quoted text to write (A-Z, 0-9, space): drawn by the model's text model
    budget_s: float | None = None  # the plan's seconds per image: a render far past it is stopped
    requested_at: datetime = msgspec.field(default_factory=utcnow)


class RenderProgress(Event, kw_only=True):
    """Plain NATS, throttled: while a job waits (`state="queued"`, its place in the queue and
    an estimate of the wait), then while it renders (the step it reached)."""

    step: int
    total_steps: int
    state: Literal["queued", "rendering"] = "rendering"
    queue_position: int | None = None  # 1 = next to be rendered
    eta_s: float | None = None
    at: datetime = msgspec.field(default_factory=utcnow)


class RenderCompleted(Planned, kw_only=True):
    image_key: str  # object key in the image store, never the image itself
    width: int
    height: int
    seed: int
    render_ms: float  # the pipeline's own time, without queueing or storage
    worker_id: str
    batch_size: int = 1  # jobs rendered in the same pipeline call
    queued_ms: float | None = None  # from the job's request to the start of its batch
    prompt: str = ""  # what was drawn
    composition: Composition | None = None
    completed_at: datetime = msgspec.field(default_factory=utcnow)


class RenderFailed(Planned, kw_only=True):
    reason: str
    detail: str
    worker_id: str
    failed_at: datetime = msgspec.field(default_factory=utcnow)


class ImageDelivered(Planned, kw_only=True):
    """The image is in the image bucket under `image_key`. An outcome is kept a year, so it
    holds no link: a link is signed when someone reads (`kiln.delivery.link.<user>.<request>`,
    `KilnClient.link`). `url` is empty; outcomes stored before that held a signed link there,
    long expired, and still decode."""

    image_key: str
    url: str = ""
    render_ms: float
    prompt: str = ""  # what was drawn
    composition: Composition | None = None
    delivered_at: datetime = msgspec.field(default_factory=utcnow)


class RequestFailed(Planned, kw_only=True):
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
    | TurnComposed
)


class QuotaStatus(msgspec.Struct, kw_only=True):
    """quota's answer to `kiln.quota.status.<user>` (NATS request/reply): today's usage."""

    user_id: str
    plan: str
    used: int
    limit: int
    day: str  # the UTC day, YYYY-MM-DD
    resets_at: datetime  # the next UTC midnight

    @property
    def left(self) -> int:
        return max(self.limit - self.used, 0)


class ImageLink(msgspec.Struct, kw_only=True):
    """delivery's answer to `kiln.delivery.link.<user>.<request>` (NATS request/reply): a
    download link for the request's image, signed now, that works until `expires_at`."""

    user_id: str
    request_id: str
    url: str
    expires_at: datetime


class WorkerHeartbeat(msgspec.Struct, kw_only=True):
    """A render worker's telemetry, once a second on `kiln.fleet.telemetry.<worker>` (plain
    NATS: only the latest matters). Quota derives the fleet pressure from it."""

    v: int = 1
    worker_id: str
    device: str  # "cpu" or "cuda:N"
    model: str
    queue_depth: int  # jobs waiting in the render queue, all tiers
    queue_depth_paid: int = 0
    queue_depth_free: int = 0
    batch_limit: int = 1  # the largest batch the worker takes now (0: paused, too hot)
    cpu_load: float  # 1-minute load average per core
    # GPU figures (from NVML) on a GPU worker; None on a CPU worker.
    gpu_temperature_c: float | None = None
    gpu_utilisation: float | None = None  # 0..1
    gpu_memory_used: float | None = None  # 0..1
    gpu_power_w: float | None = None
    images_per_s: float = 0.0
    # The batch in the pipeline now ("<user>/<request>" each) and since when: for operators.
    rendering: list[str] = msgspec.field(default_factory=list)
    rendering_since: datetime | None = None
    # Measured seconds per image-step by size ("32x32"), for pricing (shared.cost), and
    # how long the batch in hand should still take.
    step_seconds: dict[str, float] = msgspec.field(default_factory=dict)
    rendering_left_s: float = 0.0
    # The worker that hands out the queue's jobs says so (the fleet keeps one dispatcher
    # while it lives); a worker that is stopping says so in its last heartbeat.
    dispatching: bool = False
    leaving: bool = False
    at: datetime = msgspec.field(default_factory=utcnow)


class RenderClaim(msgspec.Struct, kw_only=True):
    """A render worker asks the dispatcher for jobs (request/reply on `kiln.render.claim`)."""

    worker_id: str
    slots: int  # jobs it can take now
    batch_key: list | None = None  # only jobs that can join the batch it holds (pipeline.batch_key)
    wait_ms: int = 0  # with nothing to give, wait this long for a job before answering


class ClaimedJob(msgspec.Struct):
    """A job as JetStream delivered it to the dispatcher: the worker acks it on `reply`."""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str] | None = None


class RenderClaimed(msgspec.Struct, kw_only=True):
    jobs: list[ClaimedJob]
    more: bool = False  # more jobs of that batch's kind are held: the batch may fill


# Events that end a request: a client waits for exactly one of these.
TERMINAL = (QuotaDenied, ImageDelivered, RequestFailed)


def _is_own_mask(key: str, user_id: str) -> bool:
    prefix = f"{user_id}/masks/"
    return key.startswith(prefix) and bool(ID_PATTERN.match(key[len(prefix) :].removesuffix(".png")))


_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder(AnyEvent)
_msgpack_decoder = msgspec.msgpack.Decoder(AnyEvent)

# An event is a few hundred bytes (images never travel on the bus); anything much larger
# is junk or an attack, refused before it is parsed.
MAX_EVENT_BYTES = 64 * 1024

T = TypeVar("T")


def encode(event: msgspec.Struct) -> bytes:
    return _json_encoder.encode(event)


def decode(data: bytes, content_type: str | None = None) -> AnyEvent:
    """Decode one event; raises `msgspec.DecodeError` (a `ValueError`) with the reason."""
    decoder = _msgpack_decoder if content_type == MSGPACK else _json_decoder
    return _guarded(decoder.decode, data)


def decode_message(data: bytes | None, headers: dict[str, str] | None) -> AnyEvent:
    """Decode a message's event by its `Content-Type` header (JSON unless it says msgpack)."""
    return decode(data or b"", (headers or {}).get("Content-Type"))


def decode_json(data: bytes, kind: type[T]) -> T:
    """Decode JSON that is not an event (a heartbeat, an HTTP body, a stored record) with
    the same guards; raises `msgspec.DecodeError` with the reason."""
    return _guarded(lambda raw: msgspec.json.decode(raw, type=kind), data)


def _guarded(decode_bytes: Callable[[bytes], T], data: bytes) -> T:
    """Whatever the bytes hold, the caller gets a value or a `msgspec.DecodeError`: too
    large, nested too deeply (msgspec raises RecursionError), malformed, mistyped, or
    holding a value no field should (see `_refuse_odd_values`)."""
    if len(data) > MAX_EVENT_BYTES:
        raise msgspec.DecodeError(f"{len(data)} bytes, more than the {MAX_EVENT_BYTES} a message may have")
    try:
        value = decode_bytes(data)
    except RecursionError:
        raise msgspec.DecodeError("nested too deeply") from None
    if _has_odd_value(value):  # the quick walk, on every message; the slow one names the field
        _refuse_odd_values(value)
    return value


def _has_odd_value(value: object) -> bool:
    """Whether `_refuse_odd_values` would refuse `value`, without building field names:
    a third of its cost, on every message decoded."""
    kind = type(value)
    if kind is str:
        return "\x00" in value
    if kind is float:
        return not math.isfinite(value) or (value == 0 and math.copysign(1, value) < 0)
    if kind is int or kind is bool or value is None:
        return False
    if isinstance(value, msgspec.Struct):
        return any(map(_has_odd_value, msgspec.structs.astuple(value)))
    if kind is dict:
        return any(map(_has_odd_value, value)) or any(map(_has_odd_value, value.values()))
    if kind is list or kind is tuple:
        return any(map(_has_odd_value, value))
    return False


def _refuse_odd_values(value: object, field: str = "$") -> None:
    """No NUL character in any text (PostgreSQL refuses it in JSONB, C libraries cut the
    text there) and no NaN, infinity or -0.0 in any number (they break comparisons,
    limits and the quota log's hashes)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise msgspec.DecodeError(f"`{field}` contains a NUL character")
    elif isinstance(value, float):
        if not math.isfinite(value) or (value == 0 and math.copysign(1, value) < 0):
            raise msgspec.DecodeError(f"`{field}` is {value!r}, not a usable number")
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            _refuse_odd_values(getattr(value, name), f"{field}.{name}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_odd_values(key, field)
            _refuse_odd_values(item, f"{field}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _refuse_odd_values(item, f"{field}[{index}]")


def check_ids(event: Event) -> None:
    """Raise ValueError naming the field when an id cannot be a subject token."""
    if isinstance(event, PromptSubmitted) and event.edit_of is not None and not ID_PATTERN.match(event.edit_of):
        raise ValueError(f"`edit_of` must match {ID_PATTERN.pattern} but is {event.edit_of!r}")
    mask_key = getattr(event, "mask_key", None)
    if mask_key is not None and not _is_own_mask(mask_key, event.user_id):
        raise ValueError(f"`mask_key` must be a key under {event.user_id}/masks/ but is {mask_key!r}")
    for field in ("request_id", "user_id"):
        value = getattr(event, field)
        if not ID_PATTERN.match(value):
            raise ValueError(f"`{field}` must match {ID_PATTERN.pattern} but is {value!r}")
    if event.conversation_id and not ID_PATTERN.match(event.conversation_id):
        raise ValueError(f"`conversation_id` must match {ID_PATTERN.pattern} but is {event.conversation_id!r}")
