import msgspec

from services.render.fleet import FRESH_S, LISTEN_FIRST_S, Fleet
from shared.events import WorkerHeartbeat


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def beat(worker: str, **fields) -> bytes:
    return msgspec.json.encode(
        WorkerHeartbeat(worker_id=worker, device="cpu", model="m", queue_depth=0, cpu_load=0, **fields)
    )


def test_a_lone_worker_dispatches_once_it_has_listened_a_moment():
    clock = Clock()
    fleet = Fleet("w2", clock)
    fleet.hear(beat("w2"))
    assert not fleet.should_dispatch(False)
    clock.now += LISTEN_FIRST_S
    assert fleet.should_dispatch(False)


def test_the_dispatcher_keeps_its_role_while_it_lives_and_the_smallest_id_takes_over_after():
    clock = Clock()
    fleet = Fleet("w1", clock)
    clock.now += LISTEN_FIRST_S
    fleet.hear(beat("w3", dispatching=True))
    assert not fleet.should_dispatch(False)  # w1 is smaller, but w3 dispatches
    clock.now += FRESH_S + 1  # w3 went silent
    fleet.hear(beat("w2"))
    assert fleet.should_dispatch(False)


def test_a_worker_that_says_it_is_leaving_is_replaced_at_once():
    clock = Clock()
    fleet = Fleet("w5", clock)
    clock.now += LISTEN_FIRST_S
    fleet.hear(beat("w1", dispatching=True))
    assert not fleet.should_dispatch(False)
    fleet.hear(beat("w1", dispatching=True, leaving=True))
    assert fleet.should_dispatch(False)


def test_of_two_dispatchers_the_larger_id_steps_down():
    clock = Clock()
    fleet = Fleet("w2", clock)
    fleet.hear(beat("w9", dispatching=True))
    assert fleet.should_dispatch(True)
    fleet.hear(beat("w1", dispatching=True))
    assert not fleet.should_dispatch(True)


def test_a_newcomer_with_a_smaller_id_does_not_take_the_role_from_a_live_dispatcher():
    clock = Clock()
    fleet = Fleet("a-new", clock)
    clock.now += LISTEN_FIRST_S
    fleet.hear(beat("z-old", dispatching=True))
    assert not fleet.should_dispatch(False)


def test_a_newcomer_that_asked_and_heard_no_dispatcher_takes_the_role_at_once():
    fleet = Fleet("w1", Clock())
    fleet.nobody_answered = True
    assert fleet.should_dispatch(False)
