import nats.js.errors

from services.render.attempts import RENDER_ATTEMPTS, Attempts, out_of_attempts

from .jobs import job


class Entry:
    def __init__(self, value: bytes) -> None:
        self.value = value


class KeyValue:
    """The kiln-render-attempts bucket: get raises for a key never put."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def get(self, key: str) -> Entry:
        if key not in self.values:
            raise nats.js.errors.KeyNotFoundError
        return Entry(self.values[key])

    async def put(self, key: str, value: bytes) -> None:
        self.values[key] = value


async def test_each_render_started_counts_per_user_and_request():
    kv = KeyValue()
    attempts = Attempts(kv)  # type: ignore[arg-type]
    assert [await attempts.start(job("r1", "alice")) for _ in range(3)] == [1, 2, 3]
    assert await attempts.start(job("r1", "bob")) == 1  # the same request id, another user
    assert kv.values == {"alice.r1": b"3", "bob.r1": b"1"}


async def test_a_job_past_its_renders_is_out_of_attempts():
    attempts = Attempts(KeyValue())  # type: ignore[arg-type]
    started = [await attempts.start(job()) for _ in range(RENDER_ATTEMPTS + 1)]
    assert [out_of_attempts(attempt) for attempt in started] == [False] * RENDER_ATTEMPTS + [True]


async def test_a_first_delivery_counts_one_without_reading_the_count():
    kv = KeyValue()
    kv.values["alice.r1"] = b"2"  # a copy of the job published past the dedupe window starts again
    attempts = Attempts(kv)  # type: ignore[arg-type]
    assert await attempts.start(job("r1", "alice"), first_delivery=True) == 1
    assert await attempts.start(job("r1", "alice")) == 2  # a redelivery reads what was counted
