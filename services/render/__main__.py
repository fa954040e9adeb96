"""Entry point: `python -m services.render [--worker-id ID] [--gpu N]`.

One worker process per GPU: `--gpu N` pins it to GPU N (CUDA_VISIBLE_DEVICES)."""

import argparse
import dataclasses
import functools
import os
import socket

from services.render.application import Render
from shared import service, subjects
from shared.service import Listen, Service

SERVICE = Service(
    name="render",
    open=Render.open,
    listens=(
        Listen(subjects.RENDER_CANCEL, Render.hear_cancel),
        Listen(subjects.FLEET_TELEMETRY, Render.hear_heartbeat),
    ),
    publishes=(
        subjects.RENDER_PROGRESS,
        subjects.RENDER_EVENT,
        subjects.FLEET_TELEMETRY,
        subjects.OUTCOME,
        subjects.RENDER_CLAIM,
    ),
    hears=(subjects.RENDER_CLAIM,),  # while this worker is the fleet's dispatcher
    reads=(subjects.RENDER_JOBS, subjects.RENDER_CANCELS),
    buckets=(subjects.IMAGES, subjects.RENDER_ATTEMPTS),
    tasks=(Render.work, Render.send_heartbeats, Render.dispatch),
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m services.render")
    parser.add_argument("--worker-id", default=f"{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--gpu", type=int, help="render on this GPU only (sets CUDA_VISIBLE_DEVICES)")
    arguments = parser.parse_args()
    if arguments.gpu is not None:  # before torch initialises CUDA; PCI order, as NVML numbers GPUs
        os.environ |= {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(arguments.gpu)}
    service.run(dataclasses.replace(SERVICE, open=functools.partial(Render.open, worker_id=arguments.worker_id)))
