"""The playground in a real browser: Debian's Chromium, headless, driven by Playwright.

Generates an image and watches the progress bar move (shown only while drawing), edits it
in words, downloads it, and opens its share link in a second browser context that is not
signed in; then a denial, said once, in words, in the browser's time zone. Accounts: sign-up,
a wrong password, sign-out (the old cookie is then refused) and sign-in again; a cross-site
POST refused. A screenshot of the playground is kept in test-artifacts/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from infra.platform import Platform
from shared.settings import PROJECT_ROOT, Settings

pytestmark = pytest.mark.integration
CHROMIUM = str(Settings.from_env().chromium)
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
PNG = b"\x89PNG\r\n\x1a\n"
BROWSER_ZONE = "America/New_York"  # not the test machine's: the page must use the browser's own
PASSWORD = "correct horse battery"

# Records every value the progress bar takes, and whether the bar was on screen then, from
# the page's side.
WATCH_PROGRESS = """
window.progressSeen = [];
new MutationObserver(() => window.progressSeen.push({
  value: document.querySelector('#progress').value,
  shown: document.querySelector('#working').checkVisibility(),
})).observe(document.querySelector('#progress'), { attributes: true, attributeFilter: ['value'] });
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package (apt-get)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def _sign_up(page: Page, user: str) -> None:
    page.fill("#user", user)
    page.fill("#password", PASSWORD)
    page.click("#sign-up")


def _draw(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#send")


def test_generate_watch_progress_edit_download_and_share(
    browser: Browser, platform: Platform, user: str, tmp_path: Path
):
    base = platform.http_url
    context = browser.new_context(accept_downloads=True, locale="en-US", timezone_id=BROWSER_ZONE)
    page = context.new_page()
    page.set_default_timeout(90_000)
    expect.set_options(timeout=90_000)  # expect() has its own 5 s default: too short for 50 steps on a busy CPU
    page.goto(base)
    _sign_up(page, user)
    expect(page.locator("#quota")).to_have_text("3 of 3 images left today (free)")
    # Only the model's native size is offered (its card), not 64, which it draws as blobs.
    expect(page.locator("#size option")).to_have_text(["32×32"])
    working = page.locator("#working")
    expect(working).to_be_hidden()  # nothing in flight, no bar

    # Draw: the progress bar shows and moves through the steps, then the image shows and
    # the bar goes.
    page.evaluate(WATCH_PROGRESS)
    page.select_option("#style", "watercolor")
    page.fill("#steps", "50")
    _draw(page, "a red circle on a white background")
    first = page.locator(".turn").nth(0)
    expect(first.locator("img")).to_be_visible()
    expect(page.locator("#quota")).to_have_text("2 of 3 images left today (free)")
    expect(working).to_be_hidden()
    seen = page.evaluate("window.progressSeen")
    between = [point for point in seen if 0 < point["value"] < 1]
    assert len({point["value"] for point in between}) >= 2, seen  # it moved, not just jumped to the end
    assert all(point["shown"] for point in between), seen  # on screen while drawing
    assert seen[-1]["value"] == 1
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
    assert share_url.startswith(f"{base}/share/") and user not in share_url  # an opaque id, not the owner
    stranger = browser.new_context()
    shared = stranger.new_page()
    shared.goto(share_url)
    expect(shared.locator("#shared-prompt")).to_contain_text("a blue circle on a white background")
    assert shared.locator("#shared-image").evaluate("img => img.complete && img.naturalWidth") == 32
    # Signed out, the playground asks for a name and password; the stranger sees nothing else of the user's.
    shared.goto(base)
    expect(shared.locator("#sign-in-form")).to_be_visible()
    stranger.close()

    # The conversation survives a reload.
    page.reload()
    expect(page.locator(".turn img")).to_have_count(2)

    # The last free image of the day, then a denial: said once, in words, with when to come
    # back on the browser's clock and naming its zone; no bar left waiting for quota.
    page.fill("#steps", "10")
    _draw(page, "a green square")
    expect(page.locator(".turn img")).to_have_count(3)
    expect(page.locator("#quota")).to_have_text("0 of 3 images left today (free)")
    _draw(page, "a yellow triangle")
    denial = page.locator(".turn.failed .reason")
    expect(denial).to_have_count(1)
    expect(working).to_be_hidden()
    assert _spaced(denial.inner_text()) == (
        "You have used all of today’s images: the free plan allows 3 images per UTC day and 3 were used today. "
        f"Try again after {_next_utc_midnight_in(BROWSER_ZONE)}."
    )
    page_text = page.locator("body").inner_text()
    assert page_text.count("3 images per UTC day") == 1, page_text
    assert "daily_limit" not in page_text
    context.close()


def test_sign_up_sign_out_sign_in_and_a_cross_site_post_refused(browser: Browser, platform: Platform, user: str):
    base = platform.http_url
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(base)
    _sign_up(page, user)
    expect(page.locator("#who")).to_have_text(user)
    (old_session,) = [cookie for cookie in context.cookies() if cookie["name"] == "kiln_session"]
    assert old_session["httpOnly"] and old_session["sameSite"] == "Lax"

    # A POST from another site's page, with the session's cookie riding along if it can, is
    # refused; so is one that carries the cookie but not the page's CSRF token.
    page.route("http://evil.test/", lambda route: route.fulfill(content_type="text/html", body=_CROSS_SITE_FORM % base))
    with page.expect_response(f"{base}/api/generate") as answer:
        page.goto("http://evil.test/")
    assert answer.value.status == 403, answer.value.text()
    no_token = context.request.post(f"{base}/api/generate", data={"prompt": "x"}, headers={"Origin": base})
    assert no_token.status == 403 and "X-CSRF-Token" in no_token.json()["error"]

    # Sign out: the server forgets the session, so the old cookie, sent again, is refused.
    page.goto(base)
    page.click("#sign-out")
    expect(page.locator("#sign-in-form")).to_be_visible()
    replayed = httpx.get(f"{base}/api/me", cookies={"kiln_session": old_session["value"]})
    assert replayed.status_code == 401

    # Sign-up again under the same name is refused; a wrong password is refused; the right one signs in.
    _sign_up(page, user)
    expect(page.locator("#sign-in-error")).to_contain_text("taken")
    page.fill("#password", "not the password")
    page.click("#sign-in")
    expect(page.locator("#sign-in-error")).to_have_text("wrong user name or password")
    page.fill("#password", PASSWORD)
    page.click("#sign-in")
    expect(page.locator("#who")).to_have_text(user)
    context.close()


# Another site's page that posts to the playground's API as soon as it loads (a form, so the
# browser sends it cross-site without asking the server first).
_CROSS_SITE_FORM = """<!doctype html><form method=post action="%s/api/generate" enctype="text/plain">
<input name='{"prompt": "spend their quota", "x": "' value='"}'></form>
<script>document.forms[0].submit()</script>"""


def _next_utc_midnight_in(zone: str) -> str:
    """When a free user's day resets, as an en-US browser in `zone` says it: "Thu, Nov 26,
    7:00 PM EST"."""
    midnight = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    local = midnight.astimezone(ZoneInfo(zone))
    return f"{local:%a, %b} {local.day}, {local.hour % 12 or 12}:{local:%M %p} {local.tzname()}"


def _spaced(text: str) -> str:
    """ICU puts a narrow no-break space before AM/PM in some versions: one plain space."""
    return re.sub(r"\s+", " ", text).strip()
