"""Signed checkpoints of the quota log's head, kept outside Postgres.

The hash chain (`chain.py`) shows an edit to one row, but whoever can write the table can
delete the newest rows, or rewrite a row and recompute every later hash, and the chain
still holds. So quota signs the head — (position, hash, time) — with an ed25519 key that
lives in the data folder, not in the database, and publishes it to the
KILN_AUDIT_CHECKPOINTS stream, which the quota database role cannot reach. `kiln audit
verify` then checks the table against every checkpoint it can read:
  - a checkpointed position no longer in the table, or past the table's end: the newest
    events were removed;
  - a checkpointed position whose hash differs: an event at or before it was rewritten
    (after the last checkpoint that still matches).

When: every KILN_CHECKPOINT_EVERY events, and otherwise at most KILN_CHECKPOINT_AFTER_S
after an event (the task looks once a second). Several quota processes may sign the same head: the
message id is the position, so JetStream keeps one.

The key: PyNaCl's ed25519 (libsodium) rather than nkeys, whose seeds are NATS identities:
this key signs documents, not connections, and its public half is what an auditor keeps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import msgspec
import nacl.exceptions
import nacl.signing

from infra.nats_auth import write_private
from services.quota import chain
from shared import subjects
from shared.service import sleep_unless_stopped
from shared.settings import Settings

logger = logging.getLogger("kiln.quota.checkpoints")

POLL_S = 1.0
KEY_FILE = "audit/checkpoint.key"  # under the data folder, 0600
PUBLIC_KEY_FILE = "audit/checkpoint.pub"  # what `kiln audit verify` checks signatures with


SigningKey = nacl.signing.SigningKey
Publish = Callable[["Checkpoint"], Awaitable[None]]


class Checkpoint(msgspec.Struct, kw_only=True):
    """The log's head at one moment, signed: every event up to `position` hashes to `hash`."""

    position: int
    hash: str
    at: datetime
    key: str = ""  # the signer's public key, hex
    signature: str = ""  # ed25519 over `signed_bytes`, hex

    def signed_bytes(self) -> bytes:
        document = {"position": self.position, "hash": self.hash, "at": chain.canonical_time(self.at)}
        return msgspec.json.encode(document, order="sorted")

    @property
    def when(self) -> str:
        return chain.canonical_time(self.at)


# -- the key ----------------------------------------------------------------------------


def signing_key(data_dir: Path) -> nacl.signing.SigningKey:
    """Quota's checkpoint key, made (0600, with its public half beside it) the first time."""
    path = data_dir / KEY_FILE
    if not path.exists():
        key = nacl.signing.SigningKey.generate()
        write_private(path, key.encode().hex().encode())
        (data_dir / PUBLIC_KEY_FILE).write_text(key.verify_key.encode().hex() + "\n")
    return nacl.signing.SigningKey(bytes.fromhex(path.read_text().strip()))


def public_key_from(path: Path) -> nacl.signing.VerifyKey:
    """The key checkpoints must be signed with, kept as hex (OSError: quota never made one)."""
    try:
        return nacl.signing.VerifyKey(bytes.fromhex(path.read_text().strip()))
    except (ValueError, nacl.exceptions.ValueError) as error:
        raise ValueError(f"{path} does not hold an ed25519 public key in hex") from error


def sign(key: nacl.signing.SigningKey, position: int, head: str, at: datetime) -> Checkpoint:
    checkpoint = Checkpoint(position=position, hash=head, at=at.astimezone(UTC), key=key.verify_key.encode().hex())
    checkpoint.signature = key.sign(checkpoint.signed_bytes()).signature.hex()
    return checkpoint


def signed_by(checkpoint: Checkpoint, key: nacl.signing.VerifyKey) -> bool:
    try:
        key.verify(checkpoint.signed_bytes(), bytes.fromhex(checkpoint.signature))
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


def decode(data: bytes) -> Checkpoint:
    return msgspec.json.decode(data, type=Checkpoint)


def encode(checkpoint: Checkpoint) -> bytes:
    return msgspec.json.encode(checkpoint)


# -- checking the table against them -----------------------------------------------------


@dataclass
class CheckpointReport:
    checked: int = 0  # checkpoints signed by the key and compared
    matched: int = 0  # of those, the ones the table still agrees with
    unsigned: int = 0  # not signed by the key
    newest: Checkpoint | None = None  # the newest of them
    broken: list[str] = field(default_factory=list)


