from services.render.cancels import Cancels
from shared import subjects
from shared.bus import Stored

from .jobs import job


class StreamOf:
    """The cancel stream, as `Bus.last_message` reads it."""

    def __init__(self, *subjects_kept: str) -> None:
        self.kept = set(subjects_kept)
        self.asked: list[str] = []

    async def last_message(self, stream, subject: str) -> Stored | None:
        assert stream is subjects.RENDER_CANCELS
        self.asked.append(subject)
        return Stored(subject, b"", None, seq=1) if subject in self.kept else None


def cancels(limit: int, *kept: str) -> Cancels:
    return Cancels(StreamOf(*kept), limit)  # type: ignore[arg-type]


def test_a_cancel_names_a_user_and_a_request_not_the_request_alone():
    heard = cancels(10)
    heard.add("alice", "r1")
    assert job("r1", "alice") in heard
    assert job("r1", "bob") not in heard  # request ids are unique only per user


def test_past_the_limit_the_oldest_cancel_is_forgotten_first():
    heard = cancels(3)
    for request in ("r1", "r2", "r3"):
        heard.add("alice", request)
    heard.add("alice", "r1")  # heard again: now the newest
    heard.add("alice", "r4")
    assert len(heard) == 3
    assert [job(r) in heard for r in ("r1", "r2", "r3", "r4")] == [True, False, True, True]


async def test_a_cancel_not_heard_here_is_found_in_the_stream():
    stream_kept = subjects.render_cancel("alice", "r2")
    heard = cancels(10, stream_kept)
    heard.add("alice", "r1")
    assert await heard.is_cancelled(job("r1"))
    assert heard.bus.asked == []  # heard here: the stream is not asked
    assert await heard.is_cancelled(job("r2"))
    assert not await heard.is_cancelled(job("r3"))
    assert not await heard.is_cancelled(job("r2", "bob"))
