from services.render.queue import Waiting, fair_order, fair_shares


def shares(waiting, slots, last_served=None):
    return {(w.tier, w.user_id): n for w, n in fair_shares(waiting, slots, last_served or {})}


def test_paid_jobs_are_taken_before_free_ones():
    waiting = [Waiting("free", "f1", 5), Waiting("paid", "p1", 3)]
    assert shares(waiting, 4) == {("paid", "p1"): 3, ("free", "f1"): 1}


def test_one_users_hundred_jobs_do_not_starve_another_users_one():
    waiting = [Waiting("free", "heavy", 100), Waiting("free", "light", 1)]
    assert shares(waiting, 4) == {("free", "heavy"): 3, ("free", "light"): 1}
    assert shares(waiting, 1, {"render-free-heavy": 5.0}) == {("free", "light"): 1}


def test_users_take_turns_least_recently_served_first():
    waiting = [Waiting("free", user, 10) for user in ("a", "b", "c")]
    served = {"render-free-a": 3.0, "render-free-b": 1.0, "render-free-c": 2.0}
    assert shares(waiting, 2, served) == {("free", "b"): 1, ("free", "c"): 1}
    assert shares(waiting, 7, served) == {("free", "b"): 3, ("free", "c"): 2, ("free", "a"): 2}


def test_never_more_than_waiting_or_slots():
    waiting = [Waiting("paid", "p", 2), Waiting("free", "f", 0)]
    assert shares(waiting, 10) == {("paid", "p"): 2}
    assert shares(waiting, 0) == {}


def test_the_order_jobs_are_taken_in_gives_each_waiting_job_its_place():
    waiting = [Waiting("free", "a", 3), Waiting("free", "b", 1), Waiting("paid", "p", 1)]
    order = [(w.user_id, n) for w, n in fair_order(waiting, {}, limit=10)]
    assert order == [("p", 0), ("a", 0), ("b", 0), ("a", 1), ("a", 2)]
    assert len(fair_order(waiting, {}, limit=2)) == 2


def test_users_whose_jobs_are_all_handed_out_get_only_the_slots_left_over():
    waiting = [Waiting("paid", "busy", 0, maybe_due=True), Waiting("free", "w", 2)]
    assert shares(waiting, 2) == {("free", "w"): 2}
    assert shares(waiting, 3) == {("free", "w"): 2, ("paid", "busy"): 1}
