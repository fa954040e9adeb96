"""What the model draws: its native sizes and the words it knows, from `kiln-model.toml`
in the model folder (KILN_MODEL). One source for every service: quota accepts only the
native sizes, context refuses a prompt the model cannot draw, the playground offers the
native sizes. Render loads the weights; the others read only this small file.

A model folder without the file (SD 1.5, SDXL…) draws anything described in words, at any
side from MIN_SIDE to MAX_SIDE in multiples of 8.

A card may name a second model for prompts that quote text (`text_model`, a folder beside
it): that model's own card gives the sizes text is drawn at, its words, and `max_text_chars`,
the most characters it writes (shared/quoted.py).
"""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path

import msgspec

from shared.events import MAX_SIDE, MIN_SIDE

CARD_FILE = "kiln-model.toml"

_WORD = re.compile(r"[a-z]+|\d", re.IGNORECASE)


class Vocabulary(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    subjects: list[str]  # what a new picture can be of
    words: list[str] = []  # what else a prompt may say (colours, positions, "on", "the"…)

    def subjects_in(self, text: str) -> list[str]:
        return [word for word in words_of(text) if word in self.subjects]

    def unknown_in(self, text: str) -> list[str]:
        """The words of `text` the model does not know, each once, in order."""
        known = {*self.subjects, *self.words}
        return list(dict.fromkeys(word for word in words_of(text) if word not in known))

    def describe(self) -> str:
        """What the model draws, for a refusal: 'circle, square, triangle, 0-9'."""
        digits = [s for s in self.subjects if s.isdigit()]
        names = [s for s in self.subjects if not s.isdigit()]
        return ", ".join(names + ([f"{digits[0]}-{digits[-1]}"] if len(digits) > 2 else digits))


class ModelCard(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    sizes: list[int] | None = None  # native square sides; None: any side Kiln allows
    vocabulary: Vocabulary | None = None  # None: anything described in words
    text_model: str | None = None  # the folder (relative to this one) of the model that draws quoted text
    max_text_chars: int = 0  # a text model's own card: the most characters it writes
    steps: int | None = None  # the most steps it needs to draw its best (None: as asked)
    guidance: float | None = None  # the guidance it draws best at (None: the style's or Kiln's default)

    def __post_init__(self) -> None:
        for side in self.sizes or ():
            if not (MIN_SIDE <= side <= MAX_SIDE) or side % 8:
                raise ValueError(f"size {side} must be a multiple of 8 between {MIN_SIDE} and {MAX_SIDE}")
        if self.sizes == []:
            raise ValueError("`sizes` is empty: name at least one size, or leave it out")

    def size_problem(self, width: int, height: int, what: str = "the model draws") -> str | None:
        """Why the model cannot draw a `width`×`height` picture; None if it can."""
        if self.sizes is None or (width == height and width in self.sizes):
            return None
        offered = ", ".join(f"{side}×{side}" for side in self.sizes)
        return f"{what} {offered} only, not {width}×{height}"

    def offered_sides(self) -> list[int]:
        """The sides a menu offers: the native ones, or a few common ones."""
        return self.sizes or [side for side in (64, 128, 256, 512) if MIN_SIDE <= side <= MAX_SIDE]


class CardError(Exception):
    pass


def words_of(text: str) -> list[str]:
    return [word.lower() for word in _WORD.findall(text)]


def text_model_path(model_path: Path) -> Path | None:
    """The folder of the model that draws the quoted text of `model_path`'s prompts (None:
    its prompts' quotes are words like any other)."""
    name = load(model_path).text_model
    return None if name is None else (model_path / name).resolve()


def text_card(model_path: Path) -> ModelCard | None:
    path = text_model_path(model_path)
    return None if path is None else load(path)


@cache
def load(model_path: Path) -> ModelCard:
    """The card in `model_path`, or the open card when the folder has none."""
    path = model_path / CARD_FILE
    if not path.exists():
        return ModelCard()
    try:
        return msgspec.convert(tomllib.loads(path.read_text()), ModelCard)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError, ValueError) as error:
        raise CardError(f"{path}: {error}") from error
