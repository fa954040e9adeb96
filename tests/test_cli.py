"""The CLI's answers when something is wrong before any request is made."""

import subprocess
import sys

from infra.embedded import free_port


def _kiln(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_unreachable_bus_is_one_line_and_exit_3():
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    result = _kiln("generate", "a red circle", "--user", "alice", env={"KILN_NATS_URL": url, "PATH": ""})
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        f"kiln: cannot reach NATS at {url} (nats: no servers available for connection); is Kiln up (`make run`)?"
    ]


def test_missing_arguments_are_a_usage_error():
    result = _kiln("generate", "a red circle")
    assert result.returncode == 64 and "--user" in result.stderr  # 2 is kept for "denied"
