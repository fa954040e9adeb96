"""One identity across the playground and the CLI, on the real platform with NATS
authentication on: a playground account's own NATS credential (POST /api/credentials, or
`kiln login --http`) generates an image as that user, and is refused by the NATS server
itself when it tries to act for anyone else.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import httpx
import nats
import pytest

from infra.nats_auth import write_private
from infra.platform import Platform
from kiln.client import KilnClient
from shared import subjects
from shared.access import credential_options
from shared.events import ImageDelivered, PromptSubmitted, encode
from shared.settings import Settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Settings.from_env().nats_auth, reason="KILN_NATS_AUTH=off: no credential to give"),
]
PASSWORD = "correct horse battery"


async def _credential_from_playground(platform: Platform, name: str) -> str:
    """Sign up over HTTP as a browser would (Origin, then the session's CSRF token) and
    fetch the account's credential."""
    async with httpx.AsyncClient(base_url=platform.http_url, headers={"Origin": platform.http_url}) as http:
        signed_up = await http.post("/api/signup", json={"user": name, "password": PASSWORD})
        assert signed_up.status_code == 201, signed_up.text
        answer = await http.post("/api/credentials", json={}, headers={"X-CSRF-Token": signed_up.json()["csrf"]})
        assert answer.status_code == 200, answer.text
        return answer.json()["credentials"]


async def test_a_playground_credential_generates_as_its_user_and_no_one_else(
    platform: Platform, tmp_path: Path, user: str
):
    name = f"dora{uuid.uuid4().hex[:8]}"
    creds = write_private(tmp_path / "kiln.creds", (await _credential_from_playground(platform, name)).encode())

    # 1. As its own user: submitted, drawn, delivered.
    async with await KilnClient.connect(platform.nats_url, creds, name) as own:
        delivered = await own.generate("a red circle", user_id=name)
        assert isinstance(delivered, ImageDelivered) and delivered.user_id == name

    # 2. For another user: the server refuses the publish (a permissions violation).
    violations: list[str] = []

    async def on_error(error: Exception) -> None:
        violations.append(str(error).lower())

    nc = await nats.connect(platform.nats_url, **credential_options(creds, name), error_cb=on_error)
    try:
        prompt = PromptSubmitted(request_id=uuid.uuid4().hex, user_id=user, prompt="on your quota")
        await nc.publish(subjects.prompt_submitted(user), encode(prompt))
        await nc.flush()
        for _ in range(40):
            if violations:
                break
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    assert any(f'publish to "{subjects.prompt_submitted(user)}"'.lower() in v for v in violations), violations


async def test_kiln_login_over_http_then_generate_as_that_user_only(platform: Platform, tmp_path: Path):
    name = f"eve{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=platform.http_url, headers={"Origin": platform.http_url}) as http:
        assert (await http.post("/api/signup", json={"user": name, "password": PASSWORD})).status_code == 201
    env = {**os.environ, "HOME": str(tmp_path), "KILN_DATA_DIR": str(tmp_path / "no-keys-here")}
    env |= {"KILN_NATS_URL": platform.nats_url or "", "KILN_PASSWORD": PASSWORD}

    async def kiln(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kiln.cli", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        out, _ = await process.communicate()
        return process.returncode or 0, out.decode()

    code, said = await kiln("login", "--http", platform.http_url, "--user", name)
    assert code == 0 and f"logged in as {name}" in said, said
    assert oct((tmp_path / ".config" / "kiln" / "credentials.creds").stat().st_mode & 0o777) == "0o600"
    code, said = await kiln("generate", "a red circle", "--user", name, "-o", str(tmp_path / "out.png"))
    assert code == 0, said
    assert f"link: {platform.http_url}/images/{name}/" in said, said  # signed for it now, by delivery
    code, said = await kiln("generate", "a red circle", "--user", "someone-else")
    assert code == 64 and f"is {name}'s, not someone-else's" in said, said
    env["KILN_PASSWORD"] = "wrong password"
    code, said = await kiln("login", "--http", platform.http_url, "--user", name)
    assert code == 64 and "sign-in was refused (401" in said, said
