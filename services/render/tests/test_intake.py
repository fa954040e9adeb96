import asyncio

from services.render import intake
from services.render.intake import Intake, batch_ready, form_batch

from .jobs import held


def test_a_batch_is_the_oldest_held_jobs_kind_up_to_the_limit_in_the_order_held():
    jobs = [held("a"), held("b", steps=8), held("c"), held("d"), held("e", width=64)]
    group, rest = form_batch(jobs, limit=2)
    assert [item.event.request_id for item in group] == ["a", "c"]
    assert [item.event.request_id for item in rest] == ["b", "d", "e"]
    group, rest = form_batch(rest, limit=4)
    assert [item.event.request_id for item in group] == ["b"]
    assert form_batch([], 4) == ([], [])


def test_a_batch_goes_when_full_when_its_oldest_waited_enough_or_when_no_more_of_its_kind_wait():
    assert batch_ready(4, 4, waited_s=0.0, max_wait_s=0.5, more_queued=True)
    assert batch_ready(1, 4, waited_s=0.5, max_wait_s=0.5, more_queued=True)
    assert batch_ready(1, 4, waited_s=0.0, max_wait_s=0.5, more_queued=False)
    assert not batch_ready(3, 4, waited_s=0.1, max_wait_s=0.5, more_queued=True)


class Dispatcher:
    """JobQueue's side of a claim: hands out the jobs it holds, of the kind asked for."""

    def __init__(self, *jobs) -> None:
        self.waiting = list(jobs)
        self.more = False
        self.claims: list[int] = []

    async def claim(self, slots, batch_key=None, wait_s=0.0):
        self.claims.append(slots)
        from services.render.pipeline import batch_key as key_of

        fits = [item for item in self.waiting if batch_key is None or key_of(item.event) == batch_key][:slots]
        self.waiting = [item for item in self.waiting if item not in fits]
        self.more = any(batch_key is None or key_of(item.event) == batch_key for item in self.waiting)
        return fits


class Held(Intake):
    async def take(self, claimed) -> None:  # the dispatcher hands out held jobs already checked
        self.held += claimed


async def test_claims_room_for_one_batch_and_keeps_the_other_kinds_for_later():
    queue = Dispatcher(held("a"), held("b", steps=8), held("c"))
    taking = Held(bus=None, queue=queue, max_wait_s=0.5)  # type: ignore[arg-type]
    idled = []

    async def idle() -> None:
        idled.append(True)

    batch = await taking.next_batch(2, asyncio.Event(), idle)
    assert [item.event.request_id for item in batch] == ["a"]  # a and b fill the room: no claim for c
    assert [item.event.request_id for item in taking.held] == ["b"]
    assert queue.claims == [2] and idled == [True]
    batch = await taking.next_batch(2, asyncio.Event(), idle)
    assert [item.event.request_id for item in batch] == ["b"]
    assert queue.claims == [2, 1]  # room for one more of b's kind; c is not
    assert idled == [True]  # something was held: no idling


async def test_a_batch_fills_while_more_of_its_kind_wait(monkeypatch):
    monkeypatch.setattr(intake, "FILL_RETRY_S", 0.0)
    queue = Dispatcher(held("a"), held("b"), held("c"))
    original = queue.claim

    async def one_at_a_time(slots, batch_key=None, wait_s=0.0):
        return await original(1, batch_key, wait_s)

    queue.claim = one_at_a_time
    taking = Held(bus=None, queue=queue, max_wait_s=60)  # type: ignore[arg-type]
    batch = await taking.next_batch(3, asyncio.Event(), _nothing)
    assert [item.event.request_id for item in batch] == ["a", "b", "c"]


async def _nothing() -> None:
    pass


class Msg:
    def __init__(self, fails: bool = False) -> None:
        self.naked = 0
        self.fails = fails

    async def nak(self) -> None:
        import nats.errors

        self.naked += 1
        if self.fails:
            raise nats.errors.TimeoutError


async def test_handing_back_naks_every_held_job_and_holds_none(caplog):
    taking = Held(bus=None, queue=Dispatcher(), max_wait_s=0.5)  # type: ignore[arg-type]
    taking.held = [held("a"), held("b")]
    msgs = [Msg(), Msg(fails=True)]
    for item, msg in zip(taking.held, msgs, strict=True):
        item.msg = msg
    with caplog.at_level("INFO", logger="kiln.render"):
        await taking.hand_back()
    assert [msg.naked for msg in msgs] == [1, 1]
    assert taking.held == []
    assert "handed back 2 jobs" in caplog.text
