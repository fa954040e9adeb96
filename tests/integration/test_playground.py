"""The playground in a real browser: Debian's Chromium, headless, driven by Playwright.

Generates an image and watches the progress bar move, edits it in words, downloads it, and
opens its share link in a second browser context that is not signed in. A screenshot of
the playground is kept in test-artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from infra.platform import Platform
from shared.settings import PROJECT_ROOT, Settings

pytestmark = pytest.mark.integration
CHROMIUM = str(Settings.from_env().chromium)
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
PNG = b"\x89PNG\r\n\x1a\n"

# Records every value the progress bar takes, from the page's side.
WATCH_PROGRESS = """
window.progressSeen = [];
new MutationObserver(() => window.progressSeen.push(document.querySelector('#progress').value))
  .observe(document.querySelector('#progress'), { attributes: true, attributeFilter: ['value'] });
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package (apt-get)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def _draw(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#send")


def test_generate_watch_progress_edit_download_and_share(
    browser: Browser, platform: Platform, user: str, tmp_path: Path
):
    base = platform.http_url
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(90_000)
    page.goto(base)
    page.fill("#user", user)
    page.click("#sign-in")
    expect(page.locator("#quota")).to_have_text("3 of 3 images left today (free)")

    # Draw: the progress bar moves through the steps, then the image shows.
    page.evaluate(WATCH_PROGRESS)
    page.select_option("#style", "watercolor")
    page.fill("#steps", "50")
    _draw(page, "a red circle on a white background")
    first = page.locator(".turn").nth(0)
    expect(first.locator("img")).to_be_visible()
    expect(page.locator("#quota")).to_have_text("2 of 3 images left today (free)")
    seen = page.evaluate("window.progressSeen")
    between = sorted({value for value in seen if 0 < value < 1})
    assert len(between) >= 2, seen  # it moved, not just jumped to the end
    assert seen[-1] == 1
    assert first.locator("img").evaluate("img => img.complete && img.naturalWidth") == 32
    expect(first.locator(".drawn")).to_contain_text("a red circle on a white background, watercolor painting")

    # Edit it in words.
    first.locator("button.edit").click()
    expect(page.locator("#editing")).to_be_visible()
    _draw(page, "make it blue")
    second = page.locator(".turn").nth(1)
    expect(second.locator("img")).to_be_visible()
    expect(second.locator(".drawn")).to_contain_text("a blue circle on a white background, watercolor painting")
    expect(page.locator("#quota")).to_have_text("1 of 3 images left today (free)")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "playground.png", full_page=True)

    # Download it.
    with page.expect_download() as download:
        second.locator("a.download").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.read_bytes().startswith(PNG) and saved.name.startswith("kiln-")

    # Share it, and open the link signed out.
    second.locator("button.share").click()
    share_url = second.locator(".share-url").inner_text()
    assert share_url.startswith(f"{base}/share/{user}/")
    stranger = browser.new_context()
    shared = stranger.new_page()
    shared.goto(share_url)
    expect(shared.locator("#shared-prompt")).to_contain_text("a blue circle on a white background")
    assert shared.locator("#shared-image").evaluate("img => img.complete && img.naturalWidth") == 32
    # Signed out, the playground asks for a name; the stranger sees nothing else of the user's.
    shared.goto(base)
    expect(shared.locator("#sign-in-form")).to_be_visible()
    stranger.close()

    # The conversation survives a reload.
    page.reload()
    expect(page.locator(".turn img")).to_have_count(2)

    # The last free image of the day, then a denial with its reason and when to come back.
    page.fill("#steps", "10")
    _draw(page, "a green square")
    expect(page.locator(".turn img")).to_have_count(3)
    expect(page.locator("#quota")).to_have_text("0 of 3 images left today (free)")
    _draw(page, "a yellow triangle")
    expect(page.locator("#notice")).to_contain_text("denied: daily_limit")
    expect(page.locator("#notice")).to_contain_text("Try again after")
    context.close()
