"""Images in the JetStream Object Store (`kiln-images/<user>/<request>.png`): the stored
image that settles a redelivered job, the source image and mask an edit starts from (each
checked), and the PNG a render stores."""

from __future__ import annotations

import io
import json

import nats.js.errors
from nats.js.api import ObjectMeta
from nats.js.object_store import ObjectStore
from opentelemetry import trace
from PIL import Image

from shared import subjects
from shared.consuming import Received
from shared.events import MAX_SIDE, MAX_STEPS, MIN_SIDE, RenderRequested

MAX_INPUT_PIXELS = 4096 * 4096  # a source image or mask larger than this is refused


class BadInput(Exception):
    """A job's source image or mask is missing or unreadable: retrying cannot help."""


def check_job(job: RenderRequested, max_side: int = MAX_SIDE, max_steps: int = MAX_STEPS) -> None:
    """Context composed the job within the limits; render checks again, so that a job
    from anywhere else (a compromised service) cannot hold a GPU or read another's image."""
    if max(job.width, job.height) > max_side or min(job.width, job.height) < MIN_SIDE:
        raise BadInput(f"{job.width}×{job.height} is outside {MIN_SIDE}..{max_side} a side")
    if not 1 <= job.steps <= max_steps:
        raise BadInput(f"{job.steps} steps is outside 1..{max_steps}")
    if job.source_key is not None and not job.source_key.startswith(f"{job.user_id}/"):
        raise BadInput(f"the source image {job.source_key!r} is not {job.user_id}'s")


class ImageStore:
    def __init__(self, store: ObjectStore, tracer: trace.Tracer) -> None:
        self.store = store
        self.tracer = tracer

    async def stored_render_ms(self, job: RenderRequested) -> float | None:
        """The render time recorded with the job's stored image; None if none is stored."""
        try:
            info = await self.store.get_info(subjects.image_key(job.user_id, job.request_id))
        except nats.js.errors.ObjectNotFoundError:
            return None
        return float(json.loads(info.description or "{}").get("render_ms", 0.0))

    async def inputs(
        self, job: RenderRequested, max_side: int, max_steps: int
    ) -> tuple[Image.Image | None, Image.Image | None]:
        """The job checked again, and the source image (and mask) an edit starts from."""
        check_job(job, max_side, max_steps)
        source = await self.image(job.source_key) if job.mode != "text" else None
        mask = await self.image(job.mask_key) if job.mode == "inpaint" else None
        return source, mask

    async def image(self, key: str | None) -> Image.Image:
        try:
            stored = await self.store.get(key or "")
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
            raise BadInput(f"no stored image {key!r} to edit") from None
        try:
            image = Image.open(io.BytesIO(stored.data or b""))
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise BadInput(f"{key!r} is {image.width}×{image.height}, larger than an input may be")
            image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise BadInput(f"{key!r} is not an image: {error}") from None
        return image

    async def put(self, item: Received, png: bytes, render_ms: float, batch_size: int) -> None:
        """Store the job's PNG, with its render time (which settles a redelivery), in a
        client span of the job's trace."""
        job: RenderRequested = item.event
        meta = ObjectMeta(description=json.dumps({"render_ms": render_ms, "batch": batch_size}))
        with self.tracer.start_as_current_span(
            "image store put",
            context=trace.set_span_in_context(item.span),
            kind=trace.SpanKind.CLIENT,  # a call to the object store
            attributes={"kiln.bytes": len(png), "kiln.bucket": subjects.IMAGE_BUCKET},
        ):
            await self.store.put(subjects.image_key(job.user_id, job.request_id), png, meta=meta)
