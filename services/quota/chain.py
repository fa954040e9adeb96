"""The quota log's hash chain: each event's hash covers its content and its predecessor's
hash (the event before it by position), so an edited, removed or reordered row breaks the
chain at that row. It makes tampering evident, not impossible: whoever can rewrite the
table can recompute every later hash too, which is why `kiln audit verify` prints the
head hash for the operator to keep elsewhere.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import msgspec

GENESIS = "0" * 64  # the predecessor of the first event


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
        "payload": payload,
        "metadata": metadata,
        "recorded_at": canonical_time(recorded_at),
        "prev_hash": prev_hash,
    }
    # Canonical JSON: keys sorted at every level, no spaces, UTF-8.
    return hashlib.sha256(msgspec.json.encode(document, order="sorted")).hexdigest()
