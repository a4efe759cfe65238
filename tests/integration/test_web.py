"""The web page in a real headless Chromium: upload, progress, search, thumbnails, more like this.

Needs the `playwright` Python package and Debian's Chromium (`apt-get install -y chromium`);
no browser is downloaded (`playwright install` is never run).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from services.stack import Stack
from tests.conftest import upload, wait_for_job
from tests.images import write_set

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
if not CHROMIUM.exists():
    pytest.skip(
        f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (pip install playwright)"
)

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
N_UPLOAD = 6
K = 4
FINAL = "[data-final=true]"
THUMBS_LOADED = """(n) => {
  const imgs = [...document.querySelectorAll('[data-testid=result-thumb]')];
  return imgs.length === n && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture
def problems() -> list[str]:
    """Script and console errors seen on the page; a test may drop the ones it expects."""
    return []


@pytest.fixture
def page(browser: Browser, stack: Stack, problems: list[str]) -> Iterator[Page]:
    """A fresh page on the gateway; fails the test on any script error or console error."""
    context = browser.new_context(
        base_url=stack.gateway_url, viewport={"width": 1280, "height": 900}
    )
    context.set_default_timeout(60_000)
    tab = context.new_page()
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def on_console(msg: Any) -> None:
        if msg.type == "error":
            problems.append(f"console error: {msg.text}")

    tab.on("console", on_console)
    tab.goto("/")
    yield tab
    context.close()
    assert not problems, problems


def thumbnails(page: Page) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = page.eval_on_selector_all(
        "[data-testid=result-thumb]",
        "imgs => imgs.map(i => ({src: i.getAttribute('src'), w: i.naturalWidth,"
        " h: i.naturalHeight}))",
    )
    return found


def test_upload_search_and_more_like_this(page: Page, tmp_path: Path) -> None:
    files = write_set(tmp_path / "upload", N_UPLOAD, start=7000)

    page.get_by_label("Describe the image").wait_for()
    page.get_by_test_id("file-input").set_input_files([str(f) for f in files])

    # The upload bar fills, then the job's own bar polls until a final state.
    job = page.locator(f"[data-testid=job-progress]{FINAL}")
    job.wait_for(timeout=180_000)
    assert job.get_attribute("data-state") == "succeeded", job.inner_text()
    assert page.get_by_test_id("upload-progress").evaluate("p => p.value") == 1
    assert f"{N_UPLOAD} of {N_UPLOAD} indexed" in job.get_by_test_id("job-counts").inner_text()
    job_id = job.get_attribute("data-job-id")
    # The job list shows it too, once its next refresh lands.
    page.locator(f"[data-testid=job-row][data-job-id='{job_id}'][data-state=succeeded]").wait_for()

    page.get_by_test_id("search-k").fill(str(K))
    page.get_by_test_id("search-input").fill("a red square")
    page.get_by_test_id("search-submit").click()
    page.locator("[data-testid=results][data-kind=text]").wait_for(state="attached")
    results = page.get_by_test_id("result")
    assert results.count() == K
    page.wait_for_function(THUMBS_LOADED, arg=K)
    for thumb in thumbnails(page):
        assert "/thumbnail?size=" in thumb["src"], thumb
        assert 0 < thumb["w"] <= 256 and 0 < thumb["h"] <= 256, thumb
    assert page.get_by_test_id("search-error").is_hidden()

    # The full image opens in the lightbox.
    results.nth(0).get_by_test_id("result-open").click()
    lightbox = page.get_by_test_id("lightbox")
    lightbox.wait_for()
    page.wait_for_function(
        "() => { const i = document.getElementById('lightbox-image');"
        " return i.complete && i.naturalWidth > 0; }"
    )
    assert "/thumbnail" not in (page.get_by_test_id("lightbox-image").get_attribute("src") or "")
    page.get_by_test_id("lightbox-close").click()
    lightbox.wait_for(state="hidden")

    # More like this: the image itself is the best match for its own bytes.
    chosen = results.nth(1)
    image_id = chosen.get_attribute("data-image-id")
    filename = chosen.get_attribute("data-filename")
    with page.expect_request(lambda r: "/v1/search/image" in r.url) as asked:
        chosen.get_by_test_id("more-like-this").click()
    assert asked.value.method == "POST" and f"k={K}" in asked.value.url
    assert "multipart/form-data" in (asked.value.headers.get("content-type") or "")
    page.locator("[data-testid=results][data-kind=image]").wait_for(state="attached")
    first = page.get_by_test_id("result").first
    assert first.get_attribute("data-image-id") == image_id
    assert first.get_by_test_id("result-filename").inner_text() == filename
    assert page.get_by_test_id("result").count() == K
    page.wait_for_function(THUMBS_LOADED, arg=K)

    shot = tmp_path / "web.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.exists() and shot.stat().st_size > 0


def test_per_item_errors_are_listed(page: Page, tmp_path: Path) -> None:
    good = write_set(tmp_path, 1, start=7200)[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a picture")
    page.get_by_test_id("file-input").set_input_files([str(good), str(broken)])

    job = page.locator(f"[data-testid=job-progress]{FINAL}")
    job.wait_for(timeout=180_000)
    assert job.get_attribute("data-state") == "completed_with_errors", job.inner_text()
    assert "broken.jpg" in (page.get_by_test_id("upload-rejected").text_content() or "")
    assert "broken.jpg" in (job.get_by_test_id("job-errors").text_content() or "")
    row = page.locator(f"[data-testid=job-row][data-job-id='{job.get_attribute('data-job-id')}']")
    errors = row.get_by_test_id("job-errors")
    errors.locator("summary").click()
    assert errors.evaluate("d => d.open") is True
    assert "broken.jpg" in errors.inner_text()


def test_api_key_is_kept_and_sent(page: Page, api: httpx.Client, tmp_path: Path) -> None:
    files = write_set(tmp_path / "api", 3, start=7100)
    body = upload(api, [(f.name, f.read_bytes()) for f in files]).raise_for_status().json()
    assert wait_for_job(api, body["job_id"])["state"] == "succeeded"

    page.get_by_test_id("api-key").fill("test-key")
    page.get_by_test_id("api-key").press("Enter")  # commits the field: a change event
    page.reload()
    assert page.get_by_test_id("api-key").input_value() == "test-key"

    with page.expect_request(lambda r: "/v1/search?" in r.url) as searched:
        page.get_by_test_id("search-k").fill("2")
        page.get_by_test_id("search-input").fill("anything")
        page.get_by_test_id("search-submit").click()
    assert searched.value.headers.get("authorization") == "Bearer test-key"
    # With a key, thumbnails are fetched with the header and shown from blob URLs.
    page.locator("[data-testid=results][data-kind=text]").wait_for(state="attached")
    page.wait_for_function(THUMBS_LOADED, arg=2)
    assert all(t["src"].startswith("blob:") for t in thumbnails(page))


def test_error_detail_is_shown(page: Page, problems: list[str]) -> None:
    page.route(
        "**/v1/search?*",
        lambda route: route.fulfill(
            status=503,
            content_type="application/json",
            body='{"code": "query_unavailable", "detail": "the query service is resting"}',
        ),
    )
    page.get_by_test_id("search-input").fill("anything")
    page.get_by_test_id("search-submit").click()
    error = page.get_by_test_id("search-error")
    error.wait_for()
    assert error.inner_text() == "the query service is resting"
    # The browser logs the failed request itself; that one is expected.
    problems[:] = [p for p in problems if "status of 503" not in p]
