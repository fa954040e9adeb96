"""Draw a prompt's quoted text with the kiln-text model: the inference contract the
render service calls.

    pipe = GlyphPipeline.from_folder(Path("services/render/models/kiln-text"))
    [image] = pipe(['a sign that says "OPEN" in red on white'], ["OPEN"])

The UNet sees, beside the noisy latents, the quoted text drawn as a glyph mask at full
resolution and folded into the latent grid (pixel-unshuffle: each 4×4 block of the mask
becomes 16 channels of one latent cell), so no letter detail is lost to a resize. The text
encoder sees the prompt with the quoted text replaced by a placeholder: it carries the
colours; the letters come from the glyphs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from services.render.kiln_model import glyphs, text_scenes
from services.render.pipeline import quiet_model_libraries

MAX_TOKENS = 16


def glyph_condition(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 1, H, W) glyph masks in [0, 1] → (B, factor², H/factor, W/factor) in [-1, 1]."""
    return F.pixel_unshuffle(mask * 2 - 1, factor)


def glyph_masks(texts: list[str], size: tuple[int, int]) -> torch.Tensor:
    """The texts drawn by glyphs.draw, as a (B, 1, H, W) tensor in [0, 1]."""
    width, height = size
    drawn = [
        torch.frombuffer(bytearray(glyphs.draw(text, width, height).tobytes()), dtype=torch.uint8) for text in texts
    ]
    return torch.stack(drawn).view(-1, 1, height, width).float() / 255


def encoder_caption(prompt: str) -> str:
    return text_scenes.parse(prompt)[1]


class GlyphPipeline:
    size: tuple[int, int]  # (width, height) the model draws

    def __init__(self, tokenizer, text_encoder, vae, unet, scheduler, device: str, dtype: torch.dtype) -> None:
        self.tokenizer, self.text_encoder, self.vae, self.unet, self.scheduler = (
            tokenizer,
            text_encoder,
            vae,
            unet,
            scheduler,
        )
        self.device, self.dtype = device, dtype
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        side = unet.config.sample_size * self.factor
        self.size = (side, side)

    @classmethod
    def from_folder(cls, path: Path, device: str = "cpu", dtype=torch.float32) -> GlyphPipeline:
        quiet_model_libraries()
        import diffusers
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, PreTrainedTokenizerFast

        path = Path(path)
        scheduler_class = json.loads((path / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        load = {"local_files_only": True}
        small = {**load, "dtype": dtype, "low_cpu_mem_usage": False}  # a few MB: no need for accelerate
        parts = (
            PreTrainedTokenizerFast.from_pretrained(path / "tokenizer", **load),
            CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype, **load).to(device).eval(),
            AutoencoderKL.from_pretrained(path / "vae", **small).to(device).eval(),
            UNet2DConditionModel.from_pretrained(path / "unet", **small).to(device).eval(),
            getattr(diffusers, scheduler_class).from_pretrained(path / "scheduler", **load),
        )
        return cls(*parts, device=device, dtype=dtype)

    def encode_prompts(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        )
        return self.text_encoder(ids.input_ids.to(self.device))[0]

    def prepare_latents(self, generators: list[torch.Generator] | None, count: int) -> torch.Tensor:
        """One noise tensor per image from its own generator: an image does not depend on
        the batch it was drawn in."""
        shape = (1, self.unet.config.out_channels, self.size[1] // self.factor, self.size[0] // self.factor)
        noise = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators or [None] * count]
        return torch.cat(noise).to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        texts: list[str],
        *,
        negative_prompts: list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        generators: list[torch.Generator] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        # 1. Check inputs
        count = len(prompts)
        if count == 0:
            raise ValueError("`prompts` is empty: pass at least one prompt")
        if len(texts) != count:
            raise ValueError(f"`texts` must have one entry per prompt: {count} prompts but {len(texts)} texts")
        if negative_prompts is not None and len(negative_prompts) != count:
            raise ValueError(f"`negative_prompts` must have {count} entries, got {len(negative_prompts)}")
        if generators is not None and len(generators) != count:
            raise ValueError(f"`generators` must have {count} entries (one per image), got {len(generators)}")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be at least 1, got {num_inference_steps}")
        texts = [glyphs.clean(text) for text in texts]

        # 2. Encode the captions (quoted text replaced), with the unconditional ones first
        captions = [encoder_caption(prompt) for prompt in prompts]
        negatives = [encoder_caption(p) for p in negative_prompts] if negative_prompts else [""] * count
        guided = guidance_scale > 1.0
        context = self.encode_prompts([*negatives, *captions] if guided else captions)

        # 3. Draw the glyphs; both halves of the guidance batch see them (only words are dropped)
        glyph = glyph_condition(glyph_masks(texts, self.size), self.factor).to(self.device, self.dtype)
        glyph = torch.cat([glyph, glyph]) if guided else glyph

        # 4. Prepare timesteps and latents (a fresh scheduler: a multistep solver keeps state)
        scheduler = self.scheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        latents = self.prepare_latents(generators, count) * scheduler.init_noise_sigma

        # 5. Denoising loop
        for step, t in enumerate(timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            prediction = self.unet(torch.cat([model_input, glyph], dim=1), t, context).sample
            if guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = scheduler.step(prediction, t, latents).prev_sample
            if on_step is not None:
                on_step(step + 1, len(timesteps))

        # 6. Decode
        pixels = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        return [Image.fromarray(array.numpy()) for array in pixels]
