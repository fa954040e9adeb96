"""The quota policy is pure: same inputs, same decision."""

from datetime import datetime, timezone

import pytest

from services.quota import policy
from shared.events import PromptSubmitted, QuotaDenied, QuotaGranted

NOW = datetime(2026, 11, 26, 15, 30, tzinfo=timezone.utc)


def _prompt(**overrides) -> PromptSubmitted:
    return PromptSubmitted(**({"request_id": "r1", "user_id": "alice", "prompt": "a red circle"} | overrides))


@pytest.mark.parametrize("used", [0, 1, 2])
def test_free_plan_grants_the_first_three_images_of_a_day(used):
    submission = _prompt()
    decision = policy.decide(submission, "free", used, NOW)
    assert isinstance(decision, QuotaGranted)
    assert (decision.used, decision.limit, decision.day) == (used + 1, 3, "2026-11-26")
    assert decision.submission == submission


def test_fourth_image_is_denied_until_the_next_utc_midnight():
    decision = policy.decide(_prompt(), "free", 3, NOW)
    assert isinstance(decision, QuotaDenied)
    assert decision.reason == "daily_limit"
    assert decision.retry_at == datetime(2026, 11, 27, tzinfo=timezone.utc)
    assert "3 images per UTC day" in decision.detail


def test_the_day_is_the_utc_day_whatever_the_offset():
    late_evening_in_new_york = datetime.fromisoformat("2026-11-26T22:00:00-05:00")
    assert policy.utc_day(late_evening_in_new_york) == "2026-11-27"
    assert policy.next_utc_midnight(late_evening_in_new_york) == datetime(2026, 11, 28, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"width": 30}, "width"),
        ({"height": 4096}, "height"),
        ({"steps": 0}, "steps"),
    ],
)
def test_invalid_submissions_are_denied_naming_the_field(overrides, field):
    decision = policy.decide(_prompt(**overrides), "free", 0, NOW)
    assert isinstance(decision, QuotaDenied)
    assert decision.reason == "invalid" and f"`{field}`" in decision.detail
    assert decision.retry_at is None
