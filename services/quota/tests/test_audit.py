"""The audit log's pure parts: the canonical hash, signed checkpoints, replay's checks."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import nacl.signing
import pytest

from services.quota import audit, chain, checkpoints
from services.quota import log as quota_log
from services.quota.log_events import QuotaAdjusted, QuotaRefunded

AT = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def as_jsonb_gives_back(value: Any) -> Any:
    """What Postgres returns for `value` stored as JSONB (msgspec-encoded): each number
    becomes `numeric` (no negative zero) and comes back as its plain decimal."""
    if isinstance(value, float):
        number = Decimal(msgspec.json.encode(value).decode())
        return msgspec.json.decode(format(abs(number) if number == 0 else number, "f"))
    if isinstance(value, dict):
        return {key: as_jsonb_gives_back(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_jsonb_gives_back(item) for item in value]
    return value


def hash_of(payload: dict[str, Any], metadata: dict[str, Any]) -> str:
    return chain.event_hash(
        stream_id="user:alice",
        version=1,
        event_type="QuotaDenied",
        request_id="r1",
        payload=payload,
        metadata=metadata,
        recorded_at=AT,
        prev_hash=chain.GENESIS,
    )


@pytest.mark.parametrize(
    "number", [-0.0, 0.0, 1e308, -1e308, 1e16, 1.2345678901234568e17, 5e-324, 1e-7, 0.1, 2.0, 2**63 - 1, 2**64]
)
def test_an_honest_number_hashes_as_jsonb_gives_it_back(number: float) -> None:
    payload = {"strength": number, "seed": 2**63 - 1, "nested": [number, {"guidance": number}]}
    metadata = {"inputs": {"submission": payload, "pricing": {"step_seconds": number}}}
    assert hash_of(payload, metadata) == hash_of(as_jsonb_gives_back(payload), as_jsonb_gives_back(metadata))


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_number_is_refused_by_name(number: float) -> None:
    with pytest.raises(chain.NotLoggable, match=r"`payload\.strength` is"):
        hash_of({"strength": number}, {})


def test_the_canonical_value_is_what_jsonb_keeps() -> None:
    assert chain.canonical([-0.0, 1e308, 0.5]) == [0.0, 10**308, 0.5]
    assert str(chain.canonical(-0.0)) == "0.0"


# -- checkpoints ------------------------------------------------------------------------

KEY = nacl.signing.SigningKey(b"k" * 32)
HASHES = {position: f"{position:064x}" for position in (10, 20, 30)}


def signed_at(*positions: int) -> list[checkpoints.Checkpoint]:
    """Checkpoints of a one-partition log."""
    return [checkpoints.sign(KEY, [checkpoints.Head(0, position, HASHES[position])], AT) for position in positions]


def test_an_honest_table_matches_its_checkpoints() -> None:
    report = checkpoints.check(signed_at(10, 20, 30), KEY.verify_key, HASHES, {0: 31})
    assert report.broken == [] and report.checked == 3 and report.newest.position == 30


def test_removed_newest_rows_are_named() -> None:
    report = checkpoints.check(signed_at(10, 20, 30), KEY.verify_key, {10: HASHES[10], 20: HASHES[20]}, {0: 25})
    assert report.broken == [
        "partition 0 ends at position 25 but the checkpoint signed at 2026-01-02T03:04:05.678901+00:00 covers"
        " position 30: the newest events were removed"
    ]


def test_a_rewritten_middle_row_is_named_after_the_last_matching_checkpoint() -> None:
    rewritten = {**HASHES, 20: "f" * 64, 30: "e" * 64}
    report = checkpoints.check(signed_at(10, 20, 30), KEY.verify_key, rewritten, {0: 30})
    assert len(report.broken) == 2
    assert report.broken[0].startswith("position 20: its hash ffffffffffff… differs from the checkpoint")
    assert "history was rewritten after position 10, up to position 20" in report.broken[0]


def test_a_checkpoint_of_another_key_counts_for_nothing() -> None:
    forged = checkpoints.sign(nacl.signing.SigningKey(b"x" * 32), [checkpoints.Head(0, 30, "e" * 64)], AT)
    tampered = signed_at(20)[0]
    tampered.heads = [checkpoints.Head(0, 20, "d" * 64)]  # the signature no longer covers it
    report = checkpoints.check([forged, tampered], KEY.verify_key, HASHES, {0: 30})
    assert report.checked == 0
    assert all("is not signed by quota's checkpoint key" in line for line in report.broken)


# Partition 0 holds 10 and 30, partition 1 holds 20 and 25.
PARTITIONED = {10: "a" * 64, 20: "b" * 64, 25: "c" * 64, 30: "d" * 64}


def heads_at(*heads: tuple[int, int]) -> checkpoints.Checkpoint:
    return checkpoints.sign(KEY, [checkpoints.Head(p, position, PARTITIONED[position]) for p, position in heads], AT)


def test_a_checkpoint_covers_every_partitions_head() -> None:
    checkpoint = heads_at((1, 25), (0, 30))
    assert (checkpoint.position, checkpoint.hash) == (30, PARTITIONED[30])  # the newest head
    assert [head.partition for head in checkpoint.heads] == [0, 1]
    report = checkpoints.check([checkpoint], KEY.verify_key, PARTITIONED, {0: 30, 1: 25})
    assert report.broken == [] and report.matched == 1


def test_one_partitions_removed_newest_event_is_found_while_the_other_matches() -> None:
    older, newer = heads_at((0, 10), (1, 20)), heads_at((0, 30), (1, 25))
    hashes = {position: PARTITIONED[position] for position in (10, 20, 30)}  # 25 is gone
    report = checkpoints.check([older, newer], KEY.verify_key, hashes, {0: 30, 1: 20})
    assert report.matched == 1 and len(report.broken) == 1
    assert report.broken[0].startswith("partition 1 ends at position 20 but the checkpoint signed at")
    # Checking partition 0 alone: nothing wrong there.
    assert checkpoints.check([older, newer], KEY.verify_key, hashes, {0: 30, 1: 20}, partition=0).broken == []


def test_a_checkpoint_from_before_partitions_is_read_as_partition_zeros_head() -> None:
    old = checkpoints.Checkpoint(position=30, hash=PARTITIONED[30], at=AT, key=KEY.verify_key.encode().hex())
    old.signature = KEY.sign(old.signed_bytes()).signature.hex()  # the document it signed: no heads
    assert b"heads" not in old.signed_bytes()
    assert old.covered() == [checkpoints.Head(0, 30, PARTITIONED[30])]
    assert checkpoints.check([old], KEY.verify_key, PARTITIONED, {0: 30, 1: 25}).broken == []


def test_a_user_stays_in_one_partition_and_users_spread_over_all() -> None:
    assert quota_log.partition_of("alice", 16) == quota_log.partition_of("alice", 16)
    assert quota_log.partition_of("alice", 1) == 0
    counts = Counter(quota_log.partition_of(f"user{n}", 16) for n in range(16_000))
    assert set(counts) == set(range(16)) and max(counts.values()) < 1.2 * min(counts.values())


def test_a_checkpoint_survives_its_wire_form(tmp_path) -> None:
    path = tmp_path / "checkpoints.jsonl"
    with path.open("wb") as file:
        audit.export_checkpoints(signed_at(30, 10), file)
    read = checkpoints.read_file(path)
    assert [c.position for c in read] == [10, 30]
    assert all(checkpoints.signed_by(c, KEY.verify_key) for c in read)


def test_the_key_is_made_once_and_kept_private(tmp_path) -> None:
    key = checkpoints.signing_key(tmp_path)
    assert checkpoints.signing_key(tmp_path).encode() == key.encode()
    assert (tmp_path / checkpoints.KEY_FILE).stat().st_mode & 0o077 == 0
    assert checkpoints.public_key_from(tmp_path / checkpoints.PUBLIC_KEY_FILE) == key.verify_key


def test_the_head_is_checkpointed_every_n_events_or_within_t_seconds() -> None:
    schedule = checkpoints.Schedule(every=100, after_s=10)
    assert not schedule.due(0, now=0)  # empty log
    assert not schedule.due(5, now=0)  # moved: the clock starts
    assert not schedule.due(6, now=8.9)
    assert schedule.due(7, now=9.1)  # the next look (a second later) would be past 10 s
    schedule.made(7)
    assert not schedule.due(7, now=50)  # nothing new
    assert schedule.due(107, now=50)  # 100 events


# -- replay's checks of refunds and adjustments ------------------------------------------


def refund(day: str = "2026-01-02") -> QuotaRefunded:
    return QuotaRefunded(request_id="r1", user_id="alice", day=day, reason="gave_up")


def test_a_refund_must_follow_a_grant_of_its_request_on_its_day_once() -> None:
    assert audit._check_refund(refund(), "2026-01-02", again=False) is None
    assert "no grant of this request" in audit._check_refund(refund(), None, again=False)
    assert "second refund" in audit._check_refund(refund(), "2026-01-02", again=True)
    assert "granted on 2026-01-01" in audit._check_refund(refund(), "2026-01-01", again=False)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({}, None),
        ({"day": "yesterday"}, "not a YYYY-MM-DD day"),
        ({"images": 0}, "0 images"),
        ({"by": ""}, "names nobody"),
        ({"request_id": "r1"}, "not an `adjust-…` id"),
    ],
)
def test_an_adjustment_must_be_well_formed(change: dict, problem: str | None) -> None:
    fields = dict(request_id="adjust-1", user_id="alice", day="2026-01-02", images=3, by="ops") | change
    found = audit._check_adjustment(QuotaAdjusted(**fields))
    assert found == problem if problem is None else problem in found
