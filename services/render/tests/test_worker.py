"""The batch loop with everything around it faked: no bus, no model."""

import logging

from opentelemetry import trace

from services.render import worker as worker_module
from services.render.attempts import Attempts
from services.render.cancels import job_key
from services.render.worker import OVER_BUDGET_SLACK_S, RenderWorker, over_budget
from shared import subjects

from .jobs import held
from .test_attempts import KeyValue
from .test_outcomes import Msg
from .test_storage import ObjectStore, png


class Bus:
    tracer = trace.NoOpTracer()

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str], object] = {}
        self.cancels_kept: set[str] = set()

    def span(self, event, msg) -> trace.Span:
        return self.tracer.start_span("render RenderRequested")

    async def publish(self, subject, event, first_on_subject=False) -> None:
        self.outcomes[(event.user_id, event.request_id)] = event

    async def publish_plain(self, subject, event, span=None) -> None:
        pass

    async def last_message(self, stream, subject):
        return object() if subject in self.cancels_kept else None


class Renderer:
    model, device = "tiny", "cpu"

    def __init__(self, fits: int = 16) -> None:
        self.fits = fits
        self.calls: list[list[str]] = []

    def render_batch(self, jobs, on_step, sources, masks):
        self.calls.append([job.request_id for job in jobs])
        if len(jobs) > self.fits:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(job.prompt == "reject me" for job in jobs):
            raise ValueError("the pipeline cannot take this prompt")
        for step in range(1, jobs[0].steps + 1):
            on_step(step, jobs[0].steps)
        return [png() for _ in jobs], 10.0


class Queue:
    ack_wait_s = 30.0


def a_worker(renderer: Renderer) -> RenderWorker:
    return RenderWorker(
        Bus(),  # type: ignore[arg-type]
        ObjectStore(),  # type: ignore[arg-type]
        renderer,  # type: ignore[arg-type]
        "w1",
        Queue(),  # type: ignore[arg-type]
        guard=None,  # type: ignore[arg-type]
        attempts=Attempts(KeyValue()),  # type: ignore[arg-type]
        max_wait_s=0.1,
    )


def jobs(*names: str, **fields):
    items = [held(name, **fields) for name in names]
    for item in items:
        item.msg = Msg()
    return items


async def test_a_batch_renders_stores_and_reports_each_job_and_leaves_nothing_behind():
    worker = a_worker(Renderer())
    batch = jobs("r1", "r2") + [held("r1", "bob")]
    batch[2].msg = Msg()
    await worker._run_batch(batch)
    await worker.finish_previous()
    assert set(worker.bus.outcomes) == {("alice", "r1"), ("alice", "r2"), ("bob", "r1")}
    assert all(type(event).__name__ == "RenderCompleted" for event in worker.bus.outcomes.values())
    assert all(item.msg.acked for item in batch)
    assert set(worker.images.store.objects) == {"alice/r1.png", "alice/r2.png", "bob/r1.png"}
    assert worker.outcomes.queued_ms == {} and worker._storing == set()


async def test_a_stored_or_cancelled_job_is_settled_without_rendering():
    renderer = Renderer()
    worker = a_worker(renderer)
    worker.images.store.objects["alice/done.png"] = png()  # a redelivery: drawn already
    worker.bus.cancels_kept.add(subjects.render_cancel("alice", "dropped"))
    worker.cancel_requested("alice", "heard")
    await worker._run_batch(jobs("done", "dropped", "heard", "new"))
    await worker.finish_previous()
    assert renderer.calls == [["new"]]
    reasons = {key[1]: getattr(event, "reason", "completed") for key, event in worker.bus.outcomes.items()}
    assert reasons == {"done": "completed", "dropped": "cancelled", "heard": "cancelled", "new": "completed"}
    assert worker.outcomes.queued_ms == {}


async def test_a_batch_out_of_memory_renders_in_halves_down_to_what_fits(caplog):
    renderer = Renderer(fits=1)
    worker = a_worker(renderer)
    with caplog.at_level(logging.WARNING, logger="kiln.render"):
        await worker._run_batch(jobs("a", "b", "c", "d"))
        await worker.finish_previous()
    assert "a batch of 4 ran out of memory" in caplog.text
    assert renderer.calls == [["a", "b", "c", "d"], ["a", "b"], ["a"], ["b"], ["c", "d"], ["c"], ["d"]]
    assert {type(event).__name__ for event in worker.bus.outcomes.values()} == {"RenderCompleted"}
    assert {event.batch_size for event in worker.bus.outcomes.values()} == {1}


async def test_a_job_the_pipeline_rejects_fails_alone_as_invalid():
    renderer = Renderer()
    worker = a_worker(renderer)
    batch = jobs("a", "c")
    batch.insert(1, held("b", prompt="reject me"))
    batch[1].msg = Msg()
    await worker._run_batch(batch)
    await worker.finish_previous()
    assert renderer.calls == [["a", "b", "c"], ["a"], ["b"], ["c"]]
    outcome = worker.bus.outcomes
    assert outcome[("alice", "b")].reason == "invalid"
    assert outcome[("alice", "a")].render_ms == outcome[("alice", "c")].render_ms == 10.0
    assert worker.outcomes.queued_ms == {}


async def test_any_other_failure_is_retried_with_its_own_jobs_attempt(monkeypatch):
    retried = []

    async def retry_or_give_up(bus, item, error, attempt, max_attempts):
        retried.append((job_key(item.event), attempt))

    monkeypatch.setattr(worker_module.consuming, "retry_or_give_up", retry_or_give_up)
    renderer = Renderer()
    renderer.render_batch = lambda *args: (_ for _ in ()).throw(RuntimeError("driver lost"))
    worker = a_worker(renderer)
    await worker.attempts.start(held("r1", "bob").event)  # bob's r1 started once before
    batch = jobs("r1") + [held("r1", "bob")]
    batch[1].msg = Msg(delivered=2)  # redelivered after that render
    await worker._run_batch(batch)
    assert sorted(retried) == [(("alice", "r1"), 1), (("bob", "r1"), 2)]
    assert worker.bus.outcomes == {} and worker.outcomes.queued_ms == {}


async def test_every_job_cancelled_mid_render_stops_the_batch():
    worker = a_worker(Renderer())
    original = worker.renderer.render_batch

    def render_batch(jobs, on_step, sources, masks):
        for job in jobs:
            worker.cancel_requested(job.user_id, job.request_id)
        return original(jobs, on_step, sources, masks)

    worker.renderer.render_batch = render_batch
    await worker._run_batch(jobs("a", "b"))
    assert {event.detail for event in worker.bus.outcomes.values()} == {"cancelled at step 1 of 4"}


def test_a_batch_is_over_budget_only_far_past_its_most_generous_plan():
    assert not over_budget(1000.0, None)
    assert not over_budget(2 * 5.0 + OVER_BUDGET_SLACK_S, 5.0)
    assert over_budget(2 * 5.0 + OVER_BUDGET_SLACK_S + 0.1, 5.0)
