"""The quota policy: pure functions of recorded inputs, so `kiln audit replay` can re-run it.

No I/O here. `decide` gets the submission, the user's plan, the user's state (today's usage
and rate bucket), the fleet pressure and the time, and returns the decision. `apply` folds
any logged event into a user's state: the projection in Postgres and audit replay both
build state with it, so the two cannot drift apart.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import msgspec

from services.quota.log_events import LogEvent, QuotaAdjusted, QuotaRefunded
from services.quota.plans import Plan, Shedding
from shared import cost, quoted
from shared.events import MAX_SIDE, MAX_STEPS, MIN_SIDE, Pressure, PromptSubmitted, QuotaDenied, QuotaGranted
from shared.model_card import ModelCard

# 3: sizes and cost (`Pricing`); 4: free images degraded under pressure; 5: `max_active`;
# 6: `critical_paid_lane` (paid images keep their lane while critical), quoted text checked
# against the text model's sizes and characters (`Pricing.text_sizes`); 7: quoted text priced
# and degraded from the steps the text model draws (`Pricing.text_steps`)
POLICY_VERSION = "7"
# Versions whose decisions replay re-runs: version 2 had no pricing, which `Pricing()` is;
# before 4 the recorded shedding rules have no `elevated_max_steps`, which is no degrading;
# before 5 no plan had `max_active` and no decision recorded `active`, which is no limit;
# before 6 no shedding rule had `critical_paid_lane`, whose default is the old lane, and no
# pricing had `text_sizes`, which is quotes as plain words; before 7 none had `text_steps`,
# which is text priced at the steps asked.
REPLAYABLE_VERSIONS = ("2", "3", "4", "5", "6", "7")
ACTIVE_RETRY_S = 10  # a user at max_active may try again this soon: requests end in seconds
MAX_PROMPT_CHARS = 1000
SIZE_RANGE = (MIN_SIDE, MAX_SIDE)
STEPS_RANGE = (1, MAX_STEPS)
MAX_SEED = 2**63 - 1  # what every torch generator accepts


class Pricing(msgspec.Struct, frozen=True):
    """What quota knows of the model and the fleet when it decides (recorded with the
    decision): the model's native sides (None: any) and the workers' measured seconds per
    image-step by size (empty: none measured yet, so no request is priced)."""

    sizes: list[int] | None = None
    step_seconds: dict[str, float] = {}
    # The model that draws quoted text (shared/quoted.py): its sides and the most characters
    # it writes. None: there is none, and quotes are words like any other.
    text_sizes: list[int] | None = None
    text_chars: int = 0
    text_steps: int | None = None  # the most steps it draws, whatever is asked (None: as asked)

    def quoted_text(self, submission: PromptSubmitted) -> str | None:
        """The text the prompt asks to see written, if a model here draws text."""
        return quoted.find(submission.prompt) if self.text_sizes is not None else None

    def steps_drawn(self, submission: PromptSubmitted) -> int:
        """The steps the picture is drawn with when the fleet is not under pressure."""
        most = self.text_steps if self.quoted_text(submission) is not None else None
        return min(submission.steps, most or submission.steps)

    def card_for(self, submission: PromptSubmitted) -> ModelCard:
        """The sizes of the model that draws this prompt."""
        return ModelCard(sizes=self.sizes if self.quoted_text(submission) is None else self.text_sizes)

    def drawing_problem(self, submission: PromptSubmitted) -> str | None:
        """Why the models cannot draw this prompt at this size; None if they can."""
        width, height = submission.width, submission.height
        if (text := self.quoted_text(submission)) is None:
            return self.card_for(submission).size_problem(width, height)
        try:
            quoted.clean(text, self.text_chars)
        except ValueError as error:
            return str(error)
        return self.card_for(submission).size_problem(width, height, "a prompt quoting text is drawn at")


class Usage(msgspec.Struct):
    """One user's images on one UTC day."""

    granted: int = 0
    refunded: int = 0
    extra: int = 0  # admin grants on top of the plan's daily limit

    @property
    def used(self) -> int:
        return self.granted - self.refunded