def check(
    checkpoints: Iterable[Checkpoint],
    key: nacl.signing.VerifyKey,
    hashes: dict[int, str],
    last_position: int | None,
) -> CheckpointReport:
    """Compare the table — `hashes`: position → hash of each checkpointed position found in it,
    `last_position`: its last event's — with the checkpoints, oldest first."""
    report = CheckpointReport()
    matching: Checkpoint | None = None  # the newest one that still matches
    for checkpoint in sorted(checkpoints, key=lambda c: c.position):
        if not signed_by(checkpoint, key):
            report.unsigned += 1
            report.broken.append(
                f"checkpoint at position {checkpoint.position} ({checkpoint.when}) is not signed by quota's"
                " checkpoint key: forged, or signed with another key"
            )
            continue
        report.checked += 1
        report.newest = checkpoint
        since = f"after position {matching.position}" if matching else "from the start of the log"
        found = hashes.get(checkpoint.position)
        if last_position is None or checkpoint.position > last_position:
            ends = f"ends at position {last_position}" if last_position is not None else "is empty"
            report.broken.append(
                f"the log {ends} but the checkpoint signed at {checkpoint.when} covers position"
                f" {checkpoint.position}: the newest events were removed"
            )
        elif found is None:
            report.broken.append(
                f"position {checkpoint.position}, checkpointed at {checkpoint.when}, is missing from the log:"
                f" events were removed ({since})"
            )
        elif found != checkpoint.hash:
            report.broken.append(
                f"position {checkpoint.position}: its hash {found[:12]}… differs from the checkpoint signed at"
                f" {checkpoint.when} ({checkpoint.hash[:12]}…): history was rewritten {since}, up to"
                f" position {checkpoint.position}"
            )
        else:
            matching = checkpoint
            report.matched += 1
    return report


def new_log_note(report: CheckpointReport, source: str) -> str | None:
    """When no checkpoint matches the log at all, what that may mean and what to do: the
    database was reset while `source` (the stream, or a file) kept the old log's
    checkpoints. Kiln cannot tell that from a rewrite of the whole history, so it still
    reports it as broken; the operator, who knows whether they reset it, can."""
    if not report.broken or report.matched:
        return None
    return (
        f"None of the {report.checked + report.unsigned} checkpoints in {source} matches this log. Either its whole history was"
        " rewritten, or this is a new log: the database was reset (or the data folder, with quota's key,"
        " replaced) while the old log's checkpoints were kept. If you reset it on purpose, start a new"
        " epoch: keep the old checkpoints (`kiln audit export --checkpoints old-epoch.jsonl`), purge the"
        f" stream as admin (`nats stream purge {subjects.AUDIT_CHECKPOINTS.name} --creds <data>/nats/creds/admin.creds`) and"
        " restart quota, which then signs the new log."
    )


def read_file(path: Path) -> list[Checkpoint]:
    """Checkpoints from `kiln audit export --checkpoints`: one JSON document a line."""
    with path.open("rb") as file:
        return [decode(line) for line in file if line.strip()]


# -- making them ------------------------------------------------------------------------


async def head(conn: asyncpg.Connection) -> tuple[int, str] | None:
    """The log's last event: its position and hash (None: the log is empty)."""
    row = await conn.fetchrow("SELECT position, hash FROM quota_events ORDER BY position DESC LIMIT 1")
    return (row["position"], row["hash"]) if row else None


@dataclass
class Schedule:
    """When the head is due a checkpoint: `every` events after the last one, or `after_s`
    after the first event it does not cover."""

    every: int = Settings.checkpoint_every  # the settings' defaults (KILN_CHECKPOINT_*)
    after_s: float = Settings.checkpoint_after_s
    signed: int = 0  # the position of the last checkpoint made
    uncovered_since: float | None = None  # monotonic time the head first moved past it

    def due(self, position: int, now: float, last_count: int | None = None) -> bool:
        if position <= self.signed:
            self.uncovered_since = None
            return False
        if self.uncovered_since is None:
            self.uncovered_since = now
        behind = position - self.signed  # positions, an upper bound on events (gaps are rollbacks)
        # The look after this one comes POLL_S later: sign now if that would be too late.
        return behind >= self.every or now - self.uncovered_since + POLL_S > self.after_s

    def made(self, position: int) -> None:
        self.signed, self.uncovered_since = position, None


async def checkpoint_once(
    pool: asyncpg.Pool, key: nacl.signing.SigningKey, schedule: Schedule, publish: Publish, now: float | None = None
) -> Checkpoint | None:
    """Look at the head; if it is due, sign it and `publish` it (an async callable)."""
    async with pool.acquire() as conn:
        found = await head(conn)
    if found is None or not schedule.due(found[0], time.monotonic() if now is None else now):
        return None
    checkpoint = sign(key, *found, datetime.now(UTC))
    await publish(checkpoint)
    schedule.made(checkpoint.position)
    return checkpoint


async def run(
    pool: asyncpg.Pool, key: nacl.signing.SigningKey, publish: Publish, stop: asyncio.Event, schedule: Schedule
) -> None:
    """Sign and publish checkpoints on `schedule` until `stop`."""
    while not stop.is_set():
        try:
            await checkpoint_once(pool, key, schedule, publish)
        except Exception as error:  # noqa: BLE001 — the database or bus is down: try again next round
            logger.warning("checkpoint round failed, will retry: %r", error)
        await sleep_unless_stopped(stop, POLL_S)
