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
  - the conversation's style (the latest one picked) adds its fragment and parameters.
"""

from __future__ import annotations

import hashlib
import re

from services.context.config import Config
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
from shared.subjects import image_key

DEFAULT_GUIDANCE = 3.0
NO_STYLE = "none"

# Words a chat message may open with before saying what it wants.
_OPENING = r"^(?:please\s+|now\s+|and\s+|but\s+|ok(?:ay)?,?\s+)*"
# How people start an edit in a chat: "make it blue", "now add a border", "turn it green".
_EDIT_START = re.compile(
    _OPENING + r"(?:make|turn|change|add|remove|replace|put|give|recolou?r|paint|edit|redo|same)\b", re.IGNORECASE
)
_MENTIONS_LAST = re.compile(r"\b(?:the last one|the last image|that one|this one|the same one)\b", re.IGNORECASE)
# Words that only say "edit it": dropped from the instruction before it joins the subject.
_EDIT_PREFIX = re.compile(
    _OPENING + r"(?:(?:make|turn|change|paint|recolou?r)\s+(?:it|them|this|that|the last one|the image|the picture)"
    r"(?:\s+(?:to|into))?\s+)?",
    re.IGNORECASE,
)
COLOURS = frozenset(
    "red orange yellow green blue purple pink brown black white grey gray cyan magenta violet "
    "gold silver teal navy beige".split()
)


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


def apply_edit(subject: str, instruction: str) -> str:
    """The subject with the instruction applied. A new colour replaces the subject's
    colour ("a red circle" + "make it blue" → "a blue circle"); otherwise the instruction,
    without its "make it", is added ("a red circle" + "add a border" → "a red circle, with
    a border")."""
    change = _MENTIONS_LAST.sub("", _EDIT_PREFIX.sub("", instruction.strip()))
    change = re.sub(r"[\s,]*\bplease\b", "", change, flags=re.IGNORECASE).strip(" ,.!")
    if not change:
        return subject
    words = subject.split()
    if change.lower() in COLOURS:
        for i, word in enumerate(words):
            if word.lower() in COLOURS:
                return " ".join(words[:i] + [change.lower()] + words[i + 1 :])
    change = re.sub(r"^add\s+", "with ", change, flags=re.IGNORECASE)
    change = re.sub(r"^remove\s+", "without ", change, flags=re.IGNORECASE)
    return f"{subject}, {change}"


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
    grant: QuotaGranted, style: str, config: Config, source: tuple[str, Composition] | None = None
) -> tuple[Composition, str]:
    """The turn's composition and the prompt to draw. `source` is the edited image's
    request id and composition."""
    text = grant.submission.prompt.strip()
    if source is None:
        composition = Composition(text=text, subject=text, style=style)
    else:
        # "make it blue" changes the earlier subject; a whole description replaces it.
        source_id, earlier = source
        subject = apply_edit(earlier.subject, text) if looks_like_edit(text) else text
        composition = Composition(text=text, subject=subject, style=style, edit_of=source_id)
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


def render_request(grant: QuotaGranted, composition: Composition, prompt: str, config: Config) -> RenderRequested:
    submission = grant.submission
    preset = config.styles.get(composition.style)
    guidance = preset.guidance if preset and preset.guidance is not None else DEFAULT_GUIDANCE
    return RenderRequested(
        request_id=grant.request_id,
        user_id=grant.user_id,
        conversation_id=grant.conversation_id,
        prompt=prompt,
        negative_prompt=preset.negative if preset else "",
        width=submission.width,
        height=submission.height,
        steps=submission.steps,
        guidance=guidance,
        seed=submission.seed if submission.seed is not None else seed_for(grant.request_id),
        tier=grant.tier,
        plan=grant.plan,
        composition=composition,
        **_edit(grant, composition),
    )


def _edit(grant: QuotaGranted, composition: Composition) -> dict:
    """An edit starts from the user's own earlier image: the key is built from the granted
    user, so a prompt can never point at another user's image."""
    if composition.edit_of is None:
        return {}
    return {
        "mode": "inpaint" if grant.submission.mask_key else "edit",
        "source_key": image_key(grant.user_id, composition.edit_of),
        "mask_key": grant.submission.mask_key,
        "strength": grant.submission.strength,
    }
