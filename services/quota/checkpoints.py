"""Signed checkpoints of the quota log's head, kept outside Postgres.

The hash chains (`chain.py`, one per partition of the log) show an edit to one row, but
whoever can write the table can delete the newest rows, or rewrite a row and recompute
every later hash, and the chain still holds. So quota signs the heads — each partition's
(position, hash), and the time — with an ed25519 key that lives in the data folder, not in
the database, and publishes them to the KILN_AUDIT_CHECKPOINTS stream, which the quota
database role cannot reach. `kiln audit verify` then checks the table against every
checkpoint it can read:
  - a checkpointed position no longer in the table, or past the end of its partition:
    the newest events were removed;
  - a checkpointed position whose hash differs: an event at or before it was rewritten
    (after the last checkpoint that still matches).
A checkpoint from before the log had partitions names one head, (position, hash): it is
read as partition 0's, which is what that log became.

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


class Head(msgspec.Struct, frozen=True):
    """A partition's last event: every event of the partition up to `position` hashes to `hash`."""

    partition: int
    position: int
    hash: str


class Checkpoint(msgspec.Struct, kw_only=True):
    """The log's heads at one moment, signed. `position` and `hash`: the newest event's
    (the message id is the position); `heads`: every partition's."""

    position: int
    hash: str
    at: datetime
    heads: list[Head] = []
    key: str = ""  # the signer's public key, hex
    signature: str = ""  # ed25519 over `signed_bytes`, hex

    def signed_bytes(self) -> bytes:
        document: dict = {"position": self.position, "hash": self.hash, "at": chain.canonical_time(self.at)}
        if self.heads:  # (a checkpoint of an unpartitioned log signed exactly the three)
            document["heads"] = [msgspec.to_builtins(head) for head in self.heads]
        return msgspec.json.encode(document, order="sorted")

    def covered(self) -> list[Head]:
        return self.heads or [Head(0, self.position, self.hash)]

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


def sign(key: nacl.signing.SigningKey, heads: list[Head], at: datetime) -> Checkpoint:
    newest = max(heads, key=lambda head: head.position)
    checkpoint = Checkpoint(
        position=newest.position,
        hash=newest.hash,
        at=at.astimezone(UTC),
        heads=sorted(heads, key=lambda head: head.partition),
        key=key.verify_key.encode().hex(),
    )
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
    last_positions: dict[int, int],
    partition: int | None = None,
) -> CheckpointReport:
    """Compare the table — `hashes`: position → hash of each checkpointed position found in
    it, `last_positions`: partition → its last event's position — with the checkpoints,
    oldest first. `partition`: compare that partition's heads only."""
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
        heads = [head for head in checkpoint.covered() if partition is None or head.partition == partition]
        problems = [_head_problem(head, checkpoint.when, hashes, last_positions, since) for head in heads]
        problems = [problem for problem in problems if problem]
        report.broken += problems
        if not problems:
            matching = checkpoint
            report.matched += 1
    return report


def _head_problem(
    head: Head, when: str, hashes: dict[int, str], last_positions: dict[int, int], since: str
) -> str | None:
    last = last_positions.get(head.partition)
    found = hashes.get(head.position)
    where = f"partition {head.partition}"
    if last is None or head.position > last:
        if not last_positions:
            ends = "the log is empty"
        elif last is None:
            ends = f"{where} is empty"
        else:
            ends = f"{where} ends at position {last}"
        return f"{ends} but the checkpoint signed at {when} covers position {head.position}: the newest events were removed"
    if found is None:
        return (
            f"position {head.position}, checkpointed at {when}, is missing from {where}: events were removed ({since})"
        )
    if found != head.hash:
        return (
            f"position {head.position}: its hash {found[:12]}… differs from the checkpoint signed at {when}"
            f" ({head.hash[:12]}…): history was rewritten {since}, up to position {head.position}"
        )
    return None


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


async def heads(conn: asyncpg.Connection) -> list[Head]:
    """Each partition's last event (none for a partition without events), in one snapshot."""
    rows = await conn.fetch(
        "SELECT partition, position, hash FROM quota_chain_head WHERE position IS NOT NULL ORDER BY partition"
    )
    return [Head(row["partition"], row["position"], row["hash"]) for row in rows]


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
    """Look at the heads; if they are due, sign them and `publish` it (an async callable)."""
    async with pool.acquire() as conn:
        found = await heads(conn)
    newest = max((head.position for head in found), default=None)
    if newest is None or not schedule.due(newest, time.monotonic() if now is None else now):
        return None
    checkpoint = sign(key, found, datetime.now(UTC))
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
