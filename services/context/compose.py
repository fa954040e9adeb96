"""Compose the render job from a granted prompt and its conversation. Pure: no I/O, easy
to test. The application (`application.py`) reads the conversation and the edited image's
outcome, then calls these.

A turn is either a new picture or an edit of an earlier one:
  - an edit by id (`edit_of=<request>`) or of the conversation's latest image
    (`edit_of="last"`, or an instruction like "make it blue" in a conversation that has
    an image);
  - the edit's subject is the earlier subject with the instruction applied ("a red circle"
    + "make it blue" → "a blue circle"), so the prompt keeps describing the whole picture;
    an edit worded as a whole description ("a green circle") replaces the subject;
  - the conversation's style (the latest one picked) adds its fragment and parameters;
  - a model that declares its vocabulary (its card) is given only what it can draw: a new
    picture must name one of its subjects, an edit may use only words it knows. The style's
    fragment is context's own and is not checked;
  - a picture whose subject quotes text ('a sign that says "OPEN"') is drawn by the model's
    text model (`TextModel`), at its side, from the whole description: the composition keeps
    the text (`written`), and an edit can change it ('change the text to "CLOSED"').
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from services.context.config import Config
from shared import quoted
from shared.events import (
    LAST_IMAGE,
    MAX_SIDE,
    MAX_STEPS,
    Composition,
    PromptSubmitted,
    QuotaGranted,
    RenderRequested,
    TurnComposed,
)
from shared.model_card import ModelCard, Vocabulary, words_of
from shared.subjects import image_key

DEFAULT_GUIDANCE = 3.0
NO_STYLE = "none"

# Words a chat message may open with before saying what it wants.
_OPENING = r"^(?:please\s+|now\s+|and\s+|but\s+|ok(?:ay)?,?\s+)*"
# Colour words, to read an edit: any model's. What a model can draw is in its card.
COLOURS = frozenset(
    "red orange yellow green blue purple pink brown black white grey gray cyan magenta violet "
    "gold silver teal navy beige".split()
)
POSITIONS = ("left", "right", "top", "bottom", "center")  # also "centre", "middle"
_COLOUR = "|".join(sorted(COLOURS))
_POSITION_WORD = r"(left|right|top|bottom|cent(?:er|re)|middle)"
# Parts of a picture an edit can set, each replacing the subject's own: the object's colour
# ("blue", "in blue"), the background ("on a green background", "on green"), the position
# ("the left", "at the top").
_COLOUR_CHANGE = re.compile(rf"(?:in\s+)?({_COLOUR})", re.IGNORECASE)
_BACKGROUND = re.compile(rf"\bon\s+(?:an?\s+|the\s+)?({_COLOUR})(?:\s+background)?\b", re.IGNORECASE)
_POSITION = re.compile(rf"\b(?:(?:at|to|in)\s+)?(?:the\s+)?{_POSITION_WORD}\b", re.IGNORECASE)
# Words around a subject that do not change it: "a square", "the digit 7".
_ARTICLES = frozenset({"a", "an", "the", "digit", "number", "shape"})
# How people start an edit in a chat: "make it blue", "now add a border", "turn it green",
# or just the part to change: "on a green background", "to the left", "in blue".
_EDIT_START = re.compile(
    _OPENING + r"(?:(?:make|turn|change|add|remove|replace|put|give|recolou?r|paint|edit|redo|same|move)\b"
    rf"|on\s+(?:an?\s+|the\s+)?\w+\s+background\b|(?:at|to)\s+the\s+{_POSITION_WORD}\b|in\s+(?:{_COLOUR})\b)",
    re.IGNORECASE,
)
_MENTIONS_LAST = re.compile(r"\b(?:the last one|the last image|that one|this one|the same one)\b", re.IGNORECASE)
# Words that only say "edit it": dropped from the instruction before it joins the subject.
_EDIT_PREFIX = re.compile(
    _OPENING
    + r"(?:(?:make|turn|change|paint|recolou?r|move|put)\s+(?:it|them|this|that|the last one|the image|the picture)"
    r"(?:\s+(?:to|into))?\s+)?",
    re.IGNORECASE,
)


# An edit that rewrites the picture's text: "change the text to CLOSED", "make it say OPEN".
_TEXT_EDIT = re.compile(
    r"\b(?:(?:the\s+)?(?:text|word|words|writing|lettering|sign|label)\s+(?:to\s+(?:say|read)|to|into)|says?|reads?)"
    r"\s+(.+)$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TextModel:
    """The model that draws quoted text, from its card: the words it knows besides the
    text, the side it draws, the most characters it writes."""

    vocabulary: Vocabulary | None
    side: int
    max_chars: int
    steps: int | None = None  # the most it needs
    guidance: float | None = None

    @classmethod
    def of(cls, card: ModelCard | None) -> TextModel | None:
        if card is None or not card.sizes or not card.max_text_chars:
            return None
        return cls(card.vocabulary, max(card.sizes), card.max_text_chars, card.steps, card.guidance)


class Refusal(Exception):
    """The prompt cannot be drawn as asked: it ends as RequestFailed(stage="context")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def seed_for(request_id: str) -> int:
    """A seed derived from the request, so a redelivered grant yields the same job."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:4], "big")


# -- edits ------------------------------------------------------------------------------


def looks_like_edit(text: str) -> bool:
    """Whether a chat message asks to change the picture rather than draw a new one."""
    text = text.strip()
    return bool(_EDIT_START.match(text) or _MENTIONS_LAST.search(text))


def wants_latest_image(submission: PromptSubmitted, in_conversation: bool) -> bool:
    """An edit of the conversation's latest image: asked for by name, or by the wording."""
    if submission.edit_of == LAST_IMAGE:
        return True
    return submission.edit_of is None and in_conversation and looks_like_edit(submission.prompt)


