"""Who may do what on the bus: NATS's own decentralized JWT auth, signed with nkeys.

Kiln is its own NATS operator. Its keys live in `<data>/nats/auth/` (the folder 0700, each
seed 0600): the operator, the `KILN` account that holds every stream, and the system
account NATS requires. The embedded server trusts the operator and holds the two account
JWTs in memory (`resolver: MEMORY`, preloaded), so a credential is made offline: a user JWT,
signed by the account key, that carries its publish and subscribe permissions. The server
checks the signature at connect and the permissions on every message; nothing is allowed
that a permission does not name.

Why JWTs and not auth callout: they work on every NATS Kiln supports (2.9 too; callout
needs 2.10), nothing sits on the connect path (a callout service that is down refuses every
connection), and a user's credential is minted where the account key is, without telling
the server. The cost: revoking one before it expires means pushing a new account JWT.

A service's permissions are generated from its declaration (`shared.service.Service`, via
`Access`): its subjects, the JetStream API of the streams and buckets it reads, and its own
inbox. A user's are that user's alone (`user_permissions`).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from shared import subjects
from shared.access import Access, inbox_prefix
from shared.settings import SERVICES
from shared.subjects import Bucket

ACCOUNT = "KILN"
CREDS_TEMPLATE = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""
UNLIMITED = -1
SERVICE_MODULES = SERVICES
# The launcher's own identity: it declares the streams and buckets and waits for the
# services; the tests and benchmarks use it to play any part. Never a service's.
ADMIN = "admin"
ADMIN_ACCESS = Access(
    publish=frozenset({">"}),
    subscribe=frozenset({">"}),
    streams=frozenset(stream.name for stream in subjects.ALL_STREAMS),
    buckets=frozenset(bucket.name for bucket in subjects.ALL_BUCKETS),
)
NO_AUTH_WARNING = (
    "WARNING: NATS authentication is OFF (KILN_NATS_AUTH=off). Anyone who can reach the NATS "
    "server can submit as any user, read every image and outcome, and forge results."
)


def declarations() -> dict[str, Access]:
    """Each service's access, from its declaration (imported now: it names its handlers)."""
    return {name: importlib.import_module(f"services.{name}.__main__").SERVICE.access() for name in SERVICE_MODULES}


# -- permissions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    respond: bool = False  # may answer requests (reply to whoever asked, once)

    def claims(self) -> dict[str, Any]:
        claims: dict[str, Any] = {"pub": {"allow": list(self.publish)}, "sub": {"allow": list(self.subscribe)}}
        if self.respond:
            claims["resp"] = {"max": 1, "ttl": 0}
        return claims


ADMIN_PERMISSIONS = Permissions(publish=(">",), subscribe=(">",), respond=True)


def service_permissions(name: str, access: Access) -> Permissions:
    """What a service's declaration allows, on the wire: its subjects, the JetStream API of
    its streams and buckets, its inbox."""
    publish = [*sorted(access.publish)]
    for stream in sorted(access.streams):
        publish += _stream_api(stream)
    for bucket in subjects.ALL_BUCKETS:
        if bucket.name in access.buckets:
            publish += _bucket_api(bucket)
    subscribe = [*sorted(access.subscribe), f"{inbox_prefix(name)}.>"]
    return Permissions(tuple(publish), tuple(subscribe), respond=True)


def user_permissions(user_id: str) -> Permissions:
    """A user's own subjects only: submit and cancel its requests, ask its quota, its
    images' links and the public lists, hear its progress and outcomes, read its stored
    outcomes and quota's decisions (the trace a request runs in) by the subject-appended
    direct get, which names the subject, so a permission can scope it."""
    return Permissions(
        publish=(
            subjects.prompt_submitted(user_id),
            subjects.RENDER_CANCEL.subject(user_id, "*"),
            subjects.quota_status(user_id),
            subjects.QUOTA_PRESSURE.pattern,
            subjects.CONTEXT_STYLES.pattern,
            subjects.CONTEXT_TURNS.subject(user_id, "*"),
            subjects.DELIVERY_LINK.subject(user_id, "*"),
            f"$JS.API.DIRECT.GET.{subjects.OUTCOMES.name}.{subjects.OUTCOME.subject(user_id, '*')}",
            f"$JS.API.DIRECT.GET.{subjects.QUOTA.name}.{subjects.QUOTA_DECIDED.subject(user_id, '*')}",
        ),
        subscribe=(
            subjects.RENDER_PROGRESS.subject(user_id, "*"),
            subjects.OUTCOME.subject(user_id, "*"),
            f"{inbox_prefix(user_id)}.>",
        ),
    )