class Bucket(msgspec.Struct):
    """The rate-limit token bucket; `tokens` None means full (never drawn from)."""

    tokens: float | None = None
    at: datetime | None = None


class UserState(msgspec.Struct):
    """What a decision needs to know about a user, rebuilt from the log."""

    usage: dict[str, Usage] = msgspec.field(default_factory=dict)  # by UTC day
    bucket: Bucket = msgspec.field(default_factory=Bucket)

    def on(self, day: str) -> Usage:
        return self.usage.get(day, Usage())


def utc_day(moment: datetime) -> str:
    return moment.astimezone(UTC).date().isoformat()


def next_utc_midnight(moment: datetime) -> datetime:
    tomorrow = moment.astimezone(UTC).date() + timedelta(days=1)
    return datetime.combine(tomorrow, time(0), tzinfo=UTC)


def daily_limit(plan: Plan, usage: Usage) -> int:
    """Images allowed on a day: the plan's limit plus that day's admin grants."""
    return plan.daily_limit + usage.extra


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
    if submission.seed is not None and not (0 <= submission.seed <= MAX_SEED):
        return f"`seed` must be between 0 and {MAX_SEED} but is {submission.seed}"
    if not (0.0 < submission.strength <= 1.0):
        return f"`strength` must be above 0 and at most 1 but is {submission.strength}"
    if submission.mask_key is not None and submission.edit_of is None:
        return "`mask_key` needs `edit_of`: a mask repaints part of an earlier image"
    return None


def bucket_rule(plan: Plan, pressure: Pressure, shedding: Shedding) -> tuple[int, float]:
    """(burst, images per hour) in force: free plans are limited harder under pressure."""
    if plan.tier == "free" and pressure != "normal":
        return min(plan.burst, shedding.elevated_burst), min(plan.per_hour, shedding.elevated_per_hour)
    return plan.burst, plan.per_hour


def degraded_steps(
    asked: int, drawn: int, plan: Plan, pressure: Pressure, shedding: Shedding
) -> tuple[int, str | None]:
    """(steps to render, why they are fewer than the model would draw, or None). `drawn`:
    what the model draws of the `asked` steps without pressure (a text model draws fewer)."""
    cap = shedding.elevated_max_steps
    if plan.tier != "free" or pressure == "normal" or not cap or drawn <= cap:
        return drawn, None
    return cap, f"{asked} steps asked, {cap} rendered while the fleet is {pressure}"


def tokens_now(bucket: Bucket, burst: int, per_hour: float, now: datetime) -> float:
    if bucket.tokens is None or bucket.at is None:
        return float(burst)
    hours = max((now - bucket.at).total_seconds(), 0.0) / 3600
    return min(float(burst), bucket.tokens + hours * per_hour)


