"""What delivery keeps about each image beside the PNG (a JetStream key-value bucket, so it
lives as long as the image and survives restarts): whose it is and what it shows; and the
share ids, each naming one image, that share links carry instead of its owner."""

from __future__ import annotations

import secrets
from datetime import datetime

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from shared.events import Composition, utcnow


class ImageRecord(msgspec.Struct, kw_only=True):
    user_id: str
    request_id: str
    conversation_id: str = ""
    prompt: str  # what was drawn
    composition: Composition | None = None
    width: int
    height: int
    created_at: datetime = msgspec.field(default_factory=utcnow)


class Shared(msgspec.Struct, kw_only=True):
    """What a share id names."""

    user_id: str
    request_id: str
    created_at: datetime = msgspec.field(default_factory=utcnow)


SHARE_ID_BYTES = 16  # 128 random bits: not guessed, and it says nothing of the image or its owner


class ImageRecords:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def put(self, record: ImageRecord) -> None:
        await self.kv.put(_key(record.user_id, record.request_id), msgspec.json.encode(record))

    async def get(self, user_id: str, request_id: str) -> ImageRecord | None:
        try:
            entry = await self.kv.get(_key(user_id, request_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value or b"", type=ImageRecord)

    async def share(self, user_id: str, request_id: str) -> str:
        """A new share id for the image (each share its own, so links given to different
        people are not one link)."""
        share_id = secrets.token_urlsafe(SHARE_ID_BYTES)
        await self.kv.put(_share_key(share_id), msgspec.json.encode(Shared(user_id=user_id, request_id=request_id)))
        return share_id

    async def shared(self, share_id: str) -> Shared | None:
        try:
            entry = await self.kv.get(_share_key(share_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value or b"", type=Shared)


def _share_key(share_id: str) -> str:
    # "/" is in no id (shared.events.ID_PATTERN), so a share's key is never an image's.
    return f"share/{share_id}"


def _key(user_id: str, request_id: str) -> str:
    return f"{user_id}.{request_id}"  # both are ids (letters, digits, _ and -): a valid key