def _stream_api(stream_name: str) -> list[str]:
    """Reading a stream: its info, its messages, its consumers (create, fetch, ack, delete)."""
    stream = next(s for s in subjects.ALL_STREAMS if s.name == stream_name)
    api = [
        f"$JS.API.STREAM.INFO.{stream_name}",
        f"$JS.API.STREAM.MSG.GET.{stream_name}",
        f"$JS.API.DIRECT.GET.{stream_name}.>",
        f"$JS.API.CONSUMER.CREATE.{stream_name}",
        f"$JS.API.CONSUMER.CREATE.{stream_name}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream_name}.>",
        f"$JS.API.CONSUMER.INFO.{stream_name}.>",
        f"$JS.API.CONSUMER.DELETE.{stream_name}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream_name}.>",
        f"$JS.API.CONSUMER.LIST.{stream_name}",
        f"$JS.API.CONSUMER.NAMES.{stream_name}",
        f"$JS.ACK.{stream_name}.>",
    ]
    if stream is subjects.RENDER_JOBS:  # its reader empties subjects no job can be on
        api.append(f"$JS.API.STREAM.PURGE.{stream_name}")
    return api


def _bucket_api(bucket: Bucket) -> list[str]:
    stream = _bucket_stream(bucket)
    api = [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
    ]
    if bucket.kind == "keys":
        return [*api, f"$KV.{bucket.name}.>"]
    # An object store writes chunks and purges the old ones, and reads with a consumer.
    return [
        *api,
        f"$O.{bucket.name}.>",
        f"$JS.API.STREAM.PURGE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.FC.{stream}.>",
        "$JS.API.STREAM.NAMES",  # reading an object finds its stream by subject (names only)
    ]


def _bucket_stream(bucket: Bucket) -> str:
    return f"KV_{bucket.name}" if bucket.kind == "keys" else f"OBJ_{bucket.name}"


def permission_table(declared: dict[str, Access]) -> str:
    """The generated permissions, one block per identity: what `kiln accounts permissions` prints."""
    blocks = []
    for name, access in declared.items():
        allowed = service_permissions(name, access)
        blocks.append(_block(name, allowed))
    blocks.append(_block("user <id> (example: alice)", user_permissions("alice")))
    return "\n\n".join(blocks)


def permission_markdown(declared: dict[str, Access]) -> str:
    """The README's table: what each identity may do, in the declaration's own terms (each
    stream and bucket named here comes with the JetStream API to read it, nothing more)."""
    rows = ["| who | publishes | subscribes to | streams and buckets |", "|---|---|---|---|"]
    for name, access in declared.items():
        stores = sorted(access.streams) + sorted(access.buckets)
        rows.append(f"| {name} | {_codes(access.publish)} | {_codes(access.subscribe)} | {_codes(stores) or 'none'} |")
    user = user_permissions("<user>")
    published = [s for s in user.publish if not s.startswith("$JS")]
    rows.append(
        f"| a user | {_codes(published)} | {_codes(s for s in user.subscribe if not s.startswith('_INBOX'))} "
        f"| its own decisions and outcomes, by direct get |"
    )
    return "\n".join(rows)


def _codes(items: Iterable[str]) -> str:
    return ", ".join(f"`{item}`" for item in sorted(items))


def _block(title: str, allowed: Permissions) -> str:
    lines = [title, "  publish:"] + [f"    {s}" for s in allowed.publish]
    lines += ["  subscribe:"] + [f"    {s}" for s in allowed.subscribe]
    if allowed.respond:
        lines.append("  answers requests (one reply each)")
    return "\n".join(lines)


# -- keys, JWTs, credentials --------------------------------------------------------------


