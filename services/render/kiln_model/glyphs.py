"""The quoted text of a prompt as a picture of its letters: what the kiln-text model is
conditioned on, and the shape its training images are painted through.

    clean(' open  24 hours')  -> 'OPEN 24 HOURS'   (too long: ValueError)
    draw('OPEN', 128, 128)    -> white letters on black, one line, centred

The font is the one Pillow embeds (Aileron, scalable since Pillow 10.1), so a fresh
machine draws exactly the glyphs the model was trained on; a system TTF might be missing
or differ by version.
"""

from __future__ import annotations

from functools import cache

from PIL import Image, ImageDraw, ImageFont

# What can be written, and how a prompt's text is cleaned: one definition with quota and
# context, which refuse what the model cannot write before it reaches render.
from shared.quoted import ALPHABET, MAX_CHARS, clean

__all__ = ["ALPHABET", "MAX_CHARS", "clean", "draw"]

SUPERSAMPLE = 4  # drawn 4× larger, then box-shrunk: smooth edges the VAE can keep
MARGIN = 0.03  # of the width, each side
STROKE = 0.04  # of the font size: Aileron Regular is thin; bolder strokes survive the VAE (0.07 closes 5s and Gs)
SPACE = 0.45  # of the font size: a clear gap between words (Aileron's own is 0.22, which OCR misses)
TRACKING = 0.06  # of the font size, between letters, so the bold strokes do not touch
MAX_CAP_HEIGHT = 0.16  # of the height: short words grow to this, no further
_PROBE = 100  # font size the metrics below are measured at


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@cache
def _metrics() -> tuple[float, float, float]:
    """Per unit of font size: the average advance of a character, the cap height, and how
    far below the drawing origin the caps start."""
    font = _font(_PROBE)
    advance = sum(font.getlength(c) for c in ALPHABET.strip()) / len(ALPHABET.strip())
    _, top, _, bottom = font.getbbox("H")
    return advance / _PROBE, (bottom - top) / _PROBE, top / _PROBE


def _advance(char: str, size: int) -> float:
    return SPACE * size if char == " " else _font(size).getlength(char)


def _line_width(text: str, size: int) -> float:
    return sum(_advance(c, size) for c in text) + TRACKING * size * (len(text) - 1) + 2 * STROKE * size


def draw(text: str, width: int, height: int) -> Image.Image:
    """`text` in white on black (mode "L"), one line, centred. The font is as large as
    fits, up to a cap height of MAX_CAP_HEIGHT × height; twelve average characters always
    fit between the margins (an unusually wide line is squeezed sideways to fit)."""
    text = clean(text)
    advance, cap_height, cap_top = _metrics()
    room = width * (1 - 2 * MARGIN) * SUPERSAMPLE
    twelve = room / (MAX_CHARS * (advance + TRACKING) + 2 * STROKE)  # the size twelve average chars need
    fills = room / (_line_width(text, _PROBE) / _PROBE)  # the size this text needs to fill the line
    capped = MAX_CAP_HEIGHT * height * SUPERSAMPLE / cap_height
    size = round(max(twelve, min(fills, capped)))
    font, stroke = _font(size), max(1, round(STROKE * size))

    line_width = _line_width(text, size)
    line = Image.new("L", (round(line_width), round((cap_height + 2 * STROKE) * size) + 1), 0)
    pen, x = ImageDraw.Draw(line), stroke
    for char in text:  # one at a time: the tracking keeps bold strokes apart
        pen.text((x, stroke - cap_top * size), char, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
        x += _advance(char, size) + TRACKING * size
    if line.width > room:
        line = line.resize((round(room), line.height), Image.Resampling.LANCZOS)

    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    canvas.paste(line, ((canvas.width - line.width) // 2, (canvas.height - line.height) // 2))
    return canvas.resize((width, height), Image.Resampling.BOX)
