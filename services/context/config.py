"""context's rules, read from a TOML file (`context.toml` beside this module, or the file
KILN_CONTEXT_CONFIG names): limits, the blocklist and the style presets. A mistake in the
file stops the service at start with a message naming the key."""

from __future__ import annotations

import re
import tomllib
from functools import cached_property
from pathlib import Path

import msgspec


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_prompt_chars: int = 500
    max_composed_chars: int = 1000
    max_turns: int = 500


class Style(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    title: str
    fragment: str  # added to the subject: what the style looks like, in words
    negative: str = ""  # what the style must not look like
    guidance: float | None = None  # None: the default guidance


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, dict=True):
    limits: Limits = Limits()
    blocklist: list[str] = []
    styles: dict[str, Style] = {}

    @cached_property
    def blocked(self) -> re.Pattern[str] | None:
        """One pattern for the whole blocklist: each entry as whole words, any case."""
        if not self.blocklist:
            return None
        terms = "|".join(r"\s+".join(map(re.escape, term.split())) for term in self.blocklist)
        return re.compile(rf"\b(?:{terms})\b", re.IGNORECASE)


class ConfigError(Exception):
    pass


def load(path: Path) -> Config:
    try:
        config = msgspec.convert(tomllib.loads(path.read_text()), Config)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as error:
        raise ConfigError(f"{path}: {error}") from error
    for name in config.styles:
        if name == "none" or not re.fullmatch(r"[a-z0-9-]{1,32}", name):
            raise ConfigError(f"{path}: style name {name!r} must be 1-32 of a-z, 0-9 and -, and not 'none'")
    return config
