"""The quota policy: a pure function of recorded inputs, so `audit replay` can re-run it.

No I/O here. `decide` gets the submission, the user's plan, how many images the user was
granted on the UTC day of the decision, and the time of decision, and returns the event.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone

from shared.events import PromptSubmitted, QuotaDenied, QuotaGranted

POLICY_VERSION = "1"
DAILY_LIMITS = {"free": 3}
MAX_PROMPT_CHARS = 1000
SIZE_RANGE = (8, 1024)
STEPS_RANGE = (1, 100)


def utc_day(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).date().isoformat()


def next_utc_midnight(moment: datetime) -> datetime:
    tomorrow = moment.astimezone(timezone.utc).date() + timedelta(days=1)
    return datetime.combine(tomorrow, time(0), tzinfo=timezone.utc)


def invalid_reason(submission: PromptSubmitted) -> str | None:
    """Why the submission cannot be rendered, naming the field and its value; None if fine."""
    if not submission.prompt.strip():
        return "`prompt` is empty"
    if len(submission.prompt) > MAX_PROMPT_CHARS:
        return f"`prompt` has {len(submission.prompt)} characters, the limit is {MAX_PROMPT_CHARS}"
    low, high = SIZE_RANGE
    for field in ("width", "height"):
        value = getattr(submission, field)
        if not (low <= value <= high) or value % 8:
            return f"`{field}` must be a multiple of 8 between {low} and {high} but is {value}"
    if not (STEPS_RANGE[0] <= submission.steps <= STEPS_RANGE[1]):
        return f"`steps` must be between {STEPS_RANGE[0]} and {STEPS_RANGE[1]} but is {submission.steps}"
    return None


def decide(
    submission: PromptSubmitted, plan: str, used_today: int, now: datetime
) -> QuotaGranted | QuotaDenied:
    ids = dict(
        request_id=submission.request_id,
        user_id=submission.user_id,
        conversation_id=submission.conversation_id,
    )
    problem = invalid_reason(submission)
    if problem is not None:
        return QuotaDenied(**ids, plan=plan, reason="invalid", detail=problem, decided_at=now)

    limit = DAILY_LIMITS[plan]
    if used_today >= limit:
        reset = next_utc_midnight(now)
        return QuotaDenied(
            **ids,
            plan=plan,
            reason="daily_limit",
            detail=f"the {plan} plan allows {limit} images per UTC day and {used_today} were used today",
            retry_at=reset,
            decided_at=now,
        )
    return QuotaGranted(
        **ids,
        plan=plan,
        used=used_today + 1,
        limit=limit,
        day=utc_day(now),
        submission=submission,
        decided_at=now,
    )
