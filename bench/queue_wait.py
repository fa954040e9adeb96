"""How long a small request waits behind the largest one a free user can still submit, and
how close the queue's estimate comes to the real wait.

Starts the platform as the tests do (embedded servers, the shipped plans: the free plan's
budget is 20 s an image), then:
  1. behind the largest: a free user asks for the largest image the free plan allows
     (the model's largest native size at the most steps the budget allows here), and at once
     a second user asks for a small one (10 steps); the small one's wait, from its
     submission to its delivery, is measured, ROUNDS times;
  2. the estimate: BURST users ask at once for images of 10, 30 or 50 steps; for each
     request whose owner was told its place, the first estimate heard (`queued: #N, about
     S s`) is compared with the time from then until its render started.

    python -m bench.queue_wait [--rounds 5] [--burst 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as host
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from infra.nats_auth import ADMIN
from infra.platform import Platform
from kiln.client import KilnClient
from services.quota import plans
from shared import model_card
from shared.events import MAX_STEPS, ImageDelivered, QuotaDenied, RenderProgress
from shared.settings import DEFAULT_MODEL, Settings

RESULTS = Path(__file__).parent / "results"
SHIPPED_PLANS = Path(plans.__file__).parent / "plans.toml"


def _user() -> str:
    return f"bench{uuid.uuid4().hex[:10]}"


async def _largest_free_request(client: KilnClient) -> tuple[int, int]:
    """(side, steps) of the largest request the free plan grants here: the largest native
    side at the most steps; a denial for cost names the steps that fit."""
    side = max(model_card.load(DEFAULT_MODEL).offered_sides())
    outcome = await client.generate("a red circle", user_id=_user(), width=side, height=side, steps=MAX_STEPS)
    if isinstance(outcome, QuotaDenied) and outcome.reason == "too_costly" and "--steps " in outcome.detail:
        return side, int(outcome.detail.rsplit("--steps ", 1)[1])
    if not isinstance(outcome, ImageDelivered):
        raise RuntimeError(f"the probe did not deliver: {outcome}")
    return side, MAX_STEPS


async def _behind_the_largest(client: KilnClient, side: int, steps: int) -> tuple[float, float]:
    """(the large request's render ms, the small one's wait from submission to delivery, ms)"""
    large = asyncio.ensure_future(
        client.generate("a blue square", user_id=_user(), width=side, height=side, steps=steps)
    )
    await asyncio.sleep(0.05)  # the large one is first in the queue
    started = time.perf_counter()
    small = await client.generate("a red circle", user_id=_user(), width=side, height=side, steps=10)
    waited_ms = (time.perf_counter() - started) * 1000
    big = await large
    if not (isinstance(small, ImageDelivered) and isinstance(big, ImageDelivered)):
        raise RuntimeError(f"not delivered: {big} / {small}")
    return big.render_ms, waited_ms


async def _estimate_errors(client: KilnClient, side: int, burst: int) -> list[dict[str, float]]:
    """Each told request's first estimate and its real wait until its render started."""

    async def one(index: int) -> dict[str, float] | None:
        heard: dict[str, float] = {}

        def on_progress(event: RenderProgress) -> None:
            now = time.perf_counter()
            if event.state == "queued" and event.eta_s is not None and "told_at" not in heard:
                heard.update(told_at=now, estimate_s=event.eta_s, place=event.queue_position or 0)
            elif event.state == "rendering" and "started_at" not in heard:
                heard["started_at"] = now

        steps = (10, 30, 50)[index % 3]
        outcome = await client.generate(
            "a green triangle", user_id=_user(), width=side, height=side, steps=steps, on_progress=on_progress
        )
        if not isinstance(outcome, ImageDelivered) or not {"told_at", "started_at"} <= heard.keys():
            return None
        actual = heard["started_at"] - heard["told_at"]
        return {"place": heard["place"], "estimate_s": heard["estimate_s"], "actual_s": round(actual, 3)}

    samples = await asyncio.gather(*(one(index) for index in range(burst)))
    return [sample for sample in samples if sample is not None]


async def measure(rounds: int, burst: int, settings: Settings) -> dict:
    os.environ["KILN_PLANS"] = str(SHIPPED_PLANS)  # the services read it
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        stack = Platform.isolated(Path(tmp) / "kiln", DEFAULT_MODEL, settings, tracing_ui=False)
        await stack.start()
        try:
            async with await KilnClient.connect(stack.nats_url, stack.credentials(ADMIN), ADMIN) as client:
                side, steps = await _largest_free_request(client)
                behind = [await _behind_the_largest(client, side, steps) for _ in range(rounds)]
                samples = await _estimate_errors(client, side, burst)
        finally:
            stack.stop()
    errors = [sample["estimate_s"] - sample["actual_s"] for sample in samples]
    return {
        "benchmark": "queue_wait",
        "model": f"{DEFAULT_MODEL.name}, CPU",
        "host": f"{host.node()} ({os.cpu_count()} cpus)",
        "free_budget_s": plans.load(SHIPPED_PLANS).plan("free").budget_s,
        "largest_free_request": f"{side}x{side}, {steps} steps",
        "behind_the_largest": {
            "rounds": rounds,
            "large_render_ms_median": round(statistics.median(b[0] for b in behind), 1),
            "small_wait_ms_median": round(statistics.median(b[1] for b in behind), 1),
            "small_wait_ms_max": round(max(b[1] for b in behind), 1),
        },
        "estimate": {
            "burst": burst,
            "told": len(samples),
            "median_error_s": round(statistics.median(errors), 3) if errors else None,
            "median_abs_error_s": round(statistics.median(abs(e) for e in errors), 3) if errors else None,
            "median_actual_s": round(statistics.median(s["actual_s"] for s in samples), 3) if samples else None,
            "samples": samples,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_wait")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--burst", type=int, default=12)
    args = parser.parse_args()
    result = asyncio.run(measure(args.rounds, args.burst, Settings.from_env()))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "queue_wait.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    behind, estimate = result["behind_the_largest"], result["estimate"]
    print(f"largest free request here: {result['largest_free_request']} (free budget {result['free_budget_s']:g} s)")
    print(
        f"  a small request behind it waits {behind['small_wait_ms_median']:.0f} ms at the median "
        f"(max {behind['small_wait_ms_max']:.0f} ms; the large one renders in {behind['large_render_ms_median']:.0f} ms)"
    )
    print(
        f"  queue estimate: {estimate['told']} of {estimate['burst']} requests told their place; median error "
        f"{estimate['median_error_s']} s (|error| {estimate['median_abs_error_s']} s) on a median wait of "
        f"{estimate['median_actual_s']} s"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