class Authority:
    """The operator's and the account's keys: what mints credentials."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.operator = _key(folder / "operator.nk", nkeys.PREFIX_BYTE_OPERATOR)
        self.account = _key(folder / "account.nk", nkeys.PREFIX_BYTE_ACCOUNT)
        self.system = _key(folder / "system.nk", nkeys.PREFIX_BYTE_ACCOUNT)

    @classmethod
    def open(cls, data_dir: Path) -> Authority:
        """The keys in `<data>/nats/auth`, made on first use."""
        folder = data_dir / "nats" / "auth"
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        return cls(folder)

    @staticmethod
    def exists(data_dir: Path) -> bool:
        return (data_dir / "nats" / "auth" / "account.nk").exists()

    def server_config(self) -> str:
        """The part of nats-server's config that makes it trust this operator."""
        operator_jwt = _jwt(
            self.operator, self.operator, "kiln-operator",
            {"type": "operator", "version": 2, "system_account": _public(self.system)},
        )  # fmt: skip
        kiln_jwt = _jwt(self.operator, self.account, ACCOUNT, {"type": "account", "version": 2, "limits": _LIMITS})
        system_jwt = _jwt(self.operator, self.system, "SYS", {"type": "account", "version": 2})
        return (
            f'operator: "{operator_jwt}"\n'
            f"system_account: {_public(self.system)}\n"
            "resolver: MEMORY\n"
            "max_control_line: 65536  # a credential's JWT travels in the CONNECT line\n"
            "resolver_preload: {\n"
            f'  {_public(self.account)}: "{kiln_jwt}"\n'
            f'  {_public(self.system)}: "{system_jwt}"\n'
            "}\n"
        )

    def credentials(self, name: str, allowed: Permissions, ttl_s: float | None = None) -> str:
        """A `.creds` file's text for a new user key with these permissions."""
        return mint_credentials(self.account, name, allowed, ttl_s)

    def write_credentials(self, path: Path, name: str, allowed: Permissions, ttl_s: float | None = None) -> Path:
        return write_private(path, self.credentials(name, allowed, ttl_s).encode())


_LIMITS = {
    "subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED, "imports": UNLIMITED, "exports": UNLIMITED,
    "wildcards": True, "conn": UNLIMITED, "leaf": UNLIMITED,
    # JetStream on for the account: unlimited memory and disk, streams and consumers.
    "mem_storage": UNLIMITED, "disk_storage": UNLIMITED, "streams": UNLIMITED, "consumer": UNLIMITED,
}  # fmt: skip


def mint_credentials(account: nkeys.KeyPair, name: str, allowed: Permissions, ttl_s: float | None = None) -> str:
    """A `.creds` file's text for a new user key with these permissions, signed by the
    account key alone (the operator's is not needed to make a user)."""
    user = nkeys.from_seed(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    claims = {"type": "user", "version": 2, "subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED}
    jwt = _jwt(account, user, name, claims | allowed.claims(), ttl_s)
    return CREDS_TEMPLATE.format(jwt=jwt, seed=user.seed.decode())


def account_key(data_dir: Path) -> nkeys.KeyPair | None:
    """The `KILN` account's key as kept in `<data>/nats/auth` (None if Kiln never made one):
    for a process that mints users' credentials and should not open the operator's key."""
    path = data_dir / "nats" / "auth" / "account.nk"
    return nkeys.from_seed(path.read_bytes().strip()) if path.exists() else None


def _key(path: Path, prefix: int) -> nkeys.KeyPair:
    """The key kept at `path`, made (and kept, 0600) the first time."""
    if not path.exists():
        write_private(path, nkeys.encode_seed(os.urandom(32), prefix))
    return nkeys.from_seed(path.read_bytes().strip())


def credentials_file(data_dir: Path, identity: str) -> Path:
    """Where a Kiln in `data_dir` keeps the credentials it mints (services', the admin's, the CLI's)."""
    return data_dir / "nats" / "creds" / f"{identity}.creds"


def user_credentials_file(data_dir: Path, user_id: str) -> Path:
    """Where `kiln accounts add-user` puts a user's credential by default."""
    return data_dir / "nats" / "users" / f"{user_id}.creds"


def write_private(path: Path, data: bytes) -> Path:
    """Write a secret (a key, a credential) readable by its owner only: 0600 before the
    first byte is written, also over an older file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(data)
    return path


def _public(key: nkeys.KeyPair) -> str:
    return key.public_key.decode()


def _jwt(
    issuer: nkeys.KeyPair, subject: nkeys.KeyPair, name: str, nats: dict[str, Any], ttl_s: float | None = None
) -> str:
    """A NATS JWT (v2): `nats` claims about `subject`, signed by `issuer`. Its id is the
    hash of the claims, as NATS's own tools make it."""
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": _public(issuer), "name": name, "sub": _public(subject)}
    if ttl_s is not None:
        claims["exp"] = int(time.time() + ttl_s)
    claims["nats"] = nats
    claims["jti"] = base64.b32encode(hashlib.new("sha512_256", _json(claims)).digest()).rstrip(b"=").decode()
    header = {"typ": "JWT", "alg": "ed25519-nkey"}
    signed = _b64(_json(header)) + "." + _b64(_json(claims))
    return signed + "." + _b64(issuer.sign(signed.encode()))


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
