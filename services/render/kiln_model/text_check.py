"""Does the kiln-text model write what it is asked? Render every held-out word and read it.

    python -m services.render.kiln_model.text_check services/render/models/kiln-text \\
        --json bench/results/text_check.json --sheet bench/results/text_check.png

Reads only the pictures, never the model: the border's colour is the background; pixels far
from it are the letters, their median colour the text colour (as check.py reads a shape);
their distance from the background, as a black-on-white picture upscaled 4×, goes to
Tesseract (single line, A-Z 0-9 only, no dictionary: it must read letters, not guess
words). The same reading of the glyph images, of the clean training-style pictures, and of
those after a VAE round trip is the ceiling the model is measured against.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from services.render.kiln_model import glyphs, text_scenes

TARGETS = {"exact": 0.90, "characters": 0.97, "colour": 0.95, "background": 0.95}
OBJECT_DISTANCE = 80.0  # RGB distance from the background that counts as ink
UPSCALE = 4
TESSERACT = [
    "tesseract", "stdin", "stdout", "--psm", "7",  # one line of text
    "-c", f"tessedit_char_whitelist={glyphs.ALPHABET}",  # the space too: the LSTM reads it as a character
    "-c", "load_system_dawg=0", "-c", "load_freq_dawg=0",  # letters, not dictionary words
]  # fmt: skip


@dataclass(frozen=True)
class Reading:
    text: str
    colour: str | None  # None: no ink found
    background: str


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(text_scenes.COLOURS, key=lambda n: float(np.sum((np.array(text_scenes.COLOURS[n]) - rgb) ** 2)))


def ocr(ink: Image.Image) -> str:
    """Tesseract's single line from an "L" picture of dark text on white."""
    big = ink.resize((ink.width * UPSCALE, ink.height * UPSCALE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    ImageOps.expand(big, border=16, fill=255).save(buffer, format="PNG")
    out = subprocess.run(TESSERACT, input=buffer.getvalue(), capture_output=True, check=True).stdout
    return " ".join(out.decode().split())


def read(image: Image.Image) -> Reading:
    pixels = np.asarray(image.convert("RGB"), dtype=float)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background_rgb, axis=2)
    mask = distance > OBJECT_DISTANCE
    if mask.sum() < 4:
        return Reading("", None, _nearest_colour(background_rgb))
    colour = _nearest_colour(np.median(pixels[mask], axis=0))
    ys, xs = np.nonzero(mask)
    top, bottom = max(0, ys.min() - 6), min(len(pixels), ys.max() + 7)
    left, right = max(0, xs.min() - 6), min(len(pixels[0]), xs.max() + 7)
    ink = np.clip(distance / max(distance.max(), 1.0) * 255, 0, 255).astype(np.uint8)
    text = ocr(Image.fromarray(255 - ink[top:bottom, left:right]))
    return Reading(text, colour, _nearest_colour(background_rgb))


def levenshtein(a: str, b: str) -> int:
    # Twelve characters at most: a plain dynamic programme, not worth a dependency.
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def score(pairs: list[tuple[text_scenes.TextScene, Reading]]) -> dict[str, float]:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return {
        "exact": mean([r.text == s.text for s, r in pairs]),
        "characters": mean([max(0.0, 1 - levenshtein(r.text, s.text) / len(s.text)) for s, r in pairs]),
        "colour": mean([r.colour == s.colour for s, r in pairs]),
        "background": mean([r.background == s.background for s, r in pairs]),
    }


def render(model: Path, prompts: list[str], texts: list[str], steps: int, guidance: float, seed: int, batch: int):
    import torch

    from services.render.kiln_model.glyph_pipeline import GlyphPipeline

    torch.set_num_threads(2)
    pipe = GlyphPipeline.from_folder(model)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        chunk = slice(start, start + batch)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(start, min(start + batch, len(prompts)))]
        images += pipe(
            prompts[chunk], texts[chunk], num_inference_steps=steps, guidance_scale=guidance, generators=generators
        )
    return pipe, images


def vae_round_trip(pipe, images: list[Image.Image]) -> list[Image.Image]:
    import torch

    pixels = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32)) for i in images]).permute(0, 3, 1, 2)
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(pixels / 127.5 - 1).latent_dist.mode()).sample
    array = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def contact_sheet(images: list[Image.Image], columns: int = 8) -> Image.Image:
    width, height = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (width * columns, height * rows), (128, 128, 128))
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.render.kiln_model.text_check")
    parser.add_argument("model", type=Path)
    # The settings render should use (measured on this model: 4-10 steps read as well as 20
    # or better, and guidance above 2 smears the colours into the letters).
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sheet", type=Path, help="also save the rendered pictures as one image")
    parser.add_argument("--json", type=Path, help="write the scores here")
    args = parser.parse_args()
    if shutil.which("tesseract") is None:
        print("tesseract not found: install the Debian package tesseract-ocr", file=sys.stderr)
        return 2

    held_out = text_scenes.held_out_prompts()
    scenes_ = [scene for _, scene in held_out]
    pipe, images = render(
        args.model,
        [p for p, _ in held_out],
        [s.text for s in scenes_],
        args.steps,
        args.guidance,
        args.seed,
        args.batch,
    )
    pairs = [(scene, read(image)) for scene, image in zip(scenes_, images, strict=True)]
    glyph_pairs = [(s, read(glyphs.draw(s.text, *pipe.size).convert("RGB"))) for s in scenes_]
    clean = [text_scenes.draw(s, pipe.size) for s in scenes_]
    clean_pairs = [(s, read(image)) for s, image in zip(scenes_, clean, strict=True)]
    vae_pairs = [(s, read(image)) for s, image in zip(scenes_, vae_round_trip(pipe, clean), strict=True)]

    for (prompt, scene), (_, reading) in zip(held_out, pairs, strict=True):
        wrong = [
            f"{name} {got!r}"
            for name, got, want in (
                ("read", reading.text, scene.text),
                ("colour", reading.colour, scene.colour),
                ("background", reading.background, scene.background),
            )
            if got != want
        ]
        print(f"{'ok ' if not wrong else 'BAD'} {prompt:66} {', '.join(wrong)}")
    scores, vae_scores, clean_scores = score(pairs), score(vae_pairs), score(clean_pairs)
    # The glyph masks are white on black: only their reading counts, not their colours.
    glyph_scores = {name: value for name, value in score(glyph_pairs).items() if name in ("exact", "characters")}
    passed = all(scores[name] >= target for name, target in TARGETS.items())
    print(f"\n{'':12} {'model':>8} {'target':>8} {'VAE trip':>9} {'clean':>8} {'glyphs':>8}")
    for name, target in TARGETS.items():
        glyph = f"{glyph_scores[name]:8.1%}" if name in glyph_scores else f"{'-':>8}"
        print(f"{name:12} {scores[name]:8.1%} {target:8.0%} {vae_scores[name]:9.1%} {clean_scores[name]:8.1%} {glyph}")
    if args.sheet:
        args.sheet.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(images).save(args.sheet)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "model": str(args.model),
            "steps": args.steps,
            "guidance": args.guidance,
            "seed": args.seed,
            "scores": scores,
            "targets": TARGETS,
            "passed": passed,
            "ceiling": {"glyph_images": glyph_scores, "clean_pictures": clean_scores, "vae_round_trip": vae_scores},
            "readings": [
                {"prompt": prompt, "asked": asdict(scene), "read": asdict(reading)}
                for (prompt, scene), (_, reading) in zip(held_out, pairs, strict=True)
            ],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
