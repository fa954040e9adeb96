"""The little world Kiln's own model draws: one shape or glyph, one colour, one place, on a
background. The same vocabulary writes the training captions, draws the training images and
tells the checker what a prompt asked for.

    "a red circle on a blue background at the top"
    "the digit 7 in green on white"

Words outside the vocabulary are ignored; what a prompt leaves out takes its default
(position: center) or, for the background, whatever the model likes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw, ImageFont

SIZE = 32  # the model's native size in pixels
SUPERSAMPLE = 4  # drawn larger, then shrunk: smooth edges at 32×32

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 30),
    "green": (35, 165, 60),
    "blue": (35, 75, 225),
    "purple": (135, 45, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
DIGITS = tuple("0123456789")
GLYPHS = DIGITS
POSITIONS: dict[str, tuple[float, float]] = {  # centre of the object, in pixels
    "center": (16.0, 16.0),
    "left": (8.5, 16.0),
    "right": (23.5, 16.0),
    "top": (16.0, 8.5),
    "bottom": (16.0, 23.5),
}
DEFAULT_POSITION = "center"
SHAPE_SIZE = 13.0  # side of a shape's box, pixels
GLYPH_SIZE = 15.0  # height of a glyph, pixels


@dataclass(frozen=True)
class Scene:
    thing: str  # a shape name, or one glyph character
    colour: str
    background: str | None  # None: the prompt did not say
    position: str = DEFAULT_POSITION

    @property
    def is_glyph(self) -> bool:
        return self.thing in GLYPHS


def random_scene(rng: random.Random) -> Scene:
    colour, background = rng.sample(list(COLOURS), 2)
    thing = rng.choice(SHAPES) if rng.random() < 0.6 else rng.choice(GLYPHS)
    return Scene(thing, colour, background, rng.choice(list(POSITIONS)))


# ----------------------------------------------------------------------------- captions

FILLERS = ("please", "draw", "me", "show", "picture", "of", "simple", "image", "nice", "small")


def caption(scene: Scene, rng: random.Random) -> tuple[str, Scene]:
    """A caption in one of several phrasings, and the scene it actually describes (a
    caption that leaves out the background describes a scene with any background)."""
    if scene.is_glyph:
        thing = rng.choice(
            [
                f"the digit {scene.thing} in {scene.colour}",
                f"a {scene.colour} {scene.thing}",
                f"the number {scene.thing} in {scene.colour}",
            ]
        )
    else:
        thing = f"a {scene.colour} {scene.thing}"
    background = ""
    if rng.random() < 0.85:  # always saying it teaches it fastest; sometimes leave it to the model
        background = rng.choice([f" on a {scene.background} background", f" on {scene.background}"])
    position = ""
    if scene.position != DEFAULT_POSITION or rng.random() < 0.5:
        position = rng.choice([f" at the {scene.position}", f" {scene.position}"])
    parts = [thing, background, position] if rng.random() < 0.7 else [thing, position, background]
    text = "".join(parts)
    if rng.random() < 0.15:  # words the model must learn to ignore
        text = f"{rng.choice(FILLERS)} {text}"
    described = Scene(scene.thing, scene.colour, scene.background if background else None, scene.position)
    return text, described


_WORD = re.compile(r"[a-z]+|\d")


def parse(prompt: str) -> Scene | None:
    """What a prompt asks for, read the way the training captions are written: the first
    colour colours the object, a colour after "on" is the background. None when the prompt
    names no object."""
    words = _WORD.findall(prompt.lower())
    thing = next((w for w in words if w in SHAPES or w in GLYPHS), None)
    if thing is None:
        return None
    colour, background, position = None, None, DEFAULT_POSITION
    after_on = False
    for word in words:
        if word == "on":
            after_on = True
        elif word in ("at", "in"):
            after_on = False
        elif word in COLOURS:
            if after_on and background is None:
                background = word
            elif colour is None:
                colour = word
        elif word in POSITIONS:
            position = word
    return Scene(thing, colour or "white", background, position)


# ----------------------------------------------------------------------------- drawing


@cache
def _font(pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=pixels)


def glyph_mask(glyph: str, height: float = GLYPH_SIZE * SUPERSAMPLE) -> Image.Image:
    """The glyph's ink, cropped to its box and scaled to `height` pixels tall (L mode)."""
    ink = _glyph_ink(glyph)
    width = max(1, round(ink.width * height / ink.height))
    return ink.resize((width, round(height)), Image.Resampling.LANCZOS)


@cache
def _glyph_ink(glyph: str) -> Image.Image:
    font = _font(64)
    left, top, right, bottom = font.getbbox(glyph)
    # A stroke makes the glyph bold enough to survive the shrink to 32×32.
    canvas = Image.new("L", (right - left + 16, bottom - top + 16), 0)
    ImageDraw.Draw(canvas).text((8 - left, 8 - top), glyph, fill=255, font=font, stroke_width=4, stroke_fill=255)
    return canvas.crop(canvas.getbbox())


def draw(scene: Scene, rng: random.Random | None = None) -> Image.Image:
    """The scene as a 32×32 RGB image; `rng` jitters size and place a little."""
    jitter = (lambda span: rng.uniform(-span, span)) if rng else (lambda span: 0.0)
    background = scene.background or "white"
    scale = SUPERSAMPLE
    image = Image.new("RGB", (SIZE * scale, SIZE * scale), COLOURS[background])
    cx, cy = POSITIONS[scene.position]
    cx, cy = (cx + jitter(1.5)) * scale, (cy + jitter(1.5)) * scale
    fill = COLOURS[scene.colour]
    if scene.is_glyph:
        mask = glyph_mask(scene.thing, (GLYPH_SIZE + jitter(1.5)) * scale)
        image.paste(fill, (round(cx - mask.width / 2), round(cy - mask.height / 2)), mask)
    else:
        half = (SHAPE_SIZE + jitter(2.0)) * scale / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        pen = ImageDraw.Draw(image)
        if scene.thing == "circle":
            pen.ellipse(box, fill=fill)
        elif scene.thing == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


# ----------------------------------------------------------------------------- held out

HELD_OUT_SEED = 2026


def held_out_scenes(shapes: int = 40, glyphs: int = 20) -> list[Scene]:
    """The checker's 60 scenes, every attribute stated; training never draws them."""
    rng = random.Random(HELD_OUT_SEED)
    chosen: dict[tuple, Scene] = {}
    while len(chosen) < shapes + glyphs:
        colour, background = rng.sample(list(COLOURS), 2)
        is_glyph = sum(s.is_glyph for s in chosen.values()) < glyphs and (
            sum(not s.is_glyph for s in chosen.values()) >= shapes or rng.random() < 0.4
        )
        thing = rng.choice(GLYPHS if is_glyph else SHAPES)
        scene = Scene(thing, colour, background, rng.choice(list(POSITIONS)))
        chosen.setdefault((scene.thing, scene.colour, scene.background, scene.position), scene)
    return list(chosen.values())


def held_out_prompt(scene: Scene) -> str:
    thing = f"the digit {scene.thing} in {scene.colour}" if scene.is_glyph else f"a {scene.colour} {scene.thing}"
    return f"{thing} on a {scene.background} background at the {scene.position}"
