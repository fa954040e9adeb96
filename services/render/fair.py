"""The fair order of the jobs the dispatcher holds: paid before free, and within a tier
users in turn (weighted round robin: a user takes up to its plan's share of jobs per turn).

Pure: no bus, no clock. The dispatcher adds the jobs it pulls and takes batches for the
workers that ask; a user's jobs keep their arrival order. Each tier is a ring of users, the
one to serve next first; a user served goes to the back of the ring, a user skipped (its
jobs could not join the batch being filled) keeps its place.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Generic, TypeVar

from shared import subjects

Job = TypeVar("Job")

SCAN_USERS = 256  # users looked at per pass when filling a batch: a take costs O(slots), not O(users)


@dataclass
class _Turns(Generic[Job]):
    jobs: deque[tuple[int, Job]] = field(default_factory=deque)  # (stream sequence, job), oldest first
    share: int = 1  # jobs per turn


class FairQueue(Generic[Job]):
    def __init__(self, batch_key: Callable[[Job], Hashable]) -> None:
        self.batch_key = batch_key
        self._rings: dict[str, OrderedDict[str, _Turns[Job]]] = {tier: OrderedDict() for tier in subjects.TIERS}
        self._held: dict[int, tuple[str, str]] = {}  # stream sequence → (tier, user)
        self._kinds: Counter[Hashable] = Counter()  # batch key → jobs held

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, seq: int) -> bool:
        return seq in self._held

    def depth(self) -> dict[str, int]:
        """Jobs held per tier."""
        return {tier: sum(len(turns.jobs) for turns in ring.values()) for tier, ring in self._rings.items()}

    def add(self, tier: str, user_id: str, seq: int, job: Job, share: int = 1) -> None:
        """A job joins the back of its user's line; a user new to the ring joins at the back.
        The same stream sequence again (a redelivery) replaces the job in its place."""
        ring = self._rings[tier]
        turns = ring.setdefault(user_id, _Turns())
        turns.share = max(1, share)
        if seq in self._held:
            turns.jobs = deque((s, job if s == seq else j) for s, j in turns.jobs)
            return
        turns.jobs.append((seq, job))
        self._held[seq] = (tier, user_id)
        self._kinds[self.batch_key(job)] += 1

    def holds(self, key: Hashable) -> bool:
        """Whether a held job has this batch key."""
        return self._kinds[key] > 0

    def take(self, slots: int, key: Hashable | None = None) -> list[Job]:
        """Up to `slots` jobs that can share one batch, in fair order: paid tier first, each
        user up to its share per turn. The first job taken sets the batch key unless `key`
        is given (the worker already holds jobs of that key)."""
        taken: list[Job] = []
        for tier in subjects.TIERS:
            ring = self._rings[tier]
            while len(taken) < slots and ring:
                took, key = self._one_pass(ring, slots - len(taken), key, taken)
                if not took:
                    break
        return taken

    def _one_pass(
        self, ring: OrderedDict[str, _Turns[Job]], slots: int, key: Hashable | None, taken: list[Job]
    ) -> tuple[int, Hashable | None]:
        """One turn for each of the first SCAN_USERS users of the ring."""
        took = 0
        for user_id in list(islice(ring, SCAN_USERS)):
            turns = ring[user_id]
            mine, kept = 0, deque()
            for seq, job in turns.jobs:
                fits = key is None or self.batch_key(job) == key
                if took < slots and mine < turns.share and fits:
                    key = self.batch_key(job) if key is None else key
                    del self._held[seq]
                    self._kinds[key] -= 1
                    taken.append(job)
                    mine += 1
                    took += 1
                else:
                    kept.append((seq, job))  # a job of another kind waits for a batch of its own
            turns.jobs = kept
            if mine:  # served: to the back of the ring (or out, with nothing left)
                ring.move_to_end(user_id)
                if not turns.jobs:
                    del ring[user_id]
            if took >= slots:
                break
        return took, key

    def drop(self, seq: int) -> None:
        """Forget a held job (it went back to JetStream)."""
        tier, user_id = self._held.pop(seq)
        turns = self._rings[tier][user_id]
        self._kinds[self.batch_key(next(j for s, j in turns.jobs if s == seq))] -= 1
        turns.jobs = deque((s, j) for s, j in turns.jobs if s != seq)
        if not turns.jobs:
            del self._rings[tier][user_id]

    def all(self) -> Iterator[tuple[int, Job]]:
        """Every held job, in no particular order."""
        for ring in self._rings.values():
            for turns in ring.values():
                yield from turns.jobs

    def order(self, limit: int) -> list[Job]:
        """The first `limit` held jobs in the order they would be taken one at a time (the
        queue's places; batching can only bring a job forward). Changes nothing."""
        order: list[Job] = []
        for tier in subjects.TIERS:
            lines = [(list(turns.jobs), turns.share) for turns in islice(self._rings[tier].values(), limit)]
            round_ = 0
            while len(order) < limit and any(len(jobs) > round_ * share for jobs, share in lines):
                for jobs, share in lines:
                    order += [job for _, job in jobs[round_ * share : (round_ + 1) * share]]
                round_ += 1
            del order[limit:]
        return order
