"""The quota log's hash chain: each event's hash covers its content and its predecessor's
hash (the event before it by position), so an edited, removed or reordered row breaks the
chain at that row. It makes tampering evident, not impossible: whoever can rewrite the
table can recompute every later hash too, which is why quota also signs checkpoints of the
head and keeps them outside Postgres (`checkpoints.py`).

The hash covers the value as JSONB keeps it, not as Python had it: JSONB stores a number as
`numeric` and gives back its plain decimal, so -0.0 comes back as 0.0 and 1e308 as the
integer 10**308. `canonical` makes those changes before hashing, so the writer's hash is the
one `verify` recomputes from the row; numbers JSONB cannot keep (NaN, ±infinity) are refused.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

GENESIS = "0" * 64  # the predecessor of the first event
# msgspec writes a float this large with an exponent ("1e16"), which JSONB gives back as an
# integer; below it a float is written with a point or a negative exponent and comes back
# as the same float.
EXPONENT_FROM = 1e16


class NotLoggable(ValueError):
    """A value the log cannot keep as it is (a number JSONB refuses)."""


def canonical(value: Any, where: str = "$") -> Any:
    """`value` as JSONB gives it back: -0.0 → 0.0, a float of 1e16 or more → the integer its
    shortest decimal names. Raises NotLoggable, naming the place, for NaN and ±infinity."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotLoggable(f"`{where}` is {value}: the log keeps finite numbers only")
        if value == 0.0:
            return 0.0  # also -0.0: numeric has no negative zero
        if abs(value) >= EXPONENT_FROM:
            return int(Decimal(repr(value)))
        return value
    if isinstance(value, dict):
        return {key: canonical(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(item, f"{where}[{n}]") for n, item in enumerate(value)]
    return value


def canonical_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def event_hash(
    *,
    stream_id: str,
    version: int,
    event_type: str,
    request_id: str,
    payload: dict[str, Any],
    metadata: dict[str, Any],
    recorded_at: datetime,
    prev_hash: str,
) -> str:
    document = {
        "stream_id": stream_id,
        "version": version,
        "event_type": event_type,
        "request_id": request_id,
        "payload": canonical(payload, "payload"),
        "metadata": canonical(metadata, "metadata"),
        "recorded_at": canonical_time(recorded_at),
        "prev_hash": prev_hash,
    }
    # Canonical JSON: keys sorted at every level, no spaces, UTF-8.
    return hashlib.sha256(msgspec.json.encode(document, order="sorted")).hexdigest()
