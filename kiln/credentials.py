"""Which NATS credential a `kiln` command connects with.

With auth on (the default), a command connects as one identity:
- `KILN_NATS_CREDS` names a credential (a user's, from `kiln accounts add-user`): that user,
  and only that user, whatever `--user` says;
- else, on the operator's machine (Kiln's keys in the data folder), the command mints a
  short-lived credential for the user it acts for, or an operator's for `kiln status`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from infra.nats_auth import Authority, credentials_file, service_permissions, user_permissions, write_private
from kiln.client import CLIENT_ACCESS
from shared.events import ID_PATTERN
from shared.settings import Settings

MINTED_TTL_S = 3600
OPERATOR = "operator-cli"


def login_file() -> Path:
    """Where `kiln login` keeps the user's credential."""
    return Path.home() / ".config" / "kiln" / "credentials.creds"


def for_command(settings: Settings, user: str | None) -> tuple[Path | None, str]:
    """The credential to connect with, and the identity it was made for; ValueError (said
    in one line) when there is none."""
    given = settings.nats_creds or (login_file() if login_file().exists() else None)
    if given is not None:
        holder = holder_of(given)
        if user is not None and user != holder:
            raise ValueError(f"the credential in {given} is {holder}'s, not {user}'s")
        return given, holder
    if not settings.nats_auth:
        return None, "client"
    if not Authority.exists(settings.data_dir):
        raise ValueError(
            "NATS wants a credential: set KILN_NATS_CREDS to the file `kiln accounts add-user NAME` wrote "
            "(or KILN_DATA_DIR to the folder of a running Kiln)"
        )
    authority = Authority.open(settings.data_dir)
    if user is None or not ID_PATTERN.match(user):
        # `kiln status`; or a user id no subject can hold, which the command refuses itself.
        path = credentials_file(settings.data_dir, OPERATOR)
        return authority.write_credentials(
            path, OPERATOR, service_permissions(OPERATOR, CLIENT_ACCESS), MINTED_TTL_S
        ), OPERATOR
    path = credentials_file(settings.data_dir, f"cli-{user}")
    return authority.write_credentials(path, user, user_permissions(user), MINTED_TTL_S), user


def login(credentials: Path) -> str:
    """Keep a user's credential where every later command finds it; return whose it is."""
    holder = holder_of(credentials)
    write_private(login_file(), credentials.read_bytes())
    return holder


def holder_of(credentials: Path) -> str:
    """The name a credential was made for (its JWT's `name`)."""
    try:
        token = credentials.read_text().split("-----BEGIN NATS USER JWT-----")[1].split("------END")[0].strip()
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        return str(claims["name"])
    except (OSError, IndexError, KeyError, ValueError) as error:
        raise ValueError(f"{credentials} is not a NATS credential ({error})") from None