def edit_change(instruction: str) -> str:
    """What an edit asks to change, without the words that only say "edit it":
    "now make it blue, please" → "blue"."""
    change = _MENTIONS_LAST.sub("", _EDIT_PREFIX.sub("", instruction.strip()))
    return re.sub(r"[\s,]*\bplease\b", "", change, flags=re.IGNORECASE).strip(" ,.!")


def text_change(change: str) -> str | None:
    """The text an edit asks the picture to show instead, as typed: 'say "OPEN"' and
    "the text to CLOSED" → OPEN, CLOSED; None when it asks for something else."""
    if (written := quoted.find(change)) is not None:
        return written
    found = _TEXT_EDIT.search(change)
    return found.group(1).strip(" .,!") if found else None


def apply_edit(subject: str, instruction: str, vocabulary: Vocabulary | None = None) -> str:
    """The subject with the instruction applied. New text replaces the quoted text ("a sign
    that says "OPEN"" + "change the text to CLOSED"). A colour, a background or a position
    replaces the subject's own, or joins it ("a red circle" + "make it blue" → "a blue
    circle"); a model's subject alone swaps the subject's ("make it a square"); a change
    naming a subject and more is a whole description. Anything else, without its "make it",
    is added ("a red circle" + "add a border" → "a red circle, with a border")."""
    change = edit_change(instruction)
    if not change:
        return subject
    if (written := text_change(change)) is not None:
        return quoted.replace(subject, written)
    if found := _COLOUR_CHANGE.fullmatch(change):
        return _recolour(subject, found[1].lower())
    if found := _BACKGROUND.fullmatch(change):
        return _replace(subject, _BACKGROUND, found[1].lower(), f"on a {found[1].lower()} background")
    if found := _POSITION.fullmatch(change):
        return _replace(subject, _POSITION, found[1].lower(), f"at the {found[1].lower()}")
    if vocabulary is not None and (named := vocabulary.subjects_in(change)):
        earlier = vocabulary.subjects_in(subject)
        if not earlier or [word for word in words_of(change) if word not in _ARTICLES] != named[:1]:
            return change
        return re.sub(rf"\b{re.escape(earlier[0])}\b", named[0], subject, count=1, flags=re.IGNORECASE)
    change = re.sub(r"^add\s+", "with ", change, flags=re.IGNORECASE)
    change = re.sub(r"^remove\s+", "without ", change, flags=re.IGNORECASE)
    return f"{subject}, {change}"


