"""The quota policy is pure: same inputs, same decision."""

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from services.quota import policy
from services.quota.log_events import QuotaAdjusted, QuotaRefunded
from services.quota.plans import Plan, Shedding
from shared.events import PromptSubmitted, QuotaDenied, QuotaGranted

NOW = datetime(2026, 11, 26, 15, 30, tzinfo=UTC)
FREE = Plan(tier="free", daily_limit=3, burst=3, per_hour=60)
PLUS = Plan(tier="paid", daily_limit=10, burst=2, per_hour=60, soft_cap=3)
SHEDDING = Shedding(elevated_burst=1, elevated_per_hour=6, critical_retry_after_s=300)


def _prompt(**overrides) -> PromptSubmitted:
    fields = {"request_id": "r1", "user_id": "alice", "prompt": "a red circle", "submitted_at": NOW}
    return PromptSubmitted(**(fields | overrides))


def _decide(state=None, plan=FREE, pressure="normal", now=NOW, shedding=SHEDDING, **prompt):
    name = "free" if plan is FREE else "plus"
    return policy.decide(_prompt(**prompt), name, plan, state or policy.UserState(), pressure, shedding, now)


def _state_after(decisions: int, plan=FREE, pressure="normal", now=NOW) -> policy.UserState:
    state = policy.UserState()
    for n in range(decisions):
        policy.apply(state, _decide(state, plan, pressure, now, request_id=f"r{n}"))
    return state


@pytest.mark.parametrize("used", [0, 1, 2])
def test_free_plan_grants_the_first_three_images_of_a_day(used):
    decision = _decide(_state_after(used))
    assert isinstance(decision, QuotaGranted)
    assert (decision.used, decision.limit, decision.day, decision.tier) == (used + 1, 3, "2026-11-26", "free")
    assert decision.submission == _prompt()


def test_fourth_image_is_denied_until_the_next_utc_midnight():
    decision = _decide(_state_after(3))
    assert isinstance(decision, QuotaDenied)
    assert decision.reason == "daily_limit"
    assert decision.retry_at == datetime(2026, 11, 27, tzinfo=UTC)
    assert "3 images per UTC day" in decision.detail