def decide(
    submission: PromptSubmitted,
    plan_name: str,
    plan: Plan,
    state: UserState,
    pressure: Pressure,
    shedding: Shedding,
    now: datetime,
    pricing: Pricing = Pricing(),
    active: int = 0,
) -> QuotaGranted | QuotaDenied:
    """`active`: the user's requests granted and not yet ended (not in `state`: it comes
    from the outcomes on the bus, not the log, and is recorded with the decision)."""
    ids = dict(
        request_id=submission.request_id,
        user_id=submission.user_id,
        conversation_id=submission.conversation_id,
    )

    def deny(reason: str, detail: str, retry_at: datetime | None) -> QuotaDenied:
        return QuotaDenied(
            **ids,
            plan=plan_name,
            reason=reason,
            detail=detail,
            retry_at=retry_at,
            pressure=pressure,
            decided_at=now,
        )

    problem = invalid_reason(submission) or pricing.drawing_problem(submission)
    if problem is not None:
        return deny("invalid", problem, None)

    # Under pressure a free image is first made cheaper (fewer steps), before any is denied.
    steps, degraded = degraded_steps(submission.steps, pricing.steps_drawn(submission), plan, pressure, shedding)

    # What the image costs is known before anyone is charged: one over the plan's budget
    # is refused with what would fit, not left to hold a worker for minutes.
    estimate = cost.estimate_s(pricing.step_seconds, submission.width, submission.height, steps)
    budget = plan.budget_s or None
    if budget is not None and estimate is not None and estimate > budget:
        return deny("too_costly", _too_costly(submission, plan_name, budget, estimate, pricing), None)

    if pressure == "critical" and plan.tier == "free":
        retry = now + timedelta(seconds=shedding.critical_retry_after_s)
        return deny("capacity", "the render fleet is overloaded; free images are paused", retry)

    # Refused at once rather than queued: a user's work in the fleet stays bounded.
    if plan.max_active and active >= plan.max_active:
        return deny(
            "concurrency",
            f"the {plan_name} plan allows {plan.max_active} requests at once and {active} are still in progress",
            now + timedelta(seconds=ACTIVE_RETRY_S),
        )

    day = utc_day(now)
    usage = state.on(day)
    limit = daily_limit(plan, usage)
    if usage.used >= limit:
        return deny(
            "daily_limit",
            f"the {plan_name} plan allows {limit} images per UTC day and {usage.used} were used today",
            next_utc_midnight(now),
        )

    burst, per_hour = bucket_rule(plan, pressure, shedding)
    tokens = tokens_now(state.bucket, burst, per_hour, now)
    if tokens < 1:
        wait = timedelta(hours=(1 - tokens) / per_hour)
        return deny(
            "rate_limit",
            f"at most {burst} images at once, refilled at {per_hour:g} an hour"
            + ("" if pressure == "normal" else f" while the fleet is {pressure}"),
            now + wait,
        )

    used = usage.used + 1
    return QuotaGranted(
        **ids,
        plan=plan_name,
        used=used,
        limit=limit,
        day=day,
        tier=shedding.critical_paid_lane if pressure == "critical" else plan.tier,
        pressure=pressure,
        over_soft_cap=plan.soft_cap > 0 and used > plan.soft_cap,
        tokens_left=tokens - 1,
        estimate_s=None if estimate is None else round(estimate, 3),
        budget_s=budget,
        steps=steps if degraded else None,
        degraded=degraded,
        submission=submission,
        decided_at=now,
    )


def _too_costly(submission: PromptSubmitted, plan_name: str, budget: float, estimate: float, pricing: Pricing) -> str:
    """'32×32×50 needs about 40 s here; the free plan allows 20 s an image — try --steps 25'"""
    width, height, steps = submission.width, submission.height, pricing.steps_drawn(submission)
    sides = pricing.card_for(submission).offered_sides()
    hint = cost.what_fits(pricing.step_seconds, width, height, steps, budget, sides)
    return (
        f"{width}×{height}×{steps} needs about {cost.duration(estimate)} here; the {plan_name} plan allows "
        f"{cost.duration(budget)} an image" + (f" — try {hint}" if hint else "")
    )


def apply(state: UserState, event: LogEvent) -> None:
    """Fold one logged event into the user's state."""
    if isinstance(event, QuotaGranted):
        state.usage.setdefault(event.day, Usage()).granted += 1
        # (A grant of policy 1 had no bucket: it leaves the bucket full.)
        full = event.tokens_left is None
        state.bucket = Bucket() if full else Bucket(tokens=event.tokens_left, at=event.decided_at)
    elif isinstance(event, QuotaRefunded):
        # The failed image counts against neither the day nor the rate: the user may try
        # again at once. (The bucket is capped at its burst when next drawn from.)
        state.usage.setdefault(event.day, Usage()).refunded += 1
        if state.bucket.tokens is not None:
            state.bucket = Bucket(tokens=state.bucket.tokens + 1, at=state.bucket.at)
    elif isinstance(event, QuotaAdjusted):
        state.usage.setdefault(event.day, Usage()).extra += event.images
    # QuotaDenied changes nothing: a denied request uses no quota.
