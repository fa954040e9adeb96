"""Signed, expiring links. Pure: no I/O but the clock the caller passes.

A link names what it opens (`purpose`: a download or a share page), which image, and until
when; an HMAC-SHA256 over exactly that, with the server's secret, is its signature. Change
any part and the signature no longer matches (403); past its time it is gone (410).

A download link names the image by owner and request (it goes to the owner). A share link
names it by an opaque share id (image_records maps it to the image), so whoever is given the
link does not learn the owner's user id from it. Download links live at most a day.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import re
import secrets
from pathlib import Path
from typing import Literal
from urllib.parse import urlencode

Purpose = Literal["download", "share"]
SECRET_BYTES = 32
MAX_DOWNLOAD_TTL_S = 24 * 3600  # a download link goes to its owner, for now: a day at most
EXPIRY = re.compile(r"[0-9]{1,12}")  # seconds since 1970; ASCII digits only


class LinkError(Exception):
    status = 403


class Tampered(LinkError):
    status = 403


class Expired(LinkError):
    status = 410


def expiry(now: float, ttl_s: int) -> int:
    """When a link made `now` stops working: whole seconds, rounded up, so that it works
    for at least `ttl_s` seconds."""
    return math.ceil(now) + ttl_s


def load_secret(configured: str | None, data_dir: Path) -> bytes:
    """KILN_LINK_SECRET if set (every delivery replica must share it; the settings check its
    length), else a secret made once and kept in the data folder, so links stay valid
    across restarts."""
    if configured:
        return configured.encode()
    path = data_dir / "delivery" / "link-secret"
    if not path.exists():
        # Written whole under another name, then linked into place: a reader never sees a
        # half-written key, and of two processes starting at once the first link wins.
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f"link-secret.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(SECRET_BYTES))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip().encode()


class Signer:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def signature(self, purpose: Purpose, subject: str, expires: int) -> str:
        message = f"{purpose}\n{subject}\n{expires}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def check(self, purpose: Purpose, subject: str, expires: str | None, signature: str | None, now: float) -> None:
        """Raise Tampered unless the signature is this server's for exactly these parts,
        then Expired if the time has passed (a forged expiry is caught as tampering)."""
        if not expires or not signature or not EXPIRY.fullmatch(expires):
            raise Tampered("the link is incomplete or altered")
        if not hmac.compare_digest(self.signature(purpose, subject, int(expires)), signature):
            raise Tampered("the link is not valid: it was altered or is not from this server")
        if int(expires) < now:
            raise Expired("the link has expired; ask its owner for a new one")

    def query(self, purpose: Purpose, subject: str, expires: int) -> str:
        return urlencode({"exp": expires, "sig": self.signature(purpose, subject, expires)})


def image_subject(user_id: str, request_id: str) -> str:
    return f"{user_id}/{request_id}"


class Links:
    """The URLs delivery hands out for an image."""

    def __init__(self, signer: Signer, public_url: str, download_ttl_s: int, share_ttl_s: int) -> None:
        self.signer = signer
        self.public_url = public_url
        # KILN_LINK_TTL_S may be set longer (it has no upper bound of its own); a download
        # link still lives a day at most.
        self.download_ttl_s = min(download_ttl_s, MAX_DOWNLOAD_TTL_S)
        self.share_ttl_s = share_ttl_s

    def download(self, user_id: str, request_id: str, now: float) -> str:
        expires = expiry(now, self.download_ttl_s)
        query = self.signer.query("download", image_subject(user_id, request_id), expires)
        return f"{self.public_url}/images/{user_id}/{request_id}.png?{query}"

    def share(self, share_id: str, now: float, ttl_s: int | None = None) -> str:
        """The share page's link for the share id `share_id` (see ImageRecords.share)."""
        expires = expiry(now, ttl_s if ttl_s is not None else self.share_ttl_s)
        return f"{self.public_url}/share/{share_id}?{self.signer.query('share', share_subject(share_id), expires)}"


def share_subject(share_id: str) -> str:
    return f"share/{share_id}"
