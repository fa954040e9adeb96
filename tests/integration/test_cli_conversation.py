"""`kiln chat`, `kiln edit` and `kiln quota` as a user runs them, against the real stack."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from infra.platform import Platform
from shared.settings import PROJECT_ROOT

pytestmark = pytest.mark.integration


async def _kiln(platform: Platform, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = os.environ | {"KILN_NATS_URL": platform.nats_url, "COLUMNS": "200"}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "kiln", *args],
        cwd=PROJECT_ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


async def test_chat_draws_then_edits_in_words_and_shows_the_quota(platform: Platform, user: str, tmp_path: Path):
    script = "/style pixel-art\na red circle on a white background\nmake it green\n/quota\n/quit\n"
    result = await _kiln(platform, "chat", "--user", user, "--save", str(tmp_path), stdin=script)
    assert result.returncode == 0, result.stderr
    drawn = re.findall(r"drawn as: (.*)", result.stderr)
    assert drawn == [
        "a red circle on a white background, pixel art, 8-bit, crisp edges",
        "a green circle on a white background, pixel art, 8-bit, crisp edges",
    ], result.stderr
    assert f"{user} (free plan): 2 of 3 images used today, 1 left" in result.stdout
    assert len(list(tmp_path.glob("*.png"))) == 2


async def test_edit_by_id_and_quota_from_the_command_line(platform: Platform, user: str, tmp_path: Path):
    first = await _kiln(platform, "generate", "a yellow square at the top", "--user", user)
    assert first.returncode == 0, first.stderr
    image_id = re.search(r"image (\w+) drawn as", first.stderr).group(1)
    out = tmp_path / "purple.png"
    edited = await _kiln(platform, "edit", image_id, "make it purple", "--user", user, "-o", str(out))
    assert edited.returncode == 0, edited.stderr
    assert "drawn as: a purple square at the top" in edited.stderr
    assert out.read_bytes().startswith(b"\x89PNG")

    missing = await _kiln(platform, "edit", "no-such-request", "make it blue", "--user", user)
    assert missing.returncode == 3 and f"{user} has no image from request no-such-request" in missing.stderr

    quota = await _kiln(platform, "quota", "--user", user)
    assert quota.returncode == 0 and "2 of 3 images used today, 1 left" in quota.stdout


async def test_chat_refuses_a_name_it_cannot_use_and_says_what_a_stopped_service_means(platform: Platform, user: str):
    bad = await _kiln(platform, "chat", "--user", "al ice", stdin="a red circle\n")
    assert bad.returncode == 64 and "--user must be 1-64 letters" in bad.stderr
    platform.stop_service("context")
    try:
        result = await _kiln(platform, "chat", "--user", user, stdin="/styles\n/quit\n")
    finally:
        platform.start_service("context")
        await platform.wait_ready()
    # The chat goes on after the failed question, and ends when asked to.
    assert result.returncode == 0 and "kiln: context is not running" in result.stderr
