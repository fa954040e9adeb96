"""The CLI's answers when something is wrong before any request is made, and the image it
writes."""

import io
import subprocess
import sys

from PIL import Image

from infra.embedded import free_port
from kiln.cli import _side, viewable
from shared import model_card
from shared.events import DEFAULT_SIZE
from shared.settings import DEFAULT_MODEL, Settings


def _kiln(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_unreachable_bus_is_one_line_and_exit_3():
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"KILN_NATS_URL": url, "KILN_NATS_AUTH": "off", "PATH": ""}
    result = _kiln("generate", "a red circle", "--user", "alice", env=env)
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        f"kiln: cannot reach NATS at {url} (nats: no servers available for connection); is Kiln up (`make run`)?"
    ]


def test_without_a_credential_the_cli_says_where_to_get_one(tmp_path):
    url = f"nats://127.0.0.1:{free_port()}"
    env = {"KILN_NATS_URL": url, "KILN_DATA_DIR": str(tmp_path), "PATH": ""}  # no keys there
    result = _kiln("generate", "a red circle", "--user", "alice", env=env)
    assert result.returncode == 64
    assert result.stderr.strip().startswith("kiln: NATS wants a credential: set KILN_NATS_CREDS")


def test_missing_arguments_are_a_usage_error():
    result = _kiln("generate", "a red circle")
    assert result.returncode == 64 and "--user" in result.stderr  # 2 is kept for "denied"


def _png(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 8 % 256, y * 8 % 256, (x + y) % 2 * 255) for y in range(height) for x in range(width)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_a_small_image_is_scaled_up_by_a_whole_factor_each_pixel_a_square():
    small = Image.open(io.BytesIO(_png(32, 24)))

    scaled = Image.open(io.BytesIO(viewable(_png(32, 24))))

    assert scaled.size == (256, 192)  # 8 times: the longer side reaches 256
    for x, y in [(0, 0), (7, 7), (8, 0), (255, 191), (100, 50)]:
        assert scaled.getpixel((x, y)) == small.getpixel((x // 8, y // 8))


def test_an_odd_size_is_scaled_past_256_and_a_large_image_is_left_as_it_is():
    assert Image.open(io.BytesIO(viewable(_png(40, 40)))).size == (280, 280)  # 7 times
    large = _png(256, 64)
    assert viewable(large) == large


def test_a_prompt_quoting_text_defaults_to_the_text_models_size():
    settings = Settings(model_path=DEFAULT_MODEL)
    side = max(model_card.text_card(DEFAULT_MODEL).sizes)
    assert _side(None, 'a sign that says "OPEN"', settings) == side != DEFAULT_SIZE
    assert _side(None, "a red circle", settings) == DEFAULT_SIZE
    assert _side(64, 'a sign that says "OPEN"', settings) == 64  # --size wins
