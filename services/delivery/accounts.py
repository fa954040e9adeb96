"""The playground's accounts and sessions, kept in JetStream key-value buckets (so they
survive a restart of delivery and every replica sees the same ones), and the sign-in limit.

- An account is a user id (shared.events.ID_PATTERN) and the argon2id hash of its password
  (argon2-cffi's RFC 9106 profile: memory-hard, salted, its parameters inside the hash).
- A session is a random cookie; the bucket keeps only its SHA-256, so whoever reads the
  bucket cannot sign in with what they read. Each session has its own CSRF token. Sign-out
  deletes the entry; the bucket's TTL ends the rest with their cookie.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import secrets
from collections import deque
from datetime import datetime

import argon2
import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from shared.events import ID_PATTERN, utcnow

MIN_PASSWORD = 8
MAX_PASSWORD = 256  # argon2 takes any length; a bound keeps a sign-in's cost bounded
SESSION_BYTES = 32

_hasher = argon2.PasswordHasher()  # argon2id, RFC 9106 low-memory profile (64 MiB, t=3)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the account does not exist, so that a wrong name costs as much
    time as a wrong password and the answer's timing does not say which names are taken."""
    return _hasher.hash(secrets.token_hex(16))


class AccountError(ValueError):
    """A sign-up the server refuses; the message says what to change."""

    status = 400


class NameTaken(AccountError):
    status = 409


class Account(msgspec.Struct, kw_only=True):
    user_id: str
    password_hash: str
    created_at: datetime = msgspec.field(default_factory=utcnow)


class Session(msgspec.Struct, kw_only=True):
    user_id: str
    csrf: str  # sent back by the page in X-CSRF-Token on every state-changing request
    created_at: datetime = msgspec.field(default_factory=utcnow)


def check_new_account(user_id: str, password: str) -> None:
    if not ID_PATTERN.match(user_id):
        raise AccountError(f"a user name is 1-64 letters, digits, _ or -; got {user_id!r}")
    if not (MIN_PASSWORD <= len(password) <= MAX_PASSWORD):
        raise AccountError(f"a password is {MIN_PASSWORD} to {MAX_PASSWORD} characters; got {len(password)}")


class Accounts:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def sign_up(self, user_id: str, password: str) -> None:
        """Make the account; NameTaken if it exists (the bucket's create is atomic, so of two
        sign-ups for one name only one succeeds)."""
        check_new_account(user_id, password)
        account = Account(user_id=user_id, password_hash=await asyncio.to_thread(_hasher.hash, password))
        try:
            await self.kv.create(user_id, msgspec.json.encode(account))
        except nats.js.errors.KeyWrongLastSequenceError as error:
            raise NameTaken(f"the name {user_id!r} is taken; sign in, or choose another") from error

    async def verify(self, user_id: str, password: str) -> bool:
        """Whether the password is this account's. Unknown names and over-long passwords
        cost a hash too, and answer False."""
        account = await self._get(user_id) if ID_PATTERN.match(user_id) else None
        stored = account.password_hash if account else await asyncio.to_thread(_dummy_hash)
        try:
            await asyncio.to_thread(_hasher.verify, stored, password[:MAX_PASSWORD])
        except argon2.exceptions.VerificationError:
            return False
        if account is None or len(password) > MAX_PASSWORD:
            return False
        if _hasher.check_needs_rehash(stored):  # hashed under older parameters
            account.password_hash = await asyncio.to_thread(_hasher.hash, password)
            await self.kv.put(user_id, msgspec.json.encode(account))
        return True

    async def _get(self, user_id: str) -> Account | None:
        try:
            entry = await self.kv.get(user_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value or b"", type=Account)


class Sessions:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def open(self, user_id: str) -> tuple[str, Session]:
        """A new session: its cookie value and what the server keeps."""
        cookie = secrets.token_urlsafe(SESSION_BYTES)
        session = Session(user_id=user_id, csrf=secrets.token_urlsafe(SESSION_BYTES))
        await self.kv.put(_session_key(cookie), msgspec.json.encode(session))
        return cookie, session

    async def get(self, cookie: str | None) -> Session | None:
        if not cookie or len(cookie) > 128:
            return None
        try:
            entry = await self.kv.get(_session_key(cookie))
        except nats.js.errors.KeyNotFoundError:  # never made, signed out, or expired
            return None
        return msgspec.json.decode(entry.value or b"", type=Session)

    async def close(self, cookie: str) -> None:
        await self.kv.delete(_session_key(cookie))


def _session_key(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


class AttemptLimit:
    """At most `attempts` counted attempts per `window_s` for one key (an account, an
    address); past it, the seconds until the oldest of them counts no more. Sign-in counts
    its failures here, sign-up every attempt (each costs an argon2 hash).

    Bounded in memory whoever drives it: a key keeps only its last `attempts` times, a key
    whose newest attempt is past the window is dropped, and at most `max_keys` keys are
    kept (past that the one idle longest is forgotten: a botnet spraying that many keys
    inside a window can reset one, no single address can). The keys are kept in the order
    of their newest attempt, so both drops take the oldest first, in O(1) each.

    Written here rather than taken from a library (`limits`): that is a dependency with
    storage backends for a few lines of counting in memory.

    In memory: each delivery replica counts its own attempts, so N replicas allow N times
    the limit. A bucket would share the count but cost a write per attempt on the path an
    attacker drives; at a few replicas the bound still holds within a small factor.
    """

    def __init__(self, attempts: int, window_s: float, max_keys: int = 100_000) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self.max_keys = max_keys
        self._seen: dict[str, deque[float]] = {}  # oldest newest-attempt first

    def __len__(self) -> int:
        return len(self._seen)

    def retry_after(self, key: str, now: float) -> int | None:
        """Seconds to wait before trying `key` again, or None if it may try now."""
        seen = self._seen.get(key)
        if seen is None:
            return None
        while seen and seen[0] <= now - self.window_s:
            seen.popleft()
        if not seen:
            del self._seen[key]
            return None
        if len(seen) < self.attempts:
            return None
        return max(1, math.ceil(seen[0] + self.window_s - now))

    def count(self, key: str, now: float) -> None:
        seen = self._seen.pop(key, None) or deque(maxlen=self.attempts)
        seen.append(now)
        self._forget_old(now)
        self._seen[key] = seen  # (re)inserted last: the newest attempt of all

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)

    def _forget_old(self, now: float) -> None:
        while self._seen:
            oldest = next(iter(self._seen))
            if self._seen[oldest][-1] > now - self.window_s and len(self._seen) < self.max_keys:
                return
            del self._seen[oldest]
