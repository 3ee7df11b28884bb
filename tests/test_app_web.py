"""The web page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright, no browser download):
type a query, see an image grid with scores; upload an image, see predictions and similar images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_app_index import build_index
from test_app_support import API_KEY, ROOT, live_server, shape_image

from model import CLIPInference

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def live(browser, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    index = build_index(tmp_path_factory.mktemp("web") / "idx", CLIPInference.load(tiny_checkpoint))
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with live_server({}, ["--checkpoint", str(tiny_checkpoint), "--index", str(index)], log) as server:
        yield server
    shutil.rmtree(index, ignore_errors=True)


def test_search_shows_an_image_grid_with_scores(browser, live) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(live.url + "/")
    page.wait_for_selector("#model-info:has-text('mini-32')")
    assert "12 images indexed" in page.inner_text("#model-info")
    page.fill("#q", "a red circle")
    page.fill("#k", "6")
    page.click("#search-form button[type=submit]")
    page.wait_for_selector("#results .result >> nth=5")
    cards = page.locator("#results .result")
    assert cards.count() == 6
    scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    page.wait_for_function(
        "Array.from(document.querySelectorAll('#results img')).every(img => img.complete && img.naturalWidth > 0)"
    )
    assert "6 results" in page.inner_text("#search-status")
    page.click(".filters summary")
    page.fill("#caption-contains", "square")
    page.fill("#min-width", "40")
    page.click("#search-form button[type=submit]")
    page.wait_for_selector("#search-status:has-text('4 results')")
    assert page.locator("#results .result").count() == 4
    assert all("square" in text for text in page.locator("#results .result").all_inner_texts())
    page.fill("#caption-contains", "")
    page.fill("#min-width", "")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web-search.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000
    assert not errors, errors
    page.close()


def test_upload_classifies_and_shows_similar_images(browser, live, tmp_path: Path) -> None:
    image = tmp_path / "query.png"
    image.write_bytes(shape_image("triangle", "green", size=64))
    page = browser.new_page(viewport={"width": 1100, "height": 1100})
    page.goto(live.url + "/")
    page.set_input_files("#image", str(image))
    page.fill("#labels", "circle, square, triangle")
    page.click("#classify-form button[type=submit]")
    page.wait_for_selector("#predictions li >> nth=2")
    assert page.locator("#predictions li").count() == 3
    page.wait_for_selector("#similar .result")
    assert page.locator("#similar .result").count() >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-classify.png"), full_page=True)
    page.fill("#q", "bad\u0000query")  # the service's error message is shown, not a blank grid
    page.click("#search-form button[type=submit]")
    page.wait_for_selector("#search-status.error")
    assert "NUL" in page.inner_text("#search-status")
    page.close()


def test_page_sends_the_typed_key_when_reads_are_protected(browser, tiny_checkpoint: Path,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """With CLIPFORGE_PROTECT_READS the page still loads; searching works once the user types a key."""
    index = build_index(tmp_path_factory.mktemp("web-key") / "idx", CLIPInference.load(tiny_checkpoint))
    env = {"CLIPFORGE_API_KEYS": API_KEY, "CLIPFORGE_PROTECT_READS": "true"}
    log = tmp_path_factory.mktemp("logs") / "serve-key.log"
    with live_server(env, ["--checkpoint", str(tiny_checkpoint), "--index", str(index)], log) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server.url + "/")
        page.wait_for_selector("#model-info:has-text('unavailable')")  # /info needs the key
        page.fill("#api-key", API_KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#model-info:has-text('mini-32')")
        page.fill("#q", "a blue square")
        page.fill("#k", "3")
        page.click("#search-form button[type=submit]")
        page.wait_for_selector("#results .result >> nth=2")
        page.wait_for_function(  # thumbnails fetched with the key, shown from blobs
            "Array.from(document.querySelectorAll('#results img')).every(img => img.complete && img.naturalWidth > 0)"
        )
        page.close()
