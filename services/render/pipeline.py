"""Load a diffusers pipeline from a local folder and render batches of compatible jobs.

One model, three modes, sharing the same weights: text-to-image, edit (image-to-image from
an earlier image, with a strength) and inpaint (repaint where a mask is white). Any local
pipeline folder diffusers has the classes for works (Kiln's own model, SD 1.5, SD-Turbo,
SDXL…). On a GPU it runs in fp16; on a CPU in fp32.

A job with quoted text to write (`job.text`) goes to the model's text model, named by its
card (Kiln's own: kiln-text, glyph-conditioned, kiln_model/glyph_pipeline.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import io
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

from PIL import Image

from shared import model_card
from shared.cost import StepClock
from shared.events import RenderRequested

# Weights come from local folders only; never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

P = ParamSpec("P")
T = TypeVar("T")

# Every torch call of a worker (loading, warm-up, renders) runs on this one thread. OpenMP
# gives each thread that calls into torch a team of its own: spread over asyncio's thread
# pool, the teams fought over the cores, and a batch of 16 took 2.2 s instead of 1.4 s.
_TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where the C library has one."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand the memory a batch freed back to the system. glibc keeps freed blocks in its
    arenas for reuse, and batches of every size, step count and model leave them scattered:
    under a mixed load a worker's RSS went from 497 to 1,232 MB in 5 minutes without this,
    and stayed between 520 and 780 MB (the peaks mid-batch) with it, at the same images/s."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


async def on_torch_thread(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`function(*args, **kwargs)` on the worker's torch thread, awaited."""
    call = functools.partial(function, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_TORCH_THREAD, call)


# (steps done, total steps) after each denoising step. Raising `Cancelled` from it stops
# the batch between two steps.
StepCallback = Callable[[int, int], None]


class Cancelled(Exception):
    """Every job of the batch was cancelled: stop denoising."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"cancelled at step {step} of {total}")


class OverBudget(Exception):
    """The batch ran far past what its plans allow an image: stop it (the requests fail as
    `too_costly` and are refunded)."""

    def __init__(self, step: int, total: int, seconds: float, budget_s: float) -> None:
        super().__init__(
            f"stopped at step {step} of {total} after {seconds:.1f} s an image; the plan allows {budget_s:g} s"
        )


def quiet_model_libraries() -> None:
    """No import-time warnings (optional image backends no Kiln pipeline uses) and no
    progress bars from the model libraries: a log file is no place for either. Call it
    before importing transformers."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def batch_key(job: RenderRequested) -> tuple:
    """Jobs with the same key can run as one batch: one pipeline call, same size and steps."""
    strength = job.strength if job.mode != "text" else None
    return (job.mode, job.width, job.height, job.steps, job.guidance, strength, job.text is not None)


