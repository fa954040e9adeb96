"""Does a model draw what it is asked? Render the 60 held-out prompts and read the pixels.

    python -m services.render.kiln_model.check services/render/models/kiln-shapes

Reads only the image, never the model: the border's colour is the background, pixels far
from it are the object; the object's colour is their median, its place the nearest anchor
to their centroid, its shape the fill ratio of its box (square ≈ 1, circle ≈ π/4,
triangle ≈ ½), a glyph the template it overlaps best. Prints the score per attribute and
writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from services.render.kiln_model import scenes

TARGETS = {"colour": 0.90, "shape": 0.85, "position": 0.80, "background": 0.70, "digit": 0.80}
OBJECT_DISTANCE = 80.0  # RGB distance from the background that counts as the object
GLYPH_BOX = (12, 16)  # templates and objects compared at this size (w, h)


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None
    position: str | None
    shape: str | None  # by fill ratio; None when there is no object
    glyph: str | None  # best template; None when there is no object
    fill: float


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(scenes.COLOURS, key=lambda name: float(np.sum((np.array(scenes.COLOURS[name]) - rgb) ** 2)))


def _templates() -> dict[str, np.ndarray]:
    return {
        g: np.asarray(scenes.glyph_mask(g).resize(GLYPH_BOX, Image.Resampling.BILINEAR), float) / 255
        for g in scenes.GLYPHS
    }


_TEMPLATES: dict[str, np.ndarray] = {}


def read(image: Image.Image) -> Reading:
    pixels = np.asarray(image.convert("RGB").resize((scenes.SIZE, scenes.SIZE)), dtype=float)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    background = _nearest_colour(background_rgb)
    mask = np.linalg.norm(pixels - background_rgb, axis=2) > OBJECT_DISTANCE
    if mask.sum() < 4:
        return Reading(background, None, None, None, None, 0.0)
    ys, xs = np.nonzero(mask)
    colour = _nearest_colour(np.median(pixels[mask], axis=0))
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    position = min(
        scenes.POSITIONS, key=lambda p: (scenes.POSITIONS[p][0] - cx) ** 2 + (scenes.POSITIONS[p][1] - cy) ** 2
    )
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = mask.sum() / ((bottom - top) * (right - left))
    shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    if not _TEMPLATES:
        _TEMPLATES.update(_templates())
    crop = Image.fromarray((mask[top:bottom, left:right] * 255).astype(np.uint8))
    ink = np.asarray(crop.resize(GLYPH_BOX, Image.Resampling.BILINEAR), float) / 255
    glyph = max(_TEMPLATES, key=lambda g: -float(np.abs(_TEMPLATES[g] - ink).sum()))
    return Reading(background, colour, position, shape, glyph, float(fill))


def score(pairs: list[tuple[scenes.Scene, Reading]]) -> dict[str, float]:
    """The share of prompts whose attribute the image shows."""

    def share(hits: list[bool]) -> float:
        return sum(hits) / len(hits) if hits else float("nan")

    return {
        "colour": share([r.colour == s.colour for s, r in pairs]),
        "shape": share([r.shape == s.thing for s, r in pairs if not s.is_glyph]),
        "position": share([r.position == s.position for s, r in pairs]),
        "background": share([r.background == s.background for s, r in pairs]),
        "digit": share([r.glyph == s.thing for s, r in pairs if s.is_glyph]),
    }


def render_held_out(model: Path, steps: int, guidance: float, seed: int) -> list[tuple[scenes.Scene, Image.Image]]:
    from services.render.pipeline import quiet_model_libraries

    quiet_model_libraries()
    import torch
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(str(model), dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    held_out = scenes.held_out_scenes()
    prompts = [scenes.held_out_prompt(s) for s in held_out]
    images: list[Image.Image] = []
    for start in range(0, len(prompts), 20):
        generator = torch.Generator().manual_seed(seed + start)
        images += pipe(
            prompts[start : start + 20],
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=scenes.SIZE,
            height=scenes.SIZE,
            generator=generator,
        ).images
    return list(zip(held_out, images, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.render.kiln_model.check")
    parser.add_argument("model", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sheet", type=Path, help="also save the 60 images as one picture")
    parser.add_argument("--json", type=Path, help="write the scores here")
    args = parser.parse_args()

    rendered = render_held_out(args.model, args.steps, args.guidance, args.seed)
    pairs = [(scene, read(image)) for scene, image in rendered]
    for scene, reading in pairs:
        wrong = [
            name
            for name, ok in (
                ("colour", reading.colour == scene.colour),
                ("background", reading.background == scene.background),
                ("position", reading.position == scene.position),
                (
                    "digit" if scene.is_glyph else "shape",
                    (reading.glyph if scene.is_glyph else reading.shape) == scene.thing,
                ),
            )
            if not ok
        ]
        print(f"{'ok ' if not wrong else 'BAD'} {scenes.held_out_prompt(scene):60} {', '.join(wrong)}")
    scores = score(pairs)
    passed = all(scores[name] >= target for name, target in TARGETS.items())
    for name, target in TARGETS.items():
        print(f"{name:10} {scores[name]:6.1%}  (target {target:.0%})")
    if args.sheet:
        sheet = Image.new("RGB", (scenes.SIZE * 10, scenes.SIZE * 6))
        for index, (_, image) in enumerate(rendered):
            sheet.paste(image, ((index % 10) * scenes.SIZE, (index // 10) * scenes.SIZE))
        sheet.resize((sheet.width * 4, sheet.height * 4), Image.Resampling.NEAREST).save(args.sheet)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "model": str(args.model),
                    "steps": args.steps,
                    "guidance": args.guidance,
                    "scores": scores,
                    "targets": TARGETS,
                    "passed": passed,
                },
                indent=2,
            )
        )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
