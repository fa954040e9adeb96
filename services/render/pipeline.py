"""Load a diffusers text-to-image pipeline from a local folder and render one job."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path

from shared.events import RenderRequested

# Weights come from local folders only; never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


def quiet_model_libraries() -> None:
    """No import-time warnings (optional image backends no Kiln pipeline uses) and no
    progress bars from the model libraries: a log file is no place for either. Call it
    before importing transformers."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


class Renderer:
    def __init__(self, model_path: Path) -> None:
        quiet_model_libraries()
        import torch
        from diffusers import AutoPipelineForText2Image

        if not (model_path / "model_index.json").exists():
            raise FileNotFoundError(
                f"no diffusers pipeline at {model_path} (model_index.json missing); "
                "set KILN_MODEL to a local pipeline folder"
            )
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.pipe = AutoPipelineForText2Image.from_pretrained(
            str(model_path), torch_dtype=dtype, local_files_only=True
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.model = model_path.name

    def render(self, job: RenderRequested, on_step: StepCallback) -> tuple[bytes, float]:
        """Render `job`; return the PNG and the pipeline's own time in milliseconds."""

        def step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            on_step(step + 1, job.steps)
            return callback_kwargs

        generator = self.torch.Generator(self.device).manual_seed(job.seed)
        started = time.perf_counter()
        image = self.pipe(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt or None,
            width=job.width,
            height=job.height,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            generator=generator,
            callback_on_step_end=step_end,
        ).images[0]
        render_ms = (time.perf_counter() - started) * 1000
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), render_ms