def _recolour(subject: str, colour: str) -> str:
    """The subject's object in `colour`: its first colour outside the background (and the
    quoted text: "RED" written is not the colour) changes."""
    background = _BACKGROUND.search(subject)
    skip = [span.span() for span in (background, quoted.QUOTED.search(subject)) if span is not None]
    for found in re.finditer(rf"\b(?:{_COLOUR})\b", subject, re.IGNORECASE):
        if not any(start <= found.start() < end for start, end in skip):
            return subject[: found.start()] + colour + subject[found.end() :]
    return f"{subject} in {colour}" if quoted.find(subject) is not None else f"{subject}, {colour}"


def _replace(subject: str, part: re.Pattern[str], word: str, added: str) -> str:
    """The subject with `part`'s word set to `word`; `added` joins it when it has none."""
    if (found := part.search(subject)) is None:
        return f"{subject} {added}"
    return subject[: found.start(1)] + word + subject[found.end(1) :]


def check_drawable(
    composition: Composition, vocabulary: Vocabulary | None, text_model: TextModel | None = None
) -> None:
    """Refuse what the model would draw as something else: an edit in words it does not
    know, a picture naming none of its subjects. Only the user's words are checked (the
    style's fragment is context's own). A model without a vocabulary draws anything. A
    picture with text is the text model's: its words, around text it can write."""
    if composition.written is not None and text_model is not None:
        if text_model.vocabulary is not None and (
            unknown := text_model.vocabulary.unknown_in(quoted.without(composition.subject))
        ):
            raise Refusal("not_drawable", f"the text model does not know {_quoted(unknown)}; it writes quoted text")
        return
    if vocabulary is None:
        return
    if composition.edit_of is not None and looks_like_edit(composition.text):
        if unknown := vocabulary.unknown_in(edit_change(composition.text)):
            said = f'the model cannot "{composition.text}": it does not know {_quoted(unknown)}'
            raise Refusal("cannot_edit", f"{said}; {_what_it_draws(vocabulary)}")
    if not vocabulary.subjects_in(composition.subject):
        said = f'"{composition.subject}" names nothing the model draws'
        if unknown := vocabulary.unknown_in(composition.subject):
            said = f"the model does not know {_quoted(unknown)}"
        raise Refusal("not_drawable", f"{said}; {_what_it_draws(vocabulary)}")


def _quoted(words: list[str]) -> str:
    return ", ".join(f'"{word}"' for word in words)


def _what_it_draws(vocabulary: Vocabulary) -> str:
    """'it draws circle, square, 0-9 in red, blue, on a background of those colours, at left/right'"""
    text = f"it draws {vocabulary.describe()}"
    if colours := [word for word in vocabulary.words if word in COLOURS]:
        text += f" in {', '.join(colours)}, on a background of those colours"
    if positions := [word for word in POSITIONS if word in vocabulary.words]:
        text += f", at {'/'.join(positions)}"
    return text


# -- styles -----------------------------------------------------------------------------


def style_in_force(submission: PromptSubmitted, turns: list[TurnComposed], config: Config) -> str:
    """The style this turn draws in: the one it picks, else the conversation's latest (if
    the operator has not removed it since)."""
    if submission.style is None:
        inherited = turns[-1].composition.style if turns else ""
        return inherited if inherited in config.styles else ""
    name = submission.style.strip().lower()
    if name in ("", NO_STYLE):
        return ""
    if name not in config.styles:
        known = ", ".join(config.styles) or "none configured"
        raise Refusal("unknown_style", f"there is no style {submission.style!r}; the styles are: {known}")
    return name


# -- the job ----------------------------------------------------------------------------


def check_submission(submission: PromptSubmitted, config: Config) -> None:
    """This deployment's limits and blocklist, on what the user sent."""
    limits = config.limits
    if len(submission.prompt) > limits.max_prompt_chars:
        raise Refusal(
            "prompt_too_long",
            f"the prompt has {len(submission.prompt)} characters; the limit is {limits.max_prompt_chars}",
        )
    # Quota denied anything past Kiln's size and steps before charging; checked again here,
    # against the same limits, for a grant that did not come from quota's rules.
    if max(submission.width, submission.height) > MAX_SIDE:
        raise Refusal(
            "too_large", f"{submission.width}x{submission.height} is larger than Kiln draws ({MAX_SIDE} pixels a side)"
        )
    if submission.steps > MAX_STEPS:
        raise Refusal("too_many_steps", f"{submission.steps} steps asked; the limit is {MAX_STEPS}")
    _check_words(submission.prompt, config)


