"""Every subject, stream, bucket and durable consumer name of Kiln, in one place.

A `Channel` is a family of subjects with named tokens (`kiln.outcome.{user}.{request}`)
and the events it carries. Subjects carry the user (and, for per-request events, the
request) as tokens, so that permissions can be scoped per user and a client can look up the
outcome of one request by its subject. Services declare which channels they publish on and
read from (`shared.service.Service`); the bus refuses any other subject, and the AsyncAPI
document (`docs/asyncapi.yaml`) is generated from this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nats.js.api import RetentionPolicy

from shared.events import (
    TERMINAL,
    ImageLink,
    PromptSubmitted,
    QuotaDenied,
    QuotaGranted,
    QuotaStatus,
    RenderClaim,
    RenderClaimed,
    RenderCompleted,
    RenderFailed,
    RenderProgress,
    RenderRequested,
    TurnComposed,
    WorkerHeartbeat,
)

_TOKEN = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Channel:
    """A subject template, what travels on it, and how.

    `kept`: JetStream keeps it in a stream (else it is plain NATS: missed is lost).
    `reply`: a request/reply subject, answered with this type (JSON), or `{"error": …}`.
    """

    template: str
    doc: str
    events: tuple[type, ...] = ()
    kept: bool = True
    reply: type | None = None

    @property
    def tokens(self) -> list[str]:
        """The names of the template's variable tokens, in order: ["user", "request"]."""
        return _TOKEN.findall(self.template)

    @property
    def pattern(self) -> str:
        """The template as a NATS wildcard: `kiln.outcome.*.*`."""
        return _TOKEN.sub("*", self.template)

    def subject(self, *values: str) -> str:
        """The subject for these token values, in the template's order."""
        if len(values) != len(self.tokens):
            raise TypeError(f"{self.template} takes {len(self.tokens)} tokens, got {len(values)}")
        given = iter(values)
        return _TOKEN.sub(lambda _: next(given), self.template)

    def position(self, token: str) -> int:
        """Which dot-separated part of a subject holds `token` (e.g. the user)."""
        return self.template.split(".").index("{" + token + "}")

    def value(self, subject: str, token: str) -> str:
        """The value of `token` in a subject of this channel."""
        return subject.split(".")[self.position(token)]


PROMPT_SUBMITTED = Channel(
    "kiln.prompt.submitted.{user}",
    "A client asks for an image (the request's first event).",
    events=(PromptSubmitted,),
)
QUOTA_DECIDED = Channel(
    "kiln.quota.decided.{user}.{request}",
    "quota's decision, appended to its log before it is published.",
    events=(QuotaGranted, QuotaDenied),
)
RENDER_JOB = Channel(
    "kiln.render.jobs.{tier}.{user}",
    "A fully specified render job (a work queue: a job leaves once a worker acks it). One "
    "subject per user within a tier, so the render queue can take users in turn.",
    events=(RenderRequested,),
)
RENDER_CANCEL = Channel(
    "kiln.render.cancel.{user}.{request}",
    "A client's request to drop a job (empty payload). Kept, so a worker that claims the job later still sees it.",
)
RENDER_EVENT = Channel(
    "kiln.render.events.{user}.{request}",
    "render's result of one job, for delivery.",
    events=(RenderCompleted, RenderFailed),
)
RENDER_PROGRESS = Channel(
    "kiln.render.progress.{user}.{request}",
    "Step progress and queue place. Plain NATS, not kept: a missed progress event costs nothing.",
    events=(RenderProgress,),
    kept=False,
)
OUTCOME = Channel(
    "kiln.outcome.{user}.{request}",
    "The request's one outcome: QuotaDenied, ImageDelivered or RequestFailed. The subject "
    "takes one message ever, so a second outcome is refused whoever sends it.",
    events=TERMINAL,
)
CONVERSATION = Channel(
    "kiln.conversation.{user}.{conversation}",
    "A conversation's turns, in order: a turn is appended only after the turn its composer read last.",
    events=(TurnComposed,),
)
FLEET_TELEMETRY = Channel(
    "kiln.fleet.telemetry.{worker}",
    "A render worker's heartbeat, once a second (plain NATS): quota sheds load by it.",
    events=(WorkerHeartbeat,),
    kept=False,
)
RENDER_CLAIM = Channel(
    "kiln.render.claim",
    "Request/reply among render workers: a worker asks the fleet's dispatcher (one worker "
    "of the fleet, services/render/dispatch.py) for up to N jobs, in fair order.",
    events=(RenderClaim,),
    kept=False,
    reply=RenderClaimed,
)
QUOTA_STATUS = Channel(
    "kiln.quota.status.{user}",
    "Request/reply: quota answers with the user's usage today.",
    kept=False,
    reply=QuotaStatus,
)
QUOTA_PRESSURE = Channel(
    "kiln.quota.pressure",
    "Request/reply: quota answers with the fleet pressure it sheds load by.",
    kept=False,
    reply=dict[str, str],
)
CONTEXT_STYLES = Channel(
    "kiln.context.styles",
    "Request/reply: context answers with its style presets (name → title).",
    kept=False,
    reply=dict[str, str],
)
CONTEXT_TURNS = Channel(
    "kiln.context.turns.{user}.{conversation}",
    "Request/reply: context answers with the conversation's turns, oldest first (a client may not read streams).",
    kept=False,
    reply=list[TurnComposed],
)
DELIVERY_LINK = Channel(
    "kiln.delivery.link.{user}.{request}",
    "Request/reply: delivery answers with a download link for the request's image, signed "
    "now (outcomes are kept a year, so they hold the image's key, never a link).",
    kept=False,
    reply=ImageLink,
)
DEAD_LETTER = Channel(
    "kiln.deadletter.{service}",
    "A message a service could not handle, kept as it came with the reason in the "
    "`Kiln-Dead-Letter-Reason` header and its subject in `Kiln-Original-Subject`.",
)
AUDIT_CHECKPOINT = Channel(
    "kiln.audit.checkpoint",
    "quota's signed checkpoint of its log's head (position, hash, time; ed25519, see "
    "`services/quota/checkpoints.py`): `kiln audit verify` checks the database against these.",
)

