"""The two steps a deployment runs before its services (the container image's `keys` and
`setup`; infra/deploy/README.md):

    python -m infra.deploy_steps keys    the operator, account and system keys, each service's
                                         and the admin's NATS credential, the trace user-ref
                                         key and quota's checkpoint key, made in
                                         $KILN_DATA_DIR (kept if there), and nats-server's auth
                                         include, written to $KILN_NATS_AUTH_CONF
                                         (default $KILN_DATA_DIR/nats/auth.conf)
    python -m infra.deploy_steps setup   once per deployment and after each upgrade: the
                                         quota migrations as the database's owner
                                         (KILN_DATABASE_URL), the password of the `kiln_quota`
                                         role they make (KILN_QUOTA_DB_PASSWORD, if set), and
                                         Kiln's streams, declared as the admin
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path

import asyncpg

from infra.nats_auth import (
    ADMIN,
    ADMIN_PERMISSIONS,
    Authority,
    credentials_file,
    declarations,
    service_permissions,
    write_private,
)
from infra.platform import Platform
from services.quota import migrate
from services.quota.checkpoints import signing_key
from shared.settings import QUOTA_ROLE, Settings
from shared.telemetry import USER_REF_KEY_FILE


def keys(settings: Settings) -> str:
    data = settings.data_dir
    authority = Authority.open(data)
    for name, access in declarations().items():
        authority.write_credentials(credentials_file(data, name), name, service_permissions(name, access))
    authority.write_credentials(credentials_file(data, ADMIN), ADMIN, ADMIN_PERMISSIONS)
    if not (data / USER_REF_KEY_FILE).exists():
        write_private(data / USER_REF_KEY_FILE, secrets.token_bytes(32))
    signing_key(data)
    conf = Path(os.environ.get("KILN_NATS_AUTH_CONF") or data / "nats" / "auth.conf")
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(authority.server_config())
    return f"kiln keys: in {data}; nats-server auth include: {conf}"


async def setup(settings: Settings) -> str:
    password = os.environ.get("KILN_QUOTA_DB_PASSWORD")
    if password:
        connection = await asyncpg.connect(settings.database_address)
        try:
            quoted = await connection.fetchval("SELECT quote_literal($1)", password)
            await connection.execute(f"ALTER ROLE {QUOTA_ROLE} PASSWORD {quoted}")
        finally:
            await connection.close()
    await Platform.from_settings(settings).declare()
    return "kiln setup: migrations at head, streams declared"


def main() -> None:
    step = sys.argv[1] if len(sys.argv) > 1 else ""
    settings = Settings.from_env()
    if step == "keys":
        print(keys(settings))
    elif step == "setup":
        migrate.upgrade(settings.database_url)
        print(asyncio.run(setup(settings)))
    else:
        sys.exit("usage: python -m infra.deploy_steps keys|setup")


if __name__ == "__main__":
    main()
