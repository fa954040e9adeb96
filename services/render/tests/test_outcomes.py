import asyncio
from datetime import timedelta
from types import SimpleNamespace

from opentelemetry import trace

from services.render.outcomes import PROGRESS_INTERVAL_S, Outcomes, Progress
from shared.events import RenderCompleted, RenderFailed, utcnow

from .jobs import held


class Msg:
    headers = None

    def __init__(self, delivered: int = 1) -> None:
        self.acked = False
        self.metadata = SimpleNamespace(num_delivered=delivered)  # JetStream's delivery count

    async def ack(self) -> None:
        self.acked = True


class Bus:
    tracer = trace.NoOpTracer()

    def __init__(self) -> None:
        self.published: list[tuple[str, object]] = []
        self.progress: list[tuple[str, int]] = []

    async def publish(self, subject, event, first_on_subject=False) -> None:
        assert first_on_subject  # one outcome per request, ever
        self.published.append((subject, event))

    async def publish_plain(self, subject, event, span=None) -> None:
        self.progress.append((subject, event.step))


def waiting(request_id: str, user_id: str, waited_s: float):
    item = held(request_id, user_id, requested_at=utcnow() - timedelta(seconds=waited_s))
    item.msg = Msg()
    return item


async def test_an_outcome_reports_its_own_jobs_queue_wait_keyed_by_user_and_request():
    outcomes = Outcomes(Bus(), "w1")  # type: ignore[arg-type]
    alices, bobs = waiting("r1", "alice", 2.0), waiting("r1", "bob", 5.0)
    started = utcnow()
    for item in (alices, bobs):
        outcomes.queue_wait(item, started)
    assert set(outcomes.queued_ms) == {("alice", "r1"), ("bob", "r1")}
    await outcomes.complete(bobs, render_ms=100.0, batch_size=2)
    subject, completed = outcomes.bus.published[-1]
    assert isinstance(completed, RenderCompleted) and subject.endswith("bob.r1")
    assert 4900 < completed.queued_ms < 5500 and completed.batch_size == 2
    assert bobs.msg.acked
    assert set(outcomes.queued_ms) == {("alice", "r1")}


async def test_a_failed_or_forgotten_job_leaves_no_queue_wait_behind():
    outcomes = Outcomes(Bus(), "w1")  # type: ignore[arg-type]
    failing, retried = waiting("r1", "alice", 1.0), waiting("r2", "alice", 1.0)
    for item in (failing, retried):
        outcomes.queue_wait(item, utcnow())
    await outcomes.fail(failing, "invalid", "no stored image")
    _, failed = outcomes.bus.published[-1]
    assert isinstance(failed, RenderFailed) and failed.reason == "invalid" and failing.msg.acked
    outcomes.forget(retried.event)
    assert outcomes.queued_ms == {}


def test_progress_is_due_at_most_every_interval_and_always_at_the_last_step():
    progress = Progress(Bus(), [], loop=None)  # type: ignore[arg-type]
    progress.last_sent = 10.0
    assert not progress.due(3, 20, 10.0 + PROGRESS_INTERVAL_S / 2)
    assert progress.due(3, 20, 10.0 + PROGRESS_INTERVAL_S * 1.01)
    assert progress.due(20, 20, 10.0)


async def test_progress_from_the_render_thread_reaches_each_job_of_the_batch():
    bus = Bus()
    progress = Progress(bus, [held("r1", "alice"), held("r1", "bob")], asyncio.get_running_loop())  # type: ignore[arg-type]
    await asyncio.to_thread(progress.step, 1, 4, 100.0)
    await asyncio.to_thread(progress.step, 2, 4, 100.0 + PROGRESS_INTERVAL_S / 2)  # too soon: not sent
    await asyncio.sleep(0.01)
    assert sorted(bus.progress) == [("kiln.render.progress.alice.r1", 1), ("kiln.render.progress.bob.r1", 1)]
