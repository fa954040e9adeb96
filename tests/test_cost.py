"""Pricing a render from measured figures (shared.cost): pure."""

import pytest

from shared import cost

TABLE = {"32x32": 0.015, "128x128": 0.2}


def test_a_measured_size_is_priced_by_its_own_figure():
    assert cost.estimate_s(TABLE, 32, 32, 10) == pytest.approx(0.15)


def test_a_larger_unmeasured_size_costs_more_than_its_pixels():
    # 256² is 4× the pixels of 128²; attention makes it ~8× the time (pixels^1.5).
    assert cost.step_seconds(TABLE, 256, 256) == pytest.approx(0.2 * 8)
    # A smaller one is scaled by its pixels from the nearest: an overestimate, never free.
    assert cost.step_seconds(TABLE, 16, 16) == pytest.approx(0.015 / 4)


def test_nothing_measured_prices_nothing():
    assert cost.estimate_s({}, 32, 32, 10) is None
    assert cost.what_fits({}, 512, 512, 50, 20, [32, 512]) == ""


def test_what_fits_prefers_a_smaller_size_then_fewer_steps():
    table = {"32x32": 0.015, "512x512": 13.0}
    assert cost.what_fits(table, 512, 512, 50, 20, [32, 512]) == "--size 32"
    assert cost.what_fits(table, 32, 32, 50, 0.3, [32]) == "--steps 20"
    assert cost.what_fits(table, 512, 512, 50, 0.3, [32, 512]) == "--size 32 --steps 20"
    assert cost.what_fits(table, 32, 32, 50, 0.001, [32]) == ""


def test_the_fleet_figure_is_the_mean_of_the_workers_that_measured_it():
    assert cost.fleet_table([{"32x32": 0.01}, {"32x32": 0.03, "64x64": 0.05}, {}]) == {
        "32x32": pytest.approx(0.02),
        "64x64": 0.05,
    }


def test_the_step_clock_smooths_and_keeps_a_bounded_table():
    clock = cost.StepClock()
    clock.record(32, 32, images=4, steps=10, seconds=0.4)  # 0.01 per image-step
    clock.record(32, 32, images=1, steps=10, seconds=0.2)  # 0.02: moves the figure part way
    assert clock.table["32x32"] == pytest.approx(0.01 + cost.SMOOTHING * 0.01)
    for side in range(8, 8 * (cost.MAX_SIZES + 5), 8):
        clock.record(side, side, 1, 1, 0.1)
    assert len(clock.table) == cost.MAX_SIZES and "32x32" not in clock.table  # the oldest went


@pytest.mark.parametrize("seconds,text", [(0.05, "0.05 s"), (2.46, "2.5 s"), (40, "40 s"), (480, "8 min")])
def test_durations_read_at_a_glance(seconds, text):
    assert cost.duration(seconds) == text