ALL_CHANNELS = [
    PROMPT_SUBMITTED,
    QUOTA_DECIDED,
    RENDER_JOB,
    RENDER_CANCEL,
    RENDER_EVENT,
    RENDER_PROGRESS,
    OUTCOME,
    CONVERSATION,
    FLEET_TELEMETRY,
    RENDER_CLAIM,
    QUOTA_STATUS,
    QUOTA_PRESSURE,
    CONTEXT_STYLES,
    CONTEXT_TURNS,
    DELIVERY_LINK,
    DEAD_LETTER,
    AUDIT_CHECKPOINT,
]

# The subject functions the code calls: `subjects.outcome(user, request)`.
prompt_submitted = PROMPT_SUBMITTED.subject
quota_decided = QUOTA_DECIDED.subject
render_job = RENDER_JOB.subject
render_cancel = RENDER_CANCEL.subject
render_event = RENDER_EVENT.subject
render_progress = RENDER_PROGRESS.subject
outcome = OUTCOME.subject
conversation = CONVERSATION.subject
fleet_telemetry = FLEET_TELEMETRY.subject
quota_status = QUOTA_STATUS.subject
delivery_link = DELIVERY_LINK.subject
dead_letter = DEAD_LETTER.subject


@dataclass(frozen=True)
class Stream:
    """A JetStream stream keeping one channel."""

    name: str
    channel: Channel
    retention: RetentionPolicy = RetentionPolicy.LIMITS
    max_age_s: float = 7 * 24 * 3600
    duplicate_window_s: float = 600  # Nats-Msg-Id duplicates dropped within this window
    # NATS 2.15 gives a stream 1000 consumers unless it says otherwise (and -1 no longer
    # means unlimited): the streams that hold a consumer per user, or per read, say more.
    max_consumers: int | None = None
    # One message per subject, ever (while the stream keeps it), enforced by the server
    # whoever publishes: a second decision, result or outcome for a request is refused.
    one_per_subject: bool = False
    # Only these values of one token are kept (("tier", ("paid", "free"))): a publish on
    # any other subject of the channel is not stored at all.
    only: tuple[str, tuple[str, ...]] | None = None

    @property
    def subjects(self) -> list[str]:
        if self.only is None:
            return [self.channel.pattern]
        token, values = self.only
        wildcards = ["*"] * len(self.channel.tokens)
        position = self.channel.tokens.index(token)
        return [self.channel.subject(*wildcards[:position], value, *wildcards[position + 1 :]) for value in values]

    @property
    def user_token(self) -> int | None:
        """Which subject token names the user (checked against the event), if one does."""
        return self.channel.position("user") if "user" in self.channel.tokens else None


