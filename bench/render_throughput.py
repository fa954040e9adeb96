"""Render throughput: the service against a plain diffusers loop, batching, and queue wait.

Three figures, all on Kiln's own model (32×32, 20 steps) and on this machine's CPU unless a
GPU is present:

1. images/s of the render service ÷ a plain diffusers loop on the same model, batch size and
   steps, on the same host: beside the servers, idle (the loop alone, with no servers
   running, is reported too). The service figure is end to end for the render service:
   jobs published to the queue until every `RenderCompleted` is out (fair queue, batching,
   progress events, PNG encoding, object-store writes, outcome events).
2. batched ÷ batch-1 service throughput, under a load that fills the batches (all jobs
   queued at once).
3. p50 / p95 queue wait (job requested → its batch starts) at 1, 2 and 4 workers under one
   fixed offered load (an open loop at a set rate).

Only NATS and the render workers run (embedded NATS unless KILN_NATS_URL is set; PostgreSQL
is started but idle): quota, context and delivery would only take CPU from the workers.

    python -m bench.render_throughput [--jobs 64] [--batch 16] [--rate 8]
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
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from infra.platform import Platform
from kiln.client import CLIENT_ACCESS, KilnClient
from services.render.pipeline import on_torch_thread, quiet_model_libraries
from shared import subjects
from shared.access import Access
from shared.bus import Message
from shared.events import RenderCompleted, RenderRequested, WorkerHeartbeat
from shared.settings import DEFAULT_MODEL, Settings

RESULTS = Path(__file__).parent / "results"
# Only render runs, so the bench queues the jobs itself, as context would, and hears
# render's results on their subjects; beside that it is a client (it hears heartbeats).
BENCH_ACCESS = CLIENT_ACCESS | Access(
    publish=frozenset({subjects.RENDER_JOB.pattern}),
    subscribe=frozenset({subjects.RENDER_EVENT.pattern}),
)
PROMPTS = [
    "a red circle on a blue background",
    "the digit 7 in green on white",
    "a yellow triangle at the left",
    "a purple square on orange at the top",
]
STEPS, SIZE = 20, 32
USERS = 8  # jobs come from several users, as they would: the fair queue takes them in turn


def plain_loop(batch: int, batches: int, repeats: int) -> float:
    """Median images/s of `pipe(...)` called back to back on batches of `batch` prompts."""
    quiet_model_libraries()
    import torch
    from diffusers import AutoPipelineForText2Image

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = AutoPipelineForText2Image.from_pretrained(str(DEFAULT_MODEL), dtype=dtype, local_files_only=True)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def run() -> None:
        for b in range(batches):
            prompts = [PROMPTS[(b * batch + i) % len(PROMPTS)] for i in range(batch)]
            generators = [torch.Generator(device).manual_seed(b * batch + i) for i in range(batch)]
            pipe(prompt=prompts, num_inference_steps=STEPS, width=SIZE, height=SIZE, generator=generators)

    run()  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        rates.append(batch * batches / (time.perf_counter() - started))
    return statistics.median(rates)


def _job(index: int, run: str) -> RenderRequested:
    return RenderRequested(
        request_id=f"{run}{index:05d}",
        user_id=f"bench{index % USERS}",
        prompt=PROMPTS[index % len(PROMPTS)],
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        seed=index,
    )


class Workers:
    """Render workers on a running platform, started and stopped per measurement."""

    def __init__(self, stack: Platform, client: KilnClient) -> None:
        self.stack, self.client = stack, client
        self.names: list[str] = []

    async def start(self, count: int, max_batch: int) -> None:
        beats: asyncio.Queue[Message] = asyncio.Queue()
        subscription = await self.client.bus.listen(subjects.FLEET_TELEMETRY.pattern, beats.put)
        pids = set()
        # Workers on one CPU host split its cores; more threads than cores only thrash.
        threads = str(max(1, (os.cpu_count() or 1) // count))
        for n in range(count):
            name = f"render-bench-{n}"
            env = {
                "KILN_RENDER_MAX_BATCH": str(max_batch),
                "KILN_RENDER_MAX_WAIT_MS": "50",
                "KILN_RENDER_THREADS": threads,
            }
            pids.add(self.stack.start_service("render", instance=name, env=env).pid)
            self.names.append(name)
        try:
            while pids:  # ready: each has sent a heartbeat
                message = await asyncio.wait_for(beats.get(), 120)
                beat = msgspec.json.decode(message.data, type=WorkerHeartbeat)
                pids.discard(int(beat.worker_id.rsplit("-", 1)[1]))
        finally:
            await subscription.unsubscribe()

    def stop(self) -> None:
        for name in self.names:
            self.stack.stop_service(name)
        self.names = []


async def _queue_job(client: KilnClient, job: RenderRequested) -> None:
    """Put a job on the render queue, as context does."""
    await client.bus.publish(subjects.render_job("free", job.user_id), job)


async def _completions(client: KilnClient, count: int, publish: Callable[[], Awaitable[None]]) -> list[RenderCompleted]:
    """Run `publish()` and collect `count` RenderCompleted events as they come."""
    done: list[RenderCompleted] = []
    finished = asyncio.Event()

    async def on_event(message: Message) -> None:
        event = message.event()
        if isinstance(event, RenderCompleted):
            done.append(event)
            if len(done) >= count:
                finished.set()

    sub = await client.bus.listen(subjects.RENDER_EVENT.pattern, on_event)
    try:
        await publish()
        await asyncio.wait_for(finished.wait(), 600)
    finally:
        await sub.unsubscribe()
    return done


async def service_rate(client: KilnClient, jobs: int) -> float:
    """Images/s for `jobs` jobs queued at once: first publish to last completion."""
    run = uuid.uuid4().hex[:8]

    async def publish() -> None:
        await asyncio.gather(*(_queue_job(client, _job(index, run)) for index in range(jobs)))

    started = time.perf_counter()
    await _completions(client, jobs, publish)
    return jobs / (time.perf_counter() - started)


async def queue_wait(client: KilnClient, rate: float, seconds: float) -> dict:
    """Offer `rate` jobs/s for `seconds` (open loop); the queue wait of each job."""
    run, count = uuid.uuid4().hex[:8], int(rate * seconds)

    async def publish() -> None:
        started = time.perf_counter()
        for index in range(count):
            await asyncio.sleep(max(0.0, started + index / rate - time.perf_counter()))
            await _queue_job(client, _job(index, run))

    done = await _completions(client, count, publish)
    waits = sorted(event.queued_ms for event in done if event.queued_ms is not None)
    return {
        "offered_per_s": rate,
        "jobs": count,
        "p50_wait_ms": round(statistics.median(waits), 1),
        "p95_wait_ms": round(waits[int(0.95 * (len(waits) - 1))], 1),
        "mean_batch": round(statistics.mean(event.batch_size for event in done), 2),
    }


async def connect_client(stack: Platform) -> KilnClient:
    """An SDK client whose bus may also queue render jobs and hear their results."""
    # The launcher's credential (the bench plays context and the client), held to BENCH_ACCESS.
    return KilnClient(await stack.bus(access=BENCH_ACCESS))


async def _plain_loops(batch: int, jobs: int, repeats: int) -> tuple[float, float]:
    """The plain loop at `batch` and at 1, on one thread as the service renders
    (pipeline.on_torch_thread)."""
    batched = await on_torch_thread(plain_loop, batch, max(1, jobs // batch), repeats)
    return batched, await on_torch_thread(plain_loop, 1, min(jobs, 16), repeats)


async def measure(jobs: int, batch: int, rate: float, seconds: float, repeats: int, settings: Settings) -> dict:
    alone = await _plain_loops(batch, jobs, repeats)
    result: dict = {"plain_loop_alone_per_s": {"batch": round(alone[0], 2), "batch_1": round(alone[1], 2)}}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        stack = Platform.isolated(Path(tmp) / "kiln", DEFAULT_MODEL, settings, tracing_ui=False)
        stack.start_servers()
        try:
            await stack.declare()  # the streams and buckets, as `kiln up` makes them before any service
            # The ratio's base: the plain loop on the same host as the service, beside the
            # servers (idle here; the service's own bus traffic is part of what it costs).
            plain, plain_1 = await _plain_loops(batch, jobs, repeats)
            result["plain_loop_per_s"] = {"batch": round(plain, 2), "batch_1": round(plain_1, 2)}
            async with await connect_client(stack) as client:
                workers = Workers(stack, client)
                for label, max_batch in (("batch", batch), ("batch_1", 1)):
                    await workers.start(1, max_batch)
                    await service_rate(client, min(jobs, batch))  # warm-up
                    rates = [await service_rate(client, jobs) for _ in range(repeats)]
                    result.setdefault("service_per_s", {})[label] = round(statistics.median(rates), 2)
                    workers.stop()
                result["queue_wait"] = {}
                for count in (1, 2, 4):
                    await workers.start(count, batch)
                    result["queue_wait"][f"{count}_workers"] = await queue_wait(client, rate, seconds)
                    workers.stop()
        finally:
            stack.stop()
    service = result["service_per_s"]
    result["service_vs_plain"] = round(service["batch"] / plain, 3)
    result["service_vs_plain_batch_1"] = round(service["batch_1"] / plain_1, 3)
    result["batched_vs_batch_1"] = round(service["batch"] / service["batch_1"], 3)
    return {
        "benchmark": "render_throughput",
        "model": f"{DEFAULT_MODEL.name}, {SIZE}x{SIZE}, {STEPS} steps",
        "batch": batch,
        "jobs_per_measurement": jobs,
        "repeats": repeats,
        "servers": "external NATS" if settings.nats_url else "embedded nats-server 2.15",
        "host": f"{host.node()} ({os.cpu_count()} cpus)",
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.render_throughput")
    parser.add_argument("--jobs", type=int, default=64, help="jobs per throughput measurement")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rate", type=float, default=8.0, help="offered jobs/s for the queue-wait figure")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(measure(args.jobs, args.batch, args.rate, args.seconds, args.repeats, Settings.from_env()))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "render_throughput.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    plain, service = result["plain_loop_per_s"], result["service_per_s"]
    print(f"render throughput, {result['model']}, {result['host']}:")
    print(
        f"  batch {args.batch}: plain loop {plain['batch']:.1f}/s, service {service['batch']:.1f}/s "
        f"-> service / plain {result['service_vs_plain']:.3f}"
    )
    print(
        f"  batch 1: plain loop {plain['batch_1']:.1f}/s, service {service['batch_1']:.1f}/s "
        f"-> service / plain {result['service_vs_plain_batch_1']:.3f}"
    )
    alone = result["plain_loop_alone_per_s"]
    print(
        f"  plain loop with no servers running: batch {args.batch} {alone['batch']:.1f}/s, batch 1 {alone['batch_1']:.1f}/s"
    )
    print(f"  service batched / batch 1: {result['batched_vs_batch_1']:.2f}x")
    for workers, figures in result["queue_wait"].items():
        print(
            f"  {workers}: {figures['offered_per_s']:.0f} jobs/s offered, queue wait p50 {figures['p50_wait_ms']:.0f} ms, "
            f"p95 {figures['p95_wait_ms']:.0f} ms, mean batch {figures['mean_batch']}"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