def _check_words(text: str, config: Config) -> None:
    if config.blocked is not None and (found := config.blocked.search(text)):
        raise Refusal("blocked", f"the prompt contains {found.group(0)!r}, which this service does not draw")


def compose(
    grant: QuotaGranted,
    style: str,
    config: Config,
    source: tuple[str, Composition] | None = None,
    vocabulary: Vocabulary | None = None,
    text_model: TextModel | None = None,
) -> tuple[Composition, str]:
    """The turn's composition and the prompt to draw. `source` is the edited image's
    request id and composition; `vocabulary` what the model draws (None: anything);
    `text_model` the model that draws quoted text (None: quotes are words like others)."""
    text = grant.submission.prompt.strip()
    subject, edit_of = text, None
    if source is not None:
        # "make it blue" changes the earlier subject; a whole description replaces it.
        edit_of, earlier = source
        subject = apply_edit(earlier.subject, text, vocabulary) if looks_like_edit(text) else text
    composition = Composition(
        text=text,
        subject=subject,
        style=style,
        edit_of=edit_of,
        written=_written(subject, text_model),
        degraded=grant.degraded,  # told to the user with the image
    )
    check_drawable(composition, vocabulary, text_model)
    prompt = composition.subject
    if style:
        prompt = f"{prompt}, {config.styles[style].fragment}"
    if len(prompt) > config.limits.max_composed_chars:
        raise Refusal(
            "prompt_too_long",
            f"with its edits and style the prompt has {len(prompt)} characters; the limit is "
            f"{config.limits.max_composed_chars} (start a new conversation)",
        )
    _check_words(prompt, config)
    return composition, prompt


def _written(subject: str, text_model: TextModel | None) -> str | None:
    """The subject's quoted text as the text model writes it; None without one."""
    if text_model is None or (text := quoted.find(subject)) is None:
        return None
    try:
        return quoted.clean(text, text_model.max_chars)
    except ValueError as error:
        raise Refusal("bad_text", str(error)) from None


def render_request(
    grant: QuotaGranted, composition: Composition, prompt: str, config: Config, text_model: TextModel | None = None
) -> RenderRequested:
    submission = grant.submission
    preset = config.styles.get(composition.style)
    guidance = preset.guidance if preset and preset.guidance is not None else DEFAULT_GUIDANCE
    steps = grant.steps or submission.steps  # fewer when quota degraded it under pressure
    if composition.written is not None and text_model is not None:  # the text model's own recipe
        steps = min(steps, text_model.steps or steps)
        guidance = text_model.guidance or guidance
    return RenderRequested(
        request_id=grant.request_id,
        user_id=grant.user_id,
        conversation_id=grant.conversation_id,
        prompt=prompt,
        negative_prompt=preset.negative if preset else "",
        steps=steps,
        guidance=guidance,
        seed=submission.seed if submission.seed is not None else seed_for(grant.request_id),
        tier=grant.tier,
        plan=grant.plan,
        budget_s=grant.budget_s,
        composition=composition,
        **_drawn(grant, composition, text_model),
    )


def _drawn(grant: QuotaGranted, composition: Composition, text_model: TextModel | None) -> dict:
    """The size, and what the picture starts from. Text is drawn by the text model at its
    one side from the whole description (it has no image-to-image: an edit of a picture
    with text is drawn again). An edit starts from the user's own earlier image: the key is
    built from the granted user, so a prompt can never point at another user's image."""
    if composition.written is not None and text_model is not None:
        return {"width": text_model.side, "height": text_model.side, "text": composition.written}
    size = {"width": grant.submission.width, "height": grant.submission.height}
    if composition.edit_of is None:
        return size
    return size | {
        "mode": "inpaint" if grant.submission.mask_key else "edit",
        "source_key": image_key(grant.user_id, composition.edit_of),
        "mask_key": grant.submission.mask_key,
        "strength": grant.submission.strength,
    }