class Renderer:
    def __init__(self, model_path: Path, threads: int | None = None) -> None:
        quiet_model_libraries()
        import torch
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

        if not (model_path / "model_index.json").exists():
            raise FileNotFoundError(
                f"no diffusers pipeline at {model_path} (model_index.json missing); "
                "set KILN_MODEL to a local pipeline folder"
            )
        self.torch = torch
        if threads is not None:  # CPU workers sharing a host: one share each
            torch.set_num_threads(threads)
        # `--gpu N` pins the process to one GPU through CUDA_VISIBLE_DEVICES: it sees cuda:0.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        # low_cpu_mem_usage needs `accelerate`, which Kiln does not install: asking for it
        # would only print a warning at every start.
        text = AutoPipelineForText2Image.from_pretrained(
            str(model_path), dtype=dtype, local_files_only=True, low_cpu_mem_usage=False
        ).to(self.device)
        # The edit pipelines share the text pipeline's modules: no second copy of the weights.
        self.pipelines = {
            "text": text,
            "edit": AutoPipelineForImage2Image.from_pipe(text),
            "inpaint": AutoPipelineForInpainting.from_pipe(text),
        }
        for pipe in self.pipelines.values():
            pipe.set_progress_bar_config(disable=True)
        self.model = model_path.name
        self.text_pipeline = None  # draws jobs with quoted text; None: this model has no text model
        if (text_path := model_card.text_model_path(model_path)) is not None:
            from services.render.kiln_model.glyph_pipeline import GlyphPipeline

            self.text_pipeline = GlyphPipeline.from_folder(text_path, self.device, dtype)

    def warm_up(
        self, sides: Sequence[int], clock: StepClock, slow_step_s: float = 1.0, text_sides: Sequence[int] = ()
    ) -> None:
        """Render a 2-step image at each side, smallest first, and time it: the first call
        pays torch's start-up, and pricing starts from measured figures, not none. Stops
        after a side whose step takes `slow_step_s` (larger ones are extrapolated). The
        text model's sides are timed too, with text, if this worker has one."""
        plain = [(side, None) for side in sorted(sides)]
        written = [(side, "WARM UP") for side in sorted(text_sides)] if self.text_pipeline else []
        for jobs in (plain, written):
            for side, text in jobs:
                job = RenderRequested(
                    request_id="warm-up",
                    user_id="kiln",
                    conversation_id="warm-up",
                    prompt="warm up",
                    width=side,
                    height=side,
                    steps=2,
                    seed=0,
                    plan="",
                    text=text,
                )
                self.render_batch([job], lambda step, total: None)
                _, render_ms = self.render_batch([job], lambda step, total: None)
                clock.record(side, side, 1, job.steps, render_ms / 1000)
                if render_ms / 1000 / job.steps >= slow_step_s:
                    break

    def render_batch(
        self,
        jobs: Sequence[RenderRequested],
        on_step: StepCallback,
        sources: Sequence[Image.Image | None] = (),
        masks: Sequence[Image.Image | None] = (),
    ) -> tuple[list[bytes], float]:
        """Render compatible jobs (equal `batch_key`) in one pipeline call; return one PNG
        per job, in order, and the pipeline's own time in milliseconds."""
        try:
            return self._render_batch(jobs, on_step, sources, masks)
        finally:
            release_freed_memory()

    def _render_batch(
        self,
        jobs: Sequence[RenderRequested],
        on_step: StepCallback,
        sources: Sequence[Image.Image | None],
        masks: Sequence[Image.Image | None],
    ) -> tuple[list[bytes], float]:
        first = jobs[0]
        if any(batch_key(job) != batch_key(first) for job in jobs):
            raise ValueError("jobs in one batch must share mode, size, steps, guidance, strength and text or none")
        if first.text is not None:
            return self._render_text(jobs, on_step)
        pipe = self.pipelines[first.mode]

        def step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            on_step(step + 1, pipe.num_timesteps)
            return callback_kwargs

        arguments = dict(
            prompt=[job.prompt for job in jobs],
            negative_prompt=[job.negative_prompt for job in jobs],
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            # One generator per job: a job draws the same image alone or in any batch.
            generator=[self.torch.Generator(self.device).manual_seed(job.seed) for job in jobs],
            callback_on_step_end=step_end,
        )
        size = (first.width, first.height)
        if first.mode == "text":
            arguments.update(width=first.width, height=first.height)
        else:
            arguments.update(image=[_sized(source, size, "RGB") for source in sources], strength=first.strength)
        if first.mode == "inpaint":
            arguments.update(
                mask_image=[_sized(mask, size, "L") for mask in masks], width=first.width, height=first.height
            )
        started = time.perf_counter()
        images = pipe(**arguments).images
        render_ms = (time.perf_counter() - started) * 1000
        return [_png(image) for image in images], render_ms

    def _render_text(self, jobs: Sequence[RenderRequested], on_step: StepCallback) -> tuple[list[bytes], float]:
        """Jobs with quoted text, drawn by the text model at its own size."""
        if self.text_pipeline is None:
            raise ValueError(f"the model {self.model} writes no text: it has no text model")
        first = jobs[0]
        if (first.width, first.height) != self.text_pipeline.size:
            width, height = self.text_pipeline.size
            raise ValueError(f"the text model draws {width}×{height} only, not {first.width}×{first.height}")
        started = time.perf_counter()
        images = self.text_pipeline(
            [job.prompt for job in jobs],
            [job.text or "" for job in jobs],
            negative_prompts=[job.negative_prompt for job in jobs],
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            generators=[self.torch.Generator(self.device).manual_seed(job.seed) for job in jobs],
            on_step=on_step,
        )
        render_ms = (time.perf_counter() - started) * 1000
        return [_png(image) for image in images], render_ms


def _sized(image: Image.Image | None, size: tuple[int, int], mode: str) -> Image.Image:
    if image is None:
        raise ValueError("an edit needs its source image (and an inpaint its mask)")
    image = image.convert(mode)
    return image if image.size == size else image.resize(size, Image.Resampling.NEAREST)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
