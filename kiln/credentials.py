"""Which NATS credential a `kiln` command connects with.

With auth on (the default), a command connects as one identity:
- `KILN_NATS_CREDS` names a credential (a user's, from `kiln accounts add-user`): that user,
  and only that user, whatever `--user` says;
- else, on the operator's machine (Kiln's keys in the data folder), the command mints a
  short-lived credential for the user it acts for, or an operator's for `kiln status`.

`kiln login FILE` keeps a credential (from `kiln accounts add-user`, or the playground's
"CLI access") where every later command finds it; `kiln login --http URL --user NAME`
signs in to the playground with the password and fetches one the same way the page does.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import urlsplit

import httpx

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


def login_over_http(
    url: str, user: str, password: str, timeout_s: float = 30, client: httpx.Client | None = None
) -> str:
    """Sign in to the playground at `url`, fetch the user's own credential from it (as the
    page's "CLI access" does), keep it as `login` would, sign out; return whose it is.
    ValueError, said in one line, when the server refuses or cannot be reached. `client`:
    one to send with instead (the tests' in-process app)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--http wants the playground's address, like http://127.0.0.1:8480; got {url!r}")
    # Origin as a browser sends it: the playground refuses a POST from any other site.
    origin = {"Origin": f"{parts.scheme}://{parts.netloc}"}
    base = url.rstrip("/")
    with client or httpx.Client(timeout=timeout_s) as http:
        try:
            signed_in = http.post(f"{base}/api/login", json={"user": user, "password": password}, headers=origin)
            headers = origin | {"X-CSRF-Token": _answer(signed_in, "sign-in", "csrf")}
            answer = http.post(f"{base}/api/credentials", json={}, headers=headers)
            text = _answer(answer, "the credential", "credentials")
            http.post(f"{base}/api/logout", json={}, headers=headers)  # the session was for this alone
        except httpx.HTTPError as error:
            raise ValueError(f"cannot reach the playground at {url} ({error})") from None
    holder = _holder_in(text, f"the credential from {url}")
    write_private(login_file(), text.encode())
    return holder


def _answer(response: httpx.Response, what: str, field: str) -> str:
    """`field` of a playground's JSON answer; ValueError naming what was refused, and why."""
    try:
        answer = response.json()
        if response.is_success:
            return str(answer[field])
        said = answer["error"]
    except (ValueError, KeyError, TypeError):
        said = f"not the playground's answer: {response.text[:200]!r}"
    raise ValueError(f"{what} was refused ({response.status_code} from {response.url}): {said}")


def holder_of(credentials: Path) -> str:
    """The name a credential was made for (its JWT's `name`)."""
    try:
        text = credentials.read_text()
    except OSError as error:
        raise ValueError(f"{credentials} is not a NATS credential ({error})") from None
    return _holder_in(text, str(credentials))


def _holder_in(text: str, where: str) -> str:
    try:
        token = text.split("-----BEGIN NATS USER JWT-----")[1].split("------END")[0].strip()
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        return str(claims["name"])
    except (IndexError, KeyError, ValueError) as error:
        raise ValueError(f"{where} is not a NATS credential ({error})") from None
