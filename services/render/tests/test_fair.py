from services.render.fair import SCAN_USERS, FairQueue


def queue() -> FairQueue[tuple[str, str]]:
    """Jobs as (user, kind): jobs of one kind can share a batch."""
    return FairQueue(batch_key=lambda job: job[1])


def fill(q: FairQueue, tier: str, user: str, count: int, kind: str = "32px", share: int = 1) -> None:
    for _ in range(count):
        q.add(tier, user, fill.seq, (user, kind), share)
        fill.seq += 1


fill.seq = 1


def users(jobs: list) -> list[str]:
    return [user for user, _ in jobs]


def test_paid_jobs_are_taken_before_free_ones():
    q = queue()
    fill(q, "free", "f1", 5)
    fill(q, "paid", "p1", 3)
    assert users(q.take(4)) == ["p1", "p1", "p1", "f1"]
    assert q.depth() == {"paid": 0, "free": 4}


def test_one_users_hundred_jobs_do_not_starve_another_users_one():
    q = queue()
    fill(q, "free", "heavy", 100)
    fill(q, "free", "light", 1)
    assert users(q.take(1)) == ["heavy"]
    assert users(q.take(1)) == ["light"]  # its turn comes next, not after 99 more
    assert users(q.take(3)) == ["heavy"] * 3
    assert len(q) == 96


def test_users_take_turns_in_the_order_they_came_and_go_to_the_back_once_served():
    q = queue()
    for user in ("a", "b", "c"):
        fill(q, "free", user, 3)
    assert users(q.take(4)) == ["a", "b", "c", "a"]
    assert users(q.take(5)) == ["b", "c", "a", "b", "c"]


def test_a_plans_share_is_the_jobs_it_takes_per_turn():
    q = queue()
    fill(q, "paid", "pro", 10, share=4)
    fill(q, "paid", "plus", 10, share=2)
    fill(q, "paid", "other", 10)
    assert users(q.take(7)) == ["pro"] * 4 + ["plus"] * 2 + ["other"]


def test_a_batch_takes_only_jobs_of_its_kind_and_users_skipped_keep_their_turn():
    q = queue()
    fill(q, "free", "a", 1, kind="32px")
    fill(q, "free", "b", 1, kind="64px")
    fill(q, "free", "c", 2, kind="32px")
    assert q.take(8) == [("a", "32px"), ("c", "32px"), ("c", "32px")]
    assert q.holds("64px") and not q.holds("32px")
    fill(q, "free", "d", 1, kind="32px")
    assert users(q.take(1)) == ["b"]  # skipped, so first in line
    assert q.take(4, key="64px") == []  # a worker filling a 64px batch: nothing fits


def test_a_redelivered_job_replaces_the_one_held_not_joins_it():
    q = queue()
    q.add("free", "a", 7, ("a", "first delivery"))
    q.add("free", "a", 7, ("a", "second delivery"))
    assert len(q) == 1 and 7 in q
    assert q.take(2, key="second delivery") == [("a", "second delivery")]


def test_dropped_jobs_are_forgotten():
    q = queue()
    q.add("free", "a", 1, ("a", "x"))
    q.add("free", "a", 2, ("a", "x"))
    q.drop(1)
    assert len(q) == 1 and 1 not in q and 2 in q
    q.drop(2)
    assert q.depth() == {"paid": 0, "free": 0} and not q.holds("x")


def test_the_order_tells_each_job_its_place_without_taking_any():
    q = queue()
    fill(q, "free", "a", 3)
    fill(q, "free", "b", 1)
    fill(q, "paid", "p", 1)
    assert users(q.order(10)) == ["p", "a", "b", "a", "a"]
    assert len(q.order(2)) == 2 and len(q) == 5


def test_a_take_looks_at_a_bounded_number_of_users():
    q = queue()
    for n in range(SCAN_USERS + 10):
        q.add("free", f"u{n:04}", n + 1, (f"u{n:04}", "64px" if n < SCAN_USERS else "32px"))
    # The users who could fill a 32px batch are beyond the first pass: not looked for.
    assert q.take(4, key="32px") == []
    assert len(q.take(SCAN_USERS + 10)) == SCAN_USERS  # one kind per batch
