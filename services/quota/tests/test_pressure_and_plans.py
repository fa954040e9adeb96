"""Fleet pressure from heartbeats, the plans file, and the hash chain: pure parts."""

from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from services.quota import chain, plans
from services.quota.pressure import FleetMonitor, Shed, level_of
from shared.events import WorkerHeartbeat
from shared.settings import Settings

RULES = plans.PressureRules(
    stale_after_s=5,
    queue_depth=plans.Thresholds(elevated=50, critical=200),
    gpu_temperature_c=plans.Thresholds(elevated=80, critical=88),
    cpu_load=plans.Thresholds(elevated=3.0),
)


def _beat(worker="w1", **signals) -> WorkerHeartbeat:
    return WorkerHeartbeat(
        **({"worker_id": worker, "device": "cpu", "model": "m", "queue_depth": 0, "cpu_load": 0.5} | signals)
    )


def test_the_worst_signal_of_any_worker_sets_the_level():
    assert level_of([], RULES)[0] == "normal"
    assert level_of([_beat(queue_depth=10)], RULES)[0] == "normal"
    assert level_of([_beat(queue_depth=60)], RULES) == ("elevated", "queue_depth=60 on w1")
    hot = _beat("w2", device="cuda:0", gpu_temperature_c=90.0)
    assert level_of([_beat(queue_depth=60), hot], RULES) == ("critical", "gpu_temperature_c=90 on w2")
    assert level_of([_beat(cpu_load=9.0)], RULES)[0] == "elevated"  # no critical threshold set


def test_a_silent_worker_stops_counting():
    monitor = FleetMonitor(RULES)
    monitor.record(_beat(queue_depth=500), received=0.0)  # long ago
    assert monitor.level()[0] == "normal"
    monitor.record(_beat(queue_depth=500))
    assert monitor.level()[0] == "critical"


def test_a_level_counts_only_once_its_signal_has_held():
    """A host's start-up load, or one worker's burst, sheds no one: pressure rises only
    after the signal has held `hold_s`, and falls at once."""
    monitor = FleetMonitor(msgspec.structs.replace(RULES, hold_s=30))
    for second in range(0, 30, 1):
        monitor.record(_beat(queue_depth=60), received=1000.0 + second)
    level, why = monitor.level(now=1029.0)
    assert level == "normal" and "elevated for 29 of the 30 s" in why
    monitor.record(_beat(queue_depth=60), received=1030.0)
    assert monitor.level(now=1030.0)[0] == "elevated"
    monitor.record(_beat(queue_depth=500), received=1031.0)  # critical only just reached
    assert monitor.level(now=1031.0)[0] == "elevated"
    monitor.record(_beat(queue_depth=10), received=1032.0)  # a break: falls at once
    assert monitor.level(now=1032.0)[0] == "normal"
    monitor.record(_beat(queue_depth=60), received=1033.0)  # and the count starts again
    assert monitor.level(now=1036.0)[0] == "normal"


def test_the_default_plans_file_loads():
    config = plans.load(Settings().plans_file)
    assert config.plan("free").daily_limit == 3 and config.plan("free").tier == "free"
    assert {config.plan(name).tier for name in ("plus", "pro")} == {"paid"}


@pytest.mark.parametrize(
    "text,complaint",
    [
        ("[plans.plus]\ntier='paid'\ndaily_limit=5\nburst=1\nper_hour=1\n", "`free` plan"),
        ("[plans.free]\ntier='gold'\ndaily_limit=3\nburst=1\nper_hour=1\n", "tier"),
        ("[plans.free]\ntier='free'\ndaily_limit=3\nburst=0\nper_hour=1\n", "burst"),
        ("[plans.free]\ntier='free'\ndaily_limit=3\nburst=1\nper_hour=1\nspeed=2\n", "speed"),
        ("[plans.free\n", "Expected"),
    ],
)
def test_a_broken_plans_file_is_refused_naming_the_problem(tmp_path: Path, text: str, complaint: str):
    path = tmp_path / "plans.toml"
    path.write_text(text)
    with pytest.raises(plans.ConfigError, match=complaint) as caught:
        plans.load(path)
    assert str(path) in str(caught.value)


def test_the_hash_changes_with_any_field_and_with_the_predecessor():
    row = dict(
        stream_id="user:a",
        version=1,
        event_type="QuotaGranted",
        request_id="r1",
        payload={"x": 1},
        metadata={"m": "n"},
        recorded_at=datetime(2026, 1, 1, tzinfo=UTC),
        prev_hash=chain.GENESIS,
    )
    base = chain.event_hash(**row)
    assert chain.event_hash(**row) == base
    for key, other in [
        ("version", 2),
        ("payload", {"x": 2}),
        ("metadata", {}),
        ("prev_hash", "1" * 64),
        ("recorded_at", datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)),
    ]:
        assert chain.event_hash(**(row | {key: other})) != base, key


def test_what_was_shed_is_counted_over_the_last_ten_minutes_only():
    now = [1000.0]
    shed = Shed(clock=lambda: now[0])
    shed.record("shed")
    shed.record("degraded")
    shed.record("degraded")
    assert shed.counts() == {"shed": 1, "degraded": 2}
    now[0] += Shed.WINDOW_S + 1
    shed.record("shed")
    assert shed.counts() == {"shed": 1, "degraded": 0}
    for _ in range(10_000):  # an overload: many a second, kept as one count per second
        now[0] += 0.01
        shed.record("shed")
    assert shed.counts()["shed"] == 10_001 and len(shed._seconds["shed"]) <= 101