YEAR_S = 365 * 24 * 3600
PROMPTS = Stream("KILN_PROMPTS", PROMPT_SUBMITTED)
QUOTA = Stream("KILN_QUOTA", QUOTA_DECIDED, one_per_subject=True)
TIERS = ("paid", "free")  # render lanes, in the order workers pull them
# A work queue: a job leaves the stream once a worker acks it. One consumer per tier, which
# the fleet's dispatcher pulls (services/render/dispatch.py); a job of no known tier is not kept.
RENDER_JOBS = Stream(
    "KILN_RENDER_JOBS", RENDER_JOB, retention=RetentionPolicy.WORK_QUEUE, max_consumers=32, only=("tier", TIERS)
)
RENDER_CANCELS = Stream("KILN_RENDER_CANCELS", RENDER_CANCEL, max_age_s=24 * 3600)
RENDER_EVENTS = Stream("KILN_RENDER_EVENTS", RENDER_EVENT, one_per_subject=True)
# Kept a year: an edit by id finds its source image's prompt in the source's outcome.
OUTCOMES = Stream("KILN_OUTCOMES", OUTCOME, max_age_s=YEAR_S, one_per_subject=True)
# A short-lived consumer per conversation read (context composing a turn).
CONVERSATIONS = Stream("KILN_CONVERSATIONS", CONVERSATION, max_age_s=YEAR_S, max_consumers=100_000)
DEAD_LETTERS = Stream("KILN_DEAD_LETTERS", DEAD_LETTER, max_age_s=30 * 24 * 3600)
# Kept for good (max_age 0): a checkpoint is the evidence the quota database is checked
# against, so it lives where the quota database role cannot reach, and quota may only
# publish to it.
AUDIT_CHECKPOINTS = Stream("KILN_AUDIT_CHECKPOINTS", AUDIT_CHECKPOINT, max_age_s=0)

ALL_STREAMS = [
    PROMPTS,
    QUOTA,
    RENDER_JOBS,
    RENDER_CANCELS,
    RENDER_EVENTS,
    OUTCOMES,
    CONVERSATIONS,
    DEAD_LETTERS,
    AUDIT_CHECKPOINTS,
]


def stream_of(channel: Channel) -> Stream | None:
    """The stream that keeps a channel, if one does."""
    return next((stream for stream in ALL_STREAMS if stream.channel is channel), None)


@dataclass(frozen=True)
class Bucket:
    """A JetStream key-value bucket or object store."""

    name: str
    kind: str  # "objects" or "keys"
    doc: str
    ttl_s: float | None = None  # entries expire after this (key-value buckets)


IMAGES = Bucket(
    "kiln-images",
    "objects",
    "The PNGs: `<user>/<request>.png` (render writes), and masks under `<user>/masks/` (clients write).",
)
IMAGE_RECORDS = Bucket(
    "kiln-image-meta", "keys", "delivery's record of each image (`<user>.<request>`): prompt, composition, owner, time."
)
RENDER_ATTEMPTS = Bucket(
    "kiln-render-attempts",
    "keys",
    "Renders started per request (`<user>.<request>`), shared by the fleet.",
    ttl_s=7 * 24 * 3600,
)
ACCOUNTS = Bucket(
    "kiln-accounts",
    "keys",
    "delivery's playground accounts (`<user>`): the argon2id hash of the password, and when it was made.",
)
SESSIONS = Bucket(
    "kiln-sessions",
    "keys",
    "delivery's playground sessions (the SHA-256 of the session cookie): the user and the CSRF token. "
    "Sign-out deletes one; the rest expire with the cookie.",
    ttl_s=7 * 24 * 3600,
)
ALL_BUCKETS = [IMAGES, IMAGE_RECORDS, RENDER_ATTEMPTS, ACCOUNTS, SESSIONS]
IMAGE_BUCKET = IMAGES.name  # (the name, where an API wants a string)


def image_key(user_id: str, request_id: str) -> str:
    """Where a request's PNG lives in the image bucket."""
    return f"{user_id}/{request_id}.png"


# Durable consumers: a service's name for its place in a stream, kept by the server.
DURABLE_QUOTA_PROMPTS = "quota"
DURABLE_QUOTA_REFUNDS = "quota-refunds"
DURABLE_CONTEXT = "context"
DURABLE_DELIVERY = "delivery"


def render_dispatch_consumer(tier: str) -> str:
    """The render queue's durable consumer of one tier's jobs (the dispatcher pulls it)."""
    return f"render-dispatch-{tier}"


LEGACY_RENDER_CONSUMER_PREFIX = "render-"  # before 2026-12: one consumer per (tier, user)
