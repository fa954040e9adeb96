"""Subjects and streams: where each event travels and which JetStream stream keeps it.

Subjects carry the user (and, for outcomes, the request) as tokens so that permissions can
be scoped per user and a client can look up the outcome of one request by its subject.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js.api import RetentionPolicy


def prompt_submitted(user_id: str) -> str:
    return f"kiln.prompt.submitted.{user_id}"


def quota_decided(user_id: str, request_id: str) -> str:
    return f"kiln.quota.decided.{user_id}.{request_id}"


def render_job(tier: str, user_id: str) -> str:
    """One subject per user within a tier, so the render queue can take users in turn."""
    return f"kiln.render.jobs.{tier}.{user_id}"


def render_cancel(user_id: str, request_id: str) -> str:
    """A client's request to drop a job: kept in a stream, so a worker that claims the job
    later still sees it."""
    return f"kiln.render.cancel.{user_id}.{request_id}"


def render_event(user_id: str, request_id: str) -> str:
    """RenderCompleted / RenderFailed: kept in a stream for delivery."""
    return f"kiln.render.events.{user_id}.{request_id}"


def render_progress(user_id: str, request_id: str) -> str:
    """Step progress: plain NATS, not stored; a missed progress event costs nothing."""
    return f"kiln.render.progress.{user_id}.{request_id}"


def outcome(user_id: str, request_id: str) -> str:
    """The request's one outcome — QuotaDenied, ImageDelivered or RequestFailed — on one
    subject, so that JetStream can refuse a second one whoever sends it."""
    return f"kiln.outcome.{user_id}.{request_id}"


def conversation(user_id: str, conversation_id: str) -> str:
    """A conversation's turns (TurnComposed), in order: one subject per conversation, so a
    turn can be appended only after the turn its composer read last."""
    return f"kiln.conversation.{user_id}.{conversation_id}"


def quota_status(user_id: str) -> str:
    """Request/reply: quota answers with the user's QuotaStatus for today."""
    return f"kiln.quota.status.{user_id}"


# Request/reply: quota answers with the fleet pressure it sheds load by ({"level", "why"}).
QUOTA_PRESSURE = "kiln.quota.pressure"
# Request/reply: context answers with its style presets (name → title).
CONTEXT_STYLES = "kiln.context.styles"


def fleet_telemetry(worker_id: str) -> str:
    """WorkerHeartbeat: plain NATS, not stored; quota keeps the latest per worker."""
    return f"kiln.fleet.telemetry.{worker_id}"


FLEET_TELEMETRY = "kiln.fleet.telemetry.*"


def dead_letter(service: str) -> str:
    return f"kiln.deadletter.{service}"


@dataclass(frozen=True)
class Stream:
    name: str
    subjects: list[str]
    # Which subject token names the user (checked against the event), if one does.
    user_token: int | None = None
    retention: RetentionPolicy = RetentionPolicy.LIMITS
    max_age_s: float = 7 * 24 * 3600
    duplicate_window_s: float = 600  # Nats-Msg-Id duplicates dropped within this window
    # NATS 2.15 gives a stream 1000 consumers unless it says otherwise (and -1 no longer
    # means unlimited): the streams that hold a consumer per user, or per read, say more.
    max_consumers: int | None = None


PROMPTS = Stream("KILN_PROMPTS", ["kiln.prompt.submitted.*"], user_token=3)
QUOTA = Stream("KILN_QUOTA", ["kiln.quota.decided.*.*"], user_token=3)
# A work queue: a job leaves the stream once a worker acks it.
# One consumer per user with jobs waiting (the fair queue).
RENDER_JOBS = Stream(
    "KILN_RENDER_JOBS", ["kiln.render.jobs.*.*"], user_token=4, retention=RetentionPolicy.WORK_QUEUE,
    max_consumers=1_000_000,
)
RENDER_CANCELS = Stream("KILN_RENDER_CANCELS", ["kiln.render.cancel.*.*"], user_token=3, max_age_s=24 * 3600)
RENDER_EVENTS = Stream("KILN_RENDER_EVENTS", ["kiln.render.events.*.*"], user_token=3)
YEAR_S = 365 * 24 * 3600
# Kept a year: an edit by id finds its source image's prompt in the source's outcome.
OUTCOMES = Stream("KILN_OUTCOMES", ["kiln.outcome.*.*"], user_token=2, max_age_s=YEAR_S)
# A short-lived consumer per conversation read (context composing a turn).
CONVERSATIONS = Stream(
    "KILN_CONVERSATIONS", ["kiln.conversation.*.*"], user_token=2, max_age_s=YEAR_S, max_consumers=100_000
)
DEAD_LETTERS = Stream("KILN_DEAD_LETTERS", ["kiln.deadletter.*"], max_age_s=30 * 24 * 3600)

ALL_STREAMS = [PROMPTS, QUOTA, RENDER_JOBS, RENDER_CANCELS, RENDER_EVENTS, OUTCOMES, CONVERSATIONS, DEAD_LETTERS]
TIERS = ("paid", "free")  # render lanes, in the order workers pull them

IMAGE_BUCKET = "kiln-images"
# delivery's record of each image: prompt, composition, owner, time (key `<user>.<request>`).
IMAGE_META_BUCKET = "kiln-image-meta"


def image_key(user_id: str, request_id: str) -> str:
    """Where a request's PNG lives in the image bucket."""
    return f"{user_id}/{request_id}.png"