def test_the_day_is_the_utc_day_whatever_the_offset():
    late_evening_in_new_york = datetime.fromisoformat("2026-11-26T22:00:00-05:00")
    assert policy.utc_day(late_evening_in_new_york) == "2026-11-27"
    assert policy.next_utc_midnight(late_evening_in_new_york) == datetime(2026, 11, 28, tzinfo=UTC)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"width": 30}, "width"),
        ({"height": 4096}, "height"),
        ({"steps": 0}, "steps"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_submissions_are_denied_naming_the_field(overrides, field):
    decision = _decide(**overrides)
    assert isinstance(decision, QuotaDenied)
    assert decision.reason == "invalid" and f"`{field}`" in decision.detail
    assert decision.retry_at is None


def test_a_burst_past_the_bucket_is_rate_limited_until_a_token_refills():
    state = _state_after(2, PLUS)  # burst 2, one token a minute
    decision = _decide(state, PLUS)
    assert isinstance(decision, QuotaDenied) and decision.reason == "rate_limit"
    assert decision.retry_at == NOW + timedelta(minutes=1)
    assert isinstance(_decide(state, PLUS, now=NOW + timedelta(minutes=1)), QuotaGranted)


def test_past_the_soft_cap_grants_are_served_but_flagged():
    state = policy.UserState()
    flags = []
    for n in range(5):  # a minute apart: the bucket never runs dry
        decision = _decide(state, PLUS, now=NOW + timedelta(minutes=n), request_id=f"r{n}")
        policy.apply(state, decision)
        flags.append(decision.over_soft_cap)
    assert flags == [False, False, False, True, True]


def test_elevated_pressure_limits_free_users_harder_and_leaves_paid_ones_alone():
    one_granted = _state_after(1, pressure="elevated")
    denied = _decide(one_granted, pressure="elevated")
    assert isinstance(denied, QuotaDenied) and denied.reason == "rate_limit"
    assert "elevated" in denied.detail
    assert denied.retry_at == NOW + timedelta(minutes=10)  # one image per 10 minutes
    assert isinstance(_decide(one_granted, now=NOW + timedelta(minutes=1)), QuotaGranted)  # normal again
    assert isinstance(_decide(_state_after(1, PLUS), PLUS, pressure="elevated"), QuotaGranted)


def test_elevated_pressure_degrades_free_images_before_any_is_denied_and_records_why():
    shedding = Shedding(elevated_burst=1, elevated_per_hour=6, elevated_max_steps=12)

    def decide(pressure, plan=FREE, steps=30):
        name = "free" if plan is FREE else "plus"
        return policy.decide(_prompt(steps=steps), name, plan, policy.UserState(), pressure, shedding, NOW)

    degraded = decide("elevated")
    assert isinstance(degraded, QuotaGranted) and degraded.steps == 12
    assert degraded.degraded == "30 steps asked, 12 rendered while the fleet is elevated"
    assert degraded.submission.steps == 30  # what was asked stays recorded
    assert (decide("normal").steps, decide("normal").degraded) == (None, None)
    assert decide("elevated", steps=8).steps is None  # already within the cap
    assert decide("elevated", plan=PLUS).degraded is None  # paid plans are never degraded
    assert decide("critical").reason == "capacity"  # past elevated: denied
    assert _decide(pressure="elevated").degraded is None  # rules without a cap (before policy 4): as asked


def test_critical_pressure_sheds_free_requests_and_serves_paid_ones_in_the_lane_the_rules_name():
    shed = _decide(pressure="critical")
    assert isinstance(shed, QuotaDenied)
    assert (shed.reason, shed.retry_at, shed.pressure) == ("capacity", NOW + timedelta(seconds=300), "critical")
    # Rules recorded before policy 6 had no `critical_paid_lane`: paid went behind free.
    paid = _decide(plan=PLUS, pressure="critical")
    assert isinstance(paid, QuotaGranted) and (paid.tier, paid.pressure) == ("free", "critical")
    keeps = msgspec.structs.replace(SHEDDING, critical_paid_lane="paid")
    assert _decide(plan=PLUS, pressure="critical", shedding=keeps).tier == "paid"
    assert _decide(plan=PLUS).tier == "paid"


def test_a_refund_gives_the_image_back_and_an_admin_grant_raises_the_day_s_limit():
    state = _state_after(3)
    a_minute_later = NOW + timedelta(minutes=1)  # the rate bucket has a token again
    assert _decide(state, now=a_minute_later).reason == "daily_limit"
    policy.apply(state, QuotaRefunded(request_id="r0", user_id="alice", day="2026-11-26", reason="gave_up"))
    assert _decide(state).used == 3  # at once: the refund gave the rate token back too
    state = _state_after(3)
    policy.apply(state, QuotaAdjusted(request_id="a1", user_id="alice", day="2026-11-26", images=2, by="ops"))
    granted = _decide(state, now=a_minute_later)
    assert isinstance(granted, QuotaGranted) and (granted.used, granted.limit) == (4, 5)


def test_a_new_day_starts_with_the_full_allowance():
    assert isinstance(_decide(_state_after(3), now=NOW + timedelta(days=1)), QuotaGranted)


# -- sizes and cost ---------------------------------------------------------------------

PRICED = policy.Pricing(sizes=[32], step_seconds={"32x32": 0.015, "512x512": 13.0})
BUDGETED = Plan(tier="free", daily_limit=3, burst=3, per_hour=60, budget_s=0.3)


def test_a_size_the_model_does_not_draw_is_invalid_before_anything_else():
    decision = policy.decide(
        _prompt(width=64, height=64), "free", FREE, policy.UserState(), "normal", SHEDDING, NOW, PRICED
    )
    assert isinstance(decision, QuotaDenied) and decision.reason == "invalid"
    assert decision.detail == "the model draws 32×32 only, not 64×64"


def test_a_request_over_the_plans_budget_is_refused_with_what_fits():
    decision = policy.decide(_prompt(steps=50), "free", BUDGETED, policy.UserState(), "normal", SHEDDING, NOW, PRICED)
    assert isinstance(decision, QuotaDenied) and decision.reason == "too_costly" and decision.retry_at is None
    assert decision.detail == "32×32×50 needs about 0.75 s here; the free plan allows 0.3 s an image — try --steps 20"


def test_a_grant_records_its_estimate_and_budget():
    decision = policy.decide(_prompt(steps=10), "free", BUDGETED, policy.UserState(), "normal", SHEDDING, NOW, PRICED)
    assert isinstance(decision, QuotaGranted)
    assert (decision.estimate_s, decision.budget_s) == (0.15, 0.3)


def test_without_measured_figures_or_a_budget_nothing_is_refused_for_cost():
    unpriced = policy.Pricing(sizes=[32])
    for plan, pricing in ((BUDGETED, unpriced), (FREE, PRICED)):
        decision = policy.decide(_prompt(steps=50), "free", plan, policy.UserState(), "normal", SHEDDING, NOW, pricing)
        assert isinstance(decision, QuotaGranted)


# -- quoted text ---------------------------------------------------------------------------

WITH_TEXT = policy.Pricing(sizes=[32], text_sizes=[128], text_chars=12)


def _text_decision(prompt: str, side: int, pricing: policy.Pricing = WITH_TEXT):
    submission = _prompt(prompt=prompt, width=side, height=side)
    return policy.decide(submission, "free", FREE, policy.UserState(), "normal", SHEDDING, NOW, pricing)


def test_a_prompt_quoting_text_is_drawn_at_the_text_models_size():
    assert isinstance(_text_decision('a sign that says "OPEN"', 128), QuotaGranted)
    wrong = _text_decision('a sign that says "OPEN"', 32)
    assert isinstance(wrong, QuotaDenied) and wrong.reason == "invalid"
    assert wrong.detail == "a prompt quoting text is drawn at 128×128 only, not 32×32"
    assert isinstance(_text_decision("a red circle", 32), QuotaGranted)  # no quotes: the picture model


def test_text_the_model_cannot_write_is_invalid_before_anyone_is_charged():
    too_long = _text_decision('a sign that says "THIRTEEN CHARS"', 128)
    assert isinstance(too_long, QuotaDenied) and too_long.reason == "invalid"
    assert "has 14 characters; the model draws at most 12" in too_long.detail
    odd = _text_decision("the word “CAFÉ!”", 128)
    assert isinstance(odd, QuotaDenied) and "'!É'" in odd.detail
    # Without a text model (and in decisions recorded before policy 6) quotes are words.
    assert isinstance(_text_decision('a sign that says "CAFÉ!"', 32, PRICED), QuotaGranted)


def test_quoted_text_is_priced_and_degraded_from_the_steps_the_text_model_draws():
    # The text model draws 6 steps whatever is asked: 30 asked are priced as 6, and a cap
    # of 12 under pressure takes nothing from them.
    seconds = {"128x128": 0.5}
    pricing = policy.Pricing(sizes=[32], step_seconds=seconds, text_sizes=[128], text_chars=12, text_steps=6)
    shedding = Shedding(elevated_burst=5, elevated_per_hour=60, elevated_max_steps=12)
    submission = _prompt(prompt='a sign that says "OPEN"', width=128, height=128, steps=30)

    def decide(pricing: policy.Pricing, pressure="elevated", shedding=shedding):
        return policy.decide(submission, "free", FREE, policy.UserState(), pressure, shedding, NOW, pricing)

    granted = decide(pricing)
    assert isinstance(granted, QuotaGranted)
    assert (granted.estimate_s, granted.steps, granted.degraded) == (3.0, None, None)
    tight = decide(pricing, shedding=Shedding(elevated_burst=5, elevated_per_hour=60, elevated_max_steps=2))
    assert (tight.estimate_s, tight.steps) == (1.0, 2)
    assert tight.degraded == "30 steps asked, 2 rendered while the fleet is elevated"
    # Recorded before policy 7 (no `text_steps`): priced and degraded from the steps asked, as then.
    before = decide(msgspec.structs.replace(pricing, text_steps=None))
    assert (before.estimate_s, before.steps) == (6.0, 12)


# -- requests at once (`max_active`) -------------------------------------------------------

CAPPED = Plan(tier="paid", daily_limit=100, burst=50, per_hour=600, max_active=2)


def test_a_user_at_the_plans_requests_at_once_is_refused_at_once_with_a_retry_time():
    state = policy.UserState()
    decisions = [
        policy.decide(_prompt(request_id=f"r{n}"), "capped", CAPPED, state, "normal", SHEDDING, NOW, active=n)
        for n in range(3)
    ]
    assert [type(d) for d in decisions] == [QuotaGranted, QuotaGranted, QuotaDenied]
    refused = decisions[2]
    assert refused.reason == "concurrency" and refused.retry_at == NOW + timedelta(seconds=policy.ACTIVE_RETRY_S)
    assert "allows 2 requests at once and 2 are still in progress" in refused.detail


def test_without_max_active_any_number_may_be_in_progress():
    decision = policy.decide(_prompt(), "plus", PLUS, policy.UserState(), "normal", SHEDDING, NOW, active=1000)
    assert isinstance(decision, QuotaGranted)


def test_a_negative_max_active_is_refused():
    with pytest.raises(ValueError, match="max_active"):
        Plan(tier="paid", daily_limit=1, burst=1, per_hour=1, max_active=-1)
