"""What a connection may do on the bus, and the one check the bus makes before it acts.

A service's `Access` is the union of its declaration (`shared.service.Service`); the SDK's
is `kiln.client.CLIENT_ACCESS`. The bus refuses a publish, subscription or stream read
outside it (`Undeclared`), so a declaration that misses something fails in the tests, and
the same declaration can become the connection's NATS permissions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


def inbox_prefix(identity: str) -> str:
    """Each identity's replies come to its own inbox, which only it may subscribe to."""
    return f"_INBOX_{identity}"


def credential_options(credentials: Path | None, identity: str) -> dict[str, Any]:
    """nats-py's connect options for a credential made for `identity`: the credential, and
    replies to its own inbox (the only one it may read). None: no options."""
    if credentials is None:
        return {}
    return {"user_credentials": str(credentials), "inbox_prefix": inbox_prefix(identity)}


class Undeclared(Exception):
    """A service tried something on the bus its declaration does not list: a bug to fix in
    the declaration (or in the code), never something to retry."""


def matches(subject: str, pattern: str) -> bool:
    """Whether a subject falls under a NATS pattern (`*`: one token, `>`: the rest). A
    wildcard in `subject` matches only the same wildcard in `pattern`: a subscription to
    `kiln.outcome.*.*` is not inside `kiln.outcome.alice.*`."""
    parts, wanted = subject.split("."), pattern.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(parts) > index
        if index >= len(parts) or (token != "*" and token != parts[index]):
            return False
        if token == "*" and parts[index] == ">":
            return False
    return len(parts) == len(wanted)


@dataclass(frozen=True)
class Access:
    """Subject patterns (NATS wildcards) a connection may publish to and subscribe to, and
    the streams and buckets it may read or write directly."""

    publish: frozenset[str] = frozenset()
    subscribe: frozenset[str] = frozenset()
    streams: frozenset[str] = frozenset()
    buckets: frozenset[str] = frozenset()

    def check_publish(self, subject: str) -> None:
        if not any(matches(subject, pattern) for pattern in self.publish):
            raise Undeclared(f"publishing to {subject} is not declared (declared: {sorted(self.publish)})")

    def check_subscribe(self, subject: str) -> None:
        if not any(matches(subject, pattern) for pattern in self.subscribe):
            raise Undeclared(f"subscribing to {subject} is not declared (declared: {sorted(self.subscribe)})")

    def check_stream(self, stream: str) -> None:
        if stream not in self.streams:
            raise Undeclared(f"reading stream {stream} is not declared (declared: {sorted(self.streams)})")

    def check_bucket(self, bucket: str) -> None:
        if bucket not in self.buckets:
            raise Undeclared(f"using bucket {bucket} is not declared (declared: {sorted(self.buckets)})")

    def __or__(self, other: Access) -> Access:
        return Access(
            self.publish | other.publish,
            self.subscribe | other.subscribe,
            self.streams | other.streams,
            self.buckets | other.buckets,
        )
