"""What delivery keeps about each image beside the PNG (a JetStream key-value bucket, so it
lives as long as the image and survives restarts): whose it is and what it shows."""

from __future__ import annotations

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


def _key(user_id: str, request_id: str) -> str:
    return f"{user_id}.{request_id}"  # both are ids (letters, digits, _ and -): a valid key
