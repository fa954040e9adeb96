"""The events of the quota log. Decisions (QuotaGranted, QuotaDenied) are the bus's events
(`shared.events`) and travel on it too; refunds and admin adjustments live only in the log."""

from __future__ import annotations

from datetime import datetime

import msgspec

from shared.events import Event, QuotaDenied, QuotaGranted, utcnow


class QuotaRefunded(Event, kw_only=True):
    """A granted request failed for good: its image no longer counts against `day`."""

    day: str
    reason: str  # the failure's reason, e.g. "gave_up"
    detail: str = ""
    refunded_at: datetime = msgspec.field(default_factory=utcnow)


class QuotaAdjusted(Event, kw_only=True):
    """An admin grant: `images` more (or, negative, fewer) allowed on `day`.
    `request_id` is the adjustment's own id."""

    day: str
    images: int
    by: str
    note: str = ""
    adjusted_at: datetime = msgspec.field(default_factory=utcnow)


Decision = QuotaGranted | QuotaDenied
LogEvent = QuotaGranted | QuotaDenied | QuotaRefunded | QuotaAdjusted


def from_payload(payload: dict) -> LogEvent:
    """A logged event from its JSONB payload."""
    return msgspec.convert(payload, LogEvent)
