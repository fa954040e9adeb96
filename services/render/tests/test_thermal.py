from services.render.thermal import ThermalGuard


def guard_at(readings):
    readings = iter(readings)
    return ThermalGuard(lambda: next(readings), 16, hot_c=80, pause_c=87, resume_c=75)


def test_full_batches_when_cool_or_unknown():
    assert guard_at([60.0]).batch_limit() == 16
    assert guard_at([None]).batch_limit() == 16


def test_hot_halves_the_batch_and_too_hot_pauses_until_cooled():
    guard = guard_at([82.0, 88.0, 80.0, 76.0, 74.0])
    assert [guard.batch_limit() for _ in range(5)] == [8, 0, 0, 0, 16]
