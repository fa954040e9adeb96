"""The little world the kiln-text model draws: a line of quoted text in one colour on a
plain background. The same templates write the training captions and the checker's
prompts, and `parse` reads a prompt back the way they are written.

    'the word "SALE" in red on a white background'
    'a yellow sign that says "OPEN" in blue'

The caption the text encoder sees has the quoted text replaced by one placeholder word:
the letters reach the UNet as a glyph image (glyphs.py), the caption carries the colours.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image

from services.render.kiln_model import glyphs, scenes
from shared.quoted import QUOTED

COLOURS = scenes.COLOURS
PLACEHOLDER = "quoted"  # stands for the quoted text in the encoder's caption
SURFACES = ("background", "sign", "poster", "banner", "board")  # "<colour> sign": a background
MIN_CONTRAST = 60  # luma difference (0-255) between text and background: readable pairs only

# Real words and phrases the checker renders; training never samples them, nor any string
# that contains one, so a legible OPEN is read from the glyph, not remembered.
HELD_OUT = (
    "OPEN", "SALE", "CLOSED", "EXIT", "HELLO", "KILN", "PIZZA", "24 HOURS", "STOP", "COFFEE",
    "WELCOME", "BAKERY", "HOTEL", "TAXI", "PARKING", "NO ENTRY", "FREE WIFI", "BOOKS", "MUSIC",
    "GARDEN", "TICKETS", "PHARMACY", "OPEN 24 7", "SALE 50", "HOT DOGS", "ICE CREAM", "THANK YOU",
    "GOOD LUCK", "ROOM 101", "GATE 7", "BUS STOP", "CAFE", "BAR", "DANGER", "QUIET", "PUSH",
    "PULL", "ZOO", "MARKET", "JAZZ CLUB", "FIX ME", "EXPRESS", "LOBBY", "KEEP OUT", "VOTE",
    "GYM", "LIBRARY", "MAX 12 CHARS",
)  # fmt: skip

TEMPLATES_BOTH = (
    'the word "{t}" in {fg} on a {bg} background',
    '"{t}" written in {fg} on {bg}',
    'a {bg} sign that says "{t}" in {fg}',
    'a sign that says "{t}" in {fg} letters on a {bg} background',
    '{fg} text "{t}" on a {bg} background',
    'a {bg} poster with "{t}" in {fg}',
    '"{t}" in {fg} on {bg}',
    'the text "{t}" in {fg} on a {bg} sign',
    'a {bg} banner reading "{t}" in {fg} letters',
    'big {fg} letters saying "{t}" on {bg}',
)
TEMPLATES_TEXT_ONLY = ('the word "{t}" in {fg}', '"{t}" written in {fg}', 'a sign that says "{t}" in {fg}')
TEMPLATES_BACKGROUND_ONLY = ('a {bg} sign that says "{t}"', '"{t}" on a {bg} background', 'the word "{t}" on {bg}')
TEMPLATES_NEITHER = ('a sign that says "{t}"', 'the word "{t}"', '"{t}"', 'a poster with "{t}"')
FILLERS = ("please", "draw", "me", "show", "picture", "of", "simple", "image", "nice", "small")

# Every word a caption can hold, for the tokenizer; any other word is [UNK].
WORDS = sorted(
    {*COLOURS, PLACEHOLDER, *SURFACES, *FILLERS, "an"}
    | {w for t in (*TEMPLATES_BOTH, *TEMPLATES_TEXT_ONLY, *TEMPLATES_BACKGROUND_ONLY, *TEMPLATES_NEITHER)
       for w in re.findall(r"[a-z]+", t.replace("{t}", "").replace("{fg}", "").replace("{bg}", ""))}
)  # fmt: skip


@dataclass(frozen=True)
class TextScene:
    text: str  # cleaned: A-Z, 0-9, single spaces
    colour: str | None  # of the letters; None: the caption did not say
    background: str | None


def _luma(name: str) -> float:
    r, g, b = COLOURS[name]
    return 0.299 * r + 0.587 * g + 0.114 * b


READABLE_PAIRS = tuple(
    (fg, bg) for fg in COLOURS for bg in COLOURS if fg != bg and abs(_luma(fg) - _luma(bg)) >= MIN_CONTRAST
)


def is_held_out(text: str) -> bool:
    return any(word in text for word in HELD_OUT)


def random_text(rng: random.Random) -> str:
    """Random letters and digits, 1-12 long, a third of the longer ones split by a space;
    never a held-out word nor a string containing one."""
    letters = glyphs.ALPHABET.strip()
    while True:
        length = rng.randint(1, glyphs.MAX_CHARS)
        chars = [rng.choice(letters) for _ in range(length)]
        if length >= 3 and rng.random() < 0.33:
            chars[rng.randint(1, length - 2)] = " "
        text = "".join(chars)
        if not is_held_out(text):
            return text


def random_scene(rng: random.Random) -> TextScene:
    return TextScene(random_text(rng), *rng.choice(READABLE_PAIRS))


def _fill(template: str, text: str, colour: str | None, background: str | None) -> str:
    prompt = template.format(t=text, fg=colour, bg=background)
    return re.sub(r"\ba (?=[aeiou])", "an ", prompt)  # "an orange sign"; the quoted text is upper case


def caption(scene: TextScene, rng: random.Random) -> tuple[str, TextScene]:
    """A prompt in one of the phrasings, and the scene it describes (colours the prompt
    leaves out are None: any colour fits)."""
    roll = rng.random()
    if roll < 0.8:  # saying both teaches colours fastest; sometimes leave them to the model
        template, described = rng.choice(TEMPLATES_BOTH), scene
    elif roll < 0.88:
        template, described = rng.choice(TEMPLATES_TEXT_ONLY), TextScene(scene.text, scene.colour, None)
    elif roll < 0.96:
        template, described = rng.choice(TEMPLATES_BACKGROUND_ONLY), TextScene(scene.text, None, scene.background)
    else:
        template, described = rng.choice(TEMPLATES_NEITHER), TextScene(scene.text, None, None)
    prompt = _fill(template, scene.text, scene.colour, scene.background)
    if rng.random() < 0.1:  # words the model must learn to ignore
        prompt = f"{rng.choice(FILLERS)} {prompt}"
    return prompt, described


_WORD = re.compile(r"[a-z]+|\d")


def parse(prompt: str) -> tuple[str | None, str, str | None, str | None]:
    """(quoted text as written, the caption with it replaced by PLACEHOLDER, text colour,
    background colour). A colour right after "on" (or "on a") or right before a surface
    word ("yellow sign") is the background; the first other colour colours the letters."""
    match = QUOTED.search(prompt)
    quoted = match.group(1) if match else None
    without = QUOTED.sub(f" {PLACEHOLDER} ", prompt, count=1) if match else prompt
    words = _WORD.findall(without.lower())
    colour = background = None
    for i, word in enumerate(words):
        if word not in COLOURS:
            continue
        before = words[max(0, i - 2) : i]
        after = words[i + 1] if i + 1 < len(words) else ""
        if before[-1:] == ["on"] or before in (["on", "a"], ["on", "an"]) or after in SURFACES:
            background = background or word
        elif colour is None:
            colour = word
    return quoted, " ".join(without.split()), colour, background


def draw(scene: TextScene, size: tuple[int, int]) -> Image.Image:
    """The scene as an RGB picture: the glyph mask painted in the text colour on the
    background (a colour the caption left out is still drawn: the picture needs one)."""
    mask = glyphs.draw(scene.text, *size)
    image = Image.new("RGB", size, COLOURS[scene.background or "white"])
    image.paste(COLOURS[scene.colour or "black"], (0, 0), mask)
    return image


HELD_OUT_SEED = 2026


def held_out_prompts() -> list[tuple[str, TextScene]]:
    """The checker's prompts: each held-out word once, in a phrasing and readable colour
    pair drawn with a fixed seed, both colours always stated."""
    rng = random.Random(HELD_OUT_SEED)
    prompts = []
    for index, text in enumerate(HELD_OUT):
        fg, bg = rng.choice(READABLE_PAIRS)
        template = TEMPLATES_BOTH[index % len(TEMPLATES_BOTH)]
        prompts.append((_fill(template, text, fg, bg), TextScene(text, fg, bg)))
    return prompts
