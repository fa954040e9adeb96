"""Text a prompt asks to see written: the words between its first pair of double quotes.

    'a sign that says "Open"'  -> found: 'Open', cleaned: 'OPEN'
    'change the text to "CLOSED"' (an edit) -> the picture's quoted text becomes 'CLOSED'

Kiln's own model draws such text with a second, glyph-conditioned model (the model card's
`text_model`): quota refuses text it cannot draw before charging, context keeps the text
in the composition, render paints it. One line of at most MAX_CHARS letters, digits and
spaces.
"""

from __future__ import annotations

import re

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
MAX_CHARS = 12

# Straight or typographic double quotes, as phones and word processors write them.
QUOTED = re.compile(r'["“”]([^"“”]*)["“”]')
_SPACES = re.compile(r"\s+")


def find(prompt: str) -> str | None:
    """The quoted text as written (None: the prompt quotes nothing)."""
    found = QUOTED.search(prompt)
    return found.group(1) if found else None


def clean(text: str, max_chars: int = MAX_CHARS) -> str:
    """`text` as the model draws it: upper case, single spaces, at most `max_chars`.
    ValueError says what is wrong, in words a user can act on."""
    cleaned = _SPACES.sub(" ", text).strip().upper()
    if not cleaned:
        raise ValueError("the quoted text is empty: put the words to draw between the quotes")
    if unknown := sorted({c for c in cleaned if c not in ALPHABET}):
        raise ValueError(
            f"the quoted text {text!r} has characters the model cannot draw: {''.join(unknown)!r}; "
            "use only letters A-Z, digits 0-9 and spaces"
        )
    if len(cleaned) > max_chars:
        raise ValueError(
            f"the quoted text {cleaned!r} has {len(cleaned)} characters; the model draws at most {max_chars}"
        )
    return cleaned


def replace(prompt: str, text: str) -> str:
    """`prompt` with its quoted text set to `text` (added at the end if it quotes none)."""
    if QUOTED.search(prompt) is None:
        return f'{prompt} that says "{text}"'
    return QUOTED.sub(lambda _: f'"{text}"', prompt, count=1)


def without(prompt: str) -> str:
    """`prompt` with its quoted text taken out: the words around it, which describe the
    picture ("a sign that says, in red")."""
    return " ".join(QUOTED.sub(" ", prompt, count=1).split())
